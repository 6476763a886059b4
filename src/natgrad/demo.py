"""``natgrad demo``: the paper's story on Fashion-MNIST in minutes on a laptop CPU.

Trains a natural, a GradNorm and a PGD-3 ``cnn-small`` on short schedules, evaluates each (clean,
PGD, a PGD eps sweep and standard AutoAttack on fixed seeded test subsets), measures the cost of one
training step of each method, runs the gradient analyses and writes one HTML report. Every stage
reuses the library behind ``natgrad train``, ``eval``, ``bench``, ``analyze`` and ``report``.

The demo folder holds ``demo.json`` (the settings, each stage's time, the summary rows), one run
folder per model (``config.yaml`` ... ``eval.json``, ``analysis/``), ``bench.json`` and
``report.html``. Run again on the same folder, the demo skips every finished stage and continues an
interrupted one (training from its last checkpoint, AutoAttack from its last finished attack).
"""

from __future__ import annotations

import dataclasses
import html
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

MARKER = "natgrad-demo"
RECIPES = ("fmnist-natural", "fmnist-gradnorm", "fmnist-pgd")
METHODS = ("natural", "gradnorm", "pgd")  # what bench measures, in the order of RECIPES
DEMO_FILE = "demo.json"
BENCH_FILE = "bench.json"
REPORT_FILE = "report.html"
EXPECTED_MINUTES = 11  # the default settings on a quiet 2-core CPU (measured 11.0 min)


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """The sizes of the demo; the defaults finish in about 11 minutes on a 2-core CPU.

    ``overrides`` (``key=value``, as ``natgrad train`` takes them) apply to every recipe after the
    demo's own keys; tests use them to run the whole pipeline on the tiny synthetic dataset.
    """

    epochs: int = 2
    limit_train: int = 30000  # training images per epoch
    limit_eval: int = 500  # images of training's own end-of-epoch evaluation
    n_eval: int = 1000  # clean and PGD-k at the recipe's eps
    n_sweep: int = 500  # the PGD-k eps sweep
    sweep_to: float = 4.0  # the sweep's largest eps, in multiples of the recipe's eps (natgrad eval's goes to 8)
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
        return [f"epochs={self.epochs}", f"data.limit_train={self.limit_train}", f"data.limit_eval={self.limit_eval}",
                *self.overrides]

    def as_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# ---------------------------------------------------------------------------- the demo folder


def check_out(out: Path, settings: DemoSettings) -> dict | None:
    """The saved ``demo.json`` of ``out`` (None when new or empty); a UserError when ``out`` is not a demo
    folder or was made with other settings. Touches nothing."""
    from natgrad.errors import UserError

    out = Path(out)
    if not out.exists():
        return None
    if not out.is_dir():
        raise UserError(f"--out {out} is a file; give a new folder or an earlier demo folder")
    if not (out / DEMO_FILE).is_file():
        if any(out.iterdir()):
            raise UserError(f"--out {out} exists and is not a demo folder (no {DEMO_FILE}); give a new folder")
        return None
    try:
        saved = json.loads((out / DEMO_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--out {out}: {DEMO_FILE} is unreadable ({e}); give a new folder") from None
    if not isinstance(saved, dict) or saved.get("format") != MARKER:
        raise UserError(f"--out {out} holds a {DEMO_FILE} that natgrad demo did not write; give a new folder")
    if saved.get("settings") != settings.as_json():
        old, new = saved.get("settings") or {}, settings.as_json()
        diff = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]
        raise UserError(f"--out {out} holds a demo made with other settings ({'; '.join(diff[:3])}); "
                        "give a new folder to start over")
    return saved


def _write_state(out: Path, state: dict) -> None:
    from natgrad.engine.checkpoint import atomic_write_text

    atomic_write_text(out / DEMO_FILE, json.dumps(state, indent=2))


# ---------------------------------------------------------------------------- stages


def _train(out: Path, recipe: str, s: DemoSettings, progress: bool) -> None:
    from natgrad import config
    from natgrad.engine.train import CHECKPOINT, train

    cfg = config.load(recipe, s.train_overrides())
    run = out / recipe
    if (run / CHECKPOINT).is_file():
        train(cfg, run, resume=True, progress=progress)
        return
    if run.exists():  # stopped before its first checkpoint: nothing worth keeping
        shutil.rmtree(run)
    train(cfg, run, progress=progress)


def _run_config(run: Path):
    import yaml

    from natgrad import config

    return config.from_dict(yaml.safe_load((run / "config.yaml").read_text()))


def _evaluate(run: Path, s: DemoSettings, progress: bool) -> str:
    from natgrad.engine import checkpoint as ckpt
    from natgrad.engine import robustness as rb
    from natgrad.engine.distributed import setup

    cfg = _run_config(run)
    ctx = setup(cfg.device)
    loaded = rb.load_model(run, device=ctx.device)
    base = rb.EvalSettings(attacks=["clean", "pgd"], eps=[cfg.eps], pgd_steps=(s.pgd_steps,), progress=progress)
    t0 = time.perf_counter()
    out = rb.evaluate_model(loaded.model, rb.eval_dataset(cfg, s.n_eval), base, ctx)
    grid = [e for e in rb.default_sweep_eps(cfg.eps) if e <= s.sweep_to * cfg.eps * (1 + 1e-9)]
    sweep = rb.evaluate_model(loaded.model, rb.eval_dataset(cfg, s.n_sweep),
                              dataclasses.replace(base, attacks=["eps-sweep"], sweep_eps=grid), ctx)
    t1 = time.perf_counter()
    aa_settings = dataclasses.replace(base, attacks=["autoattack"], batch_size=s.autoattack_batch,
                                      state_dir=run / "autoattack-state", square_queries=s.square_queries)
    aa = rb.evaluate_model(loaded.model, rb.eval_dataset(cfg, s.n_autoattack), aa_settings, ctx)
    t2 = time.perf_counter()
    results = out["results"] + aa["results"]
    report = {"model": loaded.name, "weights": str(loaded.weights), "architecture": cfg.model.name,
              "method": cfg.method, "dataset": cfg.data.name, "n": s.n_eval, "autoattack_n": s.n_autoattack,
              "sweep_n": s.n_sweep, "world_size": ctx.world, "results": results, "sweeps": sweep["sweeps"]}
    for kind, curve in sweep["sweeps"].items():
        rb.plot_sweep(curve, kind, run / f"{kind}-sweep.png", f"{loaded.name} ({cfg.method}, n={curve['n']})")
    if progress:
        print(rb.format_table(results), flush=True)
    ckpt.atomic_write_text(run / "eval.json", json.dumps(report, indent=2))
    shutil.rmtree(run / "autoattack-state", ignore_errors=True)
    return f"clean, PGD-{s.pgd_steps} and eps sweep {t1 - t0:.1f} s, AutoAttack {t2 - t1:.1f} s"


def _bench(out: Path, s: DemoSettings, progress: bool) -> None:
    from natgrad import config
    from natgrad.engine import bench
    from natgrad.engine import checkpoint as ckpt

    cfg = config.load("fmnist-gradnorm", s.train_overrides())
    settings = bench.BenchSettings(recipe="fmnist-gradnorm", overrides=s.train_overrides(), batch=cfg.batch_size,
                                   methods=METHODS, device=cfg.device, steps=s.bench_steps, warmup=s.bench_warmup,
                                   progress=progress)
    result = bench.run_bench(settings)
    if progress:
        print(bench.format_table(result), flush=True)
    ckpt.atomic_write_text(out / BENCH_FILE, json.dumps(result, indent=2))


def _analyze(run: Path, s: DemoSettings, progress: bool) -> None:
    from natgrad.analysis.analyze import AnalysisSettings, analyze, write_analysis
    from natgrad.engine import robustness as rb
    from natgrad.engine.distributed import setup

    cfg = _run_config(run)
    ctx = setup(cfg.device)
    loaded = rb.load_model(run, device=ctx.device)
    ds = rb.eval_dataset(cfg, s.n_analysis)
    settings = AnalysisSettings(eps=cfg.eps, power_iterations=s.power_iterations, progress=progress)
    summary, arrays = analyze(loaded.model, ds, settings, ctx.device)
    summary = {"model": loaded.name, "method": cfg.method, "architecture": cfg.model.name, "dataset": cfg.data.name,
               **summary}
    write_analysis(summary, arrays, run / "analysis")


def _epochs(s: DemoSettings) -> str:
    return f"{s.epochs} epoch{'s' if s.epochs != 1 else ''}"


@dataclasses.dataclass
class Stage:
    name: str  # key in demo.json
    banner: str
    done: Callable[[], bool]  # whether its output is already there
    run: Callable[[], str | None]  # returns a detail for the timing line, if any


def _stages(out: Path, s: DemoSettings, progress: bool) -> list[Stage]:
    stages = []
    epochs = _epochs(s)
    for recipe in RECIPES:
        run = out / recipe
        stages.append(Stage(f"train {recipe}", f"training {recipe} ({epochs}, {s.limit_train} images)",
                            lambda run=run: (run / "summary.json").is_file(),
                            lambda recipe=recipe: _train(out, recipe, s, progress)))
    for recipe in RECIPES:
        run = out / recipe
        stages.append(Stage(
            f"eval {recipe}", f"evaluating {recipe}: clean and PGD-{s.pgd_steps} on {s.n_eval} images, eps sweep on "
            f"{s.n_sweep}, AutoAttack standard on {s.n_autoattack}", lambda run=run: (run / "eval.json").is_file(),
            lambda run=run: _evaluate(run, s, progress)))
    stages.append(Stage("bench", f"cost of one training step: {', '.join(METHODS)} (median of {s.bench_steps} steps)",
                        lambda: (out / BENCH_FILE).is_file(), lambda: _bench(out, s, progress)))
    for recipe in RECIPES:
        run = out / recipe
        stages.append(Stage(
            f"analyze {recipe}", f"gradient analyses of {recipe} ({s.n_analysis} images, "
            f"{s.power_iterations} power iterations)", lambda run=run: (run / "analysis" / "analysis.json").is_file(),
            lambda run=run: _analyze(run, s, progress)))
    return stages


# ---------------------------------------------------------------------------- summary and report


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def summary_rows(out: Path) -> list[dict]:
    """One row per model from its eval.json, analysis.json and the demo's bench.json."""
    import math

    bench = _read_json(out / BENCH_FILE).get("methods", {})
    rows = []
    for recipe, method in zip(RECIPES, METHODS):
        run = out / recipe
        ev, an = _read_json(run / "eval.json"), _read_json(run / "analysis" / "analysis.json")
        eps = _read_json(run / "summary.json").get("eps")
        results = ev.get("results", [])
        clean = next((r for r in results if r["attack"] == "clean"), {})
        pgd = next((r for r in results if r["attack"].startswith("pgd-")), {})
        aa = next((r for r in results if r["attack"] == "autoattack" and eps is not None
                   and math.isclose(r["eps"], eps)), {})
        cost = bench.get(method, {})
        grads = an.get("gradients", {})
        rows.append({
            "model": recipe, "method": method, "eps": eps,
            "clean_acc": clean.get("robust_acc"), "clean_n": clean.get("n"),
            "pgd_attack": pgd.get("attack"), "pgd_acc": pgd.get("robust_acc"),
            "autoattack_acc": aa.get("robust_acc"), "autoattack_n": aa.get("n"),
            "seconds_per_step": cost.get("seconds_per_step"), "relative_to_pgd": cost.get("relative_to_pgd"),
            "l1_mean": grads.get("l1_mean"), "analysis_n": grads.get("n"),
        })
    return rows


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _columns(rows: list[dict], pgd_steps: int | None) -> tuple[list[str], list[list[str]]]:
    pgd = f"PGD-{pgd_steps}" if pgd_steps else "PGD"
    header = ["model", "method", "clean", "AutoAttack", f"cost vs {pgd}", "s/step", "mean L1 grad"]
    body = [[r["model"], r["method"], _pct(r["clean_acc"]), _pct(r["autoattack_acc"]), _num(r["relative_to_pgd"], ".2f"),
             _num(r["seconds_per_step"], ".3f"), _num(r["l1_mean"], ".4g")] for r in rows]
    return header, body


def format_summary(rows: list[dict], pgd_steps: int | None = 3) -> str:
    """The summary as an aligned text table."""
    header, body = _columns(rows, pgd_steps)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in [header, *body])


def _notes(s: DemoSettings, eps: float | None) -> list[str]:
    from natgrad import config

    dataset = config.load(RECIPES[0], s.train_overrides()).data.name
    eps_text = "-" if eps is None else f"{eps:.4g}"
    return [
        (f"Short schedules: {_epochs(s)} of {s.limit_train} {dataset} training images per model, the same for "
         "the three methods; the numbers are far from those of converged models."),
        (f"Clean and PGD-{s.pgd_steps} accuracy on a fixed seeded subset of {s.n_eval} test images, the "
         f"PGD-{s.pgd_steps} eps sweep on {s.n_sweep} and AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square "
         f"{s.square_queries or 5000} queries) at eps {eps_text} on {s.n_autoattack} of them (a small n: its "
         f"standard error is up to {100 * 0.5 / s.n_autoattack ** 0.5:.0f} points)."),
        ("Cost: median seconds of one full training step (batch of the recipe), as a ratio to PGD-3 training, "
         "measured interleaved on this machine."),
        f"Mean L1 norm of the loss input gradient on {s.n_analysis} test images (Table 1).",
    ]


def _demo_section(s: DemoSettings, rows: list[dict], pgd_steps: int | None, stage_seconds: dict[str, float]) -> str:
    header, body = _columns(rows, pgd_steps)
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    trs = "".join(f"<tr data-model=\"{e(cells[0])}\"><th class=\"model\" scope=\"row\">{e(cells[0])}</th>"
                  + "".join(f"<td class=\"{'text' if i == 1 else 'num'}\">{e(c)}</td>" for i, c in enumerate(cells[1:], 1))
                  + "</tr>\n" for cells in body)
    eps = next((r["eps"] for r in rows if r["eps"] is not None), None)
    notes = "".join(f"<li>{e(n)}</li>" for n in _notes(s, eps))
    total = sum(stage_seconds.values())
    times = ", ".join(f"{e(k)} {v:.0f} s" for k, v in stage_seconds.items())
    return (f"<section id=\"demo\">\n<h2>Demo summary</h2>\n<p class=\"caption\">Written by <code>natgrad demo</code>: "
            "natural training, GradNorm (Eq. 2) and PGD-3 adversarial training of the same cnn-small, compared on "
            f"robustness, training cost and natural input gradients.</p>\n<div class=\"scroll\"><table id=\"table-demo\">"
            f"<thead><tr>{head}</tr></thead>\n<tbody>\n{trs}</tbody></table></div>\n<ul class=\"notes\">{notes}"
            f"<li>Stage times: {times} (total {total / 60:.1f} min).</li></ul>\n</section>\n")


def write_demo_report(out: Path, s: DemoSettings, rows: list[dict], pgd_steps: int | None,
                      stage_seconds: dict[str, float]) -> Path:
    """``natgrad report`` of the three run folders with the demo's summary table at its top."""
    from natgrad.report import write_report

    section = _demo_section(s, rows, pgd_steps, stage_seconds)
    return write_report([out / r for r in RECIPES], out / REPORT_FILE, intro=[section])


# ---------------------------------------------------------------------------- the demo


def describe(s: DemoSettings) -> str:
    """What the demo will do, with its n and attacks, printed before it starts."""
    from natgrad import config

    cfg = config.load(RECIPES[0], s.train_overrides())
    epochs = _epochs(s)
    lines = [
        f"  train    natural, GradNorm, PGD-3 {cfg.model.name}: {epochs} of {s.limit_train} {cfg.data.name} images each",
        (f"  evaluate clean and PGD-{s.pgd_steps} at eps {cfg.eps:.4g} on a fixed subset of {s.n_eval} test images, "
         f"a PGD-{s.pgd_steps} eps sweep (0 to {min(1.0, s.sweep_to * cfg.eps):.4g}) on {s.n_sweep} of them,"),
        (f"           AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square {s.square_queries or 5000} queries) "
         f"on {s.n_autoattack} of them"),
        f"  cost     one training step of each method, median of {s.bench_steps} interleaved steps",
        (f"  analyses gradient norms, edges, curvature ({s.power_iterations} power iterations), linearity, "
         f"along the attack, on {s.n_analysis} test images"),
    ]
    if s.overrides:
        lines.append(f"  overrides {' '.join(s.overrides)}")
    if s == DemoSettings():
        lines.append(f"  expect   about {EXPECTED_MINUTES} minutes on a 2-core CPU, most of it AutoAttack and training")
    return "\n".join(lines)


def run_demo(out: Path | str = Path("runs/demo"), settings: DemoSettings | None = None,
             progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Run every stage not yet done in ``out``; returns what ``demo.json`` holds (settings, stage times,
    summary rows, report path).

    Args:
        out: the demo folder: new, empty, or one an earlier run of the same settings left.
        settings: the sizes (default :class:`DemoSettings`).
        progress: progress bars and the stages' own output.
        log: where banners and the summary go (default ``print``).

    Raises:
        UserError: ``out`` exists and is not a demo folder of these settings (nothing is touched).
    """
    out = Path(out)
    s = settings or DemoSettings()
    say = log or (lambda text: print(text, flush=True))
    saved = check_out(out, s)
    stages = _stages(out, s, progress)
    state = saved or {"format": MARKER, "settings": s.as_json(), "stages": {}}
    out.mkdir(parents=True, exist_ok=True)
    _write_state(out, state)

    say(f"natgrad demo into {out}" + (" (continuing: finished stages are skipped)" if saved else "") + "\n" + describe(s))
    start = time.perf_counter()
    for k, stage in enumerate(stages, 1):
        banner = f"[{k}/{len(stages) + 1}] {stage.banner}"
        if stage.done():
            say(f"{banner}: done before, skipped")
            continue
        say(banner)
        t0 = time.perf_counter()
        before = state.setdefault("interrupted", {}).pop(stage.name, 0.0)  # time spent in runs that stopped
        try:
            detail = stage.run()
        except BaseException:
            state["interrupted"][stage.name] = round(before + time.perf_counter() - t0, 2)
            _write_state(out, state)
            say(f"natgrad demo: stopped during {stage.name}; run the same command again to continue from there")
            raise
        seconds = time.perf_counter() - t0
        state["stages"][stage.name] = round(before + seconds, 2)
        _write_state(out, state)
        say(f"      {stage.name}: {seconds:.1f} s" + (f" (+{before:.1f} s before it was interrupted)" if before else "")
            + (f" ({detail})" if detail else ""))
    say(f"[{len(stages) + 1}/{len(stages) + 1}] report")
    rows = summary_rows(out)
    bench = _read_json(out / BENCH_FILE)
    stage_seconds = {name: state["stages"][name] for name in (st.name for st in stages) if name in state["stages"]}
    report = write_demo_report(out, s, rows, bench.get("pgd_steps"), stage_seconds)
    state.update(rows=rows, report=str(report), this_run_seconds=round(time.perf_counter() - start, 2),
                 total_stage_seconds=round(sum(stage_seconds.values()), 2))
    _write_state(out, state)

    say("\nstage times: " + ", ".join(f"{name} {sec:.0f} s" for name, sec in stage_seconds.items())
        + f" (total {sum(stage_seconds.values()) / 60:.1f} min; this run {(time.perf_counter() - start) / 60:.1f} min)")
    say("\n" + format_summary(rows, bench.get("pgd_steps")))
    eps = next((r["eps"] for r in rows if r["eps"] is not None), None)
    say("\n".join(f"  {n}" for n in _notes(s, eps)))
    say(f"natgrad: report {report}")
    return state


__all__ = ["DemoSettings", "check_out", "describe", "format_summary", "run_demo", "summary_rows", "write_demo_report"]
