"""How numbers read in the report: percentages, compact values, eps and attack names."""

from __future__ import annotations

import math
from typing import TypeGuard

MISSING = "\u2013"  # en dash: a value that is not there

ATTACK_NAMES = {
    "clean": "Clean",
    "autoattack": "AutoAttack",
    "autoattack-plus": "AutoAttack+",
    "autoattack-custom": "AutoAttack (custom)",
    "transfer": "Transfer",
}


def is_number(x: object) -> TypeGuard[float]:
    """A finite int or float (not a bool)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def pct(x: float | None) -> str:
    """An accuracy in [0, 1] as a percentage with 2 decimals (no sign): ``0.8712 -> "87.12"``."""
    return f"{100 * x:.2f}" if is_number(x) else _other(x)


def compact(x: float | None) -> str:
    """3 significant digits; scientific notation (``1.23e-5``) below 1e-3 or from 1e4 on."""
    if not is_number(x):
        return _other(x)
    if x == 0:
        return "0"
    r = float(f"{x:.3g}")  # rounding first keeps 9.996 from reading as 10.00
    if abs(r) < 1e-3 or abs(r) >= 1e4:
        mantissa, exponent = f"{r:.2e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    decimals = max(0, 2 - math.floor(math.log10(abs(r))))
    return f"{r:.{decimals}f}"


def mean_std(mean: float | None, std: float | None) -> str:
    """``mean ± std`` in :func:`compact` notation; just the mean when std is missing."""
    if not is_number(mean):
        return _other(mean)
    return f"{compact(mean)} \u00b1 {compact(std)}" if is_number(std) else compact(mean)


def eps_text(eps: float | None) -> str:
    """``4/255`` where eps is a whole multiple of 1/255, else 4 significant digits."""
    if not is_number(eps):
        return MISSING
    k = eps * 255
    if eps > 0 and abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return f"{eps:.4g}"


def attack_name(attack: str) -> str:
    """``pgd-10 -> PGD-10``, ``pgd-l2dir-10 -> PGD-10 (L2 dir.)``, ``autoattack -> AutoAttack``."""
    if attack in ATTACK_NAMES:
        return ATTACK_NAMES[attack]
    if attack.startswith("pgd-l2dir-"):
        return f"PGD-{attack.removeprefix('pgd-l2dir-')} (L2 dir.)"
    if attack.startswith("pgd-"):
        return attack.upper()
    return attack


def _other(x: object) -> str:
    """Infinities as such; NaN (e.g. a mean over no images) and anything else as missing."""
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return MISSING
