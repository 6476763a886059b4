"""The model and the test images an evaluation runs on."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from torch.utils.data import Dataset

from natgrad import config as config_mod
from natgrad import data, models
from natgrad.build import LoadedModel, build_model, load_trained
from natgrad.config import RunConfig
from natgrad.digest import model_digest
from natgrad.errors import UserError
from natgrad.rundir import RunDir

# The dataset and eps a timm checkpoint is evaluated with when no --recipe is given: ImageNet at 4/255.
TIMM_RECIPE = "imagenet-swinb-natural"


def is_timm_name(source: str | Path) -> bool:
    """Whether ``source`` names a timm model (``resnet50``, ``resnet50.a1_in1k``) rather than a path."""
    text = str(source)
    return os.sep not in text and not Path(text).exists() and timm.is_model(text.split(".")[0])


def load_model(source: str | Path, recipe: str | None = None, model_name: str | None = None,
               device: torch.device | str = "cpu", ema: bool = True, overrides: Sequence[str] = ()) -> LoadedModel:
    """A run folder (its EMA weights when it has them), a safetensors file with ``recipe``, or a timm model
    name with ``model.pretrained`` (true: timm's weights; a checkpoint path) among ``overrides``."""
    path = Path(source)
    if path.is_dir():
        if overrides:
            raise UserError(f"{path} is a run folder, evaluated with its own config: drop the key=value overrides "
                            f"({overrides[0]}, ...)")
        return RunDir(path).load_model(ema, device, model_name)
    if path.is_file():
        if recipe is None:
            raise UserError(f"{source} is a weights file: also give --recipe (the recipe it was trained with)")
        cfg = config_mod.load(recipe, [*overrides, *([f"model.name={model_name}"] if model_name else [])])
        return load_trained(cfg, path, path.stem, device)
    if is_timm_name(source):
        return load_timm(str(source), recipe, overrides, device)
    raise UserError(f"{source} does not exist; give a run folder, a .safetensors file (with --recipe) or a timm "
                    "model name (with model.pretrained=true or PATH)")


def load_timm(name: str, recipe: str | None, overrides: Sequence[str], device: torch.device | str) -> LoadedModel:
    """timm's model ``name`` with the pretrained weights ``model.pretrained`` names, on ``recipe``'s data (default
    :data:`TIMM_RECIPE`), in eval mode; refused where the data's classes would give it a new classifier."""
    cfg = config_mod.load(recipe or TIMM_RECIPE, [*overrides, f"model.name={name}", "init=null"])
    pretrained = cfg.model.pretrained
    if not pretrained:
        raise UserError(f"{name} is a timm model name: give model.pretrained=true (timm's weights) or "
                        "model.pretrained=PATH; a model with random weights has nothing to evaluate")
    models.check_pretrained(name, pretrained)
    model = build_model(cfg, pretrained=True, keep_head=True)
    weights = Path(pretrained) if isinstance(pretrained, str) else Path(f"timm-hub:{models.pretrained_tag(name)}")
    return LoadedModel(cfg, model.to(device).eval(), weights, name, model_digest(model))


def eval_dataset(cfg: RunConfig, n: int | None) -> Dataset:
    """The recipe's test set, or a fixed seeded subset of ``n`` images (the one training evaluates on)."""
    full = data.build(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, limit_eval=None)), "test")
    if n is not None:
        if n < 1 or n > len(full):  # type: ignore[arg-type]
            raise UserError(f"--n {n} is outside 1..{len(full)}, the size of the {cfg.data.name} test set")  # type: ignore[arg-type]
        return data.fixed_subset(full, n, seed=4321)
    return full
