"""One GradNorm step (objective forward and backward, no optimizer), interleaved in one process: parts of
double_backward=natgrad off, each alone, and all on, and double_backward=autograd (docs/RESULTS.md, issue 19).

Usage: python scripts/double_backward_ablation.py cnn-small|resnet18|resnet18-train|swin-tiny

It switches natgrad internals (the fusion threshold, the GELU and normalization routes) for the measurement
only.
"""
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import natgrad.double_backward as db
from natgrad import models, objectives
from natgrad.double_backward import convolution

name = sys.argv[1]
torch.manual_seed(0)
if name == "cnn-small":
    model = models.create("cnn-small", 10, 1)
    x, y = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,))
elif name == "swin-tiny":
    model = models.create("swin_tiny_patch4_window7_224", 10, 3, img_size=56)
    x, y = torch.rand(16, 3, 56, 56), torch.randint(0, 10, (16,))
else:
    model = models.create("resnet18", 10, 3, act="gelu", train_mode="train" if name == "resnet18-train" else "eval")
    x, y = torch.rand(64, 3, 32, 32), torch.randint(0, 10, (64,))
objective = objectives.create("gradnorm", model, eps=8 / 255)
reference = objectives.create("gradnorm", model, eps=8 / 255, double_backward="autograd")
routes = dict(db._ROUTES)
threshold, matmul_threshold = convolution.FUSE_AT_MOST, convolution.MATMUL_AT_MOST


def route(funcs: tuple, on: bool) -> None:
    for func in funcs:
        if on:
            db._ROUTES[func] = routes[func]
        else:
            db._ROUTES.pop(func, None)


def step(fuse: bool, parameters_only: bool, gelu: bool, norms: bool, matmul: bool = False,
         autograd: bool = False) -> None:
    convolution.FUSE_AT_MOST = threshold if fuse else 0
    convolution.MATMUL_AT_MOST = matmul_threshold if matmul else 0
    route((F.gelu,), gelu)
    route((F.layer_norm, F.batch_norm), norms)
    model.zero_grad(set_to_none=True)
    loss = (reference if autograd else objective)(x, y)["loss"]
    if parameters_only:
        objective.backward(loss)
    else:
        loss.backward()


variants = {"none": (False, False, False, False), "fused weight gradients": (True, False, False, False),
            "backward into parameters": (False, True, False, False), "GELU": (False, False, True, False),
            "normalizations": (False, False, False, True), "all four": (True, True, True, True),
            "weight gradients by matmul": (False, False, False, False, True),
            "all five": (True, True, True, True, True),
            "autograd (parameters only)": (False, True, False, False, False, True)}
times: dict[str, list[float]] = {k: [] for k in variants}
random.seed(0)
for r in range(16):
    order = list(variants)
    random.shuffle(order)
    for k in order:
        start = time.perf_counter()
        step(*variants[k])
        if r >= 2:
            times[k].append(time.perf_counter() - start)
base = statistics.median(times["none"])
for k, ts in times.items():
    print(f"{name:10} {k:26} {statistics.median(ts) * 1e3:6.1f} ms  {statistics.median(ts) / base:.3f}")
