"""GELU whose double backward takes half the elementwise passes of autograd's.

Autograd's second derivative of ``gelu_backward`` is a chain of out-of-place products over the activation
(about nine passes, each a new tensor); on cnn-small it is a tenth of a GradNorm step on this CPU
(docs/RESULTS.md, issue 19). Here the same value, ``gg * g * phi(x) * (2 - x^2)``, is taken in place on
temporaries when no graph is built, and by differentiable operations when one is (third derivatives).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)


def gelu_curvature(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scale * gelu''(x)``, ``gelu''(x) = phi(x) (2 - x^2)`` with ``phi`` the standard normal density."""
    square = x * x
    if torch.is_grad_enabled():  # to be differentiated again
        return scale * torch.exp(-0.5 * square) * (2 - square) * _INV_SQRT_2PI
    curvature = square.mul(-0.5).exp_().mul_(square.sub_(2.0))  # exp(-x^2/2) (x^2 - 2)
    return curvature.mul_(scale).mul_(-_INV_SQRT_2PI)


class _Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.ops.aten.gelu(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return _GeluBackward.apply(g, x)


class _GeluBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, x)
        return torch.ops.aten.gelu_backward(g, x)

    @staticmethod
    def backward(ctx: Any, gg: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        g, x = ctx.saved_tensors
        need_g, need_x = ctx.needs_input_grad
        d_g = _GeluBackward.apply(gg, x) if need_g else None  # gelu_backward is linear in g
        d_x = gelu_curvature(x, gg * g) if need_x else None
        return d_g, d_x


def route(func: Callable[..., torch.Tensor], args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``F.gelu(*args, **kwargs)`` through :class:`_Gelu`, or None where autograd's GELU is left to run (the tanh
    approximation)."""
    given = dict(zip(("input", "approximate"), args), **kwargs)
    if given.get("approximate", "none") != "none":
        return None
    return _Gelu.apply(given["input"])


FUNCTIONS = (F.gelu,)  # what :func:`route` takes
