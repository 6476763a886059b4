"""Exact accuracy counts over the torchrun processes, and the result row they make."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from natgrad.attacks import finite_logits
from natgrad.engine.distributed import Context, merge_counts, shard_batches
from natgrad.evaluation.settings import EvalSettings

Perturb = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def accuracy_counts(model: nn.Module, ds: Dataset, ctx: Context, s: EvalSettings, desc: str,
                    perturb: Perturb | None) -> tuple[int, int]:
    """(images, correct) over all processes; ``perturb(x, y)`` makes the attacked batch."""
    counts = torch.zeros(2, dtype=torch.float64)
    for x, y in shard_batches(ds, s.batch_size, ctx, s.seed, desc, s.progress):
        x_adv = x if perturb is None else perturb(x, y)
        with torch.no_grad():
            counts[1] += (finite_logits(model(x_adv), f"the images of {desc}").argmax(1) == y).sum().item()
        counts[0] += len(y)
    counts = merge_counts(counts, ctx)
    return int(counts[0]), int(counts[1])


def row(attack: str, eps: float, n: int, correct: int, **extra: Any) -> dict:
    """One result row: ``{"attack", "eps", "n", "robust_acc", ...}``."""
    return {"attack": attack, "eps": eps, "n": n, "robust_acc": correct / max(n, 1), **extra}
