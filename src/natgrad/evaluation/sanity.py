"""Appendix C's sanity checks (Carlini et al.'s checklist), each PASS, WARN or SKIP."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from natgrad.engine.distributed import Context
from natgrad.evaluation import runner
from natgrad.evaluation.integrity import deterministic
from natgrad.evaluation.settings import EvalSettings
from natgrad.gradients import eval_mode

SANITY_CHECKS = ("deterministic", "large eps reaches chance", "more iterations", "l2 direction weaker",
                 "transfer weaker", "black-box weaker", "autoattack flags")


def _verdict(name: str, ok: bool | None, numbers: dict, detail: str) -> dict:
    status = "SKIP" if ok is None else ("PASS" if ok else "WARN")
    return {"check": name, "status": status, "numbers": numbers, "detail": detail}


def _find(rows: list[dict], attack: str, eps: float, aa_attacks: list[str] | None) -> dict | None:
    for r in rows:
        if r["attack"] == attack and math.isclose(r["eps"], eps) and (
                attack != "autoattack-custom" or [p["attack"] for p in r["per_attack"]] == aa_attacks):
            return r
    return None


@dataclasses.dataclass
class _Rows:
    """Result rows on the checks' images: from the evaluation already done where it has them, else attacked now."""

    model: nn.Module
    ds: Dataset
    ctx: Context
    s: EvalSettings
    done: list[dict]

    def get(self, attacks: list[str], eps: list[float], steps: tuple[int, ...] | None = None,
            **changes: Any) -> list[dict]:
        """One row per attack, PGD step count and eps."""
        rows = []
        for a in attacks:
            for k in (steps or self.s.pgd_steps) if a.startswith("pgd") else [None]:
                for e in eps:
                    row = _find(self.done, f"{a}-{k}" if k else a, e, changes.get("aa_attacks"))
                    if row is None:  # per-batch seeds make a row the same whether made alone or with others
                        one = dataclasses.replace(self.s, attacks=[a], eps=[e],
                                                  pgd_steps=(k,) if k else self.s.pgd_steps, **changes)
                        (row,) = runner.evaluate_model(self.model, self.ds, one, self.ctx)["results"]
                    rows.append(row)
        return rows


def _determinism_check(model: nn.Module, ds: Dataset, ctx: Context, s: EvalSettings) -> dict:
    with eval_mode(model):
        same = deterministic(model, ds, ctx, s)
    return _verdict("deterministic", same, {}, "two forward passes in eval mode give the same logits" if same else
                    "two forward passes in eval mode differ: dropout or other randomness is on, which masks gradients; "
                    "evaluate a deterministic model")


def _white_box_checks(rows: _Rows, eps: float, k: int, num_classes: int) -> tuple[list[dict], dict]:
    """Large eps, more iterations, L2 direction and transfer; also the PGD-k row the black-box check compares to."""
    chance = 1.0 / num_classes
    big = min(1.0, 8 * eps)
    (huge,) = rows.get(["pgd"], [big], (k,))
    (single, double) = rows.get(["pgd"], [eps], (k, 2 * k))
    change = abs(single["robust_acc"] - double["robust_acc"]) * 100
    (l2dir,) = rows.get(["pgd-l2dir"], [eps], (k,))
    checks = [
        _verdict("large eps reaches chance", huge["robust_acc"] <= chance,
                 {"eps": big, "robust_acc": huge["robust_acc"], "chance": chance},
                 f"PGD-{k} at eps {big:.4g} leaves {100 * huge['robust_acc']:.2f}% (chance {100 * chance:.2f}%)"),
        _verdict("more iterations", change < 0.5,
                 {f"pgd-{k}": single["robust_acc"], f"pgd-{2 * k}": double["robust_acc"], "change_points": change},
                 f"doubling PGD steps {k} -> {2 * k} changes robust accuracy by {change:.2f} points (want < 0.5)"),
        _verdict("l2 direction weaker", l2dir["robust_acc"] >= single["robust_acc"],
                 {"pgd-l2dir": l2dir["robust_acc"], "pgd": single["robust_acc"]},
                 "the L2-direction attack should not beat the sign attack under an L-infinity constraint"),
    ]
    if rows.s.source is not None:
        (transfer,) = rows.get(["transfer"], [eps])
        checks.append(_verdict("transfer weaker", transfer["robust_acc"] >= single["robust_acc"],
                               {"transfer": transfer["robust_acc"], "white_box": single["robust_acc"]},
                               "examples made on another model should fool this one less than its own white-box "
                               "attack"))
    else:
        checks.append(_verdict("transfer weaker", None, {}, "no --source model given"))
    return checks, single


def _black_box_checks(rows: _Rows, eps: float, pgd_row: dict) -> list[dict]:
    (square,) = rows.get(["autoattack-custom"], [eps], aa_attacks=["square"])
    (aa,) = rows.get(["autoattack"], [eps])
    flags = aa.get("warnings", []) + square.get("warnings", [])
    return [
        _verdict("black-box weaker", square["robust_acc"] >= min(aa["robust_acc"], pgd_row["robust_acc"]),
                 {"square": square["robust_acc"], "autoattack": aa["robust_acc"], "pgd": pgd_row["robust_acc"]},
                 "the black-box Square attack should not beat the white-box attacks"),
        _verdict("autoattack flags", not flags, {"warnings": flags},
                 "AutoAttack raised no flags" if not flags else "; ".join(flags)),
    ]


def sanity_checks(model: nn.Module, ds: Dataset, settings: EvalSettings, ctx: Context, num_classes: int,
                  only: list[str] | None = None, done: list[dict] | None = None) -> list[dict]:
    """Carlini et al.'s checklist as the paper's Appendix C runs it; each check PASS, WARN or SKIP.

    ``only`` restricts the report to some of :data:`SANITY_CHECKS` (and runs only the attacks they need);
    ``done`` holds result rows of :func:`evaluate_model` on the same images and settings, which are reused
    instead of attacking again.
    """
    wanted = set(SANITY_CHECKS if only is None else only)
    checks = [_determinism_check(model, ds, ctx, settings)] if "deterministic" in wanted else []
    if wanted <= {"deterministic"}:
        return checks
    rows = _Rows(model, ds, ctx, settings, done or [])
    white_box, pgd_row = _white_box_checks(rows, settings.first_eps, max(settings.pgd_steps), num_classes)
    return checks + white_box + _black_box_checks(rows, settings.first_eps, pgd_row)


def format_sanity(checks: list[dict]) -> str:
    return "\n".join(f"{c['status']:<5} {c['check']:<26} {c['detail']}" for c in checks)
