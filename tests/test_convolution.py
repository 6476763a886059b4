"""double_backward=natgrad: convolutions differentiated twice on the convolution kernels give autograd's values.

The second derivatives are checked against finite differences (``gradgradcheck``, float64), the training steps
of gradnorm and edge against autograd's own double backward, and the input-gradient pass is checked to compute
no weight gradient (autograd's nodes skip them; the custom functions must ask the engine to).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import STEP_MODELS, step_model
from natgrad import config, models, objectives
from natgrad.double_backward import convolution, native_double_backward
from natgrad.errors import UserError
from natgrad.gradients import input_gradient

# (conv, input shape, weight shape, keyword arguments)
GEOMETRIES = {
    "2d-stride-bias": (F.conv2d, (2, 4, 7, 7), (6, 4, 3, 3), {"stride": 2, "padding": 1}),
    "2d-dilation-groups": (F.conv2d, (2, 4, 8, 8), (6, 2, 3, 3), {"padding": (2, 1), "dilation": (2, 1), "groups": 2}),
    "1d": (F.conv1d, (2, 3, 9), (4, 3, 3), {"stride": 2}),
    "3d": (F.conv3d, (1, 2, 4, 5, 5), (3, 2, 2, 3, 3), {"padding": 1}),
    "2d-same-padding": (F.conv2d, (2, 3, 6, 6), (4, 3, 3, 3), {"padding": "same"}),  # left to autograd
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_second_derivatives_match_finite_differences(name):
    conv, x_shape, w_shape, kwargs = GEOMETRIES[name]
    torch.manual_seed(0)
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(w_shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(w_shape[0], dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        with native_double_backward():
            return torch.tanh(conv(x, w, b, **kwargs))  # tanh: second derivatives that mix input and weight

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def _step(method: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, double_backward: str,
          **params) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    objective = objectives.create(method, model, double_backward=double_backward, **params)
    torch.manual_seed(1)  # the same sampled classes for edge's class student
    loss = objective(x, y)["loss"]
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


CASES = {"gradnorm": {"eps": 0.1}, "edge": {"student": "class"}}


@pytest.mark.parametrize("model_name", list(STEP_MODELS))
@pytest.mark.parametrize("method", list(CASES))
def test_training_step_equals_autograds(method, model_name):
    model, x, y = step_model(model_name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss_a, grads_a = _step(method, model, x, y, "autograd", **CASES[method])
    model.load_state_dict(state)  # train-mode BatchNorm moved its running statistics
    loss_n, grads_n = _step(method, model, x, y, "natgrad", **CASES[method])
    torch.testing.assert_close(loss_n, loss_a, rtol=1e-6, atol=1e-7)
    for ga, gn in zip(grads_a, grads_n, strict=True):
        torch.testing.assert_close(gn, ga, rtol=1e-4, atol=1e-5 * ga.abs().max().item() + 1e-8)


@pytest.mark.parametrize("name, channels, size", [("resnet10t", 3, 32), ("cnn-small", 1, 28)])  # ReLU; GELU
def test_bf16_autocast_step_is_close_to_autograds(name, channels, size):
    torch.manual_seed(0)
    model = models.create(name, 10, channels, train_mode="eval")
    x, y = torch.rand(8, channels, size, size), torch.randint(0, 10, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_a, grads_a = _step("gradnorm", model, x, y, "autograd", eps=8 / 255)
        loss_n, grads_n = _step("gradnorm", model, x, y, "natgrad", eps=8 / 255)
    assert abs(loss_n - loss_a) <= 1e-2 * abs(loss_a)
    flat_a, flat_n = torch.cat([g.flatten() for g in grads_a]), torch.cat([g.flatten() for g in grads_n])
    assert ((flat_n - flat_a).norm() / flat_a.norm()).item() < 0.05  # bf16's rounding, in different kernels


class _ConvolutionMasks(TorchDispatchMode):
    """The ``output_mask`` of every ``convolution_backward`` kernel (which of input, weight and bias it computes)
    and the batch size it runs on."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: list[tuple[bool, ...]] = []
        self.batches: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.masks.append(tuple(args[-1]))
            self.batches.append(args[0].shape[0])
        return func(*args, **(kwargs or {}))


def test_input_gradient_pass_computes_no_weight_gradient():
    torch.manual_seed(0)
    model = models.create("cnn-small", 10, 1)
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    with _ConvolutionMasks() as first:
        _, ce, grad = input_gradient(model, x, y, create_graph=True)
    assert first.masks and all(m == (True, False, False) for m in first.masks)  # three convolutions, inputs only
    with _ConvolutionMasks() as final:
        (ce.mean() + grad.abs().sum()).backward()
    assert _weight_batches(final) == [4] * 6  # per convolution its double backward's and its own (maps > 4x4)
    assert all(p.grad is not None for p in model.parameters())


def _weight_batches(kernels: _ConvolutionMasks) -> list[int]:
    return sorted(b for m, b in zip(kernels.masks, kernels.batches, strict=True) if m[1])


def test_each_map_size_takes_its_weight_gradients_in_its_form():
    """resnet10t at 32x32 has maps of each kind: up to 4 positions the double backward's weight gradient is a
    matrix product and the convolution's own a kernel call; up to 16 both share one call on the two batches; above,
    two calls."""
    model, x, y = step_model("resnet10t")
    positions = []
    for conv in (m for m in model.modules() if isinstance(m, torch.nn.Conv2d)):
        conv.register_forward_hook(lambda module, inputs, out: positions.append(out[0, 0].numel()))
    _, ce, grad = input_gradient(model, x, y, create_graph=True)
    with _ConvolutionMasks() as final:
        (ce.mean() + grad.abs().sum()).backward()
    tiny = sum(p <= convolution.MATMUL_AT_MOST for p in positions)
    small = sum(convolution.MATMUL_AT_MOST < p <= convolution.FUSE_AT_MOST for p in positions)
    large = len(positions) - tiny - small
    assert tiny > 0 and small > 0 and large > 0
    assert _weight_batches(final) == [len(x)] * (2 * large + tiny) + [2 * len(x)] * small


@pytest.mark.parametrize(("x_shape", "w_shape", "kwargs"), [
    ((3, 8, 1, 1), (5, 8, 3, 3), {"padding": 1}),  # a 1x1 map, as resnet18's last stage at 32x32
    ((3, 8, 4, 4), (5, 8, 3, 3), {"padding": 1, "stride": 2}),  # 2x2
    ((3, 8, 3, 5), (5, 8, 1, 1), {"stride": (2, 3)}),  # a strided 1x1 convolution, 2x2
    ((3, 4, 6, 6), (6, 4, 3, 2), {"padding": (1, 0), "dilation": (2, 3), "stride": 3}),  # 2x1, uneven kernel
])
def test_weight_gradient_by_matmul_equals_the_kernels(x_shape, w_shape, kwargs):
    torch.manual_seed(0)
    x, w = torch.randn(x_shape, dtype=torch.float64), torch.randn(w_shape, dtype=torch.float64)
    out = F.conv2d(x, w, **kwargs)
    g = torch.randn_like(out)
    geo = convolution._Geometry(**{k: list(convolution._ints(kwargs.get(k, d), 2))
                                   for k, d in (("stride", 1), ("padding", 0), ("dilation", 1))}, groups=1)
    assert geo.by_matmul(g) and out[0, 0].numel() <= convolution.MATMUL_AT_MOST
    expected = geo.backward(g, x, w, (False, True, False))[1]
    torch.testing.assert_close(geo.weight_gradient_by_matmul(g, x, w), expected, rtol=1e-12, atol=1e-12)


@pytest.fixture
def fuse_all(monkeypatch):
    """Weight gradients share one call at every map size, so that cnn-small's exercise it."""
    monkeypatch.setattr(convolution, "FUSE_AT_MOST", 10 ** 9)


def _gradnorm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with native_double_backward():
        _, ce, grad = input_gradient(model, x, y, create_graph=True)
    return ce.mean() + grad.abs().sum()


def test_gradients_of_some_parameters_equal_the_full_backwards(fuse_all):
    """Asked for one parameter at a time, the engine runs only part of the graph: a weight gradient left for a
    forward node that does not run would be lost."""
    torch.manual_seed(0)
    model = models.create("cnn-small", 10, 1)
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    params = list(model.parameters())
    full = torch.autograd.grad(_gradnorm_loss(model, x, y), params)
    for p, expected in zip(params, full, strict=True):
        (alone,) = torch.autograd.grad(_gradnorm_loss(model, x, y), [p])
        torch.testing.assert_close(alone, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


def test_weight_gradient_of_a_convolution_whose_forward_takes_no_gradient(fuse_all):
    """With a loss linear in the last convolution's output, the second backward never reaches that convolution's
    forward node (kept alive here): its double backward's weight gradient must be taken where it arises."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w1, w2 = torch.randn(4, 3, 3, 3, requires_grad=True), torch.randn(5, 4, 3, 3, requires_grad=True)

    def second_loss(kernels: contextlib.AbstractContextManager) -> tuple[torch.Tensor, torch.Tensor]:
        with kernels:
            out = F.conv2d(torch.tanh(F.conv2d(x, w1, padding=1)), w2, padding=1)
            (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        return (grad ** 2).sum(), out

    loss, _ = second_loss(contextlib.nullcontext())
    expected = torch.autograd.grad(loss, [w1, w2])
    loss, out = second_loss(native_double_backward())
    actual = torch.autograd.grad(loss, [w1, w2])
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6 * e.abs().max().item())


def test_gradient_with_a_graph_equals_the_gradient_without(fuse_all):
    """``create_graph=True`` (a third derivative to come) takes the weight gradients one by one."""
    torch.manual_seed(0)
    model = models.create("cnn-small", 10, 1)
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    params = list(model.parameters())
    plain = torch.autograd.grad(_gradnorm_loss(model, x, y), params)
    with _ConvolutionMasks() as kernels:
        graph = torch.autograd.grad(_gradnorm_loss(model, x, y), params, create_graph=True)
    assert _weight_batches(kernels) == [4] * 6
    for a, b in zip(plain, graph, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * a.abs().max().item())


def test_unknown_double_backward_is_refused():
    with pytest.raises(UserError, match="double_backward"):
        config.load("fmnist-gradnorm", ["double_backward=fast"])


@pytest.mark.parametrize("method", list(CASES))
def test_objective_backward_skips_the_images_gradient(method):
    """``Objective.backward`` fills the parameters' gradients as ``loss.backward()`` does, and no convolution's
    input gradient beyond what the parameters need (the first convolution's)."""
    model, x, y = step_model("cnn-small")
    objective = objectives.create(method, model, **CASES[method])
    grads = {}
    for name, run_backward in {"plain": lambda loss: loss.backward(), "objective": objective.backward}.items():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss = objective(x, y)["loss"]
        with _ConvolutionMasks() as kernels:
            run_backward(loss)
        grads[name] = [p.grad.clone() for p in model.parameters()]
        input_gradients = sum(m[0] for m in kernels.masks if m[1])  # the forward nodes' (with their weights')
        assert input_gradients == (3 if name == "plain" else 2)
    for a, b in zip(grads["plain"], grads["objective"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * a.abs().max().item())
