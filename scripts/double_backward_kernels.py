"""Per-layer timings behind natgrad.double_backward (docs/RESULTS.md, issue 19), this machine, one process.

Usage: python scripts/double_backward_kernels.py [PART ...]    (default: 1 2 3 4)

1. resnet18 (32x32, batch 64): each convolution's two weight gradients as two calls against one call on the
   two batches stacked (the cat included), per output map size.
2. GELU at 128x64x14x14: autograd's double backward of ``gelu_backward`` against natgrad's.
3. LayerNorm and training-mode BatchNorm: the second backward of one normalization, autograd against natgrad.
4. Each distinct convolution of timm's resnet18 and natgrad's preact-resnet18 at 32x32, batch 64: the forward, the
   input gradient and the weight gradient of ``aten.convolution_backward`` (the kernels every method runs), and
   the weight gradient as an im2col matrix product, per output map size.
"""
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F

from natgrad import models
from natgrad.double_backward import convolution, native_double_backward

torch.manual_seed(0)


def median_ms(fn: Callable[[], object], runs: int = 10) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _geometry(conv: torch.nn.Conv2d) -> convolution._Geometry:
    return convolution._Geometry(list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)


def _two_and_one(conv: torch.nn.Conv2d, in_shape: torch.Size, out_shape: torch.Size) -> tuple[float, float]:
    """ms for a convolution's two weight gradients as two calls, and as one call on the batches stacked."""
    def wgrad(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _geometry(conv).backward(g, x, conv.weight.detach(), (False, True, False))[1]
    x1, x2, g1, g2 = torch.randn(in_shape), torch.randn(in_shape), torch.randn(out_shape), torch.randn(out_shape)
    return (median_ms(lambda: wgrad(g1, x1) + wgrad(g2, x2)),
            median_ms(lambda: wgrad(torch.cat([g1, g2]), torch.cat([x1, x2]))))


def _convolutions(model: torch.nn.Module) -> list[tuple[torch.nn.Conv2d, torch.Size, torch.Size]]:
    """Each convolution of ``model`` on a batch of 64 32x32 images, with its input and output shapes."""
    layers = []
    hooks = [m.register_forward_hook(lambda m, i, o: layers.append((m, i[0].shape, o.shape)))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(64, 3, 32, 32))
    for h in hooks:
        h.remove()
    return layers


def weight_gradients() -> None:
    layers = _convolutions(timm.create_model("resnet18", num_classes=10))
    by_size: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for conv, in_shape, out_shape in layers:
        by_size[f"{out_shape[2]}x{out_shape[3]}"].append(_two_and_one(conv, in_shape, out_shape))
    print("1. resnet18 32x32 batch 64, both weight gradients of a convolution (ms): two calls -> one stacked call")
    total_two = total_one = 0.0
    for size, pairs in by_size.items():
        print(f"   {size:6} " + ", ".join(f"{a:.2f} -> {b:.2f}" for a, b in pairs))
        total_two += sum(a for a, _ in pairs)
        total_one += sum(b for _, b in pairs)
    print(f"   all {len(layers)} layers stacked: {total_one / total_two:.3f} of two calls")


def gelu() -> None:
    shape = (128, 64, 14, 14)
    x, g, gg = torch.randn(shape), torch.randn(shape), torch.randn(shape)

    def second(routed: bool) -> None:
        leaf = x.clone().requires_grad_(True)
        with native_double_backward() if routed else torch.enable_grad():
            out = F.gelu(leaf)
        (first,) = torch.autograd.grad(out, leaf, g, create_graph=True)
        torch.autograd.grad(first, leaf, gg)

    print(f"2. GELU {shape}, first and second backward (ms): autograd {median_ms(lambda: second(False)):.2f}, "
          f"natgrad {median_ms(lambda: second(True)):.2f}")


def _second_backward(kind: str, shape: tuple[int, ...], routed: bool) -> float:
    """Seconds of the backward of ``|grad_x <norm(x), v>|_1`` for one normalization."""
    channels = shape[-1] if kind == "LayerNorm" else shape[1]
    gen = torch.Generator().manual_seed(0)
    leaf, v = torch.randn(shape, generator=gen).requires_grad_(True), torch.randn(shape, generator=gen)
    w, b = torch.randn(channels, requires_grad=True), torch.randn(channels, requires_grad=True)
    with native_double_backward() if routed else torch.enable_grad():
        y = F.layer_norm(leaf, (channels,), w, b) if kind == "LayerNorm" else F.batch_norm(leaf, None, None, w, b, True)
    (grad,) = torch.autograd.grad((y * v).sum(), leaf, create_graph=True)
    start = time.perf_counter()
    grad.abs().sum().backward()
    return time.perf_counter() - start


def normalizations() -> None:
    print("3. the second backward of one normalization (ms): autograd / natgrad")
    for kind, shape in [("LayerNorm", (16, 196, 96)), ("LayerNorm", (16, 784, 96)), ("LayerNorm", (8, 3136, 128)),
                        ("BatchNorm", (64, 64, 8, 8)), ("BatchNorm", (128, 64, 14, 14)),
                        ("BatchNorm", (32, 256, 28, 28))]:
        autograd, natgrad = (statistics.median(_second_backward(kind, shape, routed) for _ in range(9))
                             for routed in (False, True))
        print(f"   {kind} {shape}: {1e3 * autograd:.2f} / {1e3 * natgrad:.2f} ({natgrad / autograd:.2f})")


def _kernels(conv: torch.nn.Conv2d, in_shape: torch.Size, out_shape: torch.Size) -> dict[str, float]:
    w, x, g, geo = conv.weight.detach(), torch.randn(in_shape), torch.randn(out_shape), _geometry(conv)
    reference = geo.backward(g, x, w, (False, True, False))[1]
    assert (geo.weight_gradient_by_matmul(g, x, w) - reference).abs().max() <= 1e-4 * reference.abs().max()
    return {"forward": median_ms(lambda: geo.convolve(x, w)),
            "input": median_ms(lambda: geo.backward(g, x, w, (True, False, False))),
            "weight": median_ms(lambda: geo.backward(g, x, w, (False, True, False))),
            "im2col": median_ms(lambda: geo.weight_gradient_by_matmul(g, x, w))}


def convolution_kernels() -> None:
    print("4. per convolution at 32x32, batch 64 (ms): forward, input gradient, weight gradient, weight by im2col")
    for name in ("resnet18", "preact-resnet18"):
        timings: dict[tuple, dict[str, float]] = {}
        counts: dict[tuple, int] = defaultdict(int)
        for conv, in_shape, out_shape in _convolutions(models.create(name, 10, 3, act="gelu")):
            key = (tuple(conv.weight.shape), tuple(out_shape[2:]), conv.stride)
            counts[key] += 1
            if key not in timings:
                timings[key] = _kernels(conv, in_shape, out_shape)
        print(f"   {name}:")
        for key, t in timings.items():
            print(f"   {'x'.join(map(str, key[0]))} at {key[1][0]}x{key[1][1]} (x{counts[key]}): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in t.items()))
        totals = {k: sum(counts[key] * t[k] for key, t in timings.items()) for k in ("forward", "input", "weight",
                                                                                      "im2col")}
        print(f"   {name} all layers: " + ", ".join(f"{k} {v:.1f}" for k, v in totals.items()))


PARTS = {"1": weight_gradients, "2": gelu, "3": normalizations, "4": convolution_kernels}
for part in sys.argv[1:] or PARTS:
    PARTS[part]()
