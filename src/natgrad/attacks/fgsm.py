"""FGSM with random initialization (Wong, Rice and Kolter 2020): one signed-gradient step from a random start."""

from __future__ import annotations

import torch
from torch import nn

from natgrad.attacks.pgd import pgd

STEP_RATIO = 1.25  # Wong et al.'s alpha = 1.25 * eps


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float | None = None,
         random_start: bool = True) -> torch.Tensor:
    """One step of ``step_size`` (default ``1.25 * eps``) from a uniform start in the eps-ball.

    The result is projected to the ball around ``x`` and to [0, 1]; it is PGD with one step.
    """
    step = STEP_RATIO * eps if step_size is None else step_size
    return pgd(model, x, y, eps, steps=1, step_size=step, random_start=random_start)
