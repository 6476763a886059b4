"""``natgrad report``: several run folders side by side in one self-contained HTML file.

Figures are embedded as base64 PNG data URIs and the CSS is inline, so the file opens anywhere
without network access or JavaScript.
"""

from __future__ import annotations

import base64
import datetime
import html
import math
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import natgrad
from natgrad.errors import UserError
from natgrad.files import atomic_write_text, check_destination
from natgrad.report import figures, tables
from natgrad.report.formatting import MISSING
from natgrad.report.runs import Run, load_runs
from natgrad.report.tables import Table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_FIGURE_BYTES = 32 * 2**20

# analysis.json["figures"] keys, in the paper's order, with their headings
ANALYSIS_FIGURES = {
    "pictures": "Input gradients (Figure 1)",
    "gradient_norms": "Gradient norms (Figure 6)",
    "channels": "Gradient values per channel (Figure 7)",
    "edges": "Saliency maps and edges (Figure 8)",
    "curvature": "Normalized curvature (Figure 9)",
    "linearity": "Local linearity error (Figure 10)",
    "along_attack": "Along the attack direction (Figure 11)",
}

CSS = """
:root { --fg: #1d232a; --muted: #5c6873; --line: #dde2e7; --head: #f3f5f7; --accent: #23519c; }
* { box-sizing: border-box; }
body { margin: 0; background: #eef1f4; color: var(--fg);
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1320px; margin: 0 auto; padding: 28px 36px 56px; background: #fff; min-height: 100vh; }
h1 { font-size: 25px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 40px 0 10px; padding-bottom: 5px; border-bottom: 2px solid var(--line); }
h3 { font-size: 15px; margin: 26px 0 4px; }
p.meta { color: var(--muted); margin: 0 0 8px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 16px; font-size: 13px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; margin: 4px 0 6px; }
p.caption { color: var(--muted); font-size: 12.5px; margin: 0 0 6px; max-width: 900px; }
th, td { padding: 5px 12px; border-bottom: 1px solid var(--line); vertical-align: top; }
thead th { background: var(--head); font-weight: 600; font-size: 13px; text-align: center; }
thead tr:last-child th { border-bottom: 1px solid #b9c1c9; }
thead th.group { border-bottom: 1px solid #c9d0d6; font-weight: 500; color: var(--muted); }
th.model { text-align: left; font-weight: 600; white-space: nowrap; }
td.num { text-align: right; white-space: nowrap; }
td.text { text-align: left; }
tbody tr:hover { background: #f8fafc; }
.best { font-weight: 700; }
.sub { display: block; font-size: 11px; color: var(--muted); font-weight: 400; white-space: normal; max-width: 260px;
       margin-left: auto; }
th .sub { margin-left: 16px; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 7px; }
.hint { color: var(--muted); font-size: 12.5px; margin: 2px 0; }
ul.notes { margin: 4px 0 0; padding-left: 18px; color: var(--muted); font-size: 12.5px; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #f0f2f4;
       padding: 1px 4px; border-radius: 3px; color: #2a3038; }
figure { margin: 10px 0; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 3px; }
figcaption { font-size: 12px; color: var(--muted); margin-top: 3px; }
.grid { display: grid; gap: 14px; align-items: start; }
.placeholder { border: 1px dashed var(--line); border-radius: 3px; padding: 28px 12px; text-align: center;
               color: var(--muted); font-size: 12.5px; }
.badge { display: inline-block; min-width: 44px; text-align: center; border-radius: 3px; font-size: 11.5px;
         font-weight: 600; padding: 1px 6px; }
.badge.PASS { background: #e1f3e6; color: #1c6a36; }
.badge.WARN { background: #fcefd2; color: #8a5800; }
.badge.SKIP { background: #eceff2; color: #5c6873; }
footer { margin-top: 48px; color: var(--muted); font-size: 12px; }
"""


def build_report(run_dirs: Sequence[Path | str], intro: Sequence[str] = (), model_figures: bool = True) -> str:
    """The HTML report comparing the run folders ``run_dirs``; ``intro``: HTML sections placed after the header;
    ``model_figures=False`` leaves out each model's own analysis figures (a grid of many models stays small).

    Raises:
        UserError: no folders, or a path that is not a natgrad run folder.
    """
    runs = load_runs(list(run_dirs))
    colors = _colors(runs)
    footer = ("<footer>Written by <code>natgrad report</code>. Accuracies are percentages of correctly classified "
              "images; \u2013 marks a value the run folder does not hold.</footer>")
    body = [_header(runs), *intro, _models(runs, colors), _training(runs), _evaluation(runs, colors),
            _analysis(runs, colors, model_figures),
            footer]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>natgrad report: {_e(', '.join(r.label for r in runs))}</title>\n<style>{CSS}</style>\n</head>\n"
            "<body>\n<main>\n" + "\n".join(body) + "\n</main>\n</body>\n</html>\n")


def write_report(run_dirs: Sequence[Path | str], out: Path, intro: Sequence[str] = (),
                 model_figures: bool = True) -> Path:
    """Build the report and write it to ``out`` atomically (temp file, then rename); returns ``out``."""
    out = Path(out)
    # ASCII with character references: any locale can write it
    text = build_report(run_dirs, intro, model_figures).encode("ascii", "xmlcharrefreplace").decode("ascii")
    check_destination(out, "html", "--out")  # never replaces weights or other files
    try:
        atomic_write_text(out, text)
        umask = os.umask(0)
        os.umask(umask)
        out.chmod(0o666 & ~umask)  # a shareable document, not the temp file's private 0600
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror or e}); choose another --out") from None
    return out


# ---------------------------------------------------------------------------- sections


def _header(runs: list[Run]) -> str:

    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    version = getattr(natgrad, "__version__", "unknown")
    nav = "".join(f'<a href="#{i}">{t}</a>' for i, t in (("models", "Models"), ("training", "Training"),
                                                           ("evaluation", "Robust accuracy"),
                                                           ("analysis", "Natural input gradients")))
    return (f"<header>\n<h1>natgrad report</h1>\n<p class=\"meta\">{_e(now)} \u00b7 natgrad {_e(version)} \u00b7 "
            f"{len(runs)} model{'s' if len(runs) != 1 else ''}</p>\n<nav>{nav}</nav>\n</header>\n")


def _models(runs: list[Run], colors: dict[int, str]) -> str:
    return f"<section id=\"models\">\n<h2>Models</h2>\n{_table(tables.models_table(runs), colors)}\n</section>"


def _training(runs: list[Run]) -> str:
    png = figures.training_curves(runs)
    if png is None:
        inner = "<p class=\"hint\">No run folder holds metrics.jsonl (written by <code>natgrad train</code>).</p>"
    else:
        missing = [r.label for r in runs if not r.metrics]
        inner = _figure(png, "Training loss, clean accuracy and PGD accuracy per epoch",
                        "Train loss, clean and PGD accuracy per epoch (metrics.jsonl)"
                        + (f"; no metrics for {', '.join(missing)}" if missing else "") + ".")
    return f"<section id=\"training\">\n<h2>Training curves</h2>\n{inner}\n</section>"


def _evaluation(runs: list[Run], colors: dict[int, str]) -> str:
    parts = ["<section id=\"evaluation\">\n<h2>Robust accuracy</h2>", _table(tables.eval_table(runs), colors)]
    sanity = tables.sanity_rows(runs)
    if sanity:
        rows = "".join(
            f"<tr data-model=\"{_e(run.label)}\">{_model_th(run, colors)}"
            f"<td class=\"text\">{_e(c.get('check', MISSING))}</td>"
            f"<td class=\"text\"><span class=\"badge {_e(_status(c))}\">{_e(_status(c))}</span></td>"
            f"<td class=\"text\">{_e(c.get('detail') or '')}</td></tr>\n" for run, c in sanity)
        parts.append("<h3>Sanity checks (Appendix C)</h3>\n<div class=\"scroll\"><table id=\"table-sanity\">"
                     "<thead><tr><th>Model</th><th>Check</th><th>Status</th><th>Detail</th></tr></thead>\n"
                     f"<tbody>\n{rows}</tbody></table></div>")
    sweeps = figures.sweeps(runs)
    if sweeps is not None:
        alt = "Robust accuracy against eps (Figure 2); accuracy and loss against PGD steps (Figure 13)"
        parts.append("<h3>Sweeps</h3>\n" + _figure(sweeps, alt, alt + " from eval.json's sweeps."))
    parts.append("</section>")
    return "\n".join(parts)


def _status(check: dict) -> str:
    status = str(check.get("status", "SKIP")).upper()
    return status if status in ("PASS", "WARN", "SKIP") else "SKIP"


def _analysis(runs: list[Run], colors: dict[int, str], model_figures: bool = True) -> str:
    parts = ["<section id=\"analysis\">\n<h2>Natural input gradients</h2>"]
    if not any(r.analysis for r in runs):
        parts.append("<p class=\"hint\">No analysis yet: run <code>natgrad analyze RUN_DIR</code> on each run "
                     "folder.</p>")
    for make in (tables.table1, tables.table5, tables.table6, tables.table7):
        parts.append(_table(make(runs), colors))
    dist, along = figures.distributions(runs), figures.along_attack(runs)
    if dist or along:
        parts.append("<h3>Models compared</h3>")
    if dist:
        alt = "Distributions over images of the gradient L1 norm, the normalized curvature and the linearity error"
        parts.append(_figure(dist, alt, alt + " (Figures 6, 9, 10)."))
    if along:
        alt = "Loss, L1 gradient norm and normalized curvature along the attack direction"
        parts.append(_figure(along, alt, alt + " (Figure 11)."))
    if model_figures:
        parts.append(_analysis_figures(runs, colors))
    elif any(r.analysis for r in runs):
        parts.append("<p class=\"hint\">Each model's own figures (images, gradients, perturbations, per-model "
                     "distributions) are in its run folder's <code>analysis/</code>.</p>")
    parts.append("</section>")
    return "\n".join(parts)


def _analysis_figures(runs: list[Run], colors: dict[int, str]) -> str:
    """Each analysis's own PNGs, one column per model."""
    named = [dict(r.analysis.get("figures") or {}) if r.analysis and isinstance(r.analysis.get("figures"), dict) else {}
             for r in runs]
    keys = [k for k in ANALYSIS_FIGURES if any(k in f for f in named)]
    keys += sorted({k for f in named for k in f} - set(keys))
    if not keys:
        return ""
    columns = min(len(runs), 4)
    out = []
    for key in keys:
        cells = []
        for run, files in zip(runs, named):
            caption = f"<span class=\"swatch\" style=\"background:{colors[id(run)]}\"></span>{_e(run.label)}"
            png, why = _figure_file(run, files.get(key))
            if png is None:
                cells.append(f"<figure><div class=\"placeholder\">{MISSING} {_inline(why)}</div>"
                             f"<figcaption>{caption}</figcaption></figure>")
            else:
                cells.append(f"<figure>{_img(png, f'{ANALYSIS_FIGURES.get(key, key)}: {run.label}')}"
                             f"<figcaption>{caption}</figcaption></figure>")
        out.append(f"<h3>{_e(ANALYSIS_FIGURES.get(key, key.replace('_', ' ')))}</h3>\n"
                   f"<div class=\"grid\" style=\"grid-template-columns: repeat({columns}, minmax(0, 1fr))\">"
                   + "".join(cells) + "</div>")
    return "\n".join(out)


def _figure_file(run: Run, name: object) -> tuple[bytes | None, str]:
    """The bytes of a PNG named in analysis.json, or None and why not."""
    if run.analysis is None:
        return None, f"not run: `{run.command('analyze')}`"
    if not isinstance(name, str) or not name:
        return None, "not in this analysis"
    try:
        base = run.analysis_dir.resolve()
        path = (base / name).resolve()
        if not path.is_relative_to(base):
            return None, f"{name} is outside the analysis folder"
        if not path.is_file():
            return None, f"{name} is missing"
        if path.stat().st_size > MAX_FIGURE_BYTES:
            return None, f"{name} is larger than {MAX_FIGURE_BYTES // 2**20} MiB"
        data = path.read_bytes()
    except (OSError, ValueError) as e:
        return None, f"{name} is unreadable ({e})"
    if not data.startswith(PNG_SIGNATURE):
        return None, f"{name} is not a PNG file"
    return data, ""


# ---------------------------------------------------------------------------- HTML pieces


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _inline(text: str) -> str:
    """Escape ``text``; spans in backticks become <code>."""
    parts = text.split("`")
    return "".join(f"<code>{_e(p)}</code>" if i % 2 else _e(p) for i, p in enumerate(parts))


def _img(png: bytes, alt: str) -> str:
    """An <img> with the PNG inline; width and height from its header keep the layout stable while it loads."""
    width, height = struct.unpack(">II", png[16:24]) if len(png) >= 24 else (0, 0)
    size = f" width=\"{width}\" height=\"{height}\"" if width and height else ""
    return f"<img alt=\"{_e(alt)}\"{size} src=\"data:image/png;base64,{base64.b64encode(png).decode('ascii')}\">"


def _figure(png: bytes, alt: str, caption: str) -> str:
    return f"<figure>{_img(png, alt)}<figcaption>{_e(caption)}</figcaption></figure>"


def _colors(runs: list[Run]) -> dict[int, str]:
    return {id(run): figures.color(i) for i, run in enumerate(runs)}


def _model_th(run: Run, colors: dict[int, str], sub: str = "") -> str:
    swatch = f"<span class=\"swatch\" style=\"background:{colors[id(run)]}\"></span>"
    sub_html = f"<span class=\"sub\">{_e(sub)}</span>" if sub else ""
    return f"<th class=\"model\" scope=\"row\" title=\"{_e(run.path)}\">{swatch}{_e(run.label)}{sub_html}</th>"


def _best(table: Table) -> list[set[int]]:
    """Per column, the rows holding its best value (none where fewer than two values differ)."""
    best: list[set[int]] = []
    for j, col in enumerate(table.columns):
        values = [(i, v) for i, (_, cells) in enumerate(table.rows)
                  if (v := cells[j].value) is not None and math.isfinite(v)]
        if col.better not in ("high", "low") or len({v for _, v in values}) < 2:
            best.append(set())
            continue
        top = max(v for _, v in values) if col.better == "high" else min(v for _, v in values)
        best.append({i for i, v in values if math.isclose(v, top, rel_tol=1e-9, abs_tol=0.0)})
    return best


def _head(table: Table) -> str:
    cols = table.columns
    if not any(c.group for c in cols):
        cells = "".join(f"<th title=\"{_e(c.title)}\">{_e(c.name)}</th>" for c in cols)
        return f"<thead><tr><th>Model</th>{cells}</tr></thead>"
    top, bottom, j = ["<th rowspan=\"2\">Model</th>"], [], 0
    while j < len(cols):
        group = cols[j].group
        span = 1
        while group and j + span < len(cols) and cols[j + span].group == group:
            span += 1
        if group:
            top.append(f"<th class=\"group\" colspan=\"{span}\">{_e(group)}</th>")
            bottom += [f"<th title=\"{_e(c.title)}\">{_e(c.name)}</th>" for c in cols[j:j + span]]
        else:
            top.append(f"<th rowspan=\"2\" title=\"{_e(cols[j].title)}\">{_e(cols[j].name)}</th>")
        j += span
    return f"<thead><tr>{''.join(top)}</tr><tr>{''.join(bottom)}</tr></thead>"


def _table(table: Table, colors: dict[int, str]) -> str:
    """A :class:`Table` as HTML, best value per ranked column in bold, notes listed beneath."""
    best = _best(table)
    body = []
    for i, (run, cells) in enumerate(table.rows):
        tds = []
        for j, (col, cell) in enumerate(zip(table.columns, cells)):
            cls = "num" if col.numeric else "text"
            text = _e(cell.text)
            if i in best[j]:
                cls += " best"
                text = f"<strong>{text}</strong>"
            note = f"<span class=\"sub\">{_e(cell.note)}</span>" if cell.note else ""
            title = f" title=\"{_e(cell.title)}\"" if cell.title else ""
            tds.append(f"<td class=\"{cls}\"{title}>{text}{note}</td>")
        sub = (run.method or "") if table.id != "table-models" else ""
        body.append(f"<tr data-model=\"{_e(run.label)}\">{_model_th(run, colors, sub)}{''.join(tds)}</tr>")
    notes = "".join(f"<li>{_inline(n)}</li>" for n in table.notes)
    notes = f"<ul class=\"notes\">{notes}</ul>" if notes else ""
    heading = f"<h3>{_e(table.title)}</h3>\n" if table.title else ""
    rows = "\n".join(body)
    return (f"{heading}<p class=\"caption\">{_e(table.caption)}</p>\n"
            f"<div class=\"scroll\"><table id=\"{_e(table.id)}\">{_head(table)}\n<tbody>\n{rows}\n</tbody></table>"
            f"</div>{notes}")
