"""natgrad report: fake run folders (no training) rendered to one self-contained HTML file."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import struct
import subprocess
import sys
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from natgrad import config, files
from natgrad.errors import UserError
from natgrad.report import build_report, write_report
from natgrad.report.formatting import compact, eps_text, mean_std, pct

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DASH = "\u2013"

# Per model: the numbers the fixture writes, chosen so that every format path shows up.
KEYS = ("clean", "pgd10", "pgd100", "aa", "l1", "l1_ok", "l1_bad", "sal", "sal_std", "lg", "lg_std",
        "g2", "g2_std", "h", "h_std", "c", "c_std", "lin", "lin_std", "log10", "log10_std")
MODELS = {
    name: {"recipe": name, **dict(zip(KEYS, values, strict=True))} for name, values in {
        "fmnist-natural": (0.9123, 0.0012, 0.0, 0.0, 3013.4, 0.0301, 3021.0, -0.4510, 0.1467, -0.4428, 0.1498,
                           28.7, 93.8, 1.2e6, 1.1e7, 12345.6, 56789.0, 3.55e-3, 2.69e-2, -4.57, 1.63),
        "fmnist-gradnorm": (0.8712, 0.6355, 0.6201, 0.5934, 0.0123456, 0.005, 0.024, 0.5627, 0.1640, 0.5679, 0.1647,
                            0.31, 0.67, 0.79, 3.25, 2.15, 1.72, 1.86e-5, 1.65e-4, -6.60, 1.43),
        "fmnist-pgd": (0.8544, 0.6789, 0.6655, 0.6402, 4.56e-5, 1.2e-5, 9.9e-5, 0.5692, 0.1569, 0.5601, 0.1569,
                       0.30, 0.44, 0.75, 1.71, 2.17, 1.83, 8.2e-6, 5.08e-5, -6.84, 1.48),
    }.items()
}
FIGURES = {"gradient_norms": "gradient-norms.png", "edges": "edges.png", "curvature": "curvature.png",
           "linearity": "linearity.png", "along_attack": "along-attack.png", "pictures": "pictures.png"}


# ---------------------------------------------------------------------------- fixture generator


def tiny_png(rgb: tuple[int, int, int] = (40, 90, 160), width: int = 240, height: int = 160) -> bytes:
    """A valid solid-colour PNG, written with the standard library."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _hist(lo: float, hi: float, bins: int, log: bool, shift: float) -> dict:
    """Linear bins, or log-spaced ones with outer bins [0, lo) and [hi, null) as natgrad analyze writes them."""
    step = (hi - lo) / bins
    edges = [lo + k * step for k in range(bins + 1)]
    counts = [max(0, int(100 - (k - bins / 2 - shift) ** 2)) for k in range(bins)]
    if log:
        edges = [0.0] + [10 ** e for e in edges] + [None]  # null: JSON's infinity
        counts = [3, *counts, 2]
    return {"edges": edges, "counts": counts}


def analysis_json(name: str, v: dict, shift: float) -> dict:
    """An analysis.json as the schema describes it."""
    t = [k / 4 for k in range(9)]
    return {
        "model": name, "method": v["recipe"].split("-", 1)[1], "architecture": "cnn-small", "dataset": "fashion-mnist",
        "eps": 0.1, "n": 200,
        "gradients": {"n": 200, "pgd_steps": 10, "clean_acc": v["clean"], "pgd_acc": v["pgd10"],
                      "pgd_success_rate": 1 - v["pgd10"], "l1_mean": v["l1"], "l1_mean_attack_fails": v["l1_ok"],
                      "l1_mean_attack_succeeds": v["l1_bad"],
                      "histograms": {k: _hist(-6, 4, 20, True, shift) for k in ("all", "correct", "incorrect")}},
        "channels": {"all": _hist(-1, 1, 20, False, 0), "per_channel": [_hist(-1, 1, 20, False, 0)]},
        "edges": {"n": 200, "saliency_corr_mean": v["sal"], "saliency_corr_std": v["sal_std"],
                  "loss_grad_corr_mean": v["lg"], "loss_grad_corr_std": v["lg_std"]},
        "geometry": {"n": 100, "power_iterations": 20, "grad_l2_mean": v["g2"], "grad_l2_std": v["g2_std"],
                     "hessian_norm_mean": v["h"], "hessian_norm_std": v["h_std"], "curvature_mean": v["c"],
                     "curvature_std": v["c_std"], "curvature_histogram": _hist(-2, 6, 16, True, shift)},
        "linearity": {"n": 200, "eps": 0.1, "error_mean": v["lin"], "error_std": v["lin_std"],
                      "log10_mean": v["log10"], "log10_std": v["log10_std"],
                      "log10_histogram": _hist(-10, 0, 20, False, shift)},
        "along_attack": {"n": 50, "attack": "pgd-5", "eps": 0.1, "t": t, "loss": [0.3 + (1 + shift) * x for x in t],
                         "grad_l1": [v["l1"] * (1 + x) for x in t], "curvature": [v["c"] * (1 + x) for x in t]},
        "figures": dict(FIGURES),
    }


def eval_json(name: str, v: dict, sanity: bool = True) -> dict:
    """An eval.json as ``natgrad eval`` writes it, with sweeps and sanity checks."""
    results = [{"attack": "clean", "eps": 0.0, "n": 500, "robust_acc": v["clean"]},
               {"attack": "pgd-10", "eps": 0.1, "n": 500, "robust_acc": v["pgd10"], "steps": 10},
               {"attack": "pgd-100", "eps": 0.1, "n": 500, "robust_acc": v["pgd100"], "steps": 100},
               {"attack": "autoattack", "eps": 0.1, "n": 500, "robust_acc": v["aa"], "version": "standard",
                "per_attack": [{"attack": "apgd-ce", "robust_acc": v["aa"] + 0.02},
                               {"attack": "apgd-t", "robust_acc": v["aa"]}],
                "warnings": ["robust accuracy rose between attacks"] if name == "fmnist-gradnorm" else []}]
    out = {"model": name, "weights": "model.safetensors", "architecture": "cnn-small", "method": v["recipe"],
           "dataset": "fashion-mnist", "n": 500, "world_size": 1, "results": results,
           "sweeps": {"eps": {"attack": "pgd-100", "eps": [0, 0.05, 0.1, 0.2], "n": 500,
                              "robust_acc": [v["clean"], v["pgd10"] + 0.1, v["pgd100"], v["aa"] / 2]},
                      "steps": {"eps": 0.1, "steps": [1, 10, 100], "n": 500,
                                "robust_acc": [v["pgd10"] + 0.05, v["pgd10"], v["pgd100"]],
                                "loss": [2 * (1 - v["pgd10"]) + k for k in (0.0, 0.3, 0.4)]}}}
    if sanity:
        out["sanity"] = [{"check": "deterministic", "status": "PASS", "numbers": {}, "detail": "same result twice"},
                         {"check": "transfer weaker", "status": "SKIP", "numbers": {}, "detail": "no --source"},
                         {"check": "autoattack flags", "status": "WARN" if name == "fmnist-gradnorm" else "PASS",
                          "numbers": {}, "detail": "1 warning" if name == "fmnist-gradnorm" else "none"}]
    return out


def make_run(root: Path, name: str, *, metrics: bool = True, evaluation: bool = True, analysis: bool = True,
             drop: tuple[str, ...] = (), missing_figures: tuple[str, ...] = ()) -> Path:
    """A fake run folder: config.yaml from the recipe, metrics.jsonl, eval.json, analysis/ with PNG figures."""
    v = MODELS[name]
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config.load(v["recipe"])), sort_keys=False))
    shift = list(MODELS).index(name) * 3.0
    if metrics:
        lines = [{"epoch": e, "step": 100 * e, "train_loss": 1.5 / e + shift / 10, "clean_acc": v["clean"] - 0.1 / e,
                  "pgd_acc": v["pgd10"] * e / 4, "pgd_steps": 10, "eval_n": 500, "seconds": 1.0} for e in range(1, 5)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
        (run / "summary.json").write_text(json.dumps({"method": v["recipe"], "epochs_done": 4, "epochs": 4,
                                                      "clean_acc": v["clean"] - 0.025}))
    if evaluation:
        (run / "eval.json").write_text(json.dumps(eval_json(name, v)))
    if analysis:
        data = analysis_json(name, v, shift)
        for section in drop:
            data.pop(section)
        (run / "analysis").mkdir()
        (run / "analysis" / "analysis.json").write_text(json.dumps(data))
        for key, file in FIGURES.items():
            if key not in missing_figures:
                (run / "analysis" / file).write_bytes(tiny_png(((40 + 23 * len(key)) % 256, 90, 160)))
    return run


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    return [make_run(tmp_path / "runs", name) for name in MODELS]


# ---------------------------------------------------------------------------- reading the HTML back


class Page(HTMLParser):
    """Tables by id (rows of (model, cells)), <img> sources, hrefs, and the visible text."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, list[tuple[str, list[str], set[int]]]] = {}
        self.imgs: list[str] = []
        self.alts: list[str] = []
        self.links: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []
        self._table = self._row = self._cell = None
        self._best = False
        self.feed(text)
        self.close()
        self.all_text = " ".join(" ".join(self.text).split())

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
            self.alts.append(a.get("alt", ""))
        for key in ("href", "src", "action", "poster", "srcset"):
            if key in a and tag != "img":
                self.links.append(a[key])
        if tag == "table":
            self._table = a.get("id")
            self.tables[self._table] = []
        elif tag == "tr" and self._table and "data-model" in a:
            self._row = (a["data-model"], [], set())
        elif tag == "td" and self._row is not None:
            self._cell = []
            self._best = "best" in a.get("class", "")
        elif tag == "span" and self._cell is not None and "sub" in a.get("class", ""):
            self._cell.append(" | ")  # a cell's note follows its value

    def handle_endtag(self, tag):
        if tag == "td" and self._row is not None and self._cell is not None:
            if self._best:
                self._row[2].add(len(self._row[1]))
            self._row[1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def row(self, table: str, model: str) -> list[str]:
        return next(cells for name, cells, _ in self.tables[table] if name == model)

    def best(self, table: str, model: str) -> set[int]:
        return next(best for name, _, best in self.tables[table] if name == model)


def value(cell: str) -> str:
    """A cell's value without its note."""
    return cell.split(" | ")[0].strip()


# ---------------------------------------------------------------------------- tests


def test_number_formats():
    assert pct(0.8712) == "87.12" and pct(0.0) == "0.00" and pct(None) == DASH
    assert compact(3013.4) == "3010" and compact(0.0123456) == "0.0123" and compact(4.56e-5) == "4.56e-5"
    assert compact(12345.6) == "1.23e4" and compact(9.996) == "10.0" and compact(0.5) == "0.500"
    assert compact(-0.451) == "-0.451" and compact(0) == "0"
    assert compact(math.nan) == DASH and compact(None) == DASH and compact(math.inf) == "inf"
    assert mean_std(0.5627, 0.164) == "0.563 \u00b1 0.164" and mean_std(None, 1.0) == DASH
    assert eps_text(4 / 255) == "4/255" and eps_text(0.1) == "0.1"


def test_tables_hold_one_row_per_model_with_the_json_numbers(runs):
    page = Page(build_report(runs))
    names = list(MODELS)
    for table in ("table-models", "table-eval", "table-1", "table-5", "table-6", "table-7"):
        assert [name for name, _, _ in page.tables[table]] == names, table

    # Table 1: Standard, AA, PGD10, E[L1], E[L1 ok], E[L1 fail]
    def table1(model):
        return [value(c) for c in page.row("table-1", model)]
    assert table1("fmnist-natural") == ["91.23", "0.00", "0.12", "3010", "0.0301", "3020"]
    assert table1("fmnist-gradnorm") == ["87.12", "59.34", "63.55", "0.0123", "0.00500", "0.0240"]
    assert table1("fmnist-pgd") == ["85.44", "64.02", "67.89", "4.56e-5", "1.20e-5", "9.90e-5"]
    # Table 5: Clean and AutoAttack come from eval.json, correlations as mean ± std
    assert page.row("table-5", "fmnist-natural") == ["91.23", "0.00", "-0.451 \u00b1 0.147", "-0.443 \u00b1 0.150"]
    assert page.row("table-5", "fmnist-gradnorm")[2:] == ["0.563 \u00b1 0.164", "0.568 \u00b1 0.165"]
    # Table 6: values across many orders of magnitude
    assert page.row("table-6", "fmnist-natural")[2:] == ["28.7 \u00b1 93.8", "1.20e6 \u00b1 1.10e7",
                                                          "1.23e4 \u00b1 5.68e4"]
    assert page.row("table-6", "fmnist-pgd")[2:] == ["0.300 \u00b1 0.440", "0.750 \u00b1 1.71", "2.17 \u00b1 1.83"]
    # Table 7
    assert page.row("table-7", "fmnist-gradnorm")[2:] == ["1.86e-5 \u00b1 1.65e-4", "-6.60 \u00b1 1.43"]

    # evaluation: Clean, PGD-10, PGD-100, AutoAttack (with its per-attack note), n
    row = page.row("table-eval", "fmnist-gradnorm")
    assert [value(c) for c in row] == ["87.12", "63.55", "62.01", "59.34", "500"]
    assert "apgd-ce 61.34" in row[3] and "apgd-t 59.34" in row[3]
    assert "robust accuracy rose between attacks" in page.all_text
    sanity = [(name, cells) for name, cells, _ in page.tables["table-sanity"]]
    assert len(sanity) == 9 and ("fmnist-gradnorm", ["autoattack flags", "WARN", "1 warning"]) in sanity


def test_attack_on_fewer_images_shows_its_n(runs):
    """AutoAttack on fewer images than clean and PGD (as the demo does) says so in its cell, not only on hover."""
    path = runs[1] / "eval.json"
    ev = json.loads(path.read_text())
    next(r for r in ev["results"] if r["attack"] == "autoattack")["n"] = 100
    path.write_text(json.dumps(ev))
    page = Page(build_report(runs))
    gradnorm, pgd = page.row("table-eval", "fmnist-gradnorm"), page.row("table-eval", "fmnist-pgd")
    assert "n=100" in gradnorm[3] and gradnorm[-1] == "500"
    assert all("n=" not in cell for cell in pgd)


def test_best_value_per_column_is_bold(runs):
    page = Page(build_report(runs))
    # higher is better for accuracy: natural has the best clean accuracy, pgd the best AutoAttack
    assert 0 in page.best("table-eval", "fmnist-natural") and 3 in page.best("table-eval", "fmnist-pgd")
    assert 0 not in page.best("table-eval", "fmnist-pgd")
    # lower is better for gradient norms, curvature and linearity error
    assert 3 in page.best("table-1", "fmnist-pgd") and 3 not in page.best("table-1", "fmnist-natural")
    assert {2, 3} <= page.best("table-6", "fmnist-pgd") and 4 in page.best("table-6", "fmnist-gradnorm")
    assert {2, 3} <= page.best("table-7", "fmnist-pgd") and page.best("table-7", "fmnist-natural") == {0}
    # the conditional norms are descriptive: never bold
    assert all(not ({4, 5} & best) for _, _, best in page.tables["table-1"])


def test_images_are_embedded_pngs_and_nothing_is_external(runs):
    text = build_report(runs)
    page = Page(text)
    # training curves, sweeps, distributions, along-attack, and 6 analysis figures per model
    assert len(page.imgs) == 4 + len(FIGURES) * len(MODELS)
    for src in page.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1], validate=True).startswith(PNG_SIGNATURE)
    assert all(link.startswith("#") for link in page.links), page.links
    # the three distributions (open-ended outer bins included) share one figure of three panels
    dist = next(s for s, a in zip(page.imgs, page.alts) if a.startswith("Distributions"))
    dist = base64.b64decode(dist.split(",", 1)[1])
    assert struct.unpack(">I", dist[16:20])[0] > 1200
    assert not {"script", "link", "iframe", "object", "embed"} & set(page.tags)
    assert "http:" not in text and "https:" not in text and "url(" not in text and "@import" not in text
    # a grid of many models leaves each model's own figures in its run folder
    small = Page(build_report(runs, model_figures=False))
    assert len(small.imgs) == 4 and "in its run folder's" in build_report(runs, model_figures=False)


def test_header_lists_models_with_their_settings(runs):
    page = Page(build_report(runs))
    assert "natgrad 0.1.0" in page.all_text
    assert page.row("table-models", "fmnist-gradnorm") == ["gradnorm", "cnn-small (gelu)", "fashion-mnist", "0.1", "4",
                                                            "yes", "yes"]


def test_missing_parts_show_dashes_and_hints(tmp_path):
    root = tmp_path / "runs"
    full = make_run(root, "fmnist-gradnorm")
    bare = make_run(root, "fmnist-natural", metrics=False, evaluation=False, analysis=False)
    partial = make_run(root, "fmnist-pgd", drop=("geometry", "along_attack"), missing_figures=("edges",))
    (partial / "eval.json").write_text("{not json")
    analysis = json.loads((full / "analysis" / "analysis.json").read_text())
    analysis["gradients"]["l1_mean_attack_fails"] = None  # undefined: PGD succeeded on every image
    analysis["along_attack"]["curvature"][3] = None
    (full / "analysis" / "analysis.json").write_text(json.dumps(analysis))
    page = Page(build_report([full, bare, partial]))
    for table in ("table-eval", "table-1", "table-5", "table-6", "table-7"):
        assert set(page.row(table, "fmnist-natural")) == {DASH}, table
    # no geometry section, and an unreadable eval.json: clean accuracy falls back to the analysis's
    assert page.row("table-6", "fmnist-pgd") == ["85.44", DASH, DASH, DASH, DASH]
    assert page.row("table-7", "fmnist-pgd")[0] == "85.44"  # clean accuracy falls back to the analysis's
    assert f"not run: natgrad analyze {bare}" in page.all_text
    assert f"not evaluated: natgrad eval {bare} --json {bare / 'eval.json'}" in page.all_text
    assert "analysis.json has no geometry section" in page.all_text
    assert "eval.json is unreadable" in page.all_text
    assert "edges.png is missing" in page.all_text
    assert value(page.row("table-1", "fmnist-gradnorm")[4]) == DASH  # null: no image where the attack fails
    assert any(a.startswith("Loss, L1 gradient norm") for a in page.alts)  # a null value is a gap, not a lost curve
    # only two models have curves; images are still all valid PNGs
    for src in page.imgs:
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_SIGNATURE)


def test_report_of_run_folders_with_nothing_but_config(tmp_path):
    bare = make_run(tmp_path, "fmnist-pgd", metrics=False, evaluation=False, analysis=False)
    page = Page(build_report([bare]))
    assert page.imgs == []
    assert "No run folder holds metrics.jsonl" in page.all_text
    assert all(set(page.row(t, "fmnist-pgd")) == {DASH} for t in ("table-1", "table-5", "table-6", "table-7"))


def test_malformed_optional_files_do_not_stop_the_report(tmp_path):
    run = make_run(tmp_path, "fmnist-gradnorm")
    lines = ['{"epoch": "2", "train_loss": 1.0}', "[1, 2]", "not json", '{"epoch": 1, "clean_acc": "x"}']
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "eval.json").write_text(json.dumps({"results": [{"attack": "clean", "eps": 0, "robust_acc": "high"},
                                                           {"attack": "pgd-10", "eps": "0.1", "robust_acc": 0.5},
                                                           {"attack": "autoattack", "eps": 0.1, "robust_acc": 0.4,
                                                            "per_attack": 3, "warnings": "one string"}],
                                               "sweeps": [1], "sanity": {"check": "x"}, "n": None}))
    bad = {"gradients": [1], "edges": {"saliency_corr_mean": "0.5", "n": 3}, "geometry": {"curvature_histogram": {
        "edges": [1, 2], "counts": [1, 2]}}, "linearity": None, "along_attack": {"t": "0..2"},
        "figures": {"edges": "../../../etc/passwd", "pictures": "nul\u0000l.png", "channels": 7, "curvature": "x.png"}}
    (run / "analysis" / "analysis.json").write_text(json.dumps(bad))
    (run / "analysis" / "x.png").write_text("not a png")
    page = Page(build_report([run]))
    # clean is not a number and PGD-10's eps is a string: only AutoAttack remains
    assert page.row("table-eval", "fmnist-gradnorm") == [DASH, "40.00", DASH]
    assert set(page.row("table-5", "fmnist-gradnorm")[2:]) == {DASH}
    assert "outside the analysis folder" in page.all_text and "x.png is not a PNG file" in page.all_text
    assert "metrics.jsonl: 2 unreadable line(s) skipped" in page.all_text
    assert len(page.imgs) == 1  # the training curves only


@pytest.mark.parametrize("case", ["missing", "not-a-run", "file", "none"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, case):
    good = make_run(tmp_path, "fmnist-gradnorm", analysis=False)
    bad = {"missing": tmp_path / "nope", "not-a-run": tmp_path / "empty", "file": tmp_path / "x.txt",
           "none": None}[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.txt").write_text("x")
    out = tmp_path / "report.html"
    out.write_text("old")
    code, err = run_cli(["report", *([str(good), str(bad)] if bad else []), "--out", str(out)], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("natgrad: error: ")
    expected = {"missing": "does not exist", "not-a-run": "not a natgrad run folder",
                "file": "not a natgrad run folder", "none": "no run folders given"}[case]
    assert expected in err and (bad is None or str(bad) in err)
    assert out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["fmnist-gradnorm", "empty", "x.txt", "report.html"])


def test_out_is_a_folder(tmp_path, capsys):
    run = make_run(tmp_path, "fmnist-gradnorm", analysis=False)
    code, err = run_cli(["report", str(run), "--out", str(tmp_path)], capsys)
    assert code == 2 and "is a folder" in err


def test_cli_writes_the_file_atomically(runs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "reports" / "cmp.html"
    replaced = []
    real_replace = os.replace

    def spy(src, dst):  # the report appears under its name only once it is complete
        assert not Path(dst).exists() and Path(src).read_text().rstrip().endswith("</html>")
        replaced.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", spy)
    code, err = run_cli(["report", *map(str, runs), "--out", str(out)], capsys)
    assert code == 0, err
    assert len(replaced) == 1 and replaced[0][1] == out and replaced[0][0].parent == out.parent != replaced[0][0]
    assert sorted(p.name for p in out.parent.iterdir()) == ["cmp.html"]  # no temp file left behind
    text = out.read_text(encoding="ascii")  # non-ASCII characters are written as character references
    assert [n for n, _, _ in Page(text).tables["table-1"]] == list(MODELS)
    monkeypatch.chdir(tmp_path)
    assert run_cli(["report", str(runs[0])], capsys)[0] == 0 and (tmp_path / "report.html").is_file()


def test_library_raises_user_error(tmp_path):
    with pytest.raises(UserError, match="no run folders"):
        build_report([])
    with pytest.raises(UserError, match="does not exist"):
        write_report([tmp_path / "nope"], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")
def test_report_renders_in_headless_chromium(runs, tmp_path):
    report = write_report(runs, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_report.py"), str(report), "--screenshot",
                           str(shot)], check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert shot.read_bytes().startswith(PNG_SIGNATURE)
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><p>no tables</p></body></html>")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_report.py"), str(broken)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "table-1" in proc.stdout + proc.stderr
