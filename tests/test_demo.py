"""natgrad demo: the whole pipeline (train, eval, bench, analyze, report) on the tiny synthetic dataset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import TINY, run_cli
from natgrad import demo, pipeline
from natgrad.demo import RECIPES, run_demo
from natgrad.errors import UserError
from natgrad.evaluation import default_sweep_eps
from natgrad.pipeline import PipelineSettings, check_out

# Everything shrunk; eps 0.3 so that the tiny models are not robust and AutoAttack stops early.
SMALL = PipelineSettings(epochs=1, limit_train=256, limit_eval=64, n_eval=32, n_sweep=16, sweep_to=2.0, n_autoattack=4,
                     autoattack_batch=2, square_queries=20, pgd_steps=2, n_analysis=8, power_iterations=2,
                     bench_steps=1, bench_warmup=0, overrides=(*TINY, "eps=0.3"))


def _mtimes(out: Path) -> dict[str, float]:
    files = [out / r / name for r in RECIPES for name in ("summary.json", "eval.json", "analysis/analysis.json")]
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in [*files, out / "bench.json"]}


def test_demo_end_to_end_and_resume(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    lines: list[str] = []

    # An interruption during the first evaluation: training is done and kept.
    real_evaluate = pipeline.eval_stage

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "eval_stage", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_demo(out, SMALL, progress=False, log=lines.append)
    trained = {r: (out / r / "summary.json").stat().st_mtime_ns for r in RECIPES}
    assert not (out / "report.html").exists()
    saved = json.loads((out / "demo.json").read_text())
    assert saved["stages"].keys() == {f"train {r}" for r in RECIPES} and "eval fmnist-natural" in saved["interrupted"]
    assert "run the same command again" in lines[-1]
    monkeypatch.setattr(pipeline, "eval_stage", real_evaluate)

    lines.clear()
    state = run_demo(out, SMALL, progress=False, log=lines.append)
    text = "\n".join(lines)
    # says up front which n and attacks it uses, then one banner per stage
    assert "AutoAttack standard" in text and "on 4 of them" in text and "32 test images" in text
    assert "[1/11] training fmnist-natural (1 epoch of 256 training images): done before, skipped" in text
    assert "[4/11] evaluating fmnist-natural" in text and "[11/11] report" in text
    assert {r: (out / r / "summary.json").stat().st_mtime_ns for r in RECIPES} == trained  # not trained again

    # one row per model, numbers as the run folders hold them
    bench = json.loads((out / "bench.json").read_text())
    assert [r["model"] for r in state["rows"]] == list(RECIPES)
    for row in state["rows"]:
        run = out / row["model"]
        ev = json.loads((run / "eval.json").read_text())
        an = json.loads((run / "analysis" / "analysis.json").read_text())
        by_attack = {r["attack"]: r for r in ev["results"]}
        assert row["clean_acc"] == by_attack["clean"]["robust_acc"] and by_attack["clean"]["n"] == 32
        assert row["autoattack_acc"] == by_attack["autoattack"]["robust_acc"] and by_attack["autoattack"]["n"] == 4
        assert [p["attack"] for p in by_attack["autoattack"]["per_attack"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]
        assert row["pgd_acc"] == by_attack["pgd-2"]["robust_acc"]
        sweep = ev["sweeps"]["eps"]
        assert sweep["eps"] == [e for e in default_sweep_eps(0.3) if e <= 0.6 + 1e-9]  # up to sweep_to * eps
        assert len(sweep["robust_acc"]) == len(sweep["eps"]) == 5
        assert sweep["attack"] == "pgd-2" and sweep["n"] == 16 and sweep["robust_acc"][-1] <= sweep["robust_acc"][0]
        assert (run / "eps-sweep.png").is_file() and not (run / "autoattack-state").exists()
        assert row["l1_mean"] == an["gradients"]["l1_mean"] and an["gradients"]["n"] == 8
        assert an["geometry"]["power_iterations"] == 2
        assert row["relative_to_pgd"] == bench["methods"][row["method"]]["relative_to_pgd"]
        assert 0 <= row["clean_acc"] <= 1 and 0 <= row["autoattack_acc"] <= row["clean_acc"]
        assert math.isfinite(row["l1_mean"]) and row["l1_mean"] > 0
    assert state["rows"][2]["relative_to_pgd"] == 1.0
    # GradNorm does more work
    assert state["rows"][1]["flops_relative_to_pgd"] > state["rows"][0]["flops_relative_to_pgd"]

    # the summary table is printed, and the report embeds it with the report's own tables
    summary = demo.format_summary(state["rows"])
    assert summary in text and f"natgrad: report {out / 'report.html'}" in text
    html = (out / "report.html").read_text()
    for table in ("table-demo", "table-models", "table-eval", "table-1", "table-5", "table-6", "table-7"):
        assert f'<table id="{table}">' in html
    assert html.index('id="table-demo"') < html.index('id="table-models"')
    for row in state["rows"]:
        assert f'<tr data-model="{row["model"]}"><th class="model" scope="row">{row["model"]}</th>' in html
        assert f"{100 * row['autoattack_acc']:.1f}%" in html and f"{row['l1_mean']:.4g}" in html
    assert "data:image/png;base64," in html and "<script" not in html

    # a third run finds every stage finished: nothing is recomputed, only the report is rewritten
    before = _mtimes(out)
    lines.clear()
    again = run_demo(out, SMALL, progress=False, log=lines.append)
    assert _mtimes(out) == before
    assert sum("done before, skipped" in line for line in lines) == 10
    assert again["rows"] == state["rows"]


def test_demo_refuses_a_folder_that_is_not_a_demo(tmp_path, capsys):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    code, err = run_cli(["demo", "--out", str(other)], capsys)
    assert code == 2 and err.count("\n") == 1 and "not a demo folder" in err
    assert [p.name for p in other.iterdir()] == ["notes.txt"] and (other / "notes.txt").read_text() == "keep me"

    afile = tmp_path / "file.txt"
    afile.write_text("x")
    code, err = run_cli(["demo", "--out", str(afile)], capsys)
    assert code == 2 and "is a file" in err and afile.read_text() == "x"


def test_demo_refuses_other_settings(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo.json").write_text(json.dumps({"format": demo.MARKER, "settings": SMALL.as_json(), "stages": {}}))
    assert check_out(out, demo.MARKER, demo.DEMO_FILE, SMALL.as_json())["stages"] == {}
    other = PipelineSettings(**{**SMALL.__dict__, "n_autoattack": 16})
    with pytest.raises(UserError, match="other settings.*n_autoattack: 4 -> 16"):
        run_demo(out, other, progress=False, log=lambda _: None)
    assert [p.name for p in out.iterdir()] == ["demo.json"]
    (out / "demo.json").write_text("{}")
    with pytest.raises(UserError, match="did not write"):
        check_out(out, demo.MARKER, demo.DEMO_FILE, SMALL.as_json())


def test_a_signal_during_a_stage_says_to_run_the_same_command_again(tmp_path, monkeypatch, capsys):
    import signal

    from natgrad.errors import Preempted

    def preempted(*args, **kwargs):
        raise Preempted("stopped by SIGTERM at step 3 (epoch 1); ... --resume to continue", signal.SIGTERM)

    monkeypatch.setattr(pipeline, "train_stage", preempted)
    code, err = run_cli(["demo", "--out", str(tmp_path / "demo")], capsys)
    assert code == 143 and "run the same command again to continue" in err and "--resume" not in err
    assert "train fmnist-natural" in json.loads((tmp_path / "demo" / "demo.json").read_text())["interrupted"]
