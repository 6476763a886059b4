"""All of the paper's gradient analyses of one model on a test set (Tables 1, 5, 6, 7; Figures 1, 6-11).

:func:`analyze` returns the summary that ``analysis.json`` holds and the per-image values the
figures draw. Each analysis makes its own pass over the images, with its own progress bar; the
randomness of batch ``b`` (PGD starts, power-iteration starts, linearity draws) is seeded by
``seed + b``, so results do not depend on which analyses run.

Under torchrun the images are sharded across the processes as ``natgrad eval`` shards them (global batch
``b`` on rank ``b % world``, :func:`natgrad.engine.distributed.shard_batches`). Every analysis keeps its
per-batch values with the global batch index; they are gathered to every process, put back in global
batch order and reduced there as one process reduces them, so the summary and the figures' arrays are
those of one process, for any number of processes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import operator
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from natgrad.analysis import statistics as st
from natgrad.analysis.edges import log_correlation, sobel_energy
from natgrad.analysis.figures import draw_all
from natgrad.analysis.geometry import (
    hessian_spectral_norm,
    local_linearity_error,
    normalized_curvature,
)
from natgrad.attacks import paper_step_size, pgd
from natgrad.choices import ANALYSES, Analysis
from natgrad.errors import UserError, did_you_mean
from natgrad.files import TEMP_PREFIX
from natgrad.gradients import LossFn, eval_mode, frozen_parameters, loss_and_gradient
from natgrad.processes import Context, global_batch_index
from natgrad.runfiles import ANALYSIS_JSON

BatchSource = Callable[[str, int, bool], Iterator[tuple[torch.Tensor, torch.Tensor]]]
"""``(description, batch size, progress) ->`` the seeded batches of the images to analyse, on the model's device
(e.g. :func:`natgrad.engine.distributed.batch_source`)."""
CHANNEL_EDGES = st.log_edges(1e-12, 1e4, 5)  # fixed, so that counts add up over batches
T = TypeVar("T")


@dataclasses.dataclass
class AnalysisSettings:
    """What :func:`analyze` computes; defaults are the paper's."""

    eps: float
    analyses: tuple[Analysis, ...] = ANALYSES
    batch_size: int = 128
    pgd_steps: int = 10  # Table 1 conditions on PGD-10
    power_iterations: int = 20  # Table 6
    along_steps: int = 5  # Figure 11 interpolates towards PGD-5
    along_t: tuple[float, ...] = tuple(i / 4 for i in range(9))  # 0 to 2
    along_iterations: int = 2  # Figure 11: 2 iterations started at the gradient
    pictures: int = 8
    scatter_images: int = 3
    seed: int = 0
    progress: bool = True


def parse_analyses(names: str | list[str]) -> tuple[Analysis, ...]:
    """``"gradients,edges"`` -> a tuple of known analysis names."""
    out = [a.strip() for a in names.split(",")] if isinstance(names, str) else list(names)
    for a in out:
        if a not in ANALYSES:
            raise UserError(f"unknown analysis {a!r}{did_you_mean(a, ANALYSES)}; known: {', '.join(ANALYSES)}")
    return cast(tuple[Analysis, ...], tuple(out))


def _ce(model: nn.Module, y: torch.Tensor) -> LossFn:
    return lambda z: F.cross_entropy(model(z).float(), y, reduction="none")


def _class_score(model: nn.Module, y: torch.Tensor) -> LossFn:
    """Each image's logit of its own class."""
    return lambda z: model(z).gather(1, y[:, None]).squeeze(1)


def _pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int) -> torch.Tensor:
    return pgd(model, x, y, eps, steps, paper_step_size(eps), random_start=True, keep_best=True)


def _in_global_order(mine: list[tuple[int, T]], ctx: Context) -> list[T]:
    """Every process's ``(global batch index, value)`` pairs, merged: the values in global batch order, the same
    list on every process (one all-gather under torchrun; every process must call it, with or without batches)."""
    if ctx.world > 1:
        parts: list[list[tuple[int, T]] | None] = [None] * ctx.world
        dist.all_gather_object(parts, mine)
        mine = [pair for part in parts for pair in part or []]
    return [value for _, value in sorted(mine, key=operator.itemgetter(0))]


def _batches(batches: BatchSource, ctx: Context, desc: str, batch_size: int, progress: bool
             ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(global batch index, x, y)`` of this process's batches."""
    for k, (x, y) in enumerate(batches(desc, batch_size, progress)):
        yield global_batch_index(ctx, k), x, y


def _no_images() -> UserError:
    return UserError("the analysis got no images; give at least one with --n")


def _gradients(model: nn.Module, batches: BatchSource, s: AnalysisSettings, ctx: Context
               ) -> tuple[dict, dict, dict]:
    """Table 1 and Figures 6, 7: L1 norms of loss gradients, conditioned on PGD success; channel values."""
    mine: list[tuple[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]]] = []
    for b, x, y in _batches(batches, ctx, "gradients", s.batch_size, s.progress):
        _, _, g = loss_and_gradient(_ce(model, y), x)
        with torch.no_grad():
            correct = (model(x).argmax(1) == y).cpu()
            fooled = (model(_pgd(model, x, y, s.eps, s.pgd_steps)).argmax(1) != y).cpu()
        per_channel = [st.count(g[:, c].abs(), CHANNEL_EDGES) for c in range(g.shape[1])]
        mine.append((b, (g.flatten(1).abs().sum(1).cpu(), correct, fooled, per_channel)))
    merged = _in_global_order(mine, ctx)
    if not merged:
        raise _no_images()
    l1, correct, fooled, counts = zip(*merged)
    channels = [functools.reduce(operator.add, per_batch) for per_batch in zip(*counts)]
    l1_all, correct_all, fooled_all = torch.cat(l1), torch.cat(correct), torch.cat(fooled)
    mean, when_fails, when_succeeds = st.conditional_means(l1_all, fooled_all)
    edges = st.edges_for(l1_all)
    summary = {
        "n": len(l1_all), "pgd_steps": s.pgd_steps, "eps": s.eps,
        "clean_acc": correct_all.double().mean().item(), "pgd_acc": (~fooled_all).double().mean().item(),
        "pgd_success_rate": fooled_all.double().mean().item(),
        "l1_mean": mean, "l1_mean_attack_fails": when_fails, "l1_mean_attack_succeeds": when_succeeds,
        "histograms": {"all": st.histogram(l1_all, edges), "correct": st.histogram(l1_all[correct_all], edges),
                       "incorrect": st.histogram(l1_all[~correct_all], edges)},
    }
    edge_list = CHANNEL_EDGES.tolist()
    total = functools.reduce(operator.add, channels)
    channel_summary = {"n": len(l1_all), "all": {"edges": edge_list, "counts": total.tolist()},
                       "per_channel": [{"edges": edge_list, "counts": c.tolist()} for c in channels]}
    arrays = {"l1": l1_all, "correct": correct_all, "fooled": fooled_all}
    return summary, channel_summary, arrays


def _edges(model: nn.Module, batches: BatchSource, s: AnalysisSettings, ctx: Context) -> tuple[dict, dict]:
    """Table 5 and Figure 8: log-log correlation of saliency and |loss gradient| with Sobel oriented energy.

    The scatter plots show the first ``scatter_images`` images: each process keeps the first of its own
    batches, which hold the first ones of all that fall to it."""
    mine: list[tuple[int, tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]]] = []
    kept = 0
    for b, x, y in _batches(batches, ctx, "edges", s.batch_size, s.progress):
        _, _, g_loss = loss_and_gradient(_ce(model, y), x)
        _, _, g_class = loss_and_gradient(_class_score(model, y), x)
        saliency = g_class.abs().amax(1)  # per-pixel max over channels
        loss_map = g_loss.abs().amax(1)
        energy = sobel_energy(x)
        points = [{"log_energy": energy[i].clamp_min(1e-3).log().flatten().cpu(),
                   "log_saliency": saliency[i].clamp_min(1e-30).log().flatten().cpu()}
                  for i in range(min(len(x), s.scatter_images - kept))]
        kept += len(points)
        mine.append((b, (log_correlation(saliency, energy).cpu(), log_correlation(loss_map, energy).cpu(), points)))
    merged = _in_global_order(mine, ctx)
    if not merged:
        raise _no_images()
    sal_corr, loss_corr, points_per_batch = zip(*merged)
    scatter = [p for points in points_per_batch for p in points][: s.scatter_images]
    sal, loss = torch.cat(sal_corr), torch.cat(loss_corr)
    sal_mean, sal_std = st.mean_std(sal[sal.isfinite()])
    loss_mean, loss_std = st.mean_std(loss[loss.isfinite()])
    summary = {"n": len(sal), "n_constant": int((~sal.isfinite()).sum()),
               "saliency_corr_mean": sal_mean, "saliency_corr_std": sal_std,
               "loss_grad_corr_mean": loss_mean, "loss_grad_corr_std": loss_std}
    return summary, {"saliency_corr": sal, "loss_grad_corr": loss, "scatter": scatter}


def _geometry(model: nn.Module, batches: BatchSource, s: AnalysisSettings, ctx: Context) -> tuple[dict, dict]:
    """Table 6 and Figure 9: gradient L2 norm, Hessian spectral norm, normalized curvature."""
    mine: list[tuple[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = []
    for b, x, y in _batches(batches, ctx, "geometry", s.batch_size, s.progress):
        _, g, h = hessian_spectral_norm(_ce(model, y), x, s.power_iterations)
        mine.append((b, (g.flatten(1).norm(dim=1).cpu(), h.cpu(), normalized_curvature(h, g).cpu())))
    merged = _in_global_order(mine, ctx)
    if not merged:
        raise _no_images()
    g2, hn, curv = zip(*merged)
    g2_all, hn_all, curv_all = torch.cat(g2), torch.cat(hn), torch.cat(curv)
    summary: dict[str, Any] = {"n": len(g2_all), "power_iterations": s.power_iterations}
    for name, v in (("grad_l2", g2_all), ("hessian_norm", hn_all), ("curvature", curv_all)):
        summary[f"{name}_mean"], summary[f"{name}_std"] = st.mean_std(v[v.isfinite()])
    summary["curvature_histogram"] = st.histogram(curv_all[curv_all.isfinite()])
    return summary, {"grad_l2": g2_all, "hessian_norm": hn_all, "curvature": curv_all}


def _linearity(model: nn.Module, batches: BatchSource, s: AnalysisSettings, ctx: Context) -> tuple[dict, dict]:
    """Table 7 and Figure 10: local linearity error (Eq. 5-6) and its log10 (plus 1e-17)."""
    mine = [(b, local_linearity_error(_ce(model, y), x, s.eps).cpu())
            for b, x, y in _batches(batches, ctx, "linearity", s.batch_size, s.progress)]
    errors = _in_global_order(mine, ctx)
    if not errors:
        raise _no_images()
    err = torch.cat(errors).double()
    log10 = (err + 1e-17).log10()
    summary: dict[str, Any] = {"n": len(err), "eps": s.eps}
    summary["error_mean"], summary["error_std"] = st.mean_std(err)
    summary["log10_mean"], summary["log10_std"] = st.mean_std(log10)
    edges = torch.linspace(log10.min().item(), log10.max().item() + 1e-9, 41)
    summary["log10_histogram"] = {"edges": edges.tolist(),
                                  "counts": torch.histogram(log10, edges.double()).hist.long().tolist()}
    return summary, {"error": err}


def _along_attack(model: nn.Module, batches: BatchSource, s: AnalysisSettings, ctx: Context) -> tuple[dict, dict]:
    """Figure 11: mean loss, L1 gradient norm and normalized curvature at ``x + t (PGD-5(x) - x)``.

    Each batch's totals are kept and added up in global batch order, as one process adds them."""
    t = torch.tensor(s.along_t, dtype=torch.float64)
    mine: list[tuple[int, tuple[torch.Tensor, int]]] = []
    for b, x, y in _batches(batches, ctx, "along attack", s.batch_size, s.progress):
        delta = _pgd(model, x, y, s.eps, s.along_steps) - x
        batch_sums = torch.zeros(3, len(t), dtype=torch.float64)
        for k, tk in enumerate(s.along_t):
            loss, g, h = hessian_spectral_norm(_ce(model, y), x + tk * delta, s.along_iterations, init="gradient")
            c = normalized_curvature(h, g)
            totals = [loss.sum(), g.flatten(1).abs().sum(1).sum(), c[c.isfinite()].sum()]
            batch_sums[:, k] = torch.stack(totals).double().cpu()
        mine.append((b, (batch_sums, len(y))))
    sums = torch.zeros(3, len(t), dtype=torch.float64)
    n = 0
    for batch_sums, batch_n in _in_global_order(mine, ctx):
        sums += batch_sums
        n += batch_n
    if not n:
        raise _no_images()
    mean = sums / n
    summary = {"n": n, "attack": f"pgd-{s.along_steps}", "eps": s.eps, "power_iterations": s.along_iterations,
               "t": t.tolist(), "loss": mean[0].tolist(), "grad_l1": mean[1].tolist(), "curvature": mean[2].tolist()}
    return summary, {}


def _pictures(model: nn.Module, batches: BatchSource, s: AnalysisSettings, ctx: Context) -> tuple[dict, dict]:
    """Figures 1, 3, 14: images, loss gradients, PGD-10 perturbations (resisted or not) and edges.

    The first ``pictures`` images are global batch 0 of that size: rank 0 draws them and the others receive them."""
    mine: list[tuple[int, dict[str, torch.Tensor]]] = []
    if ctx.is_main:
        first = next(batches("pictures", s.pictures, False), None)
        if first is not None:
            x, y = first
            _, _, g = loss_and_gradient(_ce(model, y), x)
            x_adv = _pgd(model, x, y, s.eps, s.pgd_steps)
            with torch.no_grad():
                resisted = model(x_adv).argmax(1) == y
            mine.append((0, {"images": x.cpu(), "labels": y.cpu(), "gradients": g.cpu(),
                             "perturbations": (x_adv - x).cpu(), "resisted": resisted.cpu(),
                             "edges": sobel_energy(x).cpu()}))
    merged = _in_global_order(mine, ctx)
    if not merged:
        raise _no_images()
    arrays = merged[0]
    return {"n": len(arrays["labels"]), "resisted": arrays["resisted"].tolist()}, arrays


def analyze(model: nn.Module, batches: BatchSource, n: int, settings: AnalysisSettings, ctx: Context | None = None
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the named analyses on the ``n`` images that ``batches`` yields (on the model's device).

    Under torchrun, ``ctx`` is this process's :class:`~natgrad.processes.Context` and ``batches`` its
    share of the global batches (:func:`~natgrad.engine.distributed.batch_source` with the same ``ctx``: its
    ``k``-th batch is global batch ``rank + k * world``); every process must call this, and every process gets
    the same result, that of one process on all ``n`` images. ``None``: one process.

    Returns ``(summary, arrays)``: the JSON sections and the per-image values.
    """
    s = settings
    device = next(model.parameters()).device
    ctx = ctx or Context(0, 1, device)
    summary: dict[str, Any] = {"eps": s.eps, "n": n}
    arrays: dict[str, Any] = {}
    devices = [device] if device.type == "cuda" else []
    with eval_mode(model), frozen_parameters(model), torch.random.fork_rng(devices=devices):
        for name in s.analyses:
            if name == "gradients":
                summary["gradients"], summary["channels"], arrays["gradients"] = _gradients(model, batches, s, ctx)
            else:
                run = {"edges": _edges, "geometry": _geometry, "linearity": _linearity,
                       "along_attack": _along_attack, "pictures": _pictures}[name]
                summary[name], arrays[name] = run(model, batches, s, ctx)
    return summary, arrays


def _finite_or_null(value: Any) -> Any:
    """JSON has no NaN or infinity: an undefined statistic (e.g. the mean over no image) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(v) for v in value]
    return value


def check_out(out: Path) -> None:
    """``out`` must be new, empty or an earlier analysis folder, since writing replaces it."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / ANALYSIS_JSON).is_file())):
        raise UserError(f"--out {out} exists and is not an analysis folder (no analysis.json); "
                        "give a new folder, since writing replaces it")


def write_analysis(summary: dict[str, Any], arrays: dict[str, Any], out: Path) -> Path:
    """Write ``analysis.json`` and the figures into ``out``, all at once: built in a temporary folder,
    then moved into place (replacing an earlier analysis there). Returns the JSON's path."""

    out = Path(out)
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}{TEMP_PREFIX}"
    for stale in out.parent.glob(f"{prefix}*.tmp"):  # of an analysis killed while it wrote
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=out.parent))
    try:
        title = f"{summary.get('model', '')} ({summary.get('method', '')}, n={summary['n']})"
        summary = {**summary, "figures": draw_all(summary, arrays, tmp, title)}
        (tmp / ANALYSIS_JSON).write_text(json.dumps(_finite_or_null(summary), indent=2, allow_nan=False))
        tmp.chmod(0o755)  # mkdtemp makes it private; an analysis folder is as readable as its run folder
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / ANALYSIS_JSON
