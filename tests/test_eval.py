"""natgrad eval: attacks, sweeps, sanity checks, sharding, bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import TINY, run_cli
from natgrad import evaluation
from natgrad.engine.distributed import Context


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An undefended cnn-small trained for one epoch on synthetic images."""
    out = tmp_path_factory.mktemp("eval") / "run"
    assert run_cli(["train", "fmnist-natural", *TINY, "epochs=2", "--out", str(out), "--quiet"])[0] == 0
    return out


def _eval(run, tmp_path, *args):
    path = tmp_path / "eval.json"
    code = run_cli(["eval", str(run), "--n", "50", "--batch-size", "16", "--quiet", "--json", str(path), *args])[0]
    assert code == 0
    return json.loads(path.read_text())


def _acc(report, attack, eps=None):
    return next(r["robust_acc"] for r in report["results"]
                if r["attack"] == attack and (eps is None or r["eps"] == eps))


def test_attack_ordering_and_eps_zero(trained, tmp_path):
    zero = _eval(trained, tmp_path, "--attacks", "clean,pgd", "--eps", "0", "--pgd-steps", "10")
    assert _acc(zero, "pgd-10", 0.0) == _acc(zero, "clean")
    # APGD-CE then APGD-T stand in for the full standard AutoAttack, which is too slow for the suite
    report = _eval(trained, tmp_path, "--attacks", "clean,pgd,pgd-l2dir,autoattack-custom", "--eps", "0.3",
                   "--aa-attacks", "apgd-ce,apgd-t")
    assert report["n"] == 50 and all(r["n"] == 50 for r in report["results"])
    clean = _acc(report, "clean")
    aa, p100, p10 = _acc(report, "autoattack-custom"), _acc(report, "pgd-100"), _acc(report, "pgd-10")
    assert aa <= p100 <= p10 <= clean
    assert p10 < clean, "the attack must do something at this eps"
    assert _acc(report, "pgd-l2dir-100") >= p100
    row = next(r for r in report["results"] if r["attack"] == "autoattack-custom")
    per = [p["robust_acc"] for p in row["per_attack"]]
    assert per == sorted(per, reverse=True) and per[-1] == pytest.approx(aa)


def test_eps_sweep_falls_to_chance_and_draws_a_figure(trained, tmp_path):
    report = _eval(trained, tmp_path, "--attacks", "eps-sweep", "--pgd-steps", "10", "--plots", str(tmp_path))
    sweep = report["sweeps"]["eps"]
    accs = sweep["robust_acc"]
    assert sweep["eps"][0] == 0 and sweep["eps"][-1] == pytest.approx(0.8)  # 0..32/255 scaled by 0.1 / (4/255)
    assert all(b <= a for a, b in zip(accs, accs[1:])), accs
    assert accs[-1] <= 1 / 10
    assert (tmp_path / "eps-sweep.png").stat().st_size > 1000


def test_two_processes_give_the_counts_of_one(trained, tmp_path):
    args = ["eval", str(trained), "--num-images", "51", "--batch-size", "16", "--attacks", "clean,pgd", "--pgd-steps",
            "5",
            "--device", "cpu", "--quiet"]
    assert run_cli([*args, "--json", str(tmp_path / "one.json")])[0] == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "natgrad", *args, "--json", str(tmp_path / "two.json")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two["world_size"] == 2
    assert one["results"] == two["results"]


class _Probe(nn.Module):
    """Records the training flag it saw; optionally keeps dropout on in eval mode."""

    def __init__(self, dropout_always: bool = False):
        super().__init__()
        self.fc = nn.Linear(16, 4)
        self.dropout_always = dropout_always

    def forward(self, x):
        h = x.flatten(1)
        if self.dropout_always:
            h = nn.functional.dropout(h, 0.5, training=True)
        return self.fc(h)


class _Images(torch.utils.data.Dataset):
    def __init__(self, n=24):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.rand(n, 1, 4, 4, generator=g), torch.randint(0, 4, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


@pytest.mark.parametrize("mode", [True, False])
def test_every_attack_restores_the_train_mode(mode):
    model = _Probe().train(mode)
    settings = evaluation.EvalSettings(attacks=["clean", "pgd", "pgd-l2dir", "autoattack-custom", "transfer",
                                                "steps-sweep"],
                               eps=[0.1], source=_Probe(),
                               pgd_steps=(2,), batch_size=8, aa_attacks=["apgd-ce"], sweep_steps=(1, 2), progress=False)
    evaluation.evaluate_model(model, _Images(), settings, Context(0, 1, torch.device("cpu")))
    assert model.training is mode
    assert all(p.grad is None for p in model.parameters())


def test_randomness_check_flags_dropout_left_on():
    ctx = Context(0, 1, torch.device("cpu"))
    settings = evaluation.EvalSettings(attacks=[], eps=[0.1], pgd_steps=(2,), batch_size=8, progress=False)
    checks = evaluation.sanity_checks(_Probe(dropout_always=True), _Images(), settings, ctx, num_classes=4,
                              only=["deterministic"])
    assert checks[0]["status"] == "WARN" and "randomness" in checks[0]["detail"]
    assert evaluation.sanity_checks(_Probe(), _Images(), settings, ctx, 4,
                                    only=["deterministic"])[0]["status"] == "PASS"


@pytest.mark.parametrize("args,message", [
    (["--attacks", "pgd,fab"], "unknown attack 'fab'"),
    (["--eps", "2"], "outside [0, 1]"),
    (["--eps", "four"], "not a number"),
    (["--n", "100000"], "outside 1..64"),
    (["--square-queries", "0"], "must be at least 1"),
])
def test_bad_eval_input(trained, capsys, args, message):
    code, err = run_cli(["eval", str(trained), "--quiet", *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_mismatched_checkpoint_and_transfer_source(trained, tmp_path, capsys):
    code, err = run_cli(["eval", str(trained / "model.safetensors"), "--recipe", "cifar10-prn18-natural"], capsys)
    assert code == 2 and "does not fit this model" in err
    other = tmp_path / "rgb"
    assert run_cli(["train", "fmnist-natural", *TINY, "data.channels=3", "epochs=1", "--out", str(other),
                    "--quiet"])[0] == 0
    code, err = run_cli(["eval", str(trained), "--attacks", "transfer", "--source", str(other), "--quiet"], capsys)
    assert code == 2 and "same input shape" in err


def test_sanity_report_reuses_the_evaluation_and_exports_robustbench(trained, tmp_path, monkeypatch):
    from natgrad import config
    from natgrad.evaluation import runner

    calls = []
    real = runner.evaluate_model
    monkeypatch.setattr(runner, "evaluate_model",
                        lambda m, d, s, c: calls.append((s.attacks, s.eps, s.pgd_steps)) or real(m, d, s, c))
    # eps 0.3: APGD-CE fools every image, so the rest of AutoAttack has nothing left to attack (fast)
    report = _eval(trained, tmp_path, "--attacks", "clean,pgd,autoattack", "--eps", "0.3", "--pgd-steps", "5",
                   "--sanity", "--source", str(trained), "--square-queries", "100")
    checks = {c["check"]: c for c in report["sanity"]}
    assert list(checks) == list(evaluation.SANITY_CHECKS)
    assert all(c["status"] in ("PASS", "WARN") for c in checks.values())
    assert checks["deterministic"]["status"] == "PASS"
    assert checks["large eps reaches chance"]["status"] == "PASS"  # an undefended model at eps 1
    more = checks["more iterations"]["numbers"]
    assert more["pgd-5"] == _acc(report, "pgd-5")  # reused, not attacked again
    assert more["change_points"] == pytest.approx(100 * abs(more["pgd-5"] - more["pgd-10"]))
    assert checks["black-box weaker"]["numbers"]["autoattack"] == _acc(report, "autoattack")
    again = [c for c in calls[1:] if "autoattack" in c[0] or (c[0] == ["pgd"] and c[1:] == ([0.3], (5,)))]
    assert not again, f"the sanity checks attacked again what the evaluation had: {again}"
    assert (["pgd"], [0.3], (10,)) in calls[1:]  # the doubled step count is new
    cfg = config.load("fmnist-natural")
    cfg.eps = 0.3
    exported = evaluation.robustbench_info("tiny", cfg, report["results"])
    assert exported["clean_acc"] == f"{100 * _acc(report, 'clean'):.2f}"
    assert exported["autoattack_acc"] == f"{100 * _acc(report, 'autoattack'):.2f}"
    assert exported["threat_model"] == "Linf" and exported["eps"] == f"{0.3 * 255:.4g}/255"


def test_robustbench_json_without_autoattack_fails_before_attacking(trained, tmp_path, capsys):
    code, err = run_cli(["eval", str(trained), "--attacks", "clean,pgd", "--robustbench-json",
                         str(tmp_path / "evaluation.json"),
                         "--quiet"], capsys)
    assert code == 2 and "needs the clean and autoattack results" in err and not (tmp_path / "evaluation.json").exists()


def test_autoattack_plus_runs_its_attacks_in_order(trained, tmp_path):
    from natgrad.attacks.autoattack import attack_names

    report = _eval(trained, tmp_path, "--attacks", "clean,pgd,autoattack-plus", "--eps", "0.3", "--pgd-steps", "10",
                   "--square-queries", "100")
    row = next(r for r in report["results"] if r["attack"] == "autoattack-plus")
    assert row["version"] == "plus"
    assert [p["attack"] for p in row["per_attack"]] == attack_names("plus")
    assert row["robust_acc"] <= _acc(report, "pgd-10") <= _acc(report, "clean")


def test_autoattack_resumes_from_its_state_folder(trained, tmp_path, monkeypatch):
    from pyautoattack import AutoAttack

    args = ("--attacks", "autoattack-custom", "--aa-attacks", "apgd-ce,square", "--square-queries", "100", "--eps",
            "0.3",
            "--aa-state", str(tmp_path / "state"))
    first = _eval(trained, tmp_path, *args)
    assert len(list((tmp_path / "state").glob("*.pt"))) == 4  # 50 images in batches of 16

    def refuse(*a, **k):
        raise AssertionError("a finished evaluation was attacked again")

    monkeypatch.setattr(AutoAttack, "run_standard_evaluation", refuse)
    assert _eval(trained, tmp_path, *args)["results"] == first["results"]


def test_default_eps_sweep_scales_with_the_recipe_and_stays_in_range():
    assert evaluation.default_sweep_eps(4 / 255)[-1] == pytest.approx(32 / 255)
    assert len(evaluation.default_sweep_eps(4 / 255)) == 17
    wide = evaluation.default_sweep_eps(0.3)  # 0.3 / (4/255) x 32/255 = 2.4: clipped at 1
    assert wide[0] == 0 and wide[-1] == 1.0 and wide == sorted(set(wide))


def test_every_evaluation_reports_its_integrity():
    ctx = Context(0, 1, torch.device("cpu"))
    settings = evaluation.EvalSettings(attacks=["clean"], eps=[0.1], pgd_steps=(2,), batch_size=8, progress=False)
    ok = evaluation.evaluate_model(_Probe().eval(), _Images(), settings, ctx)["integrity"]
    assert ok == {"model_was_in_train_mode": False, "modules_in_train_mode": [], "deterministic": True,
                  "warnings": [], "autoattack_warnings": []}
    left_in_train = evaluation.evaluate_model(_Probe().train(), _Images(), settings, ctx)["integrity"]
    assert left_in_train["model_was_in_train_mode"] and left_in_train["deterministic"]
    assert left_in_train["warnings"] == ["the model was in train mode; it was evaluated in eval mode"]
    random = evaluation.evaluate_model(_Probe(dropout_always=True), _Images(), settings, ctx)["integrity"]
    assert not random["deterministic"]
    assert any("identical forward passes differ" in w for w in random["warnings"])

    class Stubborn(_Probe):  # eval() does not reach it
        def train(self, mode=True):
            return super().train(True)

    stubborn = evaluation.evaluate_model(Stubborn(), _Images(), settings, ctx)["integrity"]
    assert stubborn["modules_in_train_mode"] == ["Stubborn", "fc"]
    assert any("stay in train mode after eval(): Stubborn, fc" in w for w in stubborn["warnings"])


def test_eval_json_holds_the_integrity(trained, tmp_path):
    path = tmp_path / "eval.json"
    assert run_cli(["eval", str(trained), "--attacks", "clean", "--json", str(path), "--quiet"])[0] == 0
    integrity = json.loads(path.read_text())["integrity"]
    assert integrity["deterministic"] is True and integrity["warnings"] == []


def test_an_interrupted_eval_of_a_run_folder_continues_where_it_stopped(trained, tmp_path, monkeypatch, capsys):
    from pyautoattack import AutoAttack

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    args = ["--attacks", "autoattack-custom", "--aa-attacks", "apgd-ce", "--eps", "0.05"]
    real = AutoAttack.run_standard_evaluation
    calls = []

    def interrupted_on_the_second_batch(self, x, y, *a, **k):
        calls.append(len(x))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, x, y, *a, **k)

    monkeypatch.setattr(AutoAttack, "run_standard_evaluation", interrupted_on_the_second_batch)
    code, _ = run_cli(["eval", str(run), "--n", "32", "--batch-size", "16", "--quiet", *args], capsys)
    assert code == 130 and len(calls) == 2 and (run / "autoattack-state").is_dir()
    calls.clear()
    monkeypatch.setattr(AutoAttack, "run_standard_evaluation", interrupted_on_the_second_batch)  # not reached twice
    assert run_cli(["eval", str(run), "--n", "32", "--batch-size", "16", "--quiet", *args])[0] == 0
    assert len(calls) == 1, "the finished batch is not attacked again"
    assert not (run / "autoattack-state").exists(), "the progress is removed once the evaluation is done"
    resumed = json.loads((run / "eval.json").read_text())["results"][0]
    monkeypatch.setattr(AutoAttack, "run_standard_evaluation", real)
    fresh = _eval(trained, tmp_path, *args, "--n", "32")["results"][0]
    assert resumed["robust_acc"] == fresh["robust_acc"] and resumed["n"] == fresh["n"] == 32
