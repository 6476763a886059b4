"""Natural training: cross-entropy on clean images (soft targets under mixup)."""

from __future__ import annotations

import torch

from natgrad.losses import per_sample_ce
from natgrad.objectives.base import Objective


class Natural(Objective):
    def __call__(self, x: torch.Tensor, y: torch.Tensor, epoch_fraction: float = 0.0) -> dict:
        logits = self.loss_model(x)
        ce = per_sample_ce(logits, y).mean()
        return {"loss": ce, "logits": logits, "ce": ce.item()}
