"""Input gradients and the model states they are taken in: one place for objectives, attacks and analyses."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import cast

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from natgrad.choices import DoubleBackward
from natgrad.double_backward import native_double_backward
from natgrad.errors import UserError
from natgrad.losses import per_sample_ce

LossFn = Callable[[torch.Tensor], torch.Tensor]  # images -> one value per image


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Stop parameters from requiring grad for the block, so that no ``backward()`` fills ``.grad``."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def loss_and_gradient(loss_fn: LossFn, x: torch.Tensor, create_graph: bool = False, math_kernel: bool = True,
                      double_backward: DoubleBackward = "natgrad") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_leaf, per-image loss, per-image input gradient)``; the gradient keeps its graph if asked.

    ``math_kernel`` selects scaled-dot-product attention's math kernel: the fused kernels have no double
    backward (a no-op for models without attention). With ``create_graph``, ``double_backward="natgrad"`` runs
    the convolutions through :func:`natgrad.double_backward.native_double_backward` (same values, faster).
    """
    x = x.detach().requires_grad_(True)
    kernels = native_double_backward() if create_graph and double_backward == "natgrad" else contextlib.nullcontext()
    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]) if math_kernel else contextlib.nullcontext(), kernels:
        loss = loss_fn(x)
        (grad,) = torch.autograd.grad(loss.sum(), x, create_graph=create_graph)
    return x, loss, grad


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, create_graph: bool,
                   output: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   double_backward: DoubleBackward = "natgrad") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, per-image outputs and per-image input gradients of those outputs.

    Args:
        output: maps logits to one value per image; default the cross-entropy with ``y``.
        create_graph: keep the graph of the gradient for double backprop (with the math attention kernel).
        double_backward: with ``create_graph``, how convolutions are differentiated twice (:func:`loss_and_gradient`).
    """
    logits: list[torch.Tensor] = []

    def values(z: torch.Tensor) -> torch.Tensor:
        logits.append(model(z))
        return output(logits[0]) if output is not None else per_sample_ce(logits[0], cast(torch.Tensor, y))

    _, out, grad = loss_and_gradient(values, x, create_graph, math_kernel=create_graph, double_backward=double_backward)
    return logits[0], out, grad


def func_input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None,
                        output: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and per-image input gradients of ``output(logits)`` (default the cross-entropy with ``y``) by
    ``torch.func.grad``: both stay differentiable with respect to the parameters, and ``torch.compile`` traces
    it (it does not trace ``torch.autograd.grad``). The math attention kernel, as for double backprop."""
    def total(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(z)
        values = output(logits) if output is not None else per_sample_ce(logits, cast(torch.Tensor, y))
        return values.sum(), logits

    with sdpa_kernel([SDPBackend.MATH]):
        grad, logits = torch.func.grad(total, has_aux=True)(x.detach())
    return logits, grad


Terms = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def compiled_with_input_gradient(terms: Terms, model: nn.Module, method: str) -> Terms:
    """``torch.compile(terms)`` for ``terms`` that call :func:`func_input_gradient` on ``model``, refusing on each
    call while ``model`` has BatchNorm in training mode: ``torch.func.grad`` cannot update running statistics."""
    compiled = torch.compile(terms)
    batchnorms = [m for m in model.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]

    def checked(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if any(m.training for m in batchnorms):
            raise UserError(f"compile=true: {method}'s input gradient is taken by torch.func.grad, which cannot "
                            "update the running statistics of train-mode BatchNorm; use model.train_mode=eval "
                            "(the paper's setting) or model.bn_eval=true, or compile=false")
        return compiled(x, y)

    return checked
