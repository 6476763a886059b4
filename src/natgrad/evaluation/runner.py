"""``evaluate_model``: every named attack at every eps on a dataset, in eval mode, with the integrity report.

Every attack shards the images across torchrun processes by global batch (batch ``b`` goes to rank
``b % world``, and its randomness is seeded by ``seed + b``) and merges exact counts, so the numbers are the
same for any number of processes. Each row of the result is ``{"attack", "eps", "n", "robust_acc", ...}``;
``clean`` is the attack with eps 0.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from natgrad.engine.distributed import Context
from natgrad.evaluation.integrity import integrity
from natgrad.evaluation.registry import get_attack
from natgrad.evaluation.settings import EvalSettings
from natgrad.gradients import eval_mode


def evaluate_model(model: nn.Module, ds: Dataset, settings: EvalSettings, ctx: Context) -> dict:
    """Run every named attack at every eps on ``ds``; returns ``{"results": [...], "sweeps": {...}, "integrity"}``."""
    rows: list[dict] = []
    sweeps: dict[str, dict] = {}
    devices = [ctx.device] if ctx.device.type == "cuda" else []
    was_training = model.training
    with eval_mode(model), torch.random.fork_rng(devices=devices):
        report = integrity(model, ds, ctx, settings, was_training)
        for name in settings.attacks:
            spec = get_attack(name)
            out = spec(model, ds, ctx, settings)
            rows += out.rows
            if spec.sweep is not None and out.sweep is not None:
                sweeps[spec.sweep] = out.sweep
    report["autoattack_warnings"] = [w for r in rows for w in r.get("warnings", [])]
    return {"results": rows, "sweeps": sweeps, "integrity": report}
