"""What every evaluation reports about the model itself: its mode and whether its forward pass is deterministic."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from natgrad.attacks import finite_logits
from natgrad.engine.distributed import Context, shard_batches
from natgrad.evaluation.settings import EvalSettings


def deterministic(model: nn.Module, ds: Dataset, ctx: Context, s: EvalSettings) -> bool:
    """Whether two forward passes of the first batch, in the model's current mode, give the same logits."""
    x = next(shard_batches(ds, s.batch_size, Context(0, 1, ctx.device), s.seed, "determinism", False))[0]
    with torch.no_grad():
        return bool(torch.equal(finite_logits(model(x), "the first clean batch"), model(x)))


def integrity(model: nn.Module, ds: Dataset, ctx: Context, s: EvalSettings, was_training: bool) -> dict:
    """Whether the model came in train mode (it is evaluated in eval mode), modules that stay in train mode
    after ``eval()``, and whether two identical forward passes of the first batch agree (randomness masks
    gradients and flatters attacks)."""
    in_train = [name or type(m).__name__ for name, m in model.named_modules() if m.training]
    same = deterministic(model, ds, ctx, s)
    warnings = []
    if was_training:
        warnings.append("the model was in train mode; it was evaluated in eval mode")
    if in_train:
        warnings.append(f"modules stay in train mode after eval(): {', '.join(in_train[:5])}")
    if not same:
        warnings.append("two identical forward passes differ: dropout or other randomness is on, which masks "
                        "gradients and makes attacks look weaker")
    return {"model_was_in_train_mode": was_training, "modules_in_train_mode": in_train,
            "deterministic": same, "warnings": warnings}
