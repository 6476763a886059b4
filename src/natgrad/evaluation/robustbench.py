"""RobustBench's ``model_info`` JSON from the evaluation rows (AutoAttack standard at the recipe's eps)."""

from __future__ import annotations

import math

from natgrad.config import RunConfig
from natgrad.errors import UserError
from natgrad.evaluation.settings import EvalSettings


def check_robustbench(cfg: RunConfig, settings: EvalSettings) -> None:
    """Fail before attacking when the evaluation will not hold what :func:`robustbench_info` needs."""
    if not ({"clean", "autoattack"} <= set(settings.attacks) and any(math.isclose(e, cfg.eps) for e in settings.eps)):
        raise UserError(f"--robustbench-json needs the clean and autoattack results at the recipe's eps {cfg.eps:.4g}; "
                        f"add --attacks clean,autoattack --eps {cfg.eps:.6g}")


def robustbench_info(name: str, cfg: RunConfig, rows: list[dict]) -> dict:
    """RobustBench's model_info fields from the evaluation rows (AutoAttack standard at the recipe's eps)."""
    clean = next(r["robust_acc"] for r in rows if r["attack"] == "clean")
    aa = next(r for r in rows if r["attack"] == "autoattack" and math.isclose(r["eps"], cfg.eps))
    return {
        "name": name, "architecture": cfg.model.name, "training": cfg.method, "dataset": cfg.data.name,
        "threat_model": "Linf", "eps": f"{cfg.eps * 255:.4g}/255", "clean_acc": f"{100 * clean:.2f}",
        "autoattack_acc": f"{100 * aa['robust_acc']:.2f}", "number_forward_passes": 1, "additional_data": False,
        "footnote": f"natgrad {cfg.method} recipe; evaluated on {aa['n']} test images", "reference": "", "venue": "",
    }
