"""Which process of a torchrun job this is, and which global batches are its own: what analyses and
evaluations need to know of the processes, without the training engine."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Context:
    """This process's global rank, the number of processes, and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def global_batch_index(ctx: Context, k: int) -> int:
    """The global index of this process's ``k``-th batch of :func:`natgrad.engine.distributed.shard_batches`
    (batch ``b`` on rank ``b % world``)."""
    return ctx.rank + k * ctx.world
