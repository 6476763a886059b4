"""Projected gradient descent under an L-infinity constraint (Madry et al. 2018)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from natgrad.errors import UserError
from natgrad.losses import per_sample_ce


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _hard_labels(y: torch.Tensor) -> torch.Tensor:
    return y.argmax(1) if y.is_floating_point() else y


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float | None = None,
    random_start: bool = True,
    norm: str = "linf",
    keep_best: bool = False,
) -> torch.Tensor:
    """Maximize cross-entropy within the L-infinity ball of radius ``eps`` around ``x``, inside [0, 1].

    Args:
        model: takes [0, 1] images; run in eval mode and restored afterwards.
        x: clean images in [0, 1].
        y: integer labels, or soft targets (N, classes).
        eps: radius in pixel units.
        steps: number of signed-gradient ascent steps.
        step_size: per step; default ``eps / 4`` (the paper's 1/255 at 4/255).
        random_start: start from a uniform point of the ball.
        norm: only ``linf``.
        keep_best: return, per image, the strongest iterate seen (misclassified first, then highest loss)
            instead of the last one; what an evaluation wants.

    Returns:
        Adversarial images, detached, with ``|x_adv - x| <= eps`` and values in [0, 1].
    """
    if norm != "linf":
        raise UserError(f"pgd norm={norm!r} is not supported; use linf")
    step_size = eps / 4 if step_size is None else step_size
    x = x.detach()
    labels = _hard_labels(y)
    with eval_mode(model), torch.enable_grad():
        x_adv = x.clone()
        if random_start and eps > 0:
            x_adv = (x_adv + torch.empty_like(x).uniform_(-eps, eps)).clamp_(0.0, 1.0)
        best, best_loss = x_adv.clone(), torch.full((len(x),), -float("inf"), device=x.device)
        best_fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)

        def remember(candidate: torch.Tensor, logits: torch.Tensor, losses: torch.Tensor) -> None:
            fooled = logits.argmax(1) != labels
            better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (losses > best_loss))
            best[better] = candidate[better]
            best_loss[better] = losses[better]
            best_fooled[better] = fooled[better]

        for _ in range(steps):
            x_adv.requires_grad_(True)
            logits = model(x_adv)
            losses = per_sample_ce(logits, y)
            (grad,) = torch.autograd.grad(losses.sum(), x_adv)
            x_adv = x_adv.detach()
            if keep_best:
                remember(x_adv, logits.detach(), losses.detach().float())
            x_adv = torch.minimum(torch.maximum(x_adv + step_size * grad.sign(), x - eps), x + eps).clamp_(0.0, 1.0)
        if not keep_best:
            return x_adv
        with torch.no_grad():
            logits = model(x_adv)
            remember(x_adv, logits, per_sample_ce(logits, y).float())
        return best
