"""Figures of one model's analyses (the paper's Figures 1, 6-11), written as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from natgrad.files import atomic_write

FIGURES = {"gradients": ("gradient_norms", "gradient-norms.png"), "channels": ("channels", "channels.png"),
           "edges": ("edges", "edges.png"), "geometry": ("curvature", "curvature.png"),
           "linearity": ("linearity", "linearity.png"), "along_attack": ("along_attack", "along-attack.png"),
           "pictures": ("pictures", "pictures.png")}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _stairs(ax, hist: dict, label: str, **kw: Any) -> None:
    """A log-x histogram; the outer bins (zeros, infinity) have no place on a log axis and are noted."""
    edges, counts = hist["edges"], hist["counts"]
    ax.stairs(counts[1:-1], edges[1:-1], label=label, **kw)
    ax.set_xscale("log")
    if counts[0] or counts[-1]:
        ax.annotate(f"{counts[0]} zero, {counts[-1]} inf not shown", (0.02, 0.95), xycoords="axes fraction",
                    fontsize=7, va="top")


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    _plt().close(fig)


def _finish(fig, ax, path: Path, title: str, xlabel: str, ylabel: str, legend: bool = False) -> None:
    """Label one panel and write the figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if legend:
        ax.legend(fontsize=8)
    _save(fig, path)


def _gradient_norms(summary: dict, arrays: dict, path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=110)
    hists = summary["gradients"]["histograms"]
    for key, color in (("all", "0.4"), ("correct", "tab:blue"), ("incorrect", "tab:red")):
        _stairs(ax, hists[key], key, color=color)
    _finish(fig, ax, path, title, r"$\|\nabla_x \mathcal{L}\|_1$ per image", "images", legend=True)


def _channels(summary: dict, arrays: dict, path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=110)
    channels = summary["channels"]
    _stairs(ax, channels["all"], "all channels", color="0.3", linewidth=2)
    if len(channels["per_channel"]) > 1:
        colors = ["tab:red", "tab:green", "tab:blue"] + [None] * len(channels["per_channel"])
        for c, (hist, color) in enumerate(zip(channels["per_channel"], colors)):
            _stairs(ax, hist, f"channel {c}", color=color)
    _finish(fig, ax, path, title, r"$|\partial \mathcal{L} / \partial x|$ per pixel and channel", "values", legend=True)


def _edges(summary: dict, arrays: dict, path: Path, title: str) -> None:
    plt = _plt()
    scatter = arrays["edges"]["scatter"]
    fig, axes = plt.subplots(1, len(scatter) + 1, figsize=(3 * (len(scatter) + 1), 3), dpi=110)
    for ax, points in zip(axes, scatter):
        ax.scatter(points["log_energy"], points["log_saliency"], s=3, alpha=0.5)
        r = torch.corrcoef(torch.stack([points["log_energy"].double(), points["log_saliency"].double()]))[0, 1]
        ax.set_title(f"r = {r:.2f}", fontsize=9)
        ax.set_xlabel("log oriented energy")
        ax.set_ylabel("log saliency")
    corr = arrays["edges"]["saliency_corr"]
    axes[-1].hist(corr[corr.isfinite()].numpy(), bins=30, range=(-1, 1), color="tab:purple")
    axes[-1].set_xlabel("per-image correlation")
    axes[-1].set_title(title, fontsize=9)
    _save(fig, path)


def _curvature(summary: dict, arrays: dict, path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=110)
    _stairs(ax, summary["geometry"]["curvature_histogram"], "normalized curvature", color="tab:blue")
    _finish(fig, ax, path, title, r"$C_\mathcal{L} = \|\nabla^2 \mathcal{L}\|_2 / \|\nabla \mathcal{L}\|_2$", "images")


def _linearity(summary: dict, arrays: dict, path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=110)
    hist = summary["linearity"]["log10_histogram"]
    ax.stairs(hist["counts"], hist["edges"], color="tab:green", fill=True, alpha=0.6)
    _finish(fig, ax, path, title, r"$\log_{10}$(local linearity error $+ 10^{-17}$)", "images")


def _along_attack(summary: dict, arrays: dict, path: Path, title: str) -> None:
    plt = _plt()
    along = summary["along_attack"]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3), dpi=110)
    for ax, key, label in zip(axes, ("loss", "grad_l1", "curvature"),
                              ("loss", r"$\|\nabla_x \mathcal{L}\|_1$", "normalized curvature")):
        ax.plot(along["t"], along[key], marker="o")
        ax.set_xlabel(f"t  (x + t ({along['attack'].upper()} - x))")
        ax.set_ylabel(label)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def _show(t: torch.Tensor) -> torch.Tensor:
    """A signed map in [0, 1] for display: 0.5 is zero, per image scaled by its largest magnitude."""
    return (0.5 + 0.5 * t / t.abs().amax().clamp_min(1e-30)).clamp(0, 1)


def _pictures(summary: dict, arrays: dict, path: Path, title: str) -> None:
    plt = _plt()
    p = arrays["pictures"]
    n = len(p["images"])
    rows = [("image", p["images"]), ("loss gradient", p["gradients"]), ("PGD perturbation", p["perturbations"]),
            ("edges", p["edges"][:, None])]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.4 * len(rows)), dpi=110, squeeze=False)
    for r, (label, images) in enumerate(rows):
        for i in range(n):
            ax = axes[r][i]
            img = images[i].float()
            if label in ("loss gradient", "PGD perturbation"):
                img = _show(img)
            elif label == "edges":
                img = img / img.amax().clamp_min(1e-30)
            shown = img.permute(1, 2, 0).squeeze(-1).numpy()
            ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if label == "PGD perturbation":
                color = "tab:blue" if p["resisted"][i] else "tab:red"
                for spine in ax.spines.values():
                    spine.set_color(color)
                    spine.set_linewidth(3)
            if i == 0:
                ax.set_ylabel(label, fontsize=7)
    fig.suptitle(f"{title}  (blue: resisted PGD, red: fooled)", fontsize=9)
    _save(fig, path)


_DRAW = {"gradient_norms": _gradient_norms, "channels": _channels, "edges": _edges, "curvature": _curvature,
         "linearity": _linearity, "along_attack": _along_attack, "pictures": _pictures}


def draw_all(summary: dict, arrays: dict, out: Path, title: str) -> dict[str, str]:
    """Draw a figure for every analysis in ``summary``; returns ``{figure: file name}`` relative to ``out``."""
    written = {}
    for section, (name, filename) in FIGURES.items():
        if section in summary:
            _DRAW[name](summary, arrays, out / filename, title)
            written[name] = filename
    return written
