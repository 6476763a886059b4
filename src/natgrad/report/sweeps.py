"""PNG figures of the evaluation's sweeps: robust accuracy against eps (Figure 2), accuracy and loss against
PGD steps (Figure 13); drawn on a bare ``Figure``, so pyplot's global state is untouched."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from natgrad.files import atomic_write


def plot_sweep(sweep: dict, kind: str, path: Path, title: str) -> None:
    """Write the ``eps`` or ``steps`` sweep of an evaluation to ``path`` as a PNG."""
    fig = Figure(figsize=(5, 3.5), dpi=120)
    ax = fig.subplots()
    if kind == "eps":
        ax.plot([e * 255 for e in sweep["eps"]], [100 * a for a in sweep["robust_acc"]], marker="o")
        ax.set_xlabel("eps (x 1/255)")
        ax.set_ylabel(f"{sweep['attack'].upper()} accuracy (%)")
    else:
        ax.plot(sweep["steps"], [100 * a for a in sweep["robust_acc"]], marker="o", label="accuracy")
        ax.set_xscale("log")
        ax.set_xlabel("PGD steps")
        ax.set_ylabel("robust accuracy (%)")
        twin = ax.twinx()
        twin.plot(sweep["steps"], sweep["loss"], marker="s", color="tab:red", label="loss")
        twin.set_ylabel("cross-entropy", color="tab:red")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
