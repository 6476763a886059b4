"""natgrad reproduce: claims decided from numbers, and the cifar10 and imagenet grids end to end on synthetic data."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import yaml

from conftest import TINY, run_cli, weights
from natgrad import reproduce
from natgrad.errors import UserError
from natgrad.pipeline import PipelineSettings
from natgrad.reproduce import check_claims, quality_bar, run_reproduce

# Every recipe of the grid on the tiny synthetic stand-in, with a small model in place of the paper's
# (the activation of each recipe is kept); eps 0.3 so that AutoAttack stops early.
SYNTHETIC = (*[o for o in TINY if not o.startswith("data.channels")], "data.channels=3", "data.num_workers=0",
             "model.name=cnn-small", "eps=0.3")
SMALL = PipelineSettings(epochs=1, limit_train=None, limit_eval=16, n_eval=16, n_sweep=8, sweep_to=2.0, n_autoattack=4,
              autoattack_batch=4, square_queries=10, pgd_steps=2, n_analysis=4, power_iterations=1, bench_steps=1,
              bench_warmup=0)


def _row(name: str, clean: float, aa: float, l1: float, corr: float, curvature: float, linerr: float,
         cost: float | None = None) -> dict:
    return {"model": name, "clean_acc": clean, "autoattack_acc": aa, "l1_mean": l1, "saliency_edge_corr": corr,
            "loss_grad_edge_corr": corr, "curvature": curvature, "linearity_error": linerr,
            "relative_to_pgd": cost, "flops_relative_to_pgd": None if cost is None else 0.69, "pgd_acc": aa}


def _paper_like_rows() -> list[dict]:
    """A grid whose numbers make every claim hold."""
    return [
        _row("natural", 0.92, 0.0, 30.0, -0.4, 1e4, 1e-3, cost=0.33),
        _row("gradnorm", 0.87, 0.70, 1.5, 0.5, 2.0, 1e-6, cost=0.62),
        _row("gradnorm-silu", 0.87, 0.69, 1.5, 0.5, 2.0, 1e-6),
        _row("gradnorm-relu", 0.80, 0.20, 5.0, 0.2, 50.0, 1e-5),
        _row("pgd", 0.87, 0.74, 1.6, 0.5, 2.0, 1e-6, cost=1.0),
        _row("pgd-silu", 0.87, 0.75, 1.6, 0.5, 2.0, 1e-6),
        _row("pgd-relu", 0.86, 0.72, 1.6, 0.5, 2.0, 1e-6),
        _row("fgsm", 0.88, 0.50, 2.0, 0.4, 3.0, 1e-6),
        _row("edge", 0.85, 0.30, 4.0, 0.6, 10.0, 1e-5),
        _row("gn-weight-0.8", 0.89, 0.60, 2.0, 0.5, 2.0, 1e-6),
        _row("gn-weight-1.2", 0.87, 0.66, 1.5, 0.5, 2.0, 1e-6),
        _row("gn-weight-1.6", 0.85, 0.70, 1.2, 0.5, 2.0, 1e-6),
    ]


ROLES = reproduce.REPRODUCTIONS["fmnist"].roles


def _verdicts(rows: list[dict]) -> dict[int, str]:
    return {v.claim: v.verdict for v in check_claims(rows, ROLES)}


def test_every_claim_holds_on_paper_like_numbers():
    assert _verdicts(_paper_like_rows()) == dict.fromkeys(range(1, 11), "holds")


@pytest.mark.parametrize("claim,model,key,value", [
    (1, "natural", "autoattack_acc", 0.05),  # natural training robust
    (2, "gradnorm", "autoattack_acc", 0.60),  # 0.60 / 0.74 < 0.90
    (3, "gradnorm", "relative_to_pgd", 0.95),  # as slow as PGD-3
    (4, "gradnorm-relu", "autoattack_acc", 0.50),  # ReLU not far worse
    (4, "pgd-relu", "autoattack_acc", 0.60),  # PGD-3 cares about the activation
    (5, "pgd", "l1_mean", 4.0),  # 30 / 4 < 10
    (6, "natural", "loss_grad_edge_corr", 0.1),  # natural correlates positively
    (6, "gradnorm", "saliency_edge_corr", -0.1),  # a robust model correlates negatively
    (7, "edge", "autoattack_acc", 0.05),  # edge regularization barely robust
    (8, "gradnorm", "curvature", 500.0),  # 1e4 / 500 < 100
    (8, "pgd", "linearity_error", 1e-4),  # 1e-3 / 1e-4 < 100
    (9, "gn-weight-1.6", "autoattack_acc", 0.55),  # more weight, less robust
    (9, "gn-weight-1.6", "clean_acc", 0.90),  # more weight, better clean accuracy
    (10, "fgsm", "autoattack_acc", 0.71),  # FGSM beats GradNorm
])
def test_a_claim_fails_when_its_numbers_do(claim, model, key, value):
    rows = copy.deepcopy(_paper_like_rows())
    next(r for r in rows if r["model"] == model)[key] = value
    verdicts = _verdicts(rows)
    assert verdicts[claim] == "does not hold"
    assert all(v == "holds" for k, v in verdicts.items() if k != claim)


def test_missing_numbers_are_not_measured():
    rows = [r for r in _paper_like_rows() if r["model"] not in ("edge", "pgd-relu")]
    rows[0] = {**rows[0], "autoattack_acc": None}
    verdicts = {v.claim: v for v in check_claims(rows, ROLES)}
    assert verdicts[1].verdict == "not measured" and "natural (autoattack_acc)" in verdicts[1].measured
    assert verdicts[4].verdict == verdicts[7].verdict == "not measured"
    assert verdicts[2].verdict == "holds"


def test_quality_bar():
    rows = _paper_like_rows()  # GradNorm 0.70 / PGD-3 0.74 = 0.946, clean equal
    assert quality_bar(rows, ROLES).startswith("met: GradNorm / PGD-3 AutoAttack 0.946")
    rows[1] = {**rows[1], "clean_acc": 0.84}
    assert quality_bar(rows, ROLES).startswith("not met") and "-3.0 points" in quality_bar(rows, ROLES)



def test_ratios_to_an_unrobust_pgd_are_undefined_not_nan():
    """With PGD-3 at 0% AutoAttack (an untrained grid) the ratios say so, and no ratio criterion passes."""
    rows = [{**r, "autoattack_acc": 0.0} if r["model"] == "pgd" else r for r in _paper_like_rows()]
    verdicts = {v.claim: v for v in check_claims(rows, ROLES)}
    assert verdicts[2].verdict == "does not hold" and "= undefined (PGD-3 at 0%)" in verdicts[2].measured
    assert "undefined (PGD-3 at 0%) of PGD-3's" in verdicts[7].measured
    bar = quality_bar(rows, ROLES)
    assert bar.startswith("not met: GradNorm / PGD-3 AutoAttack undefined") and "nan" not in bar


def _stage_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("[")]


@pytest.mark.parametrize("dataset", ["cifar10", "imagenet"])
def test_grid_end_to_end_on_synthetic_data(tmp_path, dataset):
    out = tmp_path / dataset
    lines: list[str] = []
    results = run_reproduce(dataset, out, budget="short", overrides=SYNTHETIC, progress=False, log=lines.append,
                            sizes=SMALL)
    grid = reproduce.resolve(dataset, "short")[1]
    names = [e.name for e in grid.experiments]
    assert [r["model"] for r in results["rows"]] == names
    for row in results["rows"]:
        assert 0 <= row["autoattack_acc"] <= row["clean_acc"] <= 1 and row["autoattack_n"] == 4
        assert row["l1_mean"] > 0 and row["curvature"] is not None and row["linearity_error"] is not None
    assert set(results["bench"]["methods"]) == set(grid.bench_methods)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["rows"] == results["rows"] and len(on_disk["claims"]) == 10
    verdicts = {c["claim"]: c["verdict"] for c in on_disk["claims"]}
    assert set(verdicts.values()) <= {"holds", "does not hold", "not measured"}
    claims_md = (out / "CLAIMS.md").read_text()
    assert "| # | claim | criterion | paper | measured here | verdict |" in claims_md
    for c in on_disk["claims"]:
        assert f"| {c['claim']} | {c['text']} |" in claims_md and f"**{c['verdict']}**" in claims_md
    html = (out / "report.html").read_text()
    assert '<table id="table-claims">' in html and '<table id="table-grid">' in html
    assert html.index('id="table-claims"') < html.index('id="table-models"')

    if dataset == "cifar10":  # no activation, edge, FGSM or weight-sweep models in this grid
        assert verdicts[4] == verdicts[7] == verdicts[9] == verdicts[10] == "not measured"
    else:  # ResNet-50s keep their recipe's activation; the sweep fine-tunes the GradNorm model
        cfg = yaml.safe_load((out / "resnet50-relu-gradnorm" / "config.yaml").read_text())
        assert cfg["model"]["act"] == "relu" and cfg["model"]["name"] == "cnn-small"
        for w in reproduce.SWEEP_WEIGHTS:
            run = out / f"gn-weight-{w:g}"
            cfg = yaml.safe_load((run / "config.yaml").read_text())
            assert cfg["init"] == str(out / "gradnorm") and cfg["gradnorm"]["gn_weight"] == pytest.approx(w)
            assert cfg["gradnorm"]["ce_weight"] == pytest.approx(2 - w)
            tuned, start = weights(run), weights(out / "gradnorm")
            assert any(not torch.equal(tuned[k], start[k]) for k in start)
        assert verdicts[4] != "not measured" and verdicts[9] != "not measured"

    # run again: every stage is skipped, the outputs are written again from the same numbers
    lines.clear()
    again = run_reproduce(dataset, out, budget="short", overrides=SYNTHETIC, progress=False, log=lines.append,
                          sizes=SMALL)
    stage_lines = _stage_lines(lines)
    assert all(line.endswith("done before, skipped") for line in stage_lines[:-1])
    assert len(stage_lines) == 3 * len(names) + 2 and again["rows"] == results["rows"]


def test_bad_input_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "r"
    for args, message in ((["reproduce", "cifar", "--out", str(out)], "unknown dataset 'cifar' (did you mean "
                                                                      "cifar10?)"),
                          (["reproduce", "fmnist", "--budget", "long", "--out", str(out)], "unknown budget 'long'"),
                          (["reproduce", "fmnist", "--out", str(out), "gradnorm.gn_weight=-1"], "gn_weight"),
                          (["reproduce", "fmnist", "--out", str(out), "epochs=x"], "epochs")):
        code, err = run_cli(args, capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, err
        assert not out.exists()
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    code, err = run_cli(["reproduce", "fmnist", "--out", str(out)], capsys)
    assert code == 2 and "not a reproduce folder" in err and [p.name for p in out.iterdir()] == ["mine.txt"]


def test_a_run_trained_with_another_recipe_is_refused(tmp_path):
    from natgrad.pipeline import check_runs

    grid = reproduce.resolve("cifar10", "short")[1]
    natural = grid.experiments[0]
    cfg = natural.config(SMALL, tmp_path)
    (tmp_path / natural.name).mkdir()
    (tmp_path / natural.name / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    check_runs(tmp_path, grid, SMALL)  # the same configuration: fine
    cfg.lr = cfg.lr * 2  # as if the recipe had changed after this model was trained
    (tmp_path / natural.name / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    with pytest.raises(UserError, match="trained with another configuration than cifar10-prn18-natural gives now .lr"):
        check_runs(tmp_path, grid, SMALL)
