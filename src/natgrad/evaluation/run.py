"""``evaluate_run``: what ``natgrad eval`` and the pipelines' eval stage do with a run folder or weights file.

Destinations are checked before any attack; the model (and a transfer source of the same input shape) is
loaded; each :class:`Part` is evaluated on its own fixed subset of test images; then, on rank 0, the sweep
figures, ``eval.json`` (written last: its presence marks a finished evaluation) and the RobustBench entry are
written and the finished AutoAttack progress is removed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from torch.utils.data import Dataset

from natgrad.build import LoadedModel
from natgrad.datainfo import info
from natgrad.engine.distributed import Context, setup
from natgrad.errors import UserError
from natgrad.evaluation import runner
from natgrad.evaluation.keep import write_or_keep
from natgrad.evaluation.loading import eval_dataset, load_model
from natgrad.evaluation.registry import SWEEPS
from natgrad.evaluation.robustbench import check_robustbench, robustbench_info
from natgrad.evaluation.sanity import sanity_checks
from natgrad.evaluation.settings import EvalSettings
from natgrad.evaluation.state import autoattack_state_dir, remove_autoattack_state
from natgrad.evaluation.sweeps import default_sweep_eps
from natgrad.files import atomic_write_text, check_destination
from natgrad.report.sweeps import plot_sweep
from natgrad.rundir import RunDir, refuse_symlinks


@dataclasses.dataclass(frozen=True)
class Part:
    """Some attacks on a fixed seeded subset of ``n`` test images (None: all); the report holds ``n`` as ``key``."""

    attacks: tuple[str, ...]
    n: int | None = None
    key: str = "n"
    batch_size: int | None = None  # None: the run's
    sweep_to: float | None = None  # the default eps sweep stops at this multiple of the first eps
    eps: tuple[float, ...] | None = None  # this part's eps (None: the run's, ``RunSettings.eps`` or the recipe's)


@dataclasses.dataclass
class RunSettings:
    """What :func:`evaluate_run` evaluates and writes; the defaults are ``natgrad eval``'s."""

    parts: tuple[Part, ...]
    eps: list[float] | None = None  # None: the recipe's
    pgd_steps: tuple[int, ...] = (10, 100)
    restarts: int = 1
    batch_size: int = 256
    seed: int = 0
    aa_attacks: list[str] | None = None
    square_queries: int | None = None
    progress: bool = True
    recipe: str | None = None  # the recipe of a .safetensors source, or the data and eps of a timm name
    overrides: tuple[str, ...] = ()  # key=value for a .safetensors source or a timm name (model.pretrained=...)
    model_name: str | None = None
    ema: bool = True
    device: str = "auto"
    transfer_source: Path | None = None
    aa_state: Path | None = None  # None: a folder per weights and settings in the run folder, removed when done
    sanity: bool = False  # Appendix C's checks on the first part's images
    json_path: Path | None = None  # None: the run folder's eval.json (nothing for a weights file)
    json_flag: str = "--json"  # the option named in messages about json_path
    robustbench_json: Path | None = None
    plots: Path | None = None  # None: the run folder (or the current folder for a weights file)


@dataclasses.dataclass
class EvalReport:
    """What :func:`evaluate_run` measured and where it wrote it (nothing written off rank 0)."""

    report: dict  # eval.json's content
    seconds: dict[str, float]  # per part, by its key
    is_main: bool
    json_path: Path | None = None
    figures: dict[str, Path] = dataclasses.field(default_factory=dict)  # sweep kind -> PNG
    robustbench_path: Path | None = None

    @property
    def rows(self) -> list[dict]:
        return self.report["results"]

    @property
    def sweeps(self) -> dict[str, dict]:
        return self.report["sweeps"]

    @property
    def warnings(self) -> list[str]:
        return self.report["integrity"]["warnings"]

    @property
    def sanity(self) -> list[dict] | None:
        return self.report.get("sanity")


@dataclasses.dataclass
class _Planned:
    part: Part
    settings: EvalSettings
    ds: Dataset
    n: int
    default_state: Path | None


def _check_destinations(settings: RunSettings, json_path: Path | None, plots: Path) -> None:
    """Every destination is checked before minutes of attacks, not after them."""
    if json_path is not None:
        check_destination(json_path, "json", settings.json_flag)
    if settings.robustbench_json is not None:
        check_destination(settings.robustbench_json, "json", "--robustbench-json")
    if any(a in SWEEPS for p in settings.parts for a in p.attacks):
        check_destination(plots, "folder", "--plots")


def _transfer_source(settings: RunSettings, loaded: LoadedModel, ctx: Context) -> LoadedModel | None:
    """The transfer attack's source model, refused unless it takes the evaluated model's input shape."""
    if settings.transfer_source is None:
        return None
    src = load_model(settings.transfer_source, settings.recipe, None, ctx.device)
    theirs, ours = info(src.cfg.data), info(loaded.cfg.data)
    if (theirs.in_chans, theirs.image_size) != (ours.in_chans, ours.image_size):
        raise UserError(f"--source {settings.transfer_source} takes {theirs.in_chans}-channel {theirs.image_size}px "
                        f"images, this model {ours.in_chans}-channel {ours.image_size}px; give a source model with "
                        "the same input shape")
    return src


def _plan(settings: RunSettings, loaded: LoadedModel, run: RunDir | None, ctx: Context) -> list[_Planned]:
    """Each part's settings, images and default AutoAttack progress folder."""
    cfg = loaded.cfg
    datasets = [eval_dataset(cfg, part.n) for part in settings.parts]
    src = _transfer_source(settings, loaded, ctx)
    eps = settings.eps or [cfg.eps]
    plan = []
    for part, ds in zip(settings.parts, datasets, strict=True):
        n = len(ds)  # type: ignore[arg-type]
        sweep_eps = None
        if part.sweep_to is not None:
            sweep_eps = [e for e in default_sweep_eps(eps[0]) if e <= part.sweep_to * eps[0] * (1 + 1e-9)]
        s = EvalSettings(attacks=list(part.attacks), eps=list(part.eps) if part.eps else eps,
                         pgd_steps=settings.pgd_steps, restarts=settings.restarts,
                         batch_size=part.batch_size or settings.batch_size, seed=settings.seed,
                         aa_attacks=settings.aa_attacks, source=src.model if src else None, sweep_eps=sweep_eps,
                         progress=settings.progress, square_queries=settings.square_queries)
        default_state = autoattack_state_dir(run.path, loaded.sha256, s, n) if run else None
        plan.append(_Planned(part, dataclasses.replace(s, state_dir=settings.aa_state or default_state), ds, n,
                             default_state))
    return plan


def _measure(settings: RunSettings, loaded: LoadedModel, plan: list[_Planned], ctx: Context
             ) -> tuple[dict, dict[str, float]]:
    """The report (eval.json's content) and each part's seconds."""
    cfg = loaded.cfg
    outs, seconds = [], {}
    for p in plan:
        t0 = time.perf_counter()
        outs.append(runner.evaluate_model(loaded.model, p.ds, p.settings, ctx))
        seconds[p.part.key] = time.perf_counter() - t0
    first = outs[0]
    report = {"model": loaded.name, "weights": str(loaded.weights), "weights_sha256": loaded.sha256,
              "architecture": cfg.model.name, "method": cfg.method, "dataset": cfg.data.name,
              **{p.part.key: p.n for p in plan}, "world_size": ctx.world,
              "results": [r for out in outs for r in out["results"]],
              "sweeps": {k: v for out in outs for k, v in out["sweeps"].items()},
              "integrity": {**first["integrity"], "autoattack_warnings": [
                  w for out in outs for w in out["integrity"]["autoattack_warnings"]]}}
    if settings.sanity:
        report["sanity"] = sanity_checks(loaded.model, plan[0].ds, plan[0].settings, ctx,
                                         info(cfg.data).num_classes, done=first["results"])
    return report, seconds


def evaluate_run(source: str | Path, settings: RunSettings) -> EvalReport:
    """Evaluate a run folder (or a .safetensors file with ``settings.recipe``, or a timm model name with
    ``model.pretrained`` in ``settings.overrides``) and write what it measured."""
    if not settings.parts:
        raise ValueError("evaluate_run needs at least one part")
    run = RunDir(source) if Path(source).is_dir() else None
    json_path = settings.json_path or (run.eval_json if run else None)
    plots = settings.plots or (run.path if run else Path("."))
    _check_destinations(settings, json_path, plots)
    if run is not None:
        refuse_symlinks(run.path)
    ctx = setup(settings.device)
    loaded = load_model(source, settings.recipe, settings.model_name, ctx.device, ema=settings.ema,
                        overrides=settings.overrides)
    plan = _plan(settings, loaded, run, ctx)
    if settings.robustbench_json is not None:
        check_robustbench(loaded.cfg, plan[0].settings)
    report, seconds = _measure(settings, loaded, plan, ctx)
    result = EvalReport(report, seconds, ctx.is_main)
    if ctx.is_main:
        _write(result, settings, loaded, json_path, plots)
        for p in plan:
            if p.settings.state_dir == p.default_state and p.default_state is not None:  # finished: nothing to continue
                remove_autoattack_state(p.default_state)
    return result


def _write(result: EvalReport, settings: RunSettings, loaded: LoadedModel, json_path: Path | None,
           plots: Path) -> None:
    """The sweep figures, then eval.json and the RobustBench entry (kept elsewhere when they cannot be written)."""
    for kind, sweep in result.sweeps.items():
        path = plots / f"{kind}-sweep.png"
        plot_sweep(sweep, kind, path, f"{loaded.name} ({loaded.cfg.method}, n={sweep['n']})")
        result.figures[kind] = path
    if json_path is not None:
        text = json.dumps(result.report, indent=2)
        write_or_keep(lambda: atomic_write_text(json_path, text), text, json_path, "results")
        result.json_path = json_path
    if settings.robustbench_json is not None:
        rb_path = settings.robustbench_json
        rb_text = json.dumps(robustbench_info(loaded.name, loaded.cfg, result.rows))
        write_or_keep(lambda: atomic_write_text(rb_path, rb_text), rb_text, rb_path, "RobustBench entry")
        result.robustbench_path = rb_path
