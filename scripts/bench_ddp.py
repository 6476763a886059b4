"""Seconds per training step: the old flat all-reduce against DistributedDataParallel, interleaved in one run.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node=2 scripts/bench_ddp.py \
        [--model resnet18] [--act gelu] [--size 32] [--batch 64] [--rounds 5] [--steps 3] [--out FILE.json]

Every process trains its own ``--batch`` images (random, fixed) with GradNorm and with PGD-3 (eps 8/255, SGD).
Variants, each on its own copy of the same weights:

- ``flat``: natgrad 0.1's averaging: after the whole backward, every gradient copied into one buffer, one
  all-reduce, copied back (kept here only to compare against);
- ``ddp``: natgrad's :func:`natgrad.engine.distributed.data_parallel` (buckets, gradients as bucket views);
- ``ddp-copy``: DDP with ``gradient_as_bucket_view=False``;
- ``ddp-static``: DDP with ``static_graph=True`` as well. Timed only: with it, GradNorm's averaged gradients are
  wrong (1.02-1.38x the norm of one process's, per parameter: scripts/ddp_static_graph_check.py), so
  training does not use it.

Each round times ``--steps`` steps of every variant and method (after one untimed step each); the rounds rotate
the order. Rank 0 prints each median and its ratio to ``flat`` and writes them (and every round's seconds) as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from natgrad import models, objectives
from natgrad.engine.distributed import data_parallel, setup

EPS = 8 / 255
METHODS = {"gradnorm": {}, "pgd-3": {"steps": 3}}


def flat_all_reduce(model: nn.Module, world: int) -> None:
    """natgrad 0.1's gradient averaging, for comparison only."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--act", default="gelu")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64, help="images per process")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant, method and round")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    ctx = setup("auto")
    if ctx.world < 2:
        raise SystemExit("bench_ddp: run under torchrun with at least 2 processes (see the docstring)")
    torch.manual_seed(0)
    base = models.create(args.model, 10, 3, act=args.act).to(ctx.device)
    torch.manual_seed(1 + ctx.rank)
    x = torch.rand(args.batch, 3, args.size, args.size, device=ctx.device)
    y = torch.randint(0, 10, (args.batch,), device=ctx.device)
    devices = [ctx.device.index] if ctx.device.type == "cuda" else None
    wrappers: dict[str, Callable[[nn.Module], nn.Module | None]] = {
        "flat": lambda m: None,
        "ddp": lambda m: data_parallel(m, ctx),
        "ddp-copy": lambda m: DistributedDataParallel(m, device_ids=devices),
        "ddp-static": lambda m: DistributedDataParallel(m, device_ids=devices, gradient_as_bucket_view=True,
                                                        static_graph=True),
    }
    steps: dict[tuple[str, str], Callable[[], None]] = {}
    for variant, wrap in wrappers.items():
        for method, params in METHODS.items():
            model = copy.deepcopy(base).train()
            objective = objectives.create(method.split("-")[0], model, eps=EPS, **params)
            wrapped = wrap(model)
            if wrapped is not None:
                objective.distribute(wrapped)
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
            steps[variant, method] = _step(objective, optimizer, x, y, ctx.world if wrapped is None else 0)
    seconds: dict[str, list[float]] = {f"{v}/{m}": [] for v, m in steps}
    for step in steps.values():
        step()  # untimed: allocations, bucket rebuilding
    keys = list(steps)
    for r in range(args.rounds):
        for variant, method in keys[r % len(keys):] + keys[:r % len(keys)]:
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[variant, method]()
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            seconds[f"{variant}/{method}"].append((time.perf_counter() - start) / args.steps)
        if ctx.is_main:
            print(f"bench_ddp: round {r + 1}/{args.rounds} done", flush=True)
    if ctx.is_main:
        _report(args, ctx.world, seconds)
    dist.destroy_process_group()
    return 0


def _step(objective: objectives.Objective, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
          flat_world: int) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        objective(x, y)["loss"].backward()
        if flat_world:
            flat_all_reduce(objective.model, flat_world)
        optimizer.step()
    return step


def _report(args: argparse.Namespace, world: int, seconds: dict[str, list[float]]) -> None:
    medians = {k: statistics.median(v) for k, v in seconds.items()}
    ratios = {k: medians[k] / medians[f"flat/{k.split('/')[1]}"] for k in medians}
    print(f"{'variant/method':<22} {'s/step':>8} {'/ flat':>8}")
    for k in medians:
        print(f"{k:<22} {medians[k]:>8.3f} {ratios[k]:>8.3f}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "model": args.model, "act": args.act, "size": args.size, "batch_per_process": args.batch,
            "processes": world, "threads_per_process": torch.get_num_threads(), "rounds": args.rounds,
            "steps_per_round": args.steps, "torch": torch.__version__, "seconds_per_step": medians,
            "ratio_to_flat": ratios, "rounds_seconds": seconds}, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
