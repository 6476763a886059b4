"""double_backward=natgrad: GELU differentiated twice (and three times) gives autograd's values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from natgrad.double_backward import native_double_backward


def _gelu_times(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    with native_double_backward():
        return F.gelu(x * w)  # x * w: second derivatives that mix two inputs


def test_gelu_derivatives_to_third_order_match_finite_differences():
    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_gelu_times, (x, w))
    assert torch.autograd.gradgradcheck(_gelu_times, (x, w))  # the second derivative, in place

    def first_derivatives(x, w):  # its derivative is the third: the differentiable form of the curvature
        with native_double_backward():
            out = F.gelu(x * w)
            return torch.autograd.grad(out.sum(), (x, w), create_graph=True)

    assert torch.autograd.gradgradcheck(first_derivatives, (x, w))


@pytest.mark.parametrize("create_graph", [False, True])  # in place, and differentiable again
def test_gelu_second_derivative_equals_autograds_in_float32(create_graph):
    torch.manual_seed(0)
    x, u = torch.randn(64, 32) * 3, torch.randn(64, 32)

    def hessian_vector(kernels: bool) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = x.clone().requires_grad_(True)
        v = u.clone().requires_grad_(True)
        if kernels:
            with native_double_backward():
                out = F.gelu(leaf)
        else:
            out = F.gelu(leaf)
        (g,) = torch.autograd.grad((out * v).sum(), leaf, create_graph=True)
        return torch.autograd.grad((g ** 2).sum(), (leaf, v), create_graph=kernels and create_graph)

    for a, e in zip(hessian_vector(True), hessian_vector(False), strict=True):
        torch.testing.assert_close(a.detach(), e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("approximate, routed", [("none", True), ("tanh", False)])
def test_only_the_exact_gelu_is_routed(approximate, routed):
    x = torch.randn(4, requires_grad=True)
    with native_double_backward():
        out = F.gelu(x, approximate=approximate)
    assert (type(out.grad_fn).__name__ == "_GeluBackward") == routed
    torch.testing.assert_close(out, F.gelu(x, approximate=approximate))
