"""torchrun support: rank and world size from the environment; gloo on CPU, NCCL on GPU.

Training wraps the model in :class:`~torch.nn.parallel.DistributedDataParallel` (:func:`data_parallel`) for
every objective. Its hooks fire on the parameters' gradient accumulation, which happens once, in the step's
final ``.backward()``; the input gradients of GradNorm and edge regularization (``autograd.grad`` with
respect to the input only), attack steps and the finite difference's first pass accumulate nothing, and
run on the unwrapped module.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from natgrad.build import select_device
from natgrad.processes import Context, global_batch_index
from natgrad.progress import Progress


def setup(device: str = "auto") -> Context:
    """Pick the device and, under torchrun (``WORLD_SIZE`` > 1), join the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = select_device(device, local_rank)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return Context(rank, world, dev)


def data_parallel(model: nn.Module, ctx: Context) -> nn.Module:
    """``model`` in DistributedDataParallel under several processes (``model`` itself in one).

    ``find_unused_parameters`` stays off (every objective's loss reaches every parameter through its
    cross-entropy); gradients are views into DDP's buckets, which saves a copy of them per step.
    ``static_graph`` stays off: with it, a double backward's averaged gradients come out wrong.
    """
    if ctx.world == 1:
        return model
    devices = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=devices, gradient_as_bucket_view=True)


def gradient_sync(wrapped: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Around a micro-batch's forward and backward: communicate its gradients (``sync``) or only accumulate
    them (DDP's ``no_sync``), as the micro-batches of one optimizer step before its last do."""
    if sync or not isinstance(wrapped, DistributedDataParallel):
        return contextlib.nullcontext()
    return wrapped.no_sync()


def sync_batchnorm(model: nn.Module, ctx: Context) -> nn.Module:
    """``model`` with its BatchNorm layers as SyncBatchNorm (statistics over every process's batch); unchanged
    in one process. The state dict keys stay those of BatchNorm, so checkpoints move between the two."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if ctx.world > 1 else model


def sum_over_processes(values: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(values)
    return values


def gather_unique(items: list[str], world: int) -> list[str]:
    """Every process's ``items``, merged in rank order without repeats (the same list on every rank)."""
    if world == 1:
        return list(dict.fromkeys(items))
    gathered: list[list[str] | None] = [None] * world
    dist.all_gather_object(gathered, items)
    return list(dict.fromkeys(item for part in gathered for item in part or []))


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def shard_batches(ds: Dataset, batch_size: int, ctx: Context, seed: int, desc: str,
                  progress: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This process's global batches, in order, each with the global RNG seeded by ``seed + b``.

    Batch ``b`` goes to rank ``b % world``, so counts merged with :func:`merge_counts` are the same for any
    number of processes.
    """
    starts = range(0, len(ds), batch_size)  # type: ignore[arg-type]
    mine = [list(range(a, min(a + batch_size, len(ds)))) for b, a in enumerate(starts)  # type: ignore[arg-type]
            if b % ctx.world == ctx.rank]
    loader = DataLoader(ds, batch_sampler=mine)
    for k, (x, y) in enumerate(Progress(loader, desc=desc, leave=False, disable=not (progress and ctx.is_main))):
        torch.manual_seed(seed + global_batch_index(ctx, k))
        yield x.to(ctx.device), y.to(ctx.device)


def merge_counts(counts: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Exact counts summed over every process (on the process's device for the all-reduce), back on the CPU."""
    return sum_over_processes(counts.to(ctx.device), ctx.world).cpu()


def batch_source(ds: Dataset, seed: int, ctx: Context
                 ) -> Callable[[str, int, bool], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """``(description, batch size, progress) ->`` :func:`shard_batches` of ``ds``: the batches an analysis takes."""
    return lambda desc, batch_size, progress: shard_batches(ds, batch_size, ctx, seed, desc, progress)
