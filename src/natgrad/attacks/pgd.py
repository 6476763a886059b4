"""Projected gradient descent under an L-infinity constraint (Madry et al. 2018)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from natgrad.errors import UserError, check_choice
from natgrad.gradients import eval_mode
from natgrad.losses import per_sample_ce


def paper_step_size(eps: float) -> float:
    """The evaluation attacks' step: the paper's 1/255 at eps 4/255, scaled with eps."""
    return eps / 4


def finite_logits(logits: torch.Tensor, what: str = "these images") -> torch.Tensor:
    """``logits``, or a :class:`UserError` when any is NaN or infinite: an accuracy counted from them
    would be a number about broken weights, not about robustness."""
    if not torch.isfinite(logits).all():
        bad = (~torch.isfinite(logits)).any(1).sum().item() if logits.ndim == 2 else "some"
        raise UserError(f"the model's outputs are NaN or infinite on {bad} of {len(logits)} of {what}: its weights are "
                        "damaged (or it diverged in training); evaluate other weights")
    return logits


def _hard_labels(y: torch.Tensor) -> torch.Tensor:
    return y.argmax(1) if y.is_floating_point() else y


def _per_image(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View a per-image vector (N,) so that it broadcasts against ``like`` (N, ...)."""
    return v.view(-1, *(1,) * (like.dim() - 1))


def sign_direction(grad: torch.Tensor) -> torch.Tensor:
    """The signed gradient (overwrites ``grad``)."""
    return grad.sign_()


def l2_direction(grad: torch.Tensor) -> torch.Tensor:
    """The per-image L2-normalized gradient times ``sqrt(d)`` (overwrites ``grad``).

    ``d`` is the number of values per image, so a step has the L2 length ``sqrt(d)`` of a signed
    step whose gradient has no zero entries. A zero gradient gives a zero step.
    """
    flat = grad.flatten(1)
    norms = torch.linalg.vector_norm(flat, dim=1).clamp_min_(torch.finfo(grad.dtype).tiny)
    return grad.mul_(_per_image(flat.shape[1] ** 0.5 / norms, grad))


# Ascent directions for a step of size 1, from the gradient of the loss.
DIRECTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"sign": sign_direction, "l2": l2_direction}


class _Strongest:
    """Per image, the strongest candidate seen so far: misclassified first, then highest loss."""

    def __init__(self, labels: torch.Tensor):
        self.labels = labels
        self.x: torch.Tensor | None = None

    def update(self, candidate: torch.Tensor, logits: torch.Tensor, losses: torch.Tensor) -> None:
        # torch.where instead of boolean indexing: no host synchronization, no per-image work in Python.
        fooled = logits.argmax(1) != self.labels
        if self.x is None:
            self.x, self.loss, self.fooled = candidate.clone(), losses.float(), fooled
            return
        better = (fooled & ~self.fooled) | ((fooled == self.fooled) & (losses > self.loss))
        torch.where(_per_image(better, candidate), candidate, self.x, out=self.x)
        torch.where(better, losses.float(), self.loss, out=self.loss)
        torch.where(better, fooled, self.fooled, out=self.fooled)


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
    direction: str = "sign",
    restarts: int = 1,
    param_grads: bool = False,
) -> torch.Tensor:
    """Maximize cross-entropy within the L-infinity ball of radius ``eps`` around ``x``, inside [0, 1].

    Args:
        model: takes [0, 1] images; run in eval mode and restored afterwards.
        x: clean images in [0, 1].
        y: integer labels, or soft targets (N, classes).
        eps: radius in pixel units.
        steps: number of gradient ascent steps, each projected to the ball and to [0, 1].
        step_size: per step; default ``eps / 4`` (the paper's 1/255 at 4/255).
        random_start: start from a uniform point of the ball.
        norm: only ``linf``.
        keep_best: return, per image, the strongest iterate seen (misclassified first, then highest loss)
            instead of the last one; what an evaluation wants.
        direction: ``sign`` steps ``step_size * sign(g)``; ``l2`` steps ``step_size * sqrt(d) * g / ||g||_2``
            per image, with ``d`` values per image, so that both steps have the same L2 length (that of a
            signed step whose gradient has no zero entries). The projection stays L-infinity
            (the paper's Appendix C.8).
        restarts: runs of the attack, each from a new random start, keeping per image the strongest
            result (as ``keep_best`` ranks them) of all runs. Without a random start every run would
            repeat the first, so one is made.
        param_grads: also take the parameters' gradients at every step, and drop them: the work of an attack
            that calls ``loss.backward()`` (the authors' training code), to train and time as it does.

    Returns:
        Adversarial images, detached, with ``|x_adv - x| <= eps`` and values in [0, 1].
    """
    if norm != "linf":
        raise UserError(f"pgd norm={norm!r} is not supported; use linf")
    check_choice("pgd direction", direction, DIRECTIONS)
    if restarts < 1:
        raise UserError(f"pgd restarts={restarts} must be at least 1")
    ascent = DIRECTIONS[direction]
    step_size = eps / 4 if step_size is None else step_size
    random_start = random_start and eps > 0
    runs = restarts if random_start else 1
    x = x.detach()
    labels = _hard_labels(y)
    lo, hi = (x - eps).clamp_(min=0.0), (x + eps).clamp_(max=1.0)
    strongest = _Strongest(labels) if keep_best or runs > 1 else None
    params = [p for p in model.parameters() if p.requires_grad] if param_grads else []
    with eval_mode(model), torch.enable_grad():
        for _ in range(runs):
            x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp_(0.0, 1.0) if random_start else x.clone()
            for _ in range(steps):
                x_adv.requires_grad_(True)
                logits = model(x_adv)
                losses = per_sample_ce(logits, y)
                grad, *_ = torch.autograd.grad(losses.sum(), [x_adv, *params])
                x_adv = x_adv.detach()
                if keep_best and strongest is not None:
                    strongest.update(x_adv, logits.detach(), losses.detach())
                # In place: the graph that saved x_adv is freed, and the strongest iterate is a copy.
                torch.clamp(x_adv.add_(ascent(grad), alpha=step_size), lo, hi, out=x_adv)
            if strongest is None:
                return x_adv
            with torch.no_grad():
                logits = model(x_adv)
                strongest.update(x_adv, logits, per_sample_ce(logits, y))
    return x_adv if strongest is None or strongest.x is None else strongest.x
