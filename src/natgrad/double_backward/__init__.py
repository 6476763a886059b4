"""Double backprop on the kernels ordinary training uses (``double_backward=natgrad``, the default).

:func:`native_double_backward` routes the block's convolutions (:mod:`.convolution`), GELUs
(:mod:`.activation`), LayerNorms and training-mode BatchNorms (:mod:`.normalization`) through autograd
functions whose second derivatives are the same values as autograd's, computed faster; everything else, and
every call made without grad mode, runs as usual.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from natgrad.double_backward import activation, convolution, normalization

_ROUTES = {func: module.route for module in (convolution, activation, normalization) for func in module.FUNCTIONS}


class _NativeDoubleBackward(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        route = _ROUTES.get(func)
        if route is not None and torch.is_grad_enabled():
            out = route(func, args, kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def native_double_backward() -> Iterator[None]:
    """Run the block's convolutions, GELUs and normalizations through functions whose double backward is faster
    than autograd's."""
    with _NativeDoubleBackward():
        yield
