"""``natgrad reproduce DATASET``: the paper's experiment grid on one dataset, claim by claim.

Each dataset has a grid of experiments (:mod:`natgrad.pipeline`) and a budget (``short``, ``full``)
that sets the schedules and the evaluation sizes. After the grid has run, every claim of the paper
(:data:`CLAIMS`) is checked against the measured numbers by a stated criterion, with the paper's
own numbers beside, and the verdict is one of ``holds``, ``does not hold`` or ``not measured``
(an experiment the claim needs is not in the grid or has not finished). The folder gets
``results.json`` (settings, one row per experiment, the bench, the claims), ``CLAIMS.md`` and
``report.html``, and resumes where it stopped when run again.

``fmnist`` is sized for a 2-core CPU; ``cifar10`` and ``imagenet`` run the paper's own recipes
where the data are (under torchrun on several GPUs), and take the same code path.
"""

from __future__ import annotations

import dataclasses
import html
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from natgrad.engine.checkpoint import atomic_write_text
from natgrad.errors import UserError, did_you_mean
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
    is_main_process,
    read_json,
    result_rows,
    run_stages,
    stages,
    summary_columns,
    text_table,
    write_state,
)
from natgrad.report import write_report

MARKER = "natgrad-reproduce"
STATE_FILE = "reproduce.json"
RESULTS_FILE = "results.json"
CLAIMS_FILE = "CLAIMS.md"
REPORT_FILE = "report.html"
BUDGETS = ("short", "full")
SWEEP_WEIGHTS = (0.8, 1.2, 1.6)  # Figure 5: fine-tune with (2 - w) CE + w GradNorm


# ---------------------------------------------------------------------------- grids


def _weight_sweep(prefix: str, recipe: str, init: str, epochs: int | None) -> tuple[Experiment, ...]:
    ft = (f"epochs={epochs}",) if epochs else ()
    return tuple(Experiment(f"{prefix}gn-weight-{w:g}", recipe,
                            (*ft, f"gradnorm.ce_weight={2 - w:g}", f"gradnorm.gn_weight={w:g}",
                             "gradnorm.warmup_epochs=0"),
                            init=init, label=f"GradNorm weight {w:g} (fine-tuned)") for w in SWEEP_WEIGHTS)


def fmnist_grid(fine_tune_epochs: int) -> Grid:
    ft = (f"epochs={fine_tune_epochs}",)
    experiments = (
        Experiment("natural", "fmnist-natural", label="natural"),
        Experiment("gradnorm", "fmnist-gradnorm", label="GradNorm, GELU"),
        Experiment("gradnorm-silu", "fmnist-gradnorm-silu", label="GradNorm, SiLU"),
        Experiment("gradnorm-relu", "fmnist-gradnorm-relu", label="GradNorm, ReLU"),
        Experiment("pgd", "fmnist-pgd", label="PGD-3, GELU"),
        Experiment("pgd-silu", "fmnist-pgd-silu", label="PGD-3, SiLU"),
        Experiment("pgd-relu", "fmnist-pgd-relu", label="PGD-3, ReLU"),
        Experiment("fgsm", "fmnist-fgsm", label="FGSM (random init)"),
        Experiment("edge", "fmnist-edge", label="edge regularization"),
        Experiment("gradnorm-fd", "fmnist-gradnorm-fd", label="GradNorm, finite differences"),
        Experiment("gradnorm-noise", "fmnist-gradnorm-noise", (*ft, "gradnorm.warmup_epochs=0"), init="gradnorm",
                   label="GradNorm on gaussian noise (fine-tuned)"),
        *_weight_sweep("", "fmnist-gradnorm", "gradnorm", fine_tune_epochs),
    )
    return Grid(experiments, bench_recipe="fmnist-gradnorm",
                bench_methods=("natural", "gradnorm", "gradnorm-fd", "pgd", "fgsm", "edge"))


def cifar10_grid(fine_tune_epochs: int) -> Grid:
    experiments = (
        Experiment("natural", "cifar10-prn18-natural", label="natural"),
        Experiment("gradnorm", "cifar10-prn18-gradnorm", label="GradNorm"),
        Experiment("pgd", "cifar10-prn18-pgd", label="PGD-3"),
    )
    return Grid(experiments, bench_recipe="cifar10-prn18-gradnorm", bench_methods=("natural", "gradnorm", "pgd"))


def imagenet_grid(fine_tune_epochs: int) -> Grid:
    resnets = tuple(Experiment(f"resnet50-{act}-{method}", f"imagenet-resnet50-{act}-{method}",
                               label=f"ResNet-50 {act.upper()}, {'GradNorm' if method == 'gradnorm' else 'PGD-3'}")
                    for method in ("gradnorm", "pgd") for act in ("gelu", "silu", "relu"))
    experiments = (
        Experiment("natural", "imagenet-swinb-natural", label="Swin-B natural"),
        Experiment("gradnorm", "imagenet-swinb-gradnorm", label="Swin-B GradNorm"),
        Experiment("pgd", "imagenet-swinb-pgd", label="Swin-B PGD-3"),
        Experiment("fgsm", "imagenet-swinb-fgsm", label="Swin-B FGSM"),
        Experiment("edge", "imagenet-swinb-edge", label="Swin-B edge regularization"),
        *resnets,
        *_weight_sweep("", "imagenet-swinb-gradnorm", "gradnorm", fine_tune_epochs),
    )
    return Grid(experiments, bench_recipe="imagenet-swinb-gradnorm", bench_methods=("natural", "gradnorm", "pgd"))


@dataclasses.dataclass(frozen=True)
class Reproduction:
    """A dataset's grid, its budgets and which experiments play which part in the claims."""

    grid: Callable[[int], Grid]  # from the fine-tuning epochs
    budgets: dict[str, tuple[PipelineSettings, int]]  # budget -> (sizes, fine-tuning epochs)
    roles: dict[str, str]  # claim role -> experiment name
    expected: dict[str, str]  # budget -> expected time, in words


_FMNIST_ROLES = {"natural": "natural", "gradnorm": "gradnorm", "pgd": "pgd", "fgsm": "fgsm", "edge": "edge",
                 "gradnorm-gelu": "gradnorm", "gradnorm-silu": "gradnorm-silu", "gradnorm-relu": "gradnorm-relu",
                 "pgd-gelu": "pgd", "pgd-silu": "pgd-silu", "pgd-relu": "pgd-relu"}
_IMAGENET_ROLES = {"natural": "natural", "gradnorm": "gradnorm", "pgd": "pgd", "fgsm": "fgsm", "edge": "edge",
                   **{f"{m}-{a}": f"resnet50-{a}-{m}" for m in ("gradnorm", "pgd") for a in ("gelu", "silu", "relu")}}

# The full evaluation of every dataset: 1000 images for clean, PGD-10, AutoAttack and the analyses.
_FULL_EVAL: dict[str, Any] = {
    "limit_eval": 1000, "n_eval": 1000, "n_sweep": 1000, "sweep_to": 8.0, "n_autoattack": 1000, "autoattack_batch": 250,
    "pgd_steps": 10, "n_analysis": 1000, "power_iterations": 20, "bench_steps": 10, "bench_warmup": 2}

REPRODUCTIONS: dict[str, Reproduction] = {
    "fmnist": Reproduction(
        fmnist_grid,
        budgets={
            "full": (PipelineSettings(epochs=None, limit_train=None, **_FULL_EVAL), 2),
            "short": (PipelineSettings(epochs=1, limit_train=30000, limit_eval=500, n_eval=1000, n_sweep=500,
                                       sweep_to=4.0,
                            n_autoattack=100, autoattack_batch=50, pgd_steps=10, n_analysis=500, power_iterations=10,
                            bench_steps=5, bench_warmup=1), 1),
        },
        roles=_FMNIST_ROLES,
        expected={"short": "about 34 minutes on a 2-core CPU (measured: docs/RESULTS.md)",
                  "full": "several hours on a 2-core CPU, most of it AutoAttack (docs/RESULTS.md has the measured "
                          "time)"}),
    "cifar10": Reproduction(
        cifar10_grid,
        budgets={"full": (PipelineSettings(epochs=None, limit_train=None, **_FULL_EVAL), 30),
                 "short": (PipelineSettings(epochs=10, limit_train=None, **_FULL_EVAL), 5)},
        roles={"natural": "natural", "gradnorm": "gradnorm", "pgd": "pgd"},
        expected={"full": "not measured here (no GPU): 650 epochs of PreAct ResNet-18 in all, 600 of them with "
                          "double backprop or PGD-3",
                  "short": "not measured here (no GPU): 10 epochs per model"}),
    "imagenet": Reproduction(
        imagenet_grid,
        budgets={"full": (PipelineSettings(epochs=None, limit_train=None, **_FULL_EVAL), 30),
                 "short": (PipelineSettings(epochs=10, limit_train=None, **_FULL_EVAL), 3)},
        roles=_IMAGENET_ROLES,
        expected={"full": "not measured here (no GPU): the paper's Swin-B and ResNet-50 recipes, each days of "
                          "8-GPU time in the paper",
                  "short": "not measured here (no GPU): 10 epochs per model"}),
}


# ---------------------------------------------------------------------------- claims


@dataclasses.dataclass(frozen=True)
class Verdict:
    claim: int
    text: str  # the paper's claim
    criterion: str  # how it is decided here
    paper: str  # the paper's numbers
    measured: str  # ours
    verdict: str  # holds | does not hold | not measured

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


class _Missing(Exception):
    """A number a claim needs is not there."""


def _get(rows: dict[str, dict], roles: dict[str, str], role: str, key: str) -> float:
    name = roles.get(role)
    value = rows.get(name, {}).get(key) if name else None
    if value is None:
        raise _Missing(f"{role} ({key})")
    return value


def _claim(number: int, text: str, criterion: str, paper: str, measure: Callable[..., tuple[str, bool]]):
    """A claim whose ``measure(get, sweep)`` returns the measured text and whether the criterion is met;
    ``get(role, key)`` reads a number of the experiment playing ``role``, ``sweep`` is the weight sweep."""
    def check(rows: dict[str, dict], roles: dict[str, str], sweep: list[dict]) -> Verdict:
        try:
            measured, ok = measure(lambda role, key: _get(rows, roles, role, key), sweep)
        except _Missing as e:
            return Verdict(number, text, criterion, paper, f"missing: {e}", "not measured")
        return Verdict(number, text, criterion, paper, measured, "holds" if ok else "does not hold")
    return check


def _natural_has_no_robustness(get, sweep):
    aa = get("natural", "autoattack_acc")
    return f"natural AutoAttack {_pct(aa)}", aa <= 0.02


def _of_pgd(value: float, pgd: float, digits: int = 3) -> tuple[float, str]:
    """``value / pgd`` and its text; undefined (nan, so no criterion passes) when PGD-3 is at 0%."""
    if pgd > 0:
        return value / pgd, f"{value / pgd:.{digits}f}"
    return float("nan"), "undefined (PGD-3 at 0%)"


def _gradnorm_near_pgd(get, sweep):
    gn, pgd = get("gradnorm", "autoattack_acc"), get("pgd", "autoattack_acc")
    gn_clean, pgd_clean = get("gradnorm", "clean_acc"), get("pgd", "clean_acc")
    ratio, ratio_text = _of_pgd(gn, pgd)
    return (f"GradNorm {_pct(gn)} / PGD-3 {_pct(pgd)} AutoAttack = {ratio_text}; clean {_pct(gn_clean)} vs "
            f"{_pct(pgd_clean)}"), ratio >= 0.90


def _gradnorm_cheaper_than_pgd(get, sweep):
    r = get("gradnorm", "relative_to_pgd")
    flops = get("gradnorm", "flops_relative_to_pgd")
    return f"GradNorm step {r:.3f} of PGD-3's time ({flops:.3f} of its matmul/conv FLOPs)", r <= 0.65


def _relu_breaks_gradnorm(get, sweep):
    gn = {a: get(f"gradnorm-{a}", "autoattack_acc") for a in ("gelu", "silu", "relu")}
    pgd = {a: get(f"pgd-{a}", "autoattack_acc") for a in ("gelu", "silu", "relu")}
    spread = max(pgd.values()) - min(pgd.values())
    far_worse = gn["relu"] <= 0.5 * min(gn["gelu"], gn["silu"])
    text = ("GradNorm AutoAttack " + ", ".join(f"{a.upper()} {_pct(v)}" for a, v in gn.items())
            + "; PGD-3 " + ", ".join(f"{a.upper()} {_pct(v)}" for a, v in pgd.items())
            + f" (spread {100 * spread:.1f} points)")
    return text, far_worse and spread <= 0.05


def _robust_gradients_smaller(get, sweep):
    nat = get("natural", "l1_mean")
    factors = {r: nat / get(r, "l1_mean") for r in ("gradnorm", "pgd")}
    return (f"mean L1 natural {nat:.4g}; " + ", ".join(f"{r} {get(r, 'l1_mean'):.4g} ({f:.0f}x lower)"
                                                       for r, f in factors.items())), min(factors.values()) >= 10


def _gradients_follow_edges(get, sweep):
    keys = ("saliency_edge_corr", "loss_grad_edge_corr")
    vals = {r: [get(r, k) for k in keys] for r in ("natural", "gradnorm", "pgd")}
    text = "; ".join(f"{r} saliency {v[0]:+.3f}, loss gradient {v[1]:+.3f}" for r, v in vals.items())
    return text, all(v < 0 for v in vals["natural"]) and all(v > 0 for r in ("gradnorm", "pgd") for v in vals[r])


def _edges_alone_give_robustness(get, sweep):
    edge, nat, pgd = get("edge", "autoattack_acc"), get("natural", "autoattack_acc"), get("pgd", "autoattack_acc")
    share_text = _of_pgd(edge, pgd, digits=2)[1]
    return (f"edge regularization AutoAttack {_pct(edge)} (natural {_pct(nat)}, PGD-3 {_pct(pgd)}: "
            f"{share_text} of PGD-3's)"), edge - nat >= 0.10


def _robust_models_flatter(get, sweep):
    parts, ok = [], True
    for key, name in (("curvature", "normalized curvature"), ("linearity_error", "linearity error")):
        nat = get("natural", key)
        factors = {r: nat / get(r, key) for r in ("gradnorm", "pgd")}
        ok = ok and min(factors.values()) >= 100
        parts.append(f"{name} natural {nat:.3g}, " + ", ".join(f"{r} {get(r, key):.3g} ({f:.0f}x lower)"
                                                               for r, f in factors.items()))
    return "; ".join(parts), ok


def _weight_trades_clean_for_robust(get, sweep):
    if len(sweep) < 2 or any(r["clean_acc"] is None or r["autoattack_acc"] is None for r in sweep):
        raise _Missing("the GradNorm weight sweep")
    text = "; ".join(f"weight {r['weight']:g}: clean {_pct(r['clean_acc'])}, AutoAttack {_pct(r['autoattack_acc'])}"
                     for r in sweep)
    lo, hi = sweep[0], sweep[-1]
    return text, hi["clean_acc"] < lo["clean_acc"] and hi["autoattack_acc"] > lo["autoattack_acc"]


def _fgsm_weakest(get, sweep):
    fgsm, gn, pgd = (get(r, "autoattack_acc") for r in ("fgsm", "gradnorm", "pgd"))
    return f"AutoAttack FGSM {_pct(fgsm)}, GradNorm {_pct(gn)}, PGD-3 {_pct(pgd)}", fgsm < min(gn, pgd)


CLAIMS = (
    _claim(1, "Natural training has about 0% AutoAttack accuracy.", "natural AutoAttack accuracy <= 2%",
           "0.00% (Swin-B, ResNet-50 on ImageNet, Tables 1, 2; PRN-18 on CIFAR-10, Table 9)",
           _natural_has_no_robustness),
    _claim(2, "GradNorm reaches at least 90% of PGD-3 adversarial training's AutoAttack accuracy.",
           "GradNorm (GELU) AutoAttack / PGD-3 (GELU) AutoAttack >= 0.90",
           "51.58 / 56.16 = 0.92 (Swin-B, ImageNet, Table 2); 39.60 / 42.05 = 0.94 (PRN-18, CIFAR-10, Table 9)",
           _gradnorm_near_pgd),
    _claim(3, "at about 63% of its cost per training step.",
           "GradNorm's time per step <= 0.65 of PGD-3's, one bench run on this machine",
           "1.848 s / 2.943 s = 0.628 (Swin-B, 8 V100, Table 3)", _gradnorm_cheaper_than_pgd),
    _claim(4, "With ReLU, GradNorm is far worse than with GELU or SiLU, while PGD-3 barely cares.",
           "GradNorm ReLU AutoAttack <= half of GELU's and SiLU's, and PGD-3's AutoAttack spread over the three "
           "activations <= 5 points",
           "GradNorm ReLU 6.82 / GELU 30.00 / SiLU 30.58; PGD-3 31.60 / 32.64 / 33.40 (ResNet-50, Table 4)",
           _relu_breaks_gradnorm),
    _claim(5, "Robust models' mean L1 input-gradient norm is at least an order of magnitude below the natural "
              "model's.", "natural / robust mean L1 >= 10 for GradNorm and PGD-3",
           "Swin-B 3892 vs 37.42 (adv.), ResNet-50 3013 vs 56.82 (Table 1)", _robust_gradients_smaller),
    _claim(6, "The log-gradient / log-edge correlation is positive for robust models and negative for the natural "
              "one.", "natural < 0 and GradNorm, PGD-3 > 0, for the saliency map and for the loss gradient",
           "natural -0.45 / -0.44, GradNorm +0.56 / +0.57, PGD-3 +0.56 / +0.57 (Table 5)", _gradients_follow_edges),
    _claim(7, "Edge regularization alone gives non-trivial robustness.",
           "edge-regularized AutoAttack accuracy at least 10 points above natural",
           "35.02% against natural 0.00% and PGD-3 56.16% (Swin-B, Table 5)", _edges_alone_give_robustness),
    _claim(8, "Robust models have orders of magnitude lower curvature and local linearity error.",
           "natural / robust >= 100 for normalized curvature and for linearity error, GradNorm and PGD-3",
           "curvature 1e4 vs 2.15 / 2.17 (Table 6); linearity error 3.55e-3 vs 1.86e-5 / 8.2e-6 (Table 7)",
           _robust_models_flatter),
    _claim(9, "Raising the GradNorm weight trades clean for robust accuracy.",
           "from the smallest to the largest fine-tuning weight, clean accuracy falls and AutoAttack accuracy rises",
           "weight 1.2 -> 1.4: clean 77.78 -> 76.20, AutoAttack 51.58 -> 52.48 (Swin-B, Figure 5)",
           _weight_trades_clean_for_robust),
    _claim(10, "FGSM is the weakest of the robust trainings.",
           "FGSM AutoAttack accuracy below GradNorm's and PGD-3's",
           "before its collapse 0.8 points below GradNorm on PGD-10; after it PGD-100 9.78% (Swin-B, Figure 12)",
           _fgsm_weakest),
)


def sweep_rows(rows: list[dict]) -> list[dict]:
    """The weight sweep's rows (experiments named ``*gn-weight-W``), by weight."""
    out = []
    for r in rows:
        if "gn-weight-" in r["model"]:
            out.append({**r, "weight": float(r["model"].rsplit("gn-weight-", 1)[1])})
    return sorted(out, key=lambda r: r["weight"])


def check_claims(rows: list[dict], roles: dict[str, str]) -> list[Verdict]:
    """Every claim's verdict from the result rows."""
    by_name = {r["model"]: r for r in rows}
    return [claim(by_name, roles, sweep_rows(rows)) for claim in CLAIMS]


def quality_bar(rows: list[dict], roles: dict[str, str]) -> str:
    """Issue 7's bar: GradNorm >= 0.92 of PGD-3's AutoAttack accuracy at a clean accuracy within 2 points."""
    by_name = {r["model"]: r for r in rows}
    try:
        gn, pgd = (_get(by_name, roles, r, "autoattack_acc") for r in ("gradnorm", "pgd"))
        gn_c, pgd_c = (_get(by_name, roles, r, "clean_acc") for r in ("gradnorm", "pgd"))
    except _Missing as e:
        return f"not measured (missing: {e})"
    ratio, ratio_text = _of_pgd(gn, pgd)
    met = ratio >= 0.92 and abs(gn_c - pgd_c) <= 0.02
    return (f"{'met' if met else 'not met'}: GradNorm / PGD-3 AutoAttack {ratio_text} (bar 0.92), clean "
            f"{_pct(gn_c)} vs {_pct(pgd_c)} ({100 * (gn_c - pgd_c):+.1f} points, bar within 2)")


# ---------------------------------------------------------------------------- outputs


def claims_markdown(dataset: str, budget: str, verdicts: list[Verdict], bar: str, rows: list[dict],
                    sizes: PipelineSettings, pgd_steps: int | None) -> str:
    """CLAIMS.md: the claims with the paper's and the measured numbers and a verdict each."""
    held = sum(v.verdict == "holds" for v in verdicts)
    lines = [
        f"# The paper's claims on {dataset} (`natgrad reproduce {dataset} --budget {budget}`)", "",
        f"{held} of {len(verdicts)} claims hold; "
        f"{sum(v.verdict == 'does not hold' for v in verdicts)} do not; "
        f"{sum(v.verdict == 'not measured' for v in verdicts)} not measured. Each verdict applies the criterion "
        "written with it to the numbers measured here; the paper's numbers are for other datasets and "
        "models, and are beside ours for scale, not to be matched.", "",
        f"Schedule: {sizes.schedule()} per model; AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square "
        f"{sizes.square_queries or 5000} queries) on {sizes.n_autoattack} fixed test images; clean and "
        f"PGD-{sizes.pgd_steps} on {sizes.n_eval}; analyses on {sizes.n_analysis}.", "",
        "| # | claim | criterion | paper | measured here | verdict |", "|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        lines.append(f"| {v.claim} | {v.text} | {v.criterion} | {v.paper} | {v.measured} | **{v.verdict}** |")
    lines += ["", f"Quality bar (GradNorm, GELU, against PGD-3, GELU): {bar}.", "", "## Models", "",
              "```", text_table(*_result_columns(rows, pgd_steps), left=2), "```", ""]
    return "\n".join(lines)


def _result_columns(rows: list[dict], pgd_steps: int | None) -> tuple[list[str], list[list[str]]]:
    header, body = summary_columns(rows, pgd_steps)
    header = [*header[:4], f"PGD-{rows[0]['pgd_attack'].split('-')[-1] if rows and rows[0]['pgd_attack'] else 'k'}",
              *header[4:]]
    body = [[*cells[:4], "-" if r["pgd_acc"] is None else _pct(r["pgd_acc"]), *cells[4:]]
            for cells, r in zip(body, rows)]
    return header, body


def _report_sections(dataset: str, budget: str, verdicts: list[Verdict], bar: str, rows: list[dict],
                     pgd_steps: int | None, stage_seconds: dict[str, float]) -> list[str]:
    e = html.escape
    claims = "".join(
        f"<tr data-model=\"claim-{v.claim}\"><th class=\"model\" scope=\"row\">{v.claim}</th><td class=\"text\">"
        f"{e(v.text)}</td><td class=\"text\">{e(v.criterion)}</td><td class=\"text\">{e(v.paper)}</td>"
        f"<td class=\"text\">{e(v.measured)}</td><td class=\"text\"><b>{e(v.verdict)}</b></td></tr>\n"
        for v in verdicts)
    total = sum(stage_seconds.values())
    return [
        (f"<section id=\"claims\">\n<h2>The paper's claims on {e(dataset)}</h2>\n<p class=\"caption\">Written by "
         f"<code>natgrad reproduce {e(dataset)} --budget {e(budget)}</code>: each claim decided by the criterion "
         "beside "
         "it on the numbers measured here.</p>\n<div class=\"scroll\"><table id=\"table-claims\"><thead><tr><th>#</th>"
         "<th>claim</th><th>criterion</th><th>paper</th><th>measured here</th><th>verdict</th></tr></thead>\n<tbody>\n"
         f"{claims}</tbody></table></div>\n<ul class=\"notes\"><li>Quality bar: {e(bar)}.</li>"
         f"<li>Total stage time {total / 3600:.2f} h.</li></ul>\n</section>\n"),
        ("<section id=\"grid\">\n<h2>Models of the grid</h2>\n"
         + html_table("table-grid", *_result_columns(rows, pgd_steps)) + "</section>\n"),
    ]


# ---------------------------------------------------------------------------- the command


def resolve(dataset: str, budget: str) -> tuple[Reproduction, Grid, PipelineSettings]:
    """The dataset's grid and sizes for ``budget``; a UserError for an unknown dataset or budget."""
    if dataset not in REPRODUCTIONS:
        raise UserError(f"unknown dataset {dataset!r}{did_you_mean(dataset, list(REPRODUCTIONS))}; "
                        f"use one of {', '.join(REPRODUCTIONS)}")
    if budget not in BUDGETS:
        raise UserError(f"unknown budget {budget!r}{did_you_mean(budget, list(BUDGETS))}; use short or full")
    d = REPRODUCTIONS[dataset]
    sizes, ft_epochs = d.budgets[budget]
    return d, d.grid(ft_epochs), sizes


def describe_reproduction(dataset: str, budget: str, grid: Grid, sizes: PipelineSettings, d: Reproduction) -> str:
    """What the run will do, printed before it starts."""
    return "\n".join([
        f"  budget   {budget}: {sizes.schedule()} per model (fine-tunes: their own epochs); "
        f"expect {d.expected[budget]}",
        f"  models   {', '.join(e.name for e in grid.experiments)}",
        (f"  evaluate clean and PGD-{sizes.pgd_steps} on a fixed subset of {sizes.n_eval} test images, an eps sweep "
         f"on {sizes.n_sweep}, AutoAttack standard (Square {sizes.square_queries or 5000} queries) on "
         f"{sizes.n_autoattack}"),
        f"  cost     {', '.join(grid.bench_methods)}: median of {sizes.bench_steps} interleaved steps",
        f"  analyses on {sizes.n_analysis} test images, {sizes.power_iterations} power iterations",
        *([f"  overrides {' '.join(sizes.overrides)}"] if sizes.overrides else []),
    ])


def run_reproduce(dataset: str, out: Path | str | None = None, budget: str = "full", overrides: tuple[str, ...] = (),
                  progress: bool = True, log: Callable[[str], None] | None = None,
                  sizes: PipelineSettings | None = None) -> dict:
    """Run (or continue) the grid of ``dataset`` into ``out`` and decide every claim; returns results.json's content.

    Args:
        dataset: fmnist, cifar10 or imagenet.
        out: the folder (default ``runs/reproduce-DATASET-BUDGET``): new, empty, or one an earlier run of the
            same dataset, budget and overrides left.
        budget: short or full (see :data:`REPRODUCTIONS`).
        overrides: ``key=value`` for every recipe, last (tests run the grids on synthetic data with them).
        progress: progress bars and the stages' own output.
        log: where banners and the summary go (default ``print``).
        sizes: replace the budget's sizes (tests shrink everything with it).
    """
    d, grid, budget_sizes = resolve(dataset, budget)
    sizes = dataclasses.replace(sizes or budget_sizes, overrides=tuple(overrides))
    out = Path(out or f"runs/reproduce-{dataset}-{budget}")
    settings = json.loads(json.dumps({"dataset": dataset, "budget": budget, "sizes": sizes.as_json(),
                                      "grid": grid.as_json()}))
    say = log or (lambda text: print(text, flush=True))
    saved = check_out(out, MARKER, STATE_FILE, settings)
    for e in grid.experiments:  # every recipe and override is checked before any work starts
        e.config(sizes, out, with_init=False)
    check_runs(out, grid, sizes)
    check_data(grid, sizes, out)
    todo = stages(out, grid, sizes, progress)
    state = saved or {"format": MARKER, "settings": settings, "stages": {}}
    main = is_main_process()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_state(out, STATE_FILE, state)
        say(f"natgrad reproduce {dataset} into {out}" + (" (continuing: finished stages are skipped)" if saved else "")
            + "\n" + describe_reproduction(dataset, budget, grid, sizes, d))
    start = time.perf_counter()
    stage_seconds = run_stages(out, f"natgrad reproduce {dataset}", STATE_FILE, state, todo, say)
    if not main:
        return state
    say(f"[{len(todo) + 1}/{len(todo) + 1}] claims and report")
    rows = result_rows(out, grid)
    bench = read_json(out / BENCH_FILE)
    verdicts = check_claims(rows, d.roles)
    bar = quality_bar(rows, d.roles)
    results = {"format": MARKER, "dataset": dataset, "budget": budget, "settings": settings, "rows": rows,
               "bench": bench, "claims": [v.as_json() for v in verdicts], "quality_bar": bar,
               "stage_seconds": stage_seconds, "total_hours": round(sum(stage_seconds.values()) / 3600, 3)}

    atomic_write_text(out / RESULTS_FILE, json.dumps(results, indent=2))
    atomic_write_text(out / CLAIMS_FILE, claims_markdown(dataset, budget, verdicts, bar, rows, sizes,
                                                         bench.get("pgd_steps")))
    sections = _report_sections(dataset, budget, verdicts, bar, rows, bench.get("pgd_steps"), stage_seconds)
    report = write_report([out / e.name for e in grid.experiments], out / REPORT_FILE, intro=sections,
                          model_figures=False)
    state.update(report=str(report), this_run_seconds=round(time.perf_counter() - start, 2))
    write_state(out, STATE_FILE, state)

    say("\n" + format_summary(rows, bench.get("pgd_steps")))
    say("\n" + "\n".join(f"  claim {v.claim}: {v.verdict:13s} {v.measured}" for v in verdicts))
    say(f"  quality bar: {bar}")
    say(f"natgrad: {out / CLAIMS_FILE}, {out / RESULTS_FILE}, report {report}")
    return results


__all__ = ["BUDGETS", "CLAIMS", "REPRODUCTIONS", "Verdict", "check_claims", "quality_bar", "resolve", "run_reproduce"]
