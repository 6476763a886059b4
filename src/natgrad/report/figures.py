"""Comparison figures for the report, one curve per model, as PNG bytes.

Every function returns None when no model has the data it draws. Figures are built on
:class:`matplotlib.figure.Figure` directly (Agg canvas), so pyplot's global state is untouched.
"""

from __future__ import annotations

import io
import math

from natgrad.report.runs import Run, mapping, number

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
LINESTYLES = ("-", "--", ":", "-.")


def color(i: int) -> str:
    """The colour of the ``i``-th model, in the figures and the tables."""
    return COLORS[i % len(COLORS)]


def _style(i: int) -> dict:
    return {"color": color(i), "linestyle": LINESTYLES[(i // len(COLORS)) % len(LINESTYLES)], "linewidth": 1.6}


def _figure(panels: int, height: float = 3.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(min(4.2 * panels, 12.6), height), dpi=110, layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    return fig, axes


def _png(fig, labels_drawn: bool) -> bytes:
    if labels_drawn:
        handles, labels = fig.axes[0].get_legend_handles_labels()
        for ax in fig.axes[1:]:  # a model may have curves only in a later panel
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _numbers(values: object) -> list[float] | None:
    if not isinstance(values, list) or not values or any(number(v) is None for v in values):
        return None
    return [float(v) for v in values]


def _positive(values: list[float]) -> bool:
    return all(v > 0 for v in values)


def _gappy(values: object, length: int) -> list[float] | None:
    """A list of ``length`` numbers where null (an undefined value) becomes NaN, a gap in the curve."""
    if not isinstance(values, list) or len(values) != length:
        return None
    out = [math.nan if v is None else number(v) for v in values]
    return [v for v in out if v is not None] if all(v is not None for v in out) else None


# ---------------------------------------------------------------------------- training and evaluation


def training_curves(runs: list[Run]) -> bytes | None:
    """Train loss, clean accuracy and PGD accuracy per epoch (metrics.jsonl)."""
    if not any(r.metrics for r in runs):
        return None
    fig, (loss_ax, clean_ax, pgd_ax) = _figure(3)
    steps = sorted({int(m["pgd_steps"]) for r in runs for m in r.metrics if number(m.get("pgd_steps"))})
    for i, run in enumerate(runs):
        for ax, key, scale in ((loss_ax, "train_loss", 1), (clean_ax, "clean_acc", 100), (pgd_ax, "pgd_acc", 100)):
            points = [(m["epoch"], scale * m[key]) for m in run.metrics if number(m.get(key)) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", markersize=3, label=run.label, **_style(i))
    loss_ax.set_ylabel("train loss", fontsize=9)
    clean_ax.set_ylabel("clean accuracy (%)", fontsize=9)
    pgd_ax.set_ylabel(f"PGD-{'/'.join(map(str, steps)) or 'k'} accuracy (%)", fontsize=9)
    for ax in (loss_ax, clean_ax, pgd_ax):
        ax.set_xlabel("epoch", fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
    return _png(fig, True)


def sweeps(runs: list[Run]) -> bytes | None:
    """Robust accuracy against eps (Figure 2), and accuracy and loss against PGD steps (Figure 13)."""
    eps = [(i, r, s) for i, r in enumerate(runs) if (s := _sweep(r, "eps", "eps"))]
    steps = [(i, r, s) for i, r in enumerate(runs) if (s := _sweep(r, "steps", "steps"))]
    if not eps and not steps:
        return None
    fig, axes = _figure((1 if eps else 0) + (2 if steps else 0))
    if eps:
        ax = axes[0]
        for i, run, s in eps:
            ax.plot([255 * e for e in s["eps"]], [100 * a for a in s["robust_acc"]], marker="o", markersize=3,
                    label=run.label, **_style(i))
        attacks = sorted({str(s.get("attack", "pgd")).upper() for _, _, s in eps})
        ax.set_xlabel("\u03b5 (\u00d7 1/255)", fontsize=9)
        ax.set_ylabel(f"{'/'.join(attacks)} accuracy (%)", fontsize=9)
    if steps:
        acc_ax, loss_ax = axes[-2:]
        for i, run, s in steps:
            acc_ax.plot(s["steps"], [100 * a for a in s["robust_acc"]], marker="o", markersize=3, label=run.label,
                        **_style(i))
            loss = _numbers(s.get("loss"))
            if loss and len(loss) == len(s["steps"]):
                loss_ax.plot(s["steps"], loss, marker="s", markersize=3, label=run.label, **_style(i))
        for ax in (acc_ax, loss_ax):
            ax.set_xscale("log")
            ax.set_xlabel("PGD steps", fontsize=9)
        acc_ax.set_ylabel("robust accuracy (%)", fontsize=9)
        loss_ax.set_ylabel("cross-entropy", fontsize=9)
    return _png(fig, True)


def _sweep(run: Run, kind: str, x: str) -> dict | None:
    sweep = mapping(mapping(run.eval).get("sweeps")).get(kind)
    if not isinstance(sweep, dict):
        return None
    xs, acc = _numbers(sweep.get(x)), _numbers(sweep.get("robust_acc"))
    return sweep if xs and acc and len(xs) == len(acc) else None


# ---------------------------------------------------------------------------- analysis comparisons


def _histogram(h: object) -> tuple[list[float], list[float]] | None:
    """``(edges, counts)``, where the outer edges may be open: null (JSON's infinity) or inf."""
    if not isinstance(h, dict):
        return None
    edges, counts = h.get("edges"), _numbers(h.get("counts"))
    if not isinstance(edges, list) or len(edges) < 2 or not counts or len(edges) != len(counts) + 1:
        return None
    edges = [-math.inf if edges[0] is None else edges[0], *edges[1:-1], math.inf if edges[-1] is None else edges[-1]]
    if not all(isinstance(e, (int, float)) and not isinstance(e, bool) and not math.isnan(e) for e in edges):
        return None
    edges = [float(e) for e in edges]
    if edges != sorted(edges) or sum(counts) <= 0:
        return None
    return edges, counts


DISTRIBUTIONS = (
    (lambda r: mapping(mapping(r.section("gradients")).get("histograms")).get("all"),
     "\u2016\u2207x L\u2016\u2081 (Fig. 6)"),
    (lambda r: (r.section("geometry") or {}).get("curvature_histogram"), "normalized curvature C_L (Fig. 9)"),
    (lambda r: (r.section("linearity") or {}).get("log10_histogram"), "log\u2081\u2080(linerr) (Fig. 10)"),
)


def distributions(runs: list[Run]) -> bytes | None:
    """Per-image distributions of the gradient L1 norm, the curvature and the linearity error, one curve per model."""
    panels = []
    for get, label in DISTRIBUTIONS:
        found = [(i, r, h) for i, r in enumerate(runs) if (h := _histogram(get(r)))]
        if found:
            panels.append((found, label))
    if not panels:
        return None
    fig, axes = _figure(len(panels))
    for ax, (found, label) in zip(axes, panels):
        _draw_histograms(ax, found, label)
    return _png(fig, True)


def _draw_histograms(ax, found: list[tuple[int, Run, tuple[list[float], list[float]]]], xlabel: str) -> None:
    """Histograms as densities over all images, open-ended outer bins left out of the plot.

    Non-negative edges whose positive finite values span over two decades go on a log axis.
    """
    finite = [e for _, _, (edges, _) in found for e in edges if math.isfinite(e)]
    positive = [e for e in finite if e > 0]
    log = min(finite) >= 0 and len(positive) > 1 and max(positive) / min(positive) > 100
    for i, run, (edges, counts) in found:
        total = sum(counts)
        keep = [k for k in range(len(counts))
                if math.isfinite(edges[k]) and math.isfinite(edges[k + 1]) and (not log or edges[k] > 0)]
        if not keep:
            continue
        lo, hi = keep[0], keep[-1] + 1  # the contiguous drawable run of bins
        xs = [math.log10(e) for e in edges[lo:hi + 1]] if log else edges[lo:hi + 1]
        density = [c / total / max(b - a, 1e-300) for c, a, b in zip(counts[lo:hi], xs, xs[1:])]
        ax.stairs(density, edges[lo:hi + 1], label=run.label, **_style(i))
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("density per decade" if log else "density", fontsize=9)


def along_attack(runs: list[Run]) -> bytes | None:
    """Loss, L1 gradient norm and normalized curvature along the attack direction (Figure 11)."""
    found = []
    for i, run in enumerate(runs):
        s = run.section("along_attack") or {}
        t = _numbers(s.get("t"))
        if t:
            found.append((i, run, s, t))
    if not found:
        return None
    keys = (("loss", "loss"), ("grad_l1", "\u2016\u2207x L\u2016\u2081"), ("curvature", "normalized curvature"))
    fig, axes = _figure(3)
    for ax, (key, label) in zip(axes, keys):
        values_all = []
        for i, run, s, t in found:
            ys = _gappy(s.get(key), len(t))
            if ys and any(math.isfinite(y) for y in ys):
                name = f"{run.label} ({s.get('attack', 'attack')})"
                ax.plot(t, ys, marker="o", markersize=3, label=name, **_style(i))
                values_all += [y for y in ys if math.isfinite(y)]
        if key != "loss" and values_all and _positive(values_all) and max(values_all) / min(values_all) > 100:
            ax.set_yscale("log")
        ax.set_xlabel("t  (image x + t\u00b7\u03b4, \u03b4 the attack's perturbation)", fontsize=9)
        ax.set_ylabel(label, fontsize=9)
    return _png(fig, True)
