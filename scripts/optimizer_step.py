"""One optimizer step of each implementation, interleaved in one process (docs/RESULTS.md, issue 19).

Usage: python scripts/optimizer_step.py [MODEL ...]    (default: cnn-small resnet18 preact-resnet18)

For each model (its parameters with random gradients), the median seconds of one ``optimizer.step()`` as
``natgrad train`` builds it (timm's AdamW of the fmnist-gradnorm recipe) with ``optim.fused=false`` (PyTorch's
default: a loop over the tensors on the CPU, the multi-tensor form on a GPU), with ``foreach=True`` and with
``optim.fused=true``.
"""
import statistics
import sys
import time

import torch

from natgrad import config, models
from natgrad.build import build_optimizer

ROUNDS, STEPS = 7, 5
for name in sys.argv[1:] or ["cnn-small", "resnet18", "preact-resnet18"]:
    torch.manual_seed(0)
    model = models.create(name, 10, 3, act="gelu")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    fused = build_optimizer(config.load("fmnist-gradnorm", ["optim.fused=true"]), model)
    loop = build_optimizer(config.load("fmnist-gradnorm", ["optim.fused=false"]), model)
    foreach = type(loop)([{**g, "foreach": True} for g in loop.param_groups])
    optimizers = {"loop": loop, "foreach": foreach, "fused": fused}
    seconds: dict[str, list[float]] = {k: [] for k in optimizers}
    for _ in range(ROUNDS):
        for kind, optimizer in optimizers.items():
            optimizer.step()  # its state exists before the timed steps
            start = time.perf_counter()
            for _ in range(STEPS):
                optimizer.step()
            seconds[kind].append((time.perf_counter() - start) / STEPS)
    medians = {k: statistics.median(v) for k, v in seconds.items()}
    n = sum(p.numel() for p in model.parameters())
    print(f"{name} ({n / 1e6:.2f}M parameters, {torch.get_num_threads()} threads): "
          + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in medians.items())
          + f"; fused / loop {medians['fused'] / medians['loop']:.3f}")
