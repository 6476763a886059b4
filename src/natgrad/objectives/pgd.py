"""PGD-k adversarial training (Madry et al. 2018), as in the paper's Appendix G: k=3, step 2*eps/k."""

from __future__ import annotations

import torch
from torch import nn

from natgrad.attacks import pgd
from natgrad.losses import per_sample_ce
from natgrad.objectives.base import Objective, linear_warmup


class PGDTraining(Objective):
    """Cross-entropy on PGD-k examples; the attack runs in eval mode and its step warms up linearly."""

    def __init__(self, model: nn.Module, eps: float, steps: int = 3, step_size: float | None = None,
                 random_start: bool = False, warmup_epochs: float = 0.0):
        super().__init__(model)
        self.eps, self.steps, self.random_start, self.warmup_epochs = eps, steps, random_start, warmup_epochs
        self.step_size = 2 * eps / steps if step_size is None else step_size

    def __call__(self, x: torch.Tensor, y: torch.Tensor, epoch_fraction: float = 0.0) -> dict:
        step = self.step_size * linear_warmup(epoch_fraction, self.warmup_epochs)
        x_adv = pgd(self.model, x, y, self.eps, self.steps, step_size=step, random_start=self.random_start)
        logits = self.model(x_adv)
        ce = per_sample_ce(logits, y).mean()
        return {"loss": ce, "logits": logits, "ce": ce.item(), "attack_step": step}
