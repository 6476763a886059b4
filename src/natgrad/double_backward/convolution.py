"""Convolutions whose double backward runs on the convolution kernels themselves.

Autograd differentiates a convolution's input gradient (``ConvolutionBackwardBackward0``) by convolving
transposed, batch-as-channel tensors, on this CPU slower than the weight-gradient kernel that
``convolution_backward`` has for the same product (docs/RESULTS.md, issue 19). Inside
:func:`natgrad.double_backward.native_double_backward` every ``conv1d``/``conv2d``/``conv3d`` call runs
through :class:`_Convolution`, whose backward is :class:`_ConvolutionBackward`, whose backward is again a
convolution and a ``convolution_backward``: the same values by the kernels a PGD step uses, differentiable to
any order.

A double backward takes two weight gradients per convolution: one of its input gradient (in the double backward's
node) and one of the convolution itself (in the forward's node, which the engine runs later). Where a backward
builds no graph the first is taken by the fastest form measured for the output map's size (docs/RESULTS.md,
issue 19): up to :data:`MATMUL_AT_MOST` positions on a CPU, one matrix product over the unfolded input (on an
AVX2 CPU the weight-gradient kernel took up to 11 times as long at 1x1 maps); up to :data:`FUSE_AT_MOST`, left
on the forward's node, which takes both by one kernel call over the two batches stacked (on an AVX-512 CPU up to
twice as fast as two calls at 1x1 and 2x2 maps, as fast at 4x4, slower from 8x8); larger, its own kernel call.
The forward's own weight gradient is always the kernel's, as in every other method.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.graph import GradientEdge

from natgrad.double_backward.graph import Mask, needed, summed, tracked

_DIMS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
FUSE_AT_MOST = 16  # output positions up to which a double backward's two weight gradients share one call
MATMUL_AT_MOST = 4  # output positions up to which, on a CPU, its own weight gradient is one matrix product


@dataclass(frozen=True)
class _Geometry:
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int

    def convolve(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return torch.convolution(x, w, b, self.stride, self.padding, self.dilation, False, [0] * len(self.stride),
                                 self.groups)

    def backward(self, g_out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mask: Mask
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The gradients of ``<g_out, conv(x, w) + bias>`` with respect to ``(x, w, bias)`` that ``mask`` asks for."""
        return torch.ops.aten.convolution_backward(g_out, x, w, [w.shape[0]] if mask[2] else None, self.stride,
                                                   self.padding, self.dilation, False, [0] * len(self.stride),
                                                   self.groups, list(mask))

    def weight_gradient_by_matmul(self, g_out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The weight gradient of ``<g_out, conv(x, w)>`` (2-d, one group) as one matrix product: ``g_out``'s
        channels against the unfolded ``x``'s patches, summed over images and positions."""
        patches = F.unfold(x, tuple(w.shape[2:]), tuple(self.dilation), tuple(self.padding),
                           tuple(self.stride))  # images, C_in k k, positions
        return (g_out.flatten(2).transpose(0, 1).flatten(1) @ patches.transpose(0, 1).flatten(1).t()).view_as(w)

    def by_matmul(self, g_out: torch.Tensor) -> bool:
        """Whether a weight gradient into ``g_out``'s map is taken by :meth:`weight_gradient_by_matmul`."""
        return (g_out.device.type == "cpu" and len(self.stride) == 2 and self.groups == 1
                and g_out[0, 0].numel() <= MATMUL_AT_MOST)


def convolve(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, geo: _Geometry) -> torch.Tensor:
    """``geo``'s convolution of ``x`` with ``w`` (and bias ``b``) through :class:`_Convolution`."""
    (x, ex), (w, ew), (b, eb) = tracked(x), tracked(w), tracked(b)
    return _Convolution.apply(x, w, b, geo, (ex, ew, eb))


def _graph_task() -> int:
    return torch._C._current_graph_task_id()


class _Convolution(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, geo: _Geometry,
                edges: tuple[GradientEdge | None, ...]) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.geo, ctx.edges = geo, edges
        ctx.last_task = None  # the backward that last ran this node
        ctx.pending = None  # (task, g_out, x): a weight gradient left here by this backward's double-backward node
        return geo.convolve(x, w, b)

    @staticmethod
    def backward(ctx: Any, g_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w = ctx.saved_tensors
        geo: _Geometry = ctx.geo
        mask = tuple(needed(e) for e in ctx.edges)
        task, pending = _graph_task(), ctx.pending
        ctx.last_task, ctx.pending = task, None
        if pending is not None and pending[0] == task:
            _, g_left, x_left = pending
            d_x, _, d_b = geo.backward(g_out, x, w, (mask[0], False, mask[2])) if mask[0] or mask[2] else (None,) * 3
            d_w = geo.backward(torch.cat([g_out, g_left]), torch.cat([x, x_left]), w, (False, True, False))[1]
            return d_x, d_w, d_b, None, None
        grads = (_ConvolutionBackward.apply(g_out, x, w, geo, mask, weakref.ref(ctx)) if any(mask)
                 else (None, None, None))
        return (*grads, None, None)


class _ConvolutionBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, g_out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, geo: _Geometry, mask: Mask,
                forward_node: weakref.ref | None = None) -> tuple[torch.Tensor | None, ...]:
        ctx.save_for_backward(g_out, x, w)
        ctx.geo, ctx.forward_node = geo, forward_node
        return geo.backward(g_out, x, w, mask)

    @staticmethod
    def _leave_weight_gradient(ctx: Any, gg_x: torch.Tensor, g_out: torch.Tensor) -> bool:
        """Leave ``<g_out, conv(gg_x, w)>``'s weight gradient to the forward's node, if it will take its own in
        this backward (which builds no graph); whether it was left."""
        node = ctx.forward_node() if ctx.forward_node is not None else None
        if node is None or g_out[0, 0].numel() > FUSE_AT_MOST:
            return False
        task = _graph_task()
        if node.last_task == task or not torch._C._will_engine_execute_node(node) or not needed(node.edges[1]):
            return False
        node.pending = (task, g_out, gg_x)
        return True

    @staticmethod
    def backward(ctx: Any, gg_x: torch.Tensor | None, gg_w: torch.Tensor | None, gg_b: torch.Tensor | None
                 ) -> tuple[torch.Tensor | None, ...]:
        g_out, x, w = ctx.saved_tensors
        geo: _Geometry = ctx.geo
        need_g, need_x, need_w = ctx.needs_input_grad[:3]
        d_g = d_x = d_w = None
        if need_g:  # the outputs are linear in g_out: d/d g_out of <gg_x, d x> + <gg_w, d w> + <gg_b, d b>
            d_g = summed(None if gg_x is None else convolve(gg_x, w, None, geo),
                         None if gg_w is None else convolve(x, gg_w, None, geo),
                         None if gg_b is None else gg_b.view(1, -1, *[1] * (g_out.dim() - 2)).expand_as(g_out))
        if need_x and gg_w is not None:  # <gg_w, d w(g_out, x)> = <g_out, conv(x, gg_w)>
            d_x = _ConvolutionBackward.apply(g_out, x, gg_w, geo, (True, False, False))[0]
        if need_w and gg_x is not None:  # <gg_x, d x(g_out, w)> = <g_out, conv(gg_x, w)>
            if torch.is_grad_enabled():  # a graph of it: the differentiable form
                d_w = _ConvolutionBackward.apply(g_out, gg_x, w, geo, (False, True, False))[1]
            elif geo.by_matmul(g_out):
                d_w = geo.weight_gradient_by_matmul(g_out, gg_x, w)
            elif not _ConvolutionBackward._leave_weight_gradient(ctx, gg_x, g_out):
                d_w = geo.backward(g_out, gg_x, w, (False, True, False))[1]
        return d_g, d_x, d_w, None, None, None


def _ints(value: int | Sequence[int], dims: int) -> list[int]:
    return [value] * dims if isinstance(value, int) else list(value)


def route(func: Callable[..., torch.Tensor], args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``func(*args, **kwargs)`` (``F.conv1d/2d/3d``) through :class:`_Convolution`, or None where autograd's own
    convolution is left to run (string padding, unbatched input)."""
    dims = _DIMS[func]
    given = dict(zip(_ARGS, args), **kwargs)
    x, w, b, padding = given["input"], given["weight"], given.get("bias"), given.get("padding", 0)
    if isinstance(padding, str) or x.dim() != dims + 2:
        return None
    if torch.is_autocast_enabled(x.device.type):  # cast as autocast would, so that the saved tensors match
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w, b = x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)
    geo = _Geometry(_ints(given.get("stride", 1), dims), _ints(padding, dims),
                    _ints(given.get("dilation", 1), dims), int(given.get("groups", 1)))
    return convolve(x, w, b, geo)


FUNCTIONS = tuple(_DIMS)  # what :func:`route` takes
