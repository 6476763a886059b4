"""What the custom functions of :mod:`natgrad.double_backward` ask the autograd engine."""

from __future__ import annotations

from typing import TypeVar, cast

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

Mask = tuple[bool, bool, bool]  # which of (input, weight, bias) gradients to compute
T = TypeVar("T", bound=torch.Tensor | None)


def tracked(t: T) -> tuple[T, GradientEdge | None]:
    """``t`` (behind a view if it is a leaf: the engine tells :func:`needed` about non-leaf nodes only) and its
    gradient edge, or None where ``t`` is None or takes no gradient."""
    if t is None or not t.requires_grad:
        return t, None
    if t.grad_fn is None:
        t = cast(T, t.view_as(t))
    return t, get_gradient_edge(cast(torch.Tensor, t))


def needed(edge: GradientEdge | None) -> bool:
    """Whether the running backward uses a gradient along ``edge``: ``torch.autograd.grad(..., inputs)`` and
    ``backward(inputs=...)`` prune the others, and unlike autograd's own nodes a custom function is not told
    which."""
    return edge is not None and torch._C._will_engine_execute_node(edge.node)


def summed(*terms: torch.Tensor | None) -> torch.Tensor | None:
    """The sum of the terms that are not None (a gradient's contributions), or None if all are."""
    present = [t for t in terms if t is not None]
    return sum(present[1:], present[0]) if present else None
