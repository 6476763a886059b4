"""Clean and PGD-k accuracy on a dataset, exact under torchrun (no padded duplicates)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from natgrad.attacks import eval_mode, pgd
from natgrad.data import eval_loader
from natgrad.engine.distributed import Context, sum_over_processes


def evaluate(
    model: nn.Module,
    ds: Dataset,
    eps: float,
    pgd_steps: int = 10,
    batch_size: int = 256,
    ctx: Context | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Clean accuracy and, when ``pgd_steps`` and ``eps`` are positive, PGD-k accuracy (step eps/4, random start).

    The attack's randomness comes from a seeded fork of the RNG, so evaluating does not
    change what training draws afterwards.
    """
    ctx = ctx or Context(0, 1, next(model.parameters()).device)
    counts = torch.zeros(3, dtype=torch.float64)  # n, clean correct, pgd correct
    attack = pgd_steps > 0 and eps > 0
    devices = [ctx.device] if ctx.device.type == "cuda" else []
    with eval_mode(model), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        loader = eval_loader(ds, batch_size, ctx.rank, ctx.world)
        for x, y in tqdm(loader, desc="eval", leave=False, disable=not (progress and ctx.is_main)):
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            with torch.no_grad():
                counts[1] += (model(x).argmax(1) == y).sum().item()
            if attack:
                x_adv = pgd(model, x, y, eps, pgd_steps, random_start=True, keep_best=True)
                with torch.no_grad():
                    counts[2] += (model(x_adv).argmax(1) == y).sum().item()
            counts[0] += len(y)
    counts = sum_over_processes(counts.to(ctx.device), ctx.world).cpu()
    n = int(counts[0])
    return {
        "n": n,
        "clean_acc": counts[1].item() / max(n, 1),
        "pgd_acc": counts[2].item() / max(n, 1) if attack else None,
        "pgd_steps": pgd_steps if attack else 0,
        "eps": eps,
    }
