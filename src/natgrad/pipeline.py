"""Staged, resumable experiment grids: what ``natgrad demo`` and ``natgrad reproduce`` run.

A grid is a list of :class:`Experiment` (a recipe, its overrides, optionally the experiment whose
weights it fine-tunes). :func:`run_pipeline` trains every experiment, evaluates each (clean and PGD-k
at the recipe's eps, a PGD-k eps sweep and standard AutoAttack on fixed seeded test subsets),
measures the cost of one training step per method with ``natgrad bench``, and runs the gradient
analyses; every stage reuses the library behind ``natgrad train``, ``eval``, ``bench`` and
``analyze``.

The output folder holds a state file (the settings, each stage's time), one run folder per
experiment (``config.yaml`` ... ``eval.json``, ``analysis/``) and ``bench.json``. Run again on the
same folder with the same settings, the pipeline skips every finished stage and continues an
interrupted one (training from its last checkpoint, AutoAttack from its last finished batch).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from natgrad import config, data, evaluation, models
from natgrad.analysis.analyze import AnalysisSettings, write_analysis
from natgrad.engine import bench
from natgrad.engine import checkpoint as ckpt
from natgrad.engine.checkpoint import atomic_write_text
from natgrad.engine.distributed import barrier, setup
from natgrad.engine.train import train
from natgrad.errors import Preempted, UserError, did_you_mean, short
from natgrad.rundir import RunDir

BENCH_FILE = "bench.json"


def is_main_process() -> bool:
    """Rank 0 under torchrun (or a single process): the one that writes shared files and prints."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclasses.dataclass(frozen=True)
class PipelineSettings:
    """How much of everything; the defaults are the demo's (about 7 minutes on a 2-core CPU).

    ``epochs`` and ``limit_train`` None keep each recipe's schedule and the whole training set.
    ``overrides`` (``key=value``, as ``natgrad train`` takes them) apply to every recipe last; tests
    use them to run whole grids on the tiny synthetic dataset.
    """

    epochs: int | None = 2
    limit_train: int | None = 30000  # training images per epoch
    limit_eval: int = 500  # images of training's own end-of-epoch evaluation
    n_eval: int = 1000  # clean and PGD-k at the recipe's eps
    n_sweep: int = 500  # the PGD-k eps sweep
    sweep_to: float = 4.0  # the sweep's largest eps, in multiples of the recipe's eps
    n_autoattack: int = 100  # standard AutoAttack
    autoattack_batch: int = 50  # AutoAttack batch: progress and resume per batch
    square_queries: int | None = None  # None: standard AutoAttack's 5000 (tests use fewer)
    pgd_steps: int = 10  # PGD-k for the eps column and the eps sweep
    n_analysis: int = 500
    power_iterations: int = 10  # Hessian power iterations (Table 6)
    bench_steps: int = 10
    bench_warmup: int = 2
    overrides: tuple[str, ...] = ()

    def train_overrides(self) -> list[str]:
        keys = [f"data.limit_eval={self.limit_eval}"]
        if self.epochs is not None:
            keys.insert(0, f"epochs={self.epochs}")
        if self.limit_train is not None:
            keys.append(f"data.limit_train={self.limit_train}")
        return keys

    def schedule(self) -> str:
        """The training schedule in words."""
        plural = "s" if self.epochs != 1 else ""
        epochs = "the recipe's epochs" if self.epochs is None else f"{self.epochs} epoch{plural}"
        images = "all training images" if self.limit_train is None else f"{self.limit_train} training images"
        return f"{epochs} of {images}"

    def as_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def fraction_of_epochs(fraction: float, epochs: int) -> int:
    """``fraction`` of ``epochs``, rounded half up, at least 1 (0.3 of 100 is 30, of 4 is 1)."""
    return max(1, math.floor(fraction * epochs + 0.5))


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One model of a grid: trained from ``recipe`` with ``overrides`` (after the sizes' schedule),
    from scratch or fine-tuned from the weights of the experiment named ``init``.

    ``epochs_fraction`` trains for that fraction of the epochs the schedule gives the recipe (or the recipe
    ``fraction_of``, the one of the model it fine-tunes, where its own recipe sets a fine-tuning schedule), at
    least 1, as the paper's fine-tunes do; ``autoattack_eps`` adds standard AutoAttack at those multiples of the
    recipe's eps to the one at the eps itself.
    """

    name: str  # its run folder, unique in the grid
    recipe: str
    overrides: tuple[str, ...] = ()
    init: str | None = None
    label: str = ""  # a few words for tables; default the name
    epochs_fraction: float | None = None
    fraction_of: str | None = None
    autoattack_eps: tuple[float, ...] = ()

    def config(self, sizes: PipelineSettings, out: Path, with_init: bool = True):
        """The run configuration; ``with_init=False`` checks it before the weights to fine-tune exist."""

        init = [f"init={out / self.init}"] if self.init and with_init else []
        overrides = [*sizes.train_overrides(), *self.overrides, *init, *sizes.overrides]
        cfg = config.load(self.recipe, overrides)
        if self.epochs_fraction is None:
            return cfg
        base = cfg if self.fraction_of is None else config.load(self.fraction_of, overrides)
        return config.load(self.recipe, [*overrides, f"epochs={fraction_of_epochs(self.epochs_fraction, base.epochs)}"])

    @property
    def autoattack_at(self) -> tuple[float, ...]:
        """The multiples of the recipe's eps AutoAttack runs at, ascending (1 always among them)."""
        return tuple(sorted({1.0, *self.autoattack_eps}))

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Grid:
    """The experiments and the cost bench of one pipeline."""

    experiments: tuple[Experiment, ...]
    bench_recipe: str  # eps and method parameters of the bench, and its model
    bench_methods: tuple[str, ...]

    def __post_init__(self) -> None:
        names = [e.name for e in self.experiments]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment names repeat: {names}")
        for k, e in enumerate(self.experiments):
            if e.init is not None and e.init not in names[:k]:
                raise ValueError(f"{e.name} fine-tunes {e.init}, which is not an earlier experiment")

    def only(self, names: Sequence[str]) -> Grid:
        """The grid of the experiments ``names`` and those they fine-tune from (in the grid's order)."""
        by_name = {e.name: e for e in self.experiments}
        keep: set[str] = set()
        for name in names:
            if name not in by_name:
                raise UserError(f"--only: the grid has no experiment {short(name)}{did_you_mean(name, list(by_name))}"
                                f"; it has {', '.join(by_name)}")
            step: str | None = name
            while step is not None and step not in keep:
                keep.add(step)
                step = by_name[step].init
        return dataclasses.replace(self, experiments=tuple(e for e in self.experiments if e.name in keep))

    def as_json(self) -> dict:
        return {"experiments": [e.as_json() for e in self.experiments], "bench_recipe": self.bench_recipe,
                "bench_methods": list(self.bench_methods)}


# ---------------------------------------------------------------------------- the output folder


def check_out(out: Path, marker: str, state_file: str, settings: dict) -> dict | None:
    """The saved state of ``out`` (None when new or empty); a UserError when ``out`` is not a folder
    this pipeline wrote or was made with other settings. Touches nothing."""
    out = Path(out)
    tool = marker.replace("natgrad-", "natgrad ")
    if not out.exists():
        return None
    if not out.is_dir():
        raise UserError(f"--out {out} is a file; give a new folder or an earlier {tool} folder")
    if not (out / state_file).is_file():
        if any(out.iterdir()):
            raise UserError(f"--out {out} exists and is not a {tool.split()[-1]} folder (no {state_file}); "
                            "give a new folder")
        return None
    try:
        saved = json.loads((out / state_file).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--out {out}: {state_file} is unreadable ({e}); give a new folder") from None
    if not isinstance(saved, dict) or saved.get("format") != marker:
        raise UserError(f"--out {out} holds a {state_file} that {tool} did not write; give a new folder")
    if saved.get("settings") != settings:
        diff = _differences(saved.get("settings") or {}, settings)
        raise UserError(f"--out {out} holds a {tool.split()[-1]} made with other settings ({'; '.join(diff[:3])}); "
                        "give a new folder to start over")
    return saved


def _differences(old: object, new: object, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in new for d in _differences(old.get(k), new[k], f"{prefix}{k}.")] + \
               [f"{prefix}{k}: {old[k]!r} -> None" for k in old if k not in new]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def check_runs(out: Path, grid: Grid, sizes: PipelineSettings) -> None:
    """A UserError when a run folder of ``out`` was trained with another configuration than its experiment
    gives now (a recipe changed since): its results would not belong to this grid."""

    for e in grid.experiments:
        if RunDir(out / e.name).is_run():
            diff = config.differences(run_config(out / e.name), e.config(sizes, out, with_init=False),
                                      ignore=(*config.RESUME_FREE_KEYS, "init"))
            if diff:
                raise UserError(f"{out / e.name} was trained with another configuration than {e.recipe} gives now "
                                f"({'; '.join(diff[:3])}); give a new --out to run the grid again")


def check_data(grid: Grid, sizes: PipelineSettings, out: Path) -> None:
    """Fail before anything is written when the grid's dataset cannot be read (missing, or not where
    data.root says), or an experiment's pretrained start cannot load (a missing file, no internet)."""

    data.build(grid.experiments[0].config(sizes, out, with_init=False), "test")
    for e in grid.experiments:
        cfg = e.config(sizes, out, with_init=False)
        if e.init is None:
            models.check_pretrained(cfg.model.name, cfg.model.pretrained)


def write_state(out: Path, state_file: str, state: dict) -> None:

    atomic_write_text(out / state_file, json.dumps(state, indent=2))


# ---------------------------------------------------------------------------- stages


def train_stage(out: Path, e: Experiment, sizes: PipelineSettings, progress: bool) -> None:

    cfg = e.config(sizes, out)
    run = out / e.name
    if RunDir(run).checkpoint.is_file():
        train(cfg, run, resume=True, progress=progress)
        return
    if run.exists():  # stopped before its first checkpoint: nothing worth keeping
        shutil.rmtree(run)
    train(cfg, run, progress=progress)


def run_config(run: Path):
    """The configuration a run folder was trained with."""

    return RunDir(run).read_config()


def eval_stage(run: Path, s: PipelineSettings, progress: bool, autoattack_at: Sequence[float] = (1.0,)) -> str | None:
    """Clean and PGD-k on ``n_eval`` images, standard AutoAttack on ``n_autoattack`` at each multiple
    ``autoattack_at`` of the recipe's eps (none: no AutoAttack), the eps sweep on ``n_sweep``; writes the sweep
    figure and ``eval.json`` into the run folder. Returns the timing detail on rank 0."""
    cfg = run_config(run)
    aa_eps = tuple(m * cfg.eps for m in autoattack_at)
    parts = (evaluation.Part(("clean", "pgd"), s.n_eval),
             *([evaluation.Part(("autoattack",), s.n_autoattack, "autoattack_n", batch_size=s.autoattack_batch,
                                eps=aa_eps)] if aa_eps else []),
             evaluation.Part(("eps-sweep",), s.n_sweep, "sweep_n", sweep_to=s.sweep_to))
    settings = evaluation.RunSettings(parts=parts, pgd_steps=(s.pgd_steps,), square_queries=s.square_queries,
                                      progress=progress, device=cfg.device, json_flag="eval.json")
    result = evaluation.evaluate_run(run, settings)
    if not result.is_main:
        return None
    if progress:
        print(evaluation.format_results(result.rows), flush=True)
    seconds = result.seconds
    at = ", ".join(f"{e:.4g}" for e in aa_eps)
    return (f"clean, PGD-{s.pgd_steps} and eps sweep {seconds['n'] + seconds['sweep_n']:.1f} s"
            + (f", AutoAttack at eps {at} {seconds['autoattack_n']:.1f} s" if aa_eps else ", no AutoAttack"))


def bench_stage(out: Path, grid: Grid, s: PipelineSettings, progress: bool) -> None:
    """On rank 0 only: one device's cost of a training step."""
    if not is_main_process():
        return

    overrides = [*s.train_overrides(), *s.overrides]
    cfg = config.load(grid.bench_recipe, overrides)
    settings = bench.BenchSettings(recipe=grid.bench_recipe, overrides=overrides, batch=cfg.batch_size,
                                   methods=grid.bench_methods, device=cfg.device, steps=s.bench_steps,
                                   warmup=s.bench_warmup, progress=progress)
    result = bench.run_bench(settings)
    if progress:
        print(bench.format_bench(result), flush=True)
    ckpt.atomic_write_text(out / BENCH_FILE, json.dumps(result, indent=2))


def analyze_stage(run: Path, s: PipelineSettings, progress: bool) -> None:
    """On rank 0 only (the analyses run in one process)."""
    if not is_main_process():
        return

    cfg = run_config(run)
    ctx = setup(cfg.device)
    loaded = evaluation.load_model(run, device=ctx.device)
    ds = evaluation.eval_dataset(cfg, s.n_analysis)
    settings = AnalysisSettings(eps=cfg.eps, power_iterations=s.power_iterations, progress=progress)
    summary, arrays = evaluation.analyze_model(loaded, ds, settings)
    write_analysis(summary, arrays, RunDir(run).analysis)


@dataclasses.dataclass
class Stage:
    name: str  # key in the state file
    banner: str
    done: Callable[[], bool]  # whether its output is already there
    run: Callable[[], str | None]  # returns a detail for the timing line, if any


def _at_eps(multiples: Sequence[float]) -> str:
    """`` at eps x 0.25, 0.5, 1`` (nothing for the eps alone)."""
    return "" if tuple(multiples) == (1.0,) else f" at eps x {', '.join(f'{m:g}' for m in multiples)}"


def stages(out: Path, grid: Grid, s: PipelineSettings, progress: bool) -> list[Stage]:
    """Train every experiment, evaluate every one, bench, analyze every one."""
    result = []
    for e in grid.experiments:
        run = out / e.name
        schedule = (f"{e.epochs_fraction:g} of {s.schedule()}, at least 1 epoch" if e.epochs_fraction is not None
                    else s.schedule())
        how = ", ".join([schedule, *([f"fine-tuning {e.init}"] if e.init else []), *e.overrides])
        result.append(Stage(f"train {e.name}", f"training {e.name} ({how})",
                            RunDir(run).summary.is_file, functools.partial(train_stage, out, e, s, progress)))
    for e in grid.experiments:
        run = out / e.name
        result.append(Stage(
            f"eval {e.name}", f"evaluating {e.name}: clean and PGD-{s.pgd_steps} on {s.n_eval} images, eps sweep on "
            f"{s.n_sweep}, AutoAttack standard on {s.n_autoattack}{_at_eps(e.autoattack_at)}",
            RunDir(run).eval_json.is_file, functools.partial(eval_stage, run, s, progress, e.autoattack_at)))
    result.append(Stage("bench", f"cost of one training step: {', '.join(grid.bench_methods)} "
                        f"(median of {s.bench_steps} steps)",
                        lambda: (out / BENCH_FILE).is_file(), lambda: bench_stage(out, grid, s, progress)))
    for e in grid.experiments:
        run = out / e.name
        result.append(Stage(
            f"analyze {e.name}", f"gradient analyses of {e.name} ({s.n_analysis} images, "
            f"{s.power_iterations} power iterations)", RunDir(run).analysis_json.is_file,
            functools.partial(analyze_stage, run, s, progress)))
    return result


def run_stages(out: Path, tool: str, state_file: str, state: dict, todo: Sequence[Stage],
               say: Callable[[str], None]) -> dict[str, float]:
    """Run the stages not done yet, recording each one's time in ``state``; returns every stage's seconds.

    An exception (or Ctrl-C) records the time spent so far and says how to continue, then propagates.
    Under torchrun every rank runs every stage (each stage shares out its work or leaves it to rank 0),
    rank 0 alone prints and writes the state, and all ranks wait for each other after each stage.
    """

    main = is_main_process()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    say = say if main else (lambda _: None)
    for k, stage in enumerate(todo, 1):
        banner = f"[{k}/{len(todo) + 1}] {stage.banner}"
        if stage.done():
            say(f"{banner}: done before, skipped")
            continue
        say(banner)
        t0 = time.perf_counter()
        before = state.setdefault("interrupted", {}).pop(stage.name, 0.0)  # time spent in runs that stopped
        try:
            detail = stage.run()
        except BaseException as exc:
            state["interrupted"][stage.name] = round(before + time.perf_counter() - t0, 2)
            if main:
                write_state(out, state_file, state)
            say(f"{tool}: stopped during {stage.name}; run the same command again to continue from there")
            if isinstance(exc, Preempted):  # training's own advice (--resume) does not apply here
                raise Preempted(f"stopped by a signal during {stage.name}, its progress kept; run the same command "
                                "again to continue", exc.exit_code - 128) from None
            raise
        seconds = time.perf_counter() - t0
        state["stages"][stage.name] = round(before + seconds, 2)
        if main:
            write_state(out, state_file, state)
        barrier(world)
        say(f"      {stage.name}: {seconds:.1f} s" + (f" (+{before:.1f} s before it was interrupted)" if before else "")
            + (f" ({detail})" if detail else ""))
    return {st.name: state["stages"][st.name] for st in todo if st.name in state["stages"]}


# ---------------------------------------------------------------------------- results


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def autoattack_key(multiple: float) -> str:
    """The key of ``autoattack_at`` for a multiple of the recipe's eps: ``"0.25"``, ``"1"``."""
    return f"{round(multiple, 6):g}"


def result_rows(out: Path, grid: Grid, bench: dict | None = None) -> list[dict]:
    """One row per experiment from its eval.json, analysis.json and summary.json, with the bench's cost of its
    method where the bench measured that method on the same model (same architecture and activation).

    ``bench`` replaces ``out/bench.json``. A row also holds the weights' digest, the resolved config (``init``
    as the name of the experiment it fine-tunes) and ``autoattack_at``: AutoAttack by multiple of the eps."""
    bench = read_json(out / BENCH_FILE) if bench is None else bench
    rows = []
    for e in grid.experiments:
        run = out / e.name
        rundir = RunDir(run)
        ev, an, summary = read_json(rundir.eval_json), read_json(rundir.analysis_json), read_json(rundir.summary)
        cfg = run_config(run) if rundir.is_run() else None
        eps = summary.get("eps")
        results = ev.get("results", [])
        clean: dict = next((r for r in results if r["attack"] == "clean"), {})
        pgd: dict = next((r for r in results if r["attack"].startswith("pgd-")), {})
        aa: dict = next((r for r in results if r["attack"] == "autoattack" and eps is not None
                   and math.isclose(r["eps"], eps)), {})
        method = cfg.method if cfg else None
        same_model = cfg is not None and bench.get("model") == cfg.model.name and bench.get("act") == cfg.model.act
        cost = bench.get("methods", {}).get(method, {}) if same_model and not e.init else {}
        grads, edges = an.get("gradients", {}), an.get("edges", {})
        geometry, linearity = an.get("geometry", {}), an.get("linearity", {})
        autoattack_at = {autoattack_key(r["eps"] / eps): {"eps": r["eps"], "robust_acc": r["robust_acc"], "n": r["n"]}
                         for r in results if r["attack"] == "autoattack" and eps}
        rows.append({
            "model": e.name, "label": e.label or e.name, "recipe": e.recipe, "init": e.init, "method": method,
            "act": cfg.model.act if cfg else None, "eps": eps,
            "clean_acc": clean.get("robust_acc"), "clean_n": clean.get("n"),
            "pgd_attack": pgd.get("attack"), "pgd_acc": pgd.get("robust_acc"),
            "autoattack_acc": aa.get("robust_acc"), "autoattack_n": aa.get("n"),
            "autoattack_warnings": aa.get("warnings", []),
            "seconds_per_step": cost.get("seconds_per_step"), "relative_to_pgd": cost.get("relative_to_pgd"),
            "flops_relative_to_pgd": cost.get("flops_relative_to_pgd"),
            "l1_mean": grads.get("l1_mean"), "analysis_n": grads.get("n"),
            "saliency_edge_corr": edges.get("saliency_corr_mean"),
            "loss_grad_edge_corr": edges.get("loss_grad_corr_mean"),
            "curvature": geometry.get("curvature_mean"), "linearity_error": linearity.get("error_mean"),
            "autoattack_at": dict(sorted(autoattack_at.items(), key=lambda kv: float(kv[0]))),
            "weights_sha256": ev.get("weights_sha256"),
            "config": {**dataclasses.asdict(cfg), "init": e.init} if cfg else None,
        })
    return rows


# ---------------------------------------------------------------------------- summary tables


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def summary_columns(rows: list[dict], pgd_steps: int | None) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the summary table: clean, AutoAttack, cost, mean L1 gradient norm per model."""
    pgd = f"PGD-{pgd_steps}" if pgd_steps else "PGD"
    header = ["model", "method", "clean", "AutoAttack", f"cost vs {pgd}", "s/step", "mean L1 grad"]
    body = [[r["model"], r["method"] or "-", _pct(r["clean_acc"]), _pct(r["autoattack_acc"]),
             _num(r["relative_to_pgd"], ".2f"), _num(r["seconds_per_step"], ".3f"), _num(r["l1_mean"], ".4g")]
            for r in rows]
    return header, body


def format_summary(rows: list[dict], pgd_steps: int | None = 3) -> str:
    """The summary as an aligned text table."""
    return text_table(*summary_columns(rows, pgd_steps), left=2)


def text_table(header: list[str], body: list[list[str]], left: int = 1) -> str:
    """An aligned text table; the first ``left`` columns left-aligned, the others right-aligned."""
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in [header, *body])


def html_table(table_id: str, header: list[str], body: list[list[str]], text_columns: int = 2) -> str:
    """A table in the report's style; the first cell of each row heads it (``data-model`` names the row)."""
    import html

    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    trs = "".join(f"<tr data-model=\"{e(cells[0])}\"><th class=\"model\" scope=\"row\">{e(cells[0])}</th>"
                  + "".join(f"<td class=\"{'text' if i < text_columns else 'num'}\">{e(c)}</td>"
                            for i, c in enumerate(cells[1:], 1))
                  + "</tr>\n" for cells in body)
    return (f"<div class=\"scroll\"><table id=\"{e(table_id)}\"><thead><tr>{head}</tr></thead>\n<tbody>\n{trs}"
            "</tbody></table></div>\n")


__all__ = ["BENCH_FILE", "Experiment", "Grid", "PipelineSettings", "Stage", "autoattack_key", "check_out", "check_runs",
           "format_summary", "fraction_of_epochs", "html_table", "read_json", "result_rows", "run_config", "run_stages",
           "stages", "summary_columns", "text_table", "write_state"]
