"""Every objective of the paper trains a cnn-small on Fashion-MNIST from its recipe."""

import math

import pytest
import torch

from natgrad import config, data, objectives
from natgrad.build import build_model, objective_params, seed_everything

RECIPES = ["fmnist-fgsm", "fmnist-edge", "fmnist-gradnorm-fd", "fmnist-gradnorm-noise"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_objective_trains_with_finite_decreasing_loss(recipe, fmnist):
    cfg = config.load(recipe, ["data.limit_train=1536", "batch_size=64"])
    seed_everything(0)
    model = build_model(cfg)
    objective = objectives.create(cfg.method, model, **objective_params(cfg))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    losses = []
    for x, y in data.train_loader(data.build(cfg, "train"), cfg, epoch=0, rank=0, world=1):
        out = objective(x, y, epoch_fraction=10.0)  # past every warmup: one fixed objective
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert len(losses) == 24 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, f"{recipe}: loss {first:.3f} -> {last:.3f}"
