"""The curves: PGD-k accuracy against eps (Figure 2) and the final PGD iterate against the steps (Figure 13)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from natgrad.attacks import finite_logits, paper_step_size, pgd
from natgrad.engine.distributed import Context, merge_counts, shard_batches
from natgrad.evaluation.counting import accuracy_counts
from natgrad.evaluation.settings import REFERENCE_EPS, AttackResult, EvalSettings


def default_sweep_eps(eps: float) -> list[float]:
    """0 to 32/255 in steps of 2/255 (Figure 2), scaled by eps / (4/255) for other datasets, at most 1."""
    scale = eps / REFERENCE_EPS
    grid = [min(1.0, k * 2 / 255 * scale) for k in range(17)]  # eps beyond 1 means nothing for [0, 1] images
    return sorted(set(grid))


def eps_sweep(model: nn.Module, ds: Dataset, ctx: Context, s: EvalSettings) -> AttackResult:
    grid = s.sweep_eps or default_sweep_eps(s.first_eps)
    steps = max(s.pgd_steps)
    accs = []
    n = 0
    for eps in grid:
        def perturb(x: torch.Tensor, y: torch.Tensor, eps: float = eps) -> torch.Tensor:
            if eps == 0:
                return x
            return pgd(model, x, y, eps, steps, paper_step_size(eps), random_start=True, keep_best=True)
        n, correct = accuracy_counts(model, ds, ctx, s, f"eps-sweep {eps:.4g}", perturb)
        accs.append(correct / max(n, 1))
    return AttackResult(sweep={"attack": f"pgd-{steps}", "eps": grid, "robust_acc": accs, "n": n})


def steps_sweep(model: nn.Module, ds: Dataset, ctx: Context, s: EvalSettings) -> AttackResult:
    """Accuracy and mean loss of the final PGD iterate against the number of steps (Figure 13)."""
    eps = s.first_eps
    accs, losses = [], []
    totals = torch.zeros(3, dtype=torch.float64)
    for steps in s.sweep_steps:
        totals = torch.zeros(3, dtype=torch.float64)  # n, correct, loss sum
        for x, y in shard_batches(ds, s.batch_size, ctx, s.seed, f"steps-sweep {steps}", s.progress):
            x_adv = pgd(model, x, y, eps, steps, paper_step_size(eps), random_start=True)
            with torch.no_grad():
                logits = finite_logits(model(x_adv), f"the images of steps-sweep {steps}")
                totals += torch.tensor([len(y), (logits.argmax(1) == y).sum().item(),
                                        torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()],
                                       dtype=torch.float64)
        totals = merge_counts(totals, ctx)
        accs.append(totals[1].item() / max(totals[0].item(), 1))
        losses.append(totals[2].item() / max(totals[0].item(), 1))
    return AttackResult(sweep={"eps": eps, "steps": list(s.sweep_steps), "robust_acc": accs, "loss": losses,
                               "n": int(totals[0])})
