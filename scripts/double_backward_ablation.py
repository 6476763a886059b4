"""One GradNorm step (objective forward and backward, no optimizer), interleaved in one process: three parts
of double_backward=natgrad off, each alone, and all on (docs/RESULTS.md, issue 19).

Usage: python scripts/double_backward_ablation.py cnn-small|resnet18

It switches natgrad internals (the fusion threshold, the GELU route) for the measurement only.
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
else:
    model = models.create("resnet18", 10, 3, act="gelu", train_mode="eval")
    x, y = torch.rand(64, 3, 32, 32), torch.randint(0, 10, (64,))
objective = objectives.create("gradnorm", model, eps=8 / 255)
gelu_route = db._ROUTES[F.gelu]
threshold = convolution.FUSE_AT_MOST


def step(fuse: bool, parameters_only: bool, gelu: bool) -> None:
    convolution.FUSE_AT_MOST = threshold if fuse else 0
    if gelu:
        db._ROUTES[F.gelu] = gelu_route
    else:
        db._ROUTES.pop(F.gelu, None)
    model.zero_grad(set_to_none=True)
    loss = objective(x, y)["loss"]
    if parameters_only:
        objective.backward(loss)
    else:
        loss.backward()


variants = {"none": (False, False, False), "fused weight gradients": (True, False, False),
            "backward into parameters": (False, True, False), "GELU": (False, False, True),
            "all three": (True, True, True)}
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
