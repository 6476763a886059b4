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

import html
import time
from collections.abc import Callable
from pathlib import Path

from natgrad import config
from natgrad.pipeline import (
    BENCH_FILE,
    Experiment,
    Grid,
    PipelineSettings,
    check_data,
    check_out,
    check_runs,
    format_summary,
    html_table,
    read_json,
    result_rows,
    run_stages,
    stages,
    summary_columns,
    write_state,
)
from natgrad.report import write_report

MARKER = "natgrad-demo"
RECIPES = ("fmnist-natural", "fmnist-gradnorm", "fmnist-pgd")
METHODS = ("natural", "gradnorm", "pgd")  # what bench measures, in the order of RECIPES
DEMO_FILE = "demo.json"
REPORT_FILE = "report.html"
EXPECTED_MINUTES = 7  # the default settings on a 2-core CPU (measured 6.3 min of stages, docs/RESULTS.md)
GRID = Grid(tuple(Experiment(r, r) for r in RECIPES), bench_recipe="fmnist-gradnorm", bench_methods=METHODS)

# ---------------------------------------------------------------------------- summary and report


def summary_rows(out: Path) -> list[dict]:
    """One row per model from its eval.json, analysis.json and the demo's bench.json."""
    return result_rows(out, GRID)


def _notes(s: PipelineSettings, eps: float | None) -> list[str]:

    dataset = config.load(RECIPES[0], s.train_overrides()).data.name
    eps_text = "-" if eps is None else f"{eps:.4g}"
    return [
        (f"Short schedules: {s.schedule()} of {dataset} per model, the same for the three methods; the numbers "
         "are far from those of converged models."),
        (f"Clean and PGD-{s.pgd_steps} accuracy on a fixed seeded subset of {s.n_eval} test images, the "
         f"PGD-{s.pgd_steps} eps sweep on {s.n_sweep} and AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square "
         f"{s.square_queries or 5000} queries) at eps {eps_text} on {s.n_autoattack} of them (a small n: its "
         f"standard error is up to {100 * 0.5 / s.n_autoattack ** 0.5:.0f} points)."),
        ("Cost: median seconds of one full training step (batch of the recipe), as a ratio to PGD-3 training, "
         "measured interleaved on this machine."),
        f"Mean L1 norm of the loss input gradient on {s.n_analysis} test images (Table 1).",
    ]


def _demo_section(s: PipelineSettings, rows: list[dict], pgd_steps: int | None, stage_seconds: dict[str, float]) -> str:
    e = html.escape
    eps = next((r["eps"] for r in rows if r["eps"] is not None), None)
    notes = "".join(f"<li>{e(n)}</li>" for n in _notes(s, eps))
    total = sum(stage_seconds.values())
    times = ", ".join(f"{e(k)} {v:.0f} s" for k, v in stage_seconds.items())
    return ("<section id=\"demo\">\n<h2>Demo summary</h2>\n<p class=\"caption\">Written by <code>natgrad demo</code>: "
            "natural training, GradNorm (Eq. 2) and PGD-3 adversarial training of the same cnn-small, compared on "
            "robustness, training cost and natural input gradients.</p>\n"
            + html_table("table-demo", *summary_columns(rows, pgd_steps))
            + f"<ul class=\"notes\">{notes}<li>Stage times: {times} (total {total / 60:.1f} min).</li></ul>\n"
            + "</section>\n")


def write_demo_report(out: Path, s: PipelineSettings, rows: list[dict], pgd_steps: int | None,
                      stage_seconds: dict[str, float]) -> Path:
    """``natgrad report`` of the three run folders with the demo's summary table at its top."""

    section = _demo_section(s, rows, pgd_steps, stage_seconds)
    return write_report([out / r for r in RECIPES], out / REPORT_FILE, intro=[section])


# ---------------------------------------------------------------------------- the demo


def describe_demo(s: PipelineSettings) -> str:
    """What the demo will do, with its n and attacks, printed before it starts."""

    cfg = config.load(RECIPES[0], s.train_overrides())
    lines = [
        f"  train    natural, GradNorm, PGD-3 {cfg.model.name}: {s.schedule()} of {cfg.data.name} each",
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
    if s == PipelineSettings():
        lines.append(f"  expect   about {EXPECTED_MINUTES} minutes on a 2-core CPU, most of it AutoAttack and training")
    return "\n".join(lines)


def run_demo(out: Path | str = Path("runs/demo"), settings: PipelineSettings | None = None,
             progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Run every stage not yet done in ``out``; returns what ``demo.json`` holds (settings, stage times,
    summary rows, report path).

    Args:
        out: the demo folder: new, empty, or one an earlier run of the same settings left.
        settings: the sizes (default :class:`PipelineSettings`).
        progress: progress bars and the stages' own output.
        log: where banners and the summary go (default ``print``).

    Raises:
        UserError: ``out`` exists and is not a demo folder of these settings (nothing is touched).
    """
    out = Path(out)
    s = settings or PipelineSettings()
    say = log or (lambda text: print(text, flush=True))
    saved = check_out(out, MARKER, DEMO_FILE, s.as_json())
    check_runs(out, GRID, s)
    check_data(GRID, s, out)
    todo = stages(out, GRID, s, progress)
    state = saved or {"format": MARKER, "settings": s.as_json(), "stages": {}}
    out.mkdir(parents=True, exist_ok=True)
    write_state(out, DEMO_FILE, state)

    continuing = " (continuing: finished stages are skipped)" if saved else ""
    say(f"natgrad demo into {out}{continuing}\n" + describe_demo(s))
    start = time.perf_counter()
    stage_seconds = run_stages(out, "natgrad demo", DEMO_FILE, state, todo, say)
    say(f"[{len(todo) + 1}/{len(todo) + 1}] report")
    rows = summary_rows(out)
    bench = read_json(out / BENCH_FILE)
    report = write_demo_report(out, s, rows, bench.get("pgd_steps"), stage_seconds)
    state.update(rows=rows, report=str(report), this_run_seconds=round(time.perf_counter() - start, 2),
                 total_stage_seconds=round(sum(stage_seconds.values()), 2))
    write_state(out, DEMO_FILE, state)

    say("\nstage times: " + ", ".join(f"{name} {sec:.0f} s" for name, sec in stage_seconds.items())
        + f" (total {sum(stage_seconds.values()) / 60:.1f} min; this run {(time.perf_counter() - start) / 60:.1f} min)")
    say("\n" + format_summary(rows, bench.get("pgd_steps")))
    eps = next((r["eps"] for r in rows if r["eps"] is not None), None)
    say("\n".join(f"  {n}" for n in _notes(s, eps)))
    say(f"natgrad: report {report}")
    return state


__all__ = ["describe_demo", "format_summary", "run_demo", "summary_rows",
           "write_demo_report"]
