"""AutoAttack rows (standard, plus, custom) per eps, counted batch by batch over the processes, resumable."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from natgrad.attacks.autoattack import RESULT_NAMES, SQUARE_FLAG, attack_names, autoattack, square_warnings
from natgrad.engine.distributed import Context, gather_unique, global_batch_index, merge_counts, shard_batches
from natgrad.errors import UserError
from natgrad.evaluation.counting import row
from natgrad.evaluation.settings import AttackFn, AttackResult, EvalSettings

VERSIONS = {name: version for version, name in RESULT_NAMES.items()}


def autoattack_attack(attack: str) -> AttackFn:
    """The named AutoAttack version at every eps of the settings."""

    def run(model: nn.Module, ds: Dataset, ctx: Context, s: EvalSettings) -> AttackResult:
        return AttackResult([autoattack_row(model, ds, ctx, attack, eps, s) for eps in s.eps])

    return run


def _state_path(s: EvalSettings, version: str, eps: float, batch_index: int) -> Path | None:
    if s.state_dir is None:
        return None
    attacks = "-".join(s.aa_attacks or []) if version == "custom" else version
    return Path(s.state_dir) / f"{attacks}-eps{eps:.6g}-batch{batch_index}-of{s.batch_size}.pt"


def autoattack_row(model: nn.Module, ds: Dataset, ctx: Context, attack: str, eps: float, s: EvalSettings) -> dict:
    """One row: robust accuracy after every attack of the version, and the warnings AutoAttack raised."""
    version = VERSIONS[attack]
    if version == "custom" and not s.aa_attacks:
        raise UserError("autoattack-custom needs --aa-attacks, e.g. --aa-attacks apgd-ce,square")
    custom = s.aa_attacks if version == "custom" else None
    counts, names, warnings = None, [], []
    for b, (x, y) in enumerate(shard_batches(ds, s.batch_size, ctx, s.seed, f"{attack} eps={eps:.4g}", s.progress)):
        batch_index = global_batch_index(ctx, b)
        out = autoattack(model, x, y, eps, version=version, attacks=custom, batch_size=s.batch_size,
                         seed=s.seed + batch_index, state_path=_state_path(s, version, eps, batch_index),
                         square_queries=s.square_queries)
        n = len(y)
        names = [p["attack"] for p in out["per_attack"]]
        batch = torch.tensor([n, round(out["clean_acc"] * n), round(out["robust_acc"] * n)]
                             + [round(p["robust_acc"] * n) for p in out["per_attack"]], dtype=torch.float64)
        counts = batch if counts is None else counts + batch
        # the Square check is redone below on the merged counts, where its threshold is meant to apply
        warnings += [w for w in out["warnings"] if w not in warnings and not w.startswith(SQUARE_FLAG)]
    if counts is None:  # a process with no batch still joins the all-reduce
        counts = torch.zeros(3 + len(attack_names(version, s.aa_attacks)), dtype=torch.float64)
    counts = merge_counts(counts, ctx)
    total = int(counts[0])
    names = names or attack_names(version, s.aa_attacks)
    breakdown = [{"attack": name, "robust_acc": counts[3 + i].item() / max(total, 1)} for i, name in enumerate(names)]
    warnings = gather_unique(warnings, ctx.world) + square_warnings(counts[1].item() / max(total, 1), breakdown)
    return row(attack, eps, total, int(counts[2]), version=version, per_attack=breakdown, warnings=warnings)
