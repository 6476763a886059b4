"""natgrad reproduce: claims decided from numbers, and the cifar10 and imagenet grids end to end on synthetic data."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import yaml

from conftest import TINY, run_cli
from natgrad import reproduce
from natgrad.errors import UserError
from natgrad.pipeline import Experiment, Grid, PipelineSettings
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


def _at(quarter: float, half: float, eps: float) -> dict:
    return {k: {"robust_acc": v} for k, v in (("0.25", quarter), ("0.5", half), ("1", eps))}


def _paper_like_rows() -> list[dict]:
    """A grid whose numbers make every claim hold."""
    return [
        _row("natural", 0.92, 0.0, 100.0, -0.4, 1e4, 1e-3, cost=0.33),
        {**_row("gradnorm", 0.87, 0.70, 1.5, 0.5, 2.0, 1e-6, cost=0.62), "autoattack_at": _at(0.85, 0.80, 0.70)},
        _row("gradnorm-silu", 0.87, 0.69, 1.5, 0.5, 2.0, 1e-6),
        _row("gradnorm-relu", 0.80, 0.20, 5.0, 0.2, 50.0, 1e-5),
        {**_row("pgd", 0.87, 0.74, 1.6, 0.5, 2.0, 1e-6, cost=1.0), "autoattack_at": _at(0.855, 0.82, 0.74)},
        _row("pgd-silu", 0.87, 0.75, 1.6, 0.5, 2.0, 1e-6),
        _row("pgd-relu", 0.86, 0.72, 1.6, 0.5, 2.0, 1e-6),
        _row("fgsm", 0.88, 0.50, 2.0, 0.4, 3.0, 1e-6),
        _row("edge", 0.85, 0.45, 4.0, 0.6, 10.0, 1e-5),
        _row("gn-weight-0.8", 0.89, 0.60, 2.0, 0.5, 2.0, 1e-6),
        _row("gn-weight-1.2", 0.87, 0.66, 1.5, 0.5, 2.0, 1e-6),
        _row("gn-weight-1.4", 0.85, 0.70, 1.2, 0.5, 2.0, 1e-6),
    ]


ROLES = reproduce.REPRODUCTIONS["fmnist"].roles


def _verdicts(rows: list[dict]) -> dict[int, str]:
    return {v.claim: v.verdict for v in check_claims(rows, ROLES)}


def test_every_claim_holds_on_paper_like_numbers():
    assert _verdicts(_paper_like_rows()) == dict.fromkeys(range(1, 12), "holds")


@pytest.mark.parametrize("claim,model,key,value", [
    (1, "natural", "autoattack_acc", 0.05),  # natural training robust
    (2, "gradnorm", "autoattack_acc", 0.60),  # 0.60 / 0.74 < 0.90
    (3, "gradnorm", "relative_to_pgd", 0.95),  # as slow as PGD-3
    (4, "gradnorm-relu", "autoattack_acc", 0.50),  # ReLU not far worse
    (4, "pgd-relu", "autoattack_acc", 0.60),  # PGD-3 cares about the activation
    (5, "pgd", "l1_mean", 4.0),  # 100 / 4 < 50: one order of magnitude, not two
    (6, "natural", "loss_grad_edge_corr", 0.1),  # natural correlates positively
    (6, "gradnorm", "saliency_edge_corr", -0.1),  # a robust model correlates negatively
    (7, "edge", "autoattack_acc", 0.30),  # edge regularization 0.41 of PGD-3's, below half
    (8, "gradnorm", "curvature", 500.0),  # 1e4 / 500 < 100
    (8, "pgd", "linearity_error", 1e-4),  # 1e-3 / 1e-4 < 100
    (9, "gn-weight-1.4", "autoattack_acc", 0.55),  # more weight, less robust
    (9, "gn-weight-1.4", "clean_acc", 0.90),  # more weight, better clean accuracy
    (9, "gn-weight-1.2", "autoattack_acc", 0.72),  # the ends trade, the step 1.2 -> 1.4 does not
    (9, "gn-weight-1.2", "clean_acc", 0.84),  # clean accuracy back up at 1.4
    (10, "fgsm", "autoattack_acc", 0.71),  # FGSM beats GradNorm
])
def test_a_claim_fails_when_its_numbers_do(claim, model, key, value):
    rows = copy.deepcopy(_paper_like_rows())
    next(r for r in rows if r["model"] == model)[key] = value
    verdicts = _verdicts(rows)
    assert verdicts[claim] == "does not hold"
    assert all(v == "holds" for k, v in verdicts.items() if k != claim)


@pytest.mark.parametrize("gradnorm,pgd,verdict", [
    ((0.85, 0.80, 0.70), (0.855, 0.82, 0.74), "holds"),  # 0.5 < 2 < 4 points
    ((0.85, 0.80, 0.70), (0.86, 0.81, 0.74), "holds"),  # 1 = 1 < 4: neighbours may tie
    ((0.85, 0.80, 0.70), (0.89, 0.84, 0.74), "does not hold"),  # 4 = 4 = 4: the gap does not shrink
    ((0.85, 0.80, 0.70), (0.88, 0.82, 0.74), "does not hold"),  # 3 > 2: larger at eps/4 than at eps/2
])
def test_the_gap_must_shrink_with_eps(gradnorm, pgd, verdict):
    rows = [{**r, "autoattack_at": _at(*gradnorm)} if r["model"] == "gradnorm" else
            {**r, "autoattack_at": _at(*pgd)} if r["model"] == "pgd" else r for r in _paper_like_rows()]
    verdicts = {v.claim: v for v in check_claims(rows, ROLES)}
    assert verdicts[11].verdict == verdict
    assert "eps/4: PGD-3" in verdicts[11].measured


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
    assert verdicts[7].verdict == "does not hold" and "= undefined (PGD-3 at 0%)" in verdicts[7].measured
    bar = quality_bar(rows, ROLES)
    assert bar.startswith("not met: GradNorm / PGD-3 AutoAttack undefined") and "nan" not in bar


def _stage_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("[")]


@pytest.mark.parametrize("dataset", ["cifar10"])  # imagenet's grid: tests/test_reproduce_chains.py
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
    assert on_disk["rows"] == results["rows"] and len(on_disk["claims"]) == len(reproduce.CLAIMS) == 11
    verdicts = {c["claim"]: c["verdict"] for c in on_disk["claims"]}
    assert set(verdicts.values()) <= {"holds", "does not hold", "not measured"}
    claims_md = (out / "CLAIMS.md").read_text()
    assert "| # | claim | criterion | paper | measured here | verdict |" in claims_md
    for c in on_disk["claims"]:
        assert f"| {c['claim']} | {c['text']} |" in claims_md and f"**{c['verdict']}**" in claims_md
    html = (out / "report.html").read_text()
    assert '<table id="table-claims">' in html and '<table id="table-grid">' in html
    assert html.index('id="table-claims"') < html.index('id="table-models"')

    assert verdicts[11] == "not measured"  # neither grid evaluates at eps/4 and eps/2
    # no activation, edge, FGSM or weight-sweep models in this grid; Table 9's fine-tunes start from natural
    assert verdicts[4] == verdicts[7] == verdicts[9] == verdicts[10] == "not measured"
    for name in ("gradnorm", "pgd"):
        cfg = yaml.safe_load((out / name / "config.yaml").read_text())
        assert cfg["init"] == str(out / "natural") and cfg["model"]["train_mode"] == "eval"

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
                          (["reproduce", "fmnist", "--out", str(out), "epochs=x"], "epochs"),
                          (["reproduce", "fmnist", "--out", str(out), "--reuse", str(tmp_path / "none.json")],
                           "none.json: cannot read it")):
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


# ---------------------------------------------------------------------------- reuse of an earlier run's rows


def _tiny(fine_tune: Experiment) -> reproduce.Reproduction:
    """A three-model grid with what reuse has to handle: an extra AutoAttack eps and a fine-tune."""
    experiments = (Experiment("gradnorm", "fmnist-gradnorm", autoattack_eps=(0.5,)),
                   Experiment("pgd", "fmnist-pgd"), fine_tune)
    grid = Grid(experiments, bench_recipe="fmnist-gradnorm", bench_methods=("gradnorm", "pgd"))
    return reproduce.Reproduction(lambda _: grid, budgets={"short": (SMALL, 1)}, roles={"gradnorm": "gradnorm",
                                                                                        "pgd": "pgd"},
                                  expected={"short": "seconds"})


OLD_FINE_TUNE = Experiment("gn-weight-1.4", "fmnist-gradnorm", ("epochs=2", "gradnorm.gn_weight=1.4"), init="gradnorm")
NEW_FINE_TUNE = Experiment("gn-weight-1.4", "fmnist-gradnorm", ("gradnorm.gn_weight=1.4",), init="gradnorm",
                           epochs_fraction=0.3)


def _run_tiny(monkeypatch, out, fine_tune: Experiment, reuse_from=None, lines=None) -> dict:
    monkeypatch.setitem(reproduce.REPRODUCTIONS, "tiny", _tiny(fine_tune))
    return run_reproduce("tiny", out, budget="short", overrides=SYNTHETIC, progress=False,
                         log=(lines.append if lines is not None else lambda _: None), reuse_from=reuse_from)


def _without(row: dict, *keys: str) -> dict:
    return {k: v for k, v in row.items() if k not in keys}


def test_fine_tune_epochs_are_a_fraction_of_the_recipes(tmp_path):
    """Figure 5's schedule: 0.3 of the GradNorm recipe's epochs, rounded, at least 1."""
    from natgrad.pipeline import fraction_of_epochs

    assert [fraction_of_epochs(0.3, n) for n in (1, 4, 5, 10, 100)] == [1, 1, 2, 3, 30]
    full = reproduce.resolve("fmnist", "full")
    sweep = [e for e in full[1].experiments if "gn-weight-" in e.name]
    assert [e.name for e in sweep] == [f"gn-weight-{w:g}" for w in reproduce.SWEEP_WEIGHTS]
    assert all(e.config(full[2], tmp_path, with_init=False).epochs == 1 for e in sweep)  # 0.3 of 4
    imagenet = reproduce.resolve("imagenet", "full")
    assert {e.config(imagenet[2], tmp_path, with_init=False).epochs
            for e in imagenet[1].experiments if "gn-weight-" in e.name} == {30}  # 0.3 of 100, as in the paper


def test_reuse_takes_identical_rows_and_retrains_what_it_needs(tmp_path, monkeypatch):
    source = _run_tiny(monkeypatch, tmp_path / "source", OLD_FINE_TUNE)
    src_rows = {r["model"]: r for r in source["rows"]}
    assert set(src_rows["gradnorm"]["autoattack_at"]) == {"0.5", "1"}

    # the same grid and settings: every row taken over, nothing trained or evaluated
    lines: list[str] = []
    same = _run_tiny(monkeypatch, tmp_path / "same", OLD_FINE_TUNE, tmp_path / "source" / "results.json", lines)
    assert _stage_lines(lines) == ["[1/1] claims and report"]
    assert not any(p.is_dir() for p in (tmp_path / "same").iterdir())
    for row in same["rows"]:
        assert row["reused"]["fields"] == "all" and row["reused"]["path"] == str(tmp_path / "source" / "results.json")
        assert json.loads(json.dumps(_without(row, "reused"))) == _without(src_rows[row["model"]], "reused")
    assert same["reuse"]["whole_rows"] == ["gradnorm", "pgd", "gn-weight-1.4"] and same["reuse"]["bench"]

    # an earlier natgrad's results.json (no configs, digests or AutoAttack by eps) and a fine-tune whose schedule
    # changed: the fine-tune is trained again, so is the GradNorm model it starts from (checked against its row
    # first), and only AutoAttack at the eps comes from the source; PGD-3's row is taken over whole
    legacy = json.loads((tmp_path / "source" / "results.json").read_text())
    for row in legacy["rows"]:
        for key in ("config", "weights_sha256", "autoattack_at"):
            row.pop(key)
    (tmp_path / "legacy.json").write_text(json.dumps(legacy))
    lines.clear()
    out = tmp_path / "new"
    new = _run_tiny(monkeypatch, out, NEW_FINE_TUNE, tmp_path / "legacy.json", lines)
    stages = [line.split("] ", 1)[1] for line in _stage_lines(lines)]
    assert [s.split(" ")[0] for s in stages] == ["training", "checking", "training", "evaluating", "evaluating",
                                                 "gradient", "gradient", "claims"]
    assert not (out / "pgd").exists()
    rows = {r["model"]: r for r in new["rows"]}
    gn, old = rows["gradnorm"], src_rows["gradnorm"]
    check = json.loads((out / "gradnorm" / "reuse-check.json").read_text())
    assert check["verified"] and [c["what"] for c in check["checks"]] == ["images", "clean accuracy", "PGD attack",
                                                                          "pgd-2 accuracy"]
    # its eval.json holds only what was computed on these weights: AutoAttack at eps/2, not at the eps
    aa = [r for r in json.loads((out / "gradnorm" / "eval.json").read_text())["results"] if r["attack"] == "autoattack"]
    assert [r["eps"] for r in aa] == [pytest.approx(0.15)]
    assert gn["autoattack_at"]["0.5"] == old["autoattack_at"]["0.5"]  # measured again, the same number
    assert gn["autoattack_at"]["1"] == old["autoattack_at"]["1"] and gn["autoattack_acc"] == old["autoattack_acc"]
    assert gn["clean_acc"] == old["clean_acc"] and gn["weights_sha256"] == old["weights_sha256"]
    assert {"autoattack_acc", "autoattack_at.1", "seconds_per_step"} <= set(gn["reused"]["fields"])
    assert "autoattack_at.0.5" not in gn["reused"]["fields"]
    assert rows["pgd"]["reused"]["fields"] == "all" and rows["pgd"]["clean_acc"] == src_rows["pgd"]["clean_acc"]
    ft = rows["gn-weight-1.4"]
    assert "reused" not in ft and "epochs: 2 -> 1" in ft["reuse_refused"] and ft["config"]["epochs"] == 1
    claims_md = (out / "CLAIMS.md").read_text()
    assert f"--reuse {tmp_path / 'legacy.json'}" in claims_md and "whole rows, not trained again: pgd" in claims_md
    assert "gradnorm: trained again here (to fine-tune gn-weight-1.4 from); identical" in claims_md

    # a retrained model that does not match its row takes nothing over: AutoAttack runs at every eps
    from natgrad import reuse

    plan = reuse.plan(reuse.load_source(tmp_path / "legacy.json"), new_grid := reproduce.resolve("tiny", "short")[1],
                      dataclasses.replace(SMALL, overrides=SYNTHETIC), out, "tiny")
    r = plan.reused["gradnorm"]
    off = dataclasses.replace(r, row={**r.row, "clean_acc": r.row["clean_acc"] - 0.01})
    assert reuse.check_stage(out, "gradnorm", off, plan.source, dataclasses.replace(SMALL, overrides=SYNTHETIC),
                             False).startswith("differs from the source: clean accuracy")
    assert reuse._autoattack_to_run(out, new_grid.experiments[0], r) == (0.5, 1.0)
    merged = reuse.merge_rows([_without(gn, "reused")], plan, out)[0]
    assert "reused" not in merged and "clean accuracy" in merged["reuse_refused"]


def test_reuse_is_refused_when_a_setting_differs(tmp_path, monkeypatch):
    """Settings of the evaluation or a config key that differ: no row of the source is used, every stage runs."""
    from natgrad import reuse
    from natgrad.pipeline import stages

    monkeypatch.setitem(reproduce.REPRODUCTIONS, "tiny", _tiny(NEW_FINE_TUNE))
    grid = reproduce.resolve("tiny", "short")[1]
    sizes = dataclasses.replace(SMALL, overrides=SYNTHETIC)
    rows = [{"model": e.name, "clean_acc": 0.5, "autoattack_acc": 0.2, "eps": 0.3, "clean_n": 16,
             "config": {**dataclasses.asdict(e.config(sizes, tmp_path, with_init=False)), "init": e.init}}
            for e in grid.experiments]
    settings = {"dataset": "tiny", "sizes": sizes.as_json(), "grid": grid.as_json()}
    path = tmp_path / "results.json"

    def write(rows: list[dict], settings: dict) -> reuse.Plan:
        path.write_text(json.dumps({"format": "natgrad-reproduce", "settings": settings, "rows": rows, "bench": {}}))
        return reuse.plan(reuse.load_source(path), grid, sizes, tmp_path / "out", "tiny")

    assert set(write(rows, settings).reused) == {"gradnorm", "pgd", "gn-weight-1.4"}
    other = {**settings, "sizes": {**settings["sizes"], "n_autoattack": 8}}
    plan = write(rows, other)
    assert plan.reused == {} and all("n_autoattack: 8 -> 4" in why for why in plan.refused.values())
    todo = stages(tmp_path / "out", grid, sizes, False)
    assert [s.name for s in reuse.adapt_stages(todo, plan, tmp_path / "out", grid, sizes, False)] == \
        [s.name for s in todo]
    changed = [{**r, "config": {**r["config"], "lr": 0.5}} if r["model"] == "gradnorm" else r for r in rows]
    plan = write(changed, settings)  # GradNorm's config differs, so does the fine-tune that starts from it
    assert set(plan.reused) == {"pgd"} and "config differs (lr: 0.5 -> 0.002)" in plan.refused["gradnorm"]
    assert plan.refused["gn-weight-1.4"].startswith("gradnorm's config differs")
    with pytest.raises(UserError, match="is not a results.json of natgrad reproduce"):
        path.write_text("{}")
        reuse.load_source(path)
