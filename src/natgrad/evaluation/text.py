"""The evaluation's result rows as text."""

from __future__ import annotations

import math


def _eps_text(eps: float) -> str:
    text = f"{eps:.4g}"
    if round(eps * 255) >= 1 and math.isclose(eps * 255, round(eps * 255), abs_tol=1e-6):
        text += f" ({round(eps * 255)}/255)"
    return text


def format_results(rows: list[dict]) -> str:
    """The result rows as an aligned text table: attack, eps (also in 255ths where whole), n, accuracy."""
    lines = [f"{'attack':<20} {'eps':>16} {'n':>7} {'accuracy':>9}"]
    for r in rows:
        lines.append(f"{r['attack']:<20} {_eps_text(r['eps']):>16} {r['n']:>7} {100 * r['robust_acc']:>8.2f}%")
    return "\n".join(lines)
