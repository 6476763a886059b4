"""LayerNorm and training-mode BatchNorm whose double backward is a closed form on the normalizations' kernels.

Autograd differentiates ``native_layer_norm_backward`` and ``native_batch_norm_backward`` by a composite of
some thirty elementwise operations and reductions. Per group of ``N`` normalized values (a sample's trailing
dims for LayerNorm, a channel for BatchNorm), with ``xh = (x - mean) * rstd``, ``h = weight * g`` and
``P v = v - mean(v) - xh * mean(v * xh)``, the first backward is ``dx = rstd * P h``. For incoming ``a``,
``c``, ``e`` (the gradients of ``dx``, ``dweight``, ``dbias``) its derivatives are

    d_g      = weight * q + xh * c + e,                        q = rstd * P a
    d_weight = sum over the batch of g * q
    d_x      = rstd * P (g * c) - rstd / N * (xh * <a, dx> + <h, xh> * q + <a, xh> * dx)

(``<,>`` summed within each group), where ``rstd * P v`` is the normalization's own backward kernel with no
weight. 0.4-0.75 of autograd's time on this CPU (docs/RESULTS.md, issue 19). A backward that builds a graph
(third derivatives) takes the statistics and ``P`` by differentiable operations instead of the kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, cast

import torch
import torch.nn.functional as F

from natgrad.double_backward.graph import Mask, needed, summed, tracked


@dataclass(frozen=True)
class _Norm:
    """Where a normalization takes its statistics, and its kernels."""

    layer: bool  # LayerNorm over the trailing ``shape``; else BatchNorm over all dims but dim 1
    shape: tuple[int, ...]
    eps: float

    def group_dims(self, x: torch.Tensor) -> tuple[int, ...]:
        return tuple(range(x.dim() - len(self.shape), x.dim())) if self.layer else (0, *range(2, x.dim()))

    def weight_dims(self, x: torch.Tensor) -> tuple[int, ...]:
        """The dims a weight gradient sums over."""
        return tuple(range(x.dim() - len(self.shape))) if self.layer else self.group_dims(x)

    def per_channel(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A weight or BatchNorm statistic shaped to broadcast against ``x``."""
        return t if self.layer else t.view(1, -1, *[1] * (x.dim() - 2))

    def group_size(self, x: torch.Tensor) -> int:
        return math.prod(self.shape) if self.layer else x.numel() // x.shape[1]

    def backward(self, g: torch.Tensor, x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None,
                 mean: torch.Tensor, rstd: torch.Tensor, mask: Mask) -> tuple[torch.Tensor | None, ...]:
        """The gradients of ``<g, norm(x) * w + b>`` with respect to ``(x, w, b)`` that ``mask`` asks for."""
        if self.layer:
            return torch.ops.aten.native_layer_norm_backward(g, x, list(self.shape), mean, rstd, w, b, list(mask))
        return torch.ops.aten.native_batch_norm_backward(g, x, w, None, None, mean, rstd, True, self.eps, list(mask))


class _Normalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, norm: _Norm,
                running: tuple[torch.Tensor | None, torch.Tensor | None, float], edges: tuple) -> torch.Tensor:
        if norm.layer:
            y, mean, rstd = torch.native_layer_norm(x, list(norm.shape), w, b, norm.eps)
        else:  # updates the running statistics as F.batch_norm does
            y, mean, rstd = torch.native_batch_norm(x, w, b, running[0], running[1], True, running[2], norm.eps)
        ctx.save_for_backward(x, w, b, mean, rstd)
        ctx.norm, ctx.edges = norm, edges
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w, b, mean, rstd = ctx.saved_tensors
        mask = tuple(needed(e) for e in ctx.edges)
        grads = (_NormalizeBackward.apply(g, x, w, b, mean, rstd, ctx.norm, mask) if any(mask)
                 else (None, None, None))
        return (*grads, None, None, None)


class _NormalizeBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, g: torch.Tensor, x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None,
                mean: torch.Tensor, rstd: torch.Tensor, norm: _Norm, mask: Mask) -> tuple[torch.Tensor | None, ...]:
        grads = norm.backward(g, x, w, b, mean, rstd, (True, mask[1], mask[2]))  # dx is needed below
        ctx.save_for_backward(g, x, w, mean, rstd, grads[0])
        ctx.norm = norm
        return (grads[0] if mask[0] else None, *grads[1:])

    @staticmethod
    def backward(ctx: Any, a: torch.Tensor | None, c: torch.Tensor | None, e: torch.Tensor | None
                 ) -> tuple[torch.Tensor | None, ...]:
        g, x, w, mean, rstd, dx = ctx.saved_tensors
        norm: _Norm = ctx.norm
        need_g, need_x, need_w = ctx.needs_input_grad[:3]
        dims, n = norm.group_dims(x), norm.group_size(x)

        def total(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return (u * v).sum(dims, keepdim=True)

        weight = None if w is None else norm.per_channel(w, x)
        h = g if weight is None else g * weight
        if torch.is_grad_enabled():  # to be differentiated again: the statistics and P by differentiable operations
            rstd_b = (x.var(dims, unbiased=False, keepdim=True) + norm.eps).rsqrt()
            xh = (x - x.mean(dims, keepdim=True)) * rstd_b

            def scaled_projection(v: torch.Tensor) -> torch.Tensor:  # rstd * P v
                return rstd_b * (v - v.mean(dims, keepdim=True) - xh * total(v, xh) / n)

            dx = scaled_projection(h)
        else:  # the normalization's own backward kernel, with no weight
            rstd_b = norm.per_channel(rstd, x)
            xh = (x - norm.per_channel(mean, x)).mul_(rstd_b)

            def scaled_projection(v: torch.Tensor) -> torch.Tensor:
                return cast(torch.Tensor, norm.backward(v, x, None, None, mean, rstd, (True, False, False))[0])

        q = None if a is None else scaled_projection(a)
        c_b = None if c is None else norm.per_channel(c, x)
        d_g = d_x = d_w = None
        if need_g:
            d_g = summed(None if q is None else q if weight is None else q * weight,
                         None if c_b is None else xh * c_b,
                         None if e is None else norm.per_channel(e, x).expand_as(x))
        if need_x:
            inner = None
            if a is not None and q is not None:
                inner = torch.addcmul(torch.addcmul(xh * total(a, dx), q, total(h, xh)), dx, total(a, xh))
                inner = inner * (rstd_b * (-1 / n))
            d_x = summed(None if c_b is None else scaled_projection(g * c_b), inner)
        if need_w and q is not None:
            d_w = (g * q).sum(norm.weight_dims(x))
        return d_g, d_x, d_w, None, None, None, None, None


@cache
def _autocast_dtype(func: Callable[..., torch.Tensor], device: str, dtype: torch.dtype,
                    autocast: torch.dtype) -> torch.dtype:
    """The dtype ``func`` computes in for an input of ``dtype`` under the active autocast of dtype ``autocast``
    (a cache key only; CUDA's casts LayerNorm to float32, the CPU's does not)."""
    probe = torch.ones(2, 2, 2, device=device, dtype=dtype)
    with torch.no_grad():
        if func is F.layer_norm:
            return F.layer_norm(probe, (2,)).dtype
        return F.batch_norm(probe, None, None, training=True).dtype


def route(func: Callable[..., torch.Tensor], args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``F.layer_norm`` or a training-mode ``F.batch_norm`` through :class:`_Normalize`, or None where autograd's
    own is left to run (BatchNorm with running statistics in eval mode, whose double backward is cheap)."""
    if func is F.layer_norm:
        given = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), args), **kwargs)
        norm = _Norm(True, tuple(given["normalized_shape"]), float(given.get("eps", 1e-5)))
        running: tuple = (None, None, 0.0)
    else:
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        given = dict(zip(names, args), **kwargs)
        rm, rv = given.get("running_mean"), given.get("running_var")
        if not given.get("training", False) and rm is not None:
            return None
        norm = _Norm(False, (), float(given.get("eps", 1e-5)))
        running = (rm, rv, float(given.get("momentum", 0.1) or 0.0))
    x, w, b = given["input"], given.get("weight"), given.get("bias")
    if not norm.layer and x.dim() < 2:
        return None
    if torch.is_autocast_enabled(x.device.type):
        dtype = _autocast_dtype(func, x.device.type, x.dtype, torch.get_autocast_dtype(x.device.type))
        x = x.to(dtype)
        if norm.layer:  # LayerNorm's weight follows its input; BatchNorm keeps float32 weights
            w, b = (None if t is None else t.to(dtype) for t in (w, b))
    (x, ex), (w, ew), (b, eb) = tracked(x), tracked(w), tracked(b)
    return _Normalize.apply(x, w, b, norm, running, (ex, ew, eb))


FUNCTIONS = (F.layer_norm, F.batch_norm)  # what :func:`route` takes
