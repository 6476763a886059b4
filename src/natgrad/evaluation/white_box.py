"""The attacks counted image by image: clean, PGD-k (sign or L2 direction) and transfer from another model."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from natgrad.attacks import paper_step_size, pgd
from natgrad.engine.distributed import Context
from natgrad.errors import UserError
from natgrad.evaluation.counting import accuracy_counts, row
from natgrad.evaluation.settings import AttackFn, AttackResult, EvalSettings


def clean(model: nn.Module, ds: Dataset, ctx: Context, s: EvalSettings) -> AttackResult:
    n, correct = accuracy_counts(model, ds, ctx, s, "clean", None)
    return AttackResult([row("clean", 0.0, n, correct)])


def pgd_attack(attack: str, direction: str) -> AttackFn:
    """PGD-k for every eps and step count of the settings, named ``{attack}-{k}`` (step eps/4, best iterate)."""

    def run(model: nn.Module, ds: Dataset, ctx: Context, s: EvalSettings) -> AttackResult:
        rows = []
        for eps in s.eps:
            for steps in s.pgd_steps:
                def perturb(x: torch.Tensor, y: torch.Tensor, eps: float = eps, steps: int = steps) -> torch.Tensor:
                    return pgd(model, x, y, eps, steps, paper_step_size(eps), random_start=True, keep_best=True,
                               direction=direction, restarts=s.restarts)
                name = f"{attack}-{steps}"
                n, correct = accuracy_counts(model, ds, ctx, s, f"{name} eps={eps:.4g}", perturb)
                rows.append(row(name, eps, n, correct, steps=steps, step_size=paper_step_size(eps),
                                restarts=s.restarts))
        return AttackResult(rows)

    return run


def transfer(model: nn.Module, ds: Dataset, ctx: Context, s: EvalSettings) -> AttackResult:
    """PGD examples made on ``s.source``, counted on ``model``."""
    source = s.source
    if source is None:
        raise UserError("the transfer attack needs --source RUN_DIR (the model the examples are made on)")
    rows = []
    for eps in s.eps:
        def perturb(x: torch.Tensor, y: torch.Tensor, eps: float = eps) -> torch.Tensor:
            return pgd(source, x, y, eps, s.source_steps, paper_step_size(eps), random_start=True, keep_best=True)
        n, correct = accuracy_counts(model, ds, ctx, s, f"transfer eps={eps:.4g}", perturb)
        rows.append(row("transfer", eps, n, correct, source_steps=s.source_steps))
    return AttackResult(rows)
