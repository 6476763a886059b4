"""double_backward=natgrad: LayerNorm and training-mode BatchNorm differentiated twice (and three times) give
autograd's values, and BatchNorm's running statistics move as F.batch_norm moves them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from natgrad import models, objectives
from natgrad.double_backward import native_double_backward

# name -> (input shape, function of (x, weight, bias), weight shape)
NORMS = {
    "layer": ((3, 4, 6), lambda x, w, b: F.layer_norm(x, (6,), w, b, 1e-5), (6,)),
    "layer-2d": ((2, 3, 4, 5), lambda x, w, b: F.layer_norm(x, (4, 5), w, b, 1e-5), (4, 5)),
    "batch": ((5, 3, 2, 2), lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5), (3,)),
    "batch-1d": ((6, 4), lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5), (4,)),
}


def _inputs(name: str, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    shape, _, w_shape = NORMS[name]
    torch.manual_seed(0)
    return (torch.randn(shape, dtype=dtype, requires_grad=True), torch.randn(w_shape, dtype=dtype, requires_grad=True),
            torch.randn(w_shape, dtype=dtype, requires_grad=True))


def _routed(name: str):
    def f(x, w, b):
        with native_double_backward():
            return torch.tanh(NORMS[name][1](x, w, b))  # tanh: a second derivative through the output too
    return f


@pytest.mark.parametrize("name", list(NORMS))
def test_derivatives_to_third_order_match_finite_differences(name):
    f, inputs = _routed(name), _inputs(name)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)  # the closed form

    def first_derivatives(x, w, b):  # their derivatives are the third (PyTorch's own fail this check for LayerNorm)
        with native_double_backward():
            out = torch.tanh(NORMS[name][1](x, w, b))
            return torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum(),
                                       (x, w, b), create_graph=True)

    assert torch.autograd.gradgradcheck(first_derivatives, inputs)


@pytest.mark.parametrize("name", list(NORMS))
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("create_graph", [False, True])  # the kernel form, and the differentiable one
def test_second_derivatives_equal_autograds_in_float32(name, affine, create_graph):
    x, w, b = _inputs(name, torch.float32)
    if not affine:
        w = b = None

    def second(routed: bool) -> list[torch.Tensor | None]:
        leaves = [t.detach().requires_grad_(True) for t in (x, w, b) if t is not None]
        args = leaves if affine else [leaves[0], None, None]
        if routed:
            with native_double_backward():
                out = NORMS[name][1](*args)
        else:
            out = NORMS[name][1](*args)
        v = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad((out * v).sum(), leaves, create_graph=True)
        loss = sum((g ** 2).sum() * (i + 1) for i, g in enumerate(grads))
        # the bias's is None: the first derivatives do not depend on it
        return list(torch.autograd.grad(loss, leaves, allow_unused=True, create_graph=routed and create_graph))

    for r, a in zip(second(True), second(False), strict=True):
        assert (r is None) == (a is None)
        if a is not None:
            torch.testing.assert_close(r.detach(), a, rtol=1e-4, atol=1e-5 * a.abs().max().item())


def test_batch_norm_running_statistics_move_as_autograds():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4, requires_grad=True)
    stats = {}
    for routed in (True, False):
        bn = torch.nn.BatchNorm2d(3)
        if routed:
            with native_double_backward():
                out = bn(x)
        else:
            out = bn(x)
        stats[routed] = (bn.running_mean.clone(), bn.running_var.clone(), out.detach())
        assert (type(out.grad_fn).__name__ == "_NormalizeBackward") == routed
    for r, a in zip(stats[True], stats[False], strict=True):
        torch.testing.assert_close(r, a)


def test_eval_mode_batch_norm_is_left_to_autograd():
    bn = torch.nn.BatchNorm2d(3).eval()
    with native_double_backward():
        out = bn(torch.randn(2, 3, 4, 4, requires_grad=True))
    assert type(out.grad_fn).__name__ != "_NormalizeBackward"


def test_vit_gradnorm_step_equals_autograds():
    """A transformer (LayerNorm, GELU, attention): the GradNorm step's loss and parameter gradients."""
    torch.manual_seed(0)
    model = models.create("vit_tiny_patch16_224", 10, img_size=32, patch_size=8, depth=2)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    results = {}
    for form in ("autograd", "natgrad"):
        model.zero_grad(set_to_none=True)
        objective = objectives.create("gradnorm", model, eps=8 / 255, double_backward=form)
        loss = objective(x, y)["loss"]
        objective.backward(loss)
        results[form] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(results["natgrad"][0], results["autograd"][0], rtol=1e-6, atol=1e-7)
    for a, n in zip(results["autograd"][1], results["natgrad"][1], strict=True):
        torch.testing.assert_close(n, a, rtol=1e-4, atol=1e-5 * a.abs().max().item() + 1e-8)
