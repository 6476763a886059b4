"""The report's tables as data: one row per model, cells with their text and the number to rank by.

Tables 1, 5, 6 and 7 follow the paper's layout; the evaluation table has one column per attack
and eps found in any model's eval.json. Rendering is :mod:`natgrad.report.html`'s job.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from natgrad.report.formatting import (
    MISSING,
    attack_name,
    compact,
    eps_text,
    mean_std,
    pct,
)
from natgrad.report.runs import EVAL_FILE, Run, items, mapping, number


@dataclass
class Cell:
    text: str = MISSING
    value: float | None = None  # what "best in column" compares; None: not ranked
    note: str = ""  # a small second line (e.g. AutoAttack's per-attack breakdown)
    title: str = ""  # hover text: where the number comes from


@dataclass
class Column:
    name: str
    group: str = ""  # a header spanning neighbouring columns with the same group
    better: str | None = None  # "high", "low" or None (not ranked)
    numeric: bool = True
    title: str = ""


@dataclass
class Table:
    id: str
    title: str
    caption: str
    columns: list[Column]
    rows: list[tuple[Run, list[Cell]]]
    notes: list[str] = field(default_factory=list)  # plain text; `backticks` become code


# ---------------------------------------------------------------------------- shared values


def eval_row(run: Run, attack: str, eps: float | None = None) -> dict | None:
    """The last eval.json row for ``attack`` (at ``eps`` where given)."""
    found = None
    for row in items(mapping(run.eval).get("results")):
        if not isinstance(row, dict) or row.get("attack") != attack:
            continue
        if eps is None or (number(row.get("eps")) is not None and math.isclose(row["eps"], eps, rel_tol=1e-6)):
            found = row
    return found


def clean_cell(run: Run) -> Cell:
    """Clean accuracy: eval.json's, else the analysis's, else the last per-epoch evaluation's."""
    row = eval_row(run, "clean")
    gradients = run.section("gradients") or {}
    for value, source, n in ((row or {}).get("robust_acc"), "eval.json", (row or {}).get("n")), \
            (gradients.get("clean_acc"), "analysis.json", gradients.get("n")), \
            (run.summary.get("clean_acc"), "training's last evaluation", run.summary.get("eval_n")):
        if number(value) is not None:
            return Cell(pct(value), value, title=f"from {source}" + (f", n={n}" if n else ""))
    return Cell()


def autoattack_cell(run: Run) -> Cell:
    """Standard AutoAttack accuracy from eval.json at the analysis's eps (the model's by default)."""
    eps = run.analysis_eps
    row = eval_row(run, "autoattack", eps) if eps is not None else None
    if row is None or number(row.get("robust_acc")) is None:
        return Cell(title=f"no AutoAttack at eps={eps_text(eps)} in {EVAL_FILE}")
    return Cell(pct(row["robust_acc"]), row["robust_acc"], title=f"AutoAttack at eps={eps_text(eps)}, n={row.get('n')}")


def _stat(section: dict | None, mean: str, std: str | None = None) -> Cell:
    """``mean`` (± ``std``) of an analysis section, ranked by the mean."""
    if section is None:
        return Cell()
    text = mean_std(section.get(mean), section.get(std)) if std else compact(section.get(mean))
    return Cell(text, number(section.get(mean)), title=f"n={section['n']}" if section.get("n") else "")


def _accuracy_columns() -> list[Column]:
    return [Column("Clean", "Accuracy (%)", "high"), Column("AutoAttack", "Accuracy (%)", "high")]


def _analysis_notes(runs: list[Run], section: str) -> list[str]:
    notes = []
    for run in runs:
        if run.analysis is None:
            notes.append(f"{run.label}: not run: `{run.command('analyze')}`")
        elif run.section(section) is None:
            notes.append(f"{run.label}: analysis.json has no {section} section: `{run.command('analyze')}`")
    return notes


def _n_text(runs: list[Run], section: str) -> str:
    ns = sorted({int(s["n"]) for r in runs if (s := r.section(section)) and number(s.get("n")) is not None})
    return f" n = {', '.join(map(str, ns))} images." if ns else ""


# ---------------------------------------------------------------------------- tables


def models_table(runs: list[Run]) -> Table:
    """Which models the report compares, and which parts each has."""
    columns = [Column("Method", numeric=False), Column("Architecture", numeric=False),
               Column("Dataset", numeric=False), Column("\u03b5"), Column("Epochs"),
               Column("eval.json", numeric=False), Column("analysis", numeric=False)]
    rows = []
    for run in runs:
        done, total = run.epochs_done, run.epochs
        epochs = MISSING if done is None and total is None else (
            f"{done}" if done == total or total is None else f"{MISSING if done is None else done}/{total}")
        rows.append((run, [Cell(run.method or MISSING), Cell(run.architecture or MISSING), Cell(run.dataset or MISSING),
                           Cell(eps_text(run.eps), title=f"{run.eps}"), Cell(epochs),
                           Cell("yes" if run.eval is not None else "no"),
                           Cell("yes" if run.analysis is not None else "no")]))
    notes = [f"{run.label}: {problem}" for run in runs for problem in run.problems]
    caption = "One row per run folder (epochs: done/planned where the run stopped early); colours match the figures."
    return Table("table-models", "", caption, columns, rows, notes)


def eval_table(runs: list[Run]) -> Table:
    """Clean accuracy, then every attack at every eps found in eval.json."""
    keys: list[tuple[float, str]] = []
    for run in runs:
        for row in items(mapping(run.eval).get("results")):
            if not isinstance(row, dict) or row.get("attack") in (None, "clean") or number(row.get("eps")) is None:
                continue
            key = (float(row["eps"]), str(row["attack"]))
            if not any(math.isclose(key[0], k[0], rel_tol=1e-6) and key[1] == k[1] for k in keys):
                keys.append(key)
    order = {name: i for i, name in enumerate(dict.fromkeys(k[1] for k in keys))}
    keys.sort(key=lambda k: (k[0], order[k[1]]))
    columns = [Column("Clean", "Accuracy (%)", "high")]
    columns += [Column(attack_name(a), f"\u03b5 = {eps_text(e)}", "high", title=a) for e, a in keys]
    columns.append(Column("n", better=None))
    rows, notes = [], []
    for run in runs:
        if run.eval is None:
            rows.append((run, [Cell() for _ in columns]))
            unreadable = any(p.startswith(str(EVAL_FILE)) for p in run.problems)
            notes.append(f"{run.label}: {'eval.json is unreadable' if unreadable else 'not evaluated'}: "
                         f"`{run.command('eval')}`")
            continue
        row = eval_row(run, "clean")
        cells = [Cell(pct(row["robust_acc"]), number(row["robust_acc"])) if row else Cell()]
        for eps, attack in keys:
            cells.append(_attack_cell(eval_row(run, attack, eps), run.eval.get("n")))
            for warning in items(mapping(eval_row(run, attack, eps)).get("warnings")):
                notes.append(f"{run.label}: {attack_name(attack)} at \u03b5 = {eps_text(eps)}: {warning}")
        n = run.eval.get("n")
        cells.append(Cell(str(n) if n is not None else MISSING))
        rows.append((run, cells))
    caption = "Robust accuracy (%) from each run's eval.json; best per column in bold."
    return Table("table-eval", "", caption, columns, rows, notes)


def _attack_cell(row: dict | None, n: int | None = None) -> Cell:
    """An attack's accuracy; its own n is shown where it differs from the row's (e.g. AutoAttack on fewer images)."""
    if row is None or number(row.get("robust_acc")) is None:
        return Cell()
    parts = [f"{p['attack']} {pct(p.get('robust_acc'))}" for p in items(row.get("per_attack"))
             if isinstance(p, dict) and "attack" in p]
    if row.get("n") is not None and row.get("n") != n:
        parts.insert(0, f"n={row['n']}")
    title = f"n={row.get('n')}" + (f", {row['steps']} steps" if row.get("steps") else "")
    return Cell(pct(row["robust_acc"]), row["robust_acc"], note=" \u00b7 ".join(parts), title=title)


def table1(runs: list[Run]) -> Table:
    """Table 1: accuracy and the expected L1 norm of the loss-input gradient, split by PGD success."""
    steps = Counter(int(s["pgd_steps"]) for r in runs if (s := r.section("gradients")) and number(s.get("pgd_steps")))
    pgd = f"PGD{steps.most_common(1)[0][0] if steps else 10}"
    columns = [Column("Standard", "Accuracy (%)", "high"), Column("AA", "Accuracy (%)", "high"),
               Column(pgd, "Accuracy (%)", "high"),
               Column("E[L\u2081]", "Gradient norm", "low", title="E ||grad_x L||_1"),
               Column("E[L\u2081 \u2713]", "Gradient norm", title="attack fails"),
               Column("E[L\u2081 \u2717]", "Gradient norm", title="attack succeeds")]
    rows = []
    for run in runs:
        g = run.section("gradients")
        if g is None:
            rows.append((run, [Cell(), autoattack_cell(run), Cell(), Cell(), Cell(), Cell()]))
            continue
        pgd_title = f"PGD-{g.get('pgd_steps')}, n={g.get('n')}"
        rows.append((run, [Cell(pct(g.get("clean_acc")), number(g.get("clean_acc")), title=f"n={g.get('n')}"),
                           autoattack_cell(run),
                           Cell(pct(g.get("pgd_acc")), number(g.get("pgd_acc")), title=pgd_title),
                           _stat(g, "l1_mean"), _stat(g, "l1_mean_attack_fails"),
                           _stat(g, "l1_mean_attack_succeeds")]))
    caption = (f"Standard and {pgd} accuracy on the analysis images, AA (AutoAttack) from eval.json; E[L\u2081] is the "
               f"mean L\u2081 norm of \u2207x L, and its mean over images where {pgd} fails (\u2713) or "
               f"succeeds (\u2717)."
               + _n_text(runs, "gradients"))
    return Table("table-1", "Table 1 \u00b7 Gradient norm", caption, columns, rows, _analysis_notes(runs, "gradients"))


def _statistics_table(runs: list[Run], section: str, table_id: str, title: str, columns: list[Column],
                      stats: list[tuple[str, str]], caption: str) -> Table:
    """Clean and AutoAttack accuracy beside mean ± std statistics of one analysis section."""
    rows = []
    for run in runs:
        values = run.section(section)
        rows.append((run, [clean_cell(run), autoattack_cell(run), *(_stat(values, m, sd) for m, sd in stats)]))
    return Table(table_id, title, caption + _n_text(runs, section), _accuracy_columns() + columns, rows,
                 _analysis_notes(runs, section))


def table5(runs: list[Run]) -> Table:
    """Table 5: Pearson correlation of log gradient magnitudes with log oriented energy (image edges)."""
    group = "Pearson corr. of log \u00b7 w/ log oriented energy"
    return _statistics_table(
        runs, "edges", "table-5", "Table 5 \u00b7 Gradients and edges",
        [Column("Saliency map", group, "high"), Column("|\u2207x L|", group, "high")],
        [("saliency_corr_mean", "saliency_corr_std"), ("loss_grad_corr_mean", "loss_grad_corr_std")],
        "Mean \u00b1 std over images of the correlation between the log gradient magnitude and the log image "
        "edges; robust models correlate positively.")


def table6(runs: list[Run]) -> Table:
    """Table 6: gradient L2 norm, Hessian spectral norm and normalized curvature."""
    return _statistics_table(
        runs, "geometry", "table-6", "Table 6 \u00b7 Geometry",
        [Column("E\u2016\u2207L\u2016\u2082", "Geometry", "low"),
         Column("E\u2016\u2207\u00b2L\u2016\u2082", "Geometry", "low"),
         Column("E C_L", "Geometry", "low", title="normalized curvature")],
        [("grad_l2_mean", "grad_l2_std"), ("hessian_norm_mean", "hessian_norm_std"),
         ("curvature_mean", "curvature_std")],
        "Mean \u00b1 std of the geometry statistics of Srinivas et al.; C_L = \u2016\u2207\u00b2L\u2016\u2082 / "
        "\u2016\u2207L\u2016\u2082. Lower is smoother.")


def table7(runs: list[Run]) -> Table:
    """Table 7: local linearity error of Rocamora et al. and its log10."""
    return _statistics_table(
        runs, "linearity", "table-7", "Table 7 \u00b7 Local linearity",
        [Column("linerr", "Local linearity error", "low"),
         Column("log\u2081\u2080(linerr)", "Local linearity error", "low")],
        [("error_mean", "error_std"), ("log10_mean", "log10_std")],
        "Mean \u00b1 std of the local linearity error and of its log10. Lower is more linear.")


def sanity_rows(runs: list[Run]) -> list[tuple[Run, dict]]:
    """Every sanity check of every model's eval.json, in order."""
    return [(run, c) for run in runs for c in items(mapping(run.eval).get("sanity")) if isinstance(c, dict)]
