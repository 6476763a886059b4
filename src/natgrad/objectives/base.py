"""The shared objective contract."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn


def linear_warmup(epoch_fraction: float, warmup_epochs: float) -> float:
    """0 -> 1 linearly over ``warmup_epochs`` (evaluated per iteration), then 1."""
    return 1.0 if warmup_epochs <= 0 else min(1.0, max(0.0, epoch_fraction / warmup_epochs))


class Objective:
    """A training loss for ``model``: ``objective(x, y, epoch_fraction) -> dict``.

    The forward whose ``.backward()`` gives the step's parameter gradients goes through ``loss_model``
    (``model`` itself, or DistributedDataParallel around it after :meth:`distribute`); attacks and other
    passes that only need input gradients use ``model``.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.loss_model: nn.Module = model

    def compile(self) -> None:
        """Run through ``torch.compile``: here the model (attacks and loss alike); objectives that take an input
        gradient compile their loss instead, with the gradient formed inside it."""
        self.model = self.loss_model = cast(nn.Module, torch.compile(self.model))

    def distribute(self, wrapped: nn.Module) -> None:
        """Take the loss's forward through ``wrapped``, a module around ``model`` whose backward averages the
        parameter gradients over processes."""
        self.loss_model = wrapped

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` into the trainable parameters only: the images whose input gradient the loss took
        need no gradient of their own (their first convolution's input gradient is skipped)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if params:
            loss.backward(inputs=params)
        else:
            loss.backward()

    def __call__(self, x: torch.Tensor, y: torch.Tensor, epoch_fraction: float = 0.0) -> dict:
        raise NotImplementedError
