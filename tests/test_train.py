"""The training engine: run folder, exact resume, evaluation, non-finite losses, preemption."""

import json
import os
import signal
import stat

import pytest
import torch

from conftest import TINY, assert_same_weights, run_cli, weights
from natgrad import config, data, objectives
from natgrad.build import build_model
from natgrad.engine.checkpoint import atomic_write_text, load_weights, save_weights
from natgrad.objectives.natural import Natural
from natgrad.objectives.pgd import PGDTraining


def test_run_folder_and_metrics(tmp_path):
    out = tmp_path / "run"
    assert run_cli(["train", "fmnist-gradnorm", *TINY, "epochs=2", "--out", str(out), "--quiet"])[0] == 0
    for name in ("config.yaml", "metrics.jsonl", "checkpoints/last.pt", "model.safetensors", "summary.json"):
        assert (out / name).is_file(), name
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    for m in lines:
        assert {"epoch", "train_loss", "clean_acc", "seconds", "pgd_acc", "train_reg"} <= m.keys()
    assert not list(out.rglob("*.tmp")), "no temporary files left behind"
    # The logged clean accuracy is what the saved weights give, computed independently here.
    cfg = config.load("fmnist-gradnorm", TINY + ["epochs=2"])
    model = build_model(cfg)
    load_weights(model, out / "model.safetensors")
    model.eval()
    ds = data.build(cfg, "test")
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert lines[-1]["clean_acc"] == pytest.approx(acc)
    assert lines[-1]["eval_n"] == len(ds) == 64
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_done"] == 2 and summary["clean_acc"] == lines[-1]["clean_acc"]


@pytest.mark.parametrize("extra", [
    ["method=gradnorm", "aug.mixup=0.8", "aug.cutmix=1.0", "gradnorm.warmup_epochs=1.5"],
    ["method=pgd", "attack.random_start=true", "attack.warmup_epochs=1", "ema=true", "ema_decay=0.9"],
])
def test_resume_gives_the_same_weights_as_one_run(tmp_path, extra):
    args = ["train", "fmnist-natural", *TINY, "epochs=2", *extra, "--quiet"]
    assert run_cli(args + ["--out", str(tmp_path / "full")])[0] == 0
    assert run_cli(args + ["stop_after=1", "--out", str(tmp_path / "half")])[0] == 0
    assert json.loads((tmp_path / "half" / "summary.json").read_text())["epochs_done"] == 1
    assert run_cli(args + ["--resume", "--out", str(tmp_path / "half")])[0] == 0
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "half"))
    finished = (tmp_path / "half" / "summary.json").read_text()
    assert run_cli(args + ["--resume", "--out", str(tmp_path / "half")])[0] == 0, "resuming a finished run is a no-op"
    assert (tmp_path / "half" / "summary.json").read_text() == finished
    if "ema=true" in extra:
        assert_same_weights(weights(tmp_path / "full", "model_ema.safetensors"),
                            weights(tmp_path / "half", "model_ema.safetensors"))
    full = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    half = (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()
    def strip(line):
        timing = ("elapsed", "images_per_s")
        return {k: v for k, v in json.loads(line).items() if "seconds" not in k and k not in timing}

    assert [strip(a) for a in full] == [strip(b) for b in half]


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    class BreaksInEpochTwo(Natural):
        def __call__(self, x, y, epoch_fraction=0.0):
            out = super().__call__(x, y, epoch_fraction)
            if epoch_fraction >= 1.25:
                out["loss"] = out["loss"] * float("nan")
            return out

    monkeypatch.setitem(objectives.REGISTRY, "natural", BreaksInEpochTwo)
    out = tmp_path / "run"
    code, err = run_cli(["train", "fmnist-natural", *TINY, "epochs=2", "--out", str(out), "--quiet"], capsys)
    assert code == 2
    assert "non-finite loss at step 10 (epoch 2)" in err and len(err.strip().splitlines()) == 1
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 8, "the checkpoint of the last good epoch is kept"
    assert all(torch.isfinite(v).all() for v in weights(out).values())


def test_init_starts_from_saved_weights_and_refuses_a_mismatch(tmp_path, capsys):
    first = tmp_path / "first"
    assert run_cli(["train", "fmnist-natural", *TINY, "epochs=1", "--out", str(first), "--quiet"])[0] == 0
    frozen = ["epochs=1", "lr=1e-12", "optim.sched=none", "optim.weight_decay=0", "method=gradnorm", "ema=true"]
    # a run folder or its safetensors file; with a vanishing learning rate the weights stay the initial ones
    for i, init in enumerate([first, first / "model.safetensors"]):
        out = tmp_path / f"tuned{i}"
        args = ["train", "fmnist-natural", *TINY, *frozen, f"init={init}", "--out", str(out), "--quiet"]
        assert run_cli(args)[0] == 0
        assert_same_weights(weights(out), weights(first), atol=1e-7)
        assert_same_weights(weights(out, "model_ema.safetensors"), weights(first), atol=1e-7)
    scratch = tmp_path / "scratch"
    assert run_cli(["train", "fmnist-natural", *TINY, *frozen, "seed=1", "--out", str(scratch), "--quiet"])[0] == 0
    assert not torch.allclose(weights(scratch)["net.9.weight"], weights(first)["net.9.weight"])
    bad = tmp_path / "bad"
    code, err = run_cli(["train", "fmnist-natural", *TINY, "model.name=preact-resnet18", f"init={first}",
                         "--out", str(bad)], capsys)
    assert code == 2 and "does not fit this model" in err and len(err.strip().splitlines()) == 1
    assert not bad.exists()


@pytest.mark.parametrize("signum,at_step,when", [
    (signal.SIGTERM, 5, "at step 5 (epoch 1)"),
    (signal.SIGINT, 8, "after epoch 1"),  # during an epoch's last step: the epoch is finished and evaluated first
])
def test_a_signal_checkpoints_the_current_step_and_resume_finishes_bit_for_bit(tmp_path, monkeypatch, capsys,
                                                                               signum, at_step, when):
    args = ["train", "fmnist-natural", *TINY, "epochs=2", "method=pgd", "attack.random_start=true", "ema=true",
            "--quiet"]
    assert run_cli(args + ["--out", str(tmp_path / "full")])[0] == 0

    class SignalledAt(PGDTraining):
        calls = 0

        def __call__(self, x, y, epoch_fraction=0.0):
            SignalledAt.calls += 1
            if SignalledAt.calls == at_step:
                os.kill(os.getpid(), signum)  # as the scheduler or Ctrl-C would, in the middle of a step
            return super().__call__(x, y, epoch_fraction)

    monkeypatch.setitem(objectives.REGISTRY, "pgd", SignalledAt)
    previous = signal.getsignal(signum)
    out = tmp_path / "stopped"
    code, err = run_cli(args + ["--out", str(out)], capsys)
    assert code == 128 + signum and len(err.strip().splitlines()) == 1
    assert f"stopped by {signal.Signals(signum).name} {when}" in err and "--resume" in err
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == at_step
    assert signal.getsignal(signum) is previous, "the handler is put back"
    monkeypatch.setitem(objectives.REGISTRY, "pgd", PGDTraining)
    assert run_cli(args + ["--resume", "--out", str(out)])[0] == 0
    assert_same_weights(weights(tmp_path / "full"), weights(out))
    assert_same_weights(weights(tmp_path / "full", "model_ema.safetensors"), weights(out, "model_ema.safetensors"))


def _non_finite_at(steps: tuple[int, ...]) -> type:
    """The natural objective with an infinite loss at the given calls (counted from 1)."""

    class NaNAtSomeSteps(Natural):
        calls = 0

        def __call__(self, x, y, epoch_fraction=0.0):
            NaNAtSomeSteps.calls += 1
            out = super().__call__(x, y, epoch_fraction)
            if NaNAtSomeSteps.calls in steps:
                out["loss"] = out["loss"] * float("inf")
            return out

    return NaNAtSomeSteps


def test_non_finite_steps_can_be_skipped_and_are_counted(tmp_path, capsys):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(objectives.REGISTRY, "natural", _non_finite_at((3, 6, 11)))
        out = tmp_path / "run"
        assert run_cli(["train", "fmnist-natural", *TINY, "epochs=2", "on_nonfinite=skip", "--out", str(out),
                        "--quiet"], capsys)[0] == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("skipped_steps") for m in metrics] == [2, 1]  # 8 steps per epoch: steps 3, 6 | 11
    assert all(torch.isfinite(v).all() for v in weights(out).values())
    code, err = run_cli(["train", "fmnist-natural", *TINY, "on_nonfinite=ignore", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "on_nonfinite='ignore' is not one of stop, skip" in err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    """Files natgrad writes get the mode a plain open() would give them, not mkstemp's owner-only 0o600."""
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        save_weights(torch.nn.Linear(2, 2), tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    for name in ("a.txt", "w.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode


def test_a_skipped_first_step_does_not_break_the_progress_line(tmp_path, capsys):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(objectives.REGISTRY, "natural", _non_finite_at((1,)))
        out = tmp_path / "run"
        assert run_cli(["train", "fmnist-natural", *TINY, "on_nonfinite=skip", "--out", str(out)], capsys)[0] == 0
    assert [json.loads(line).get("skipped_steps") for line in (out / "metrics.jsonl").read_text().splitlines()][0] == 1


def test_resuming_a_fine_tune_killed_before_its_first_checkpoint_starts_from_init(tmp_path, capsys):
    base = tmp_path / "base"
    assert run_cli(["train", "fmnist-natural", *TINY, "--out", str(base), "--quiet"], capsys)[0] == 0
    args = ["train", "fmnist-gradnorm", *TINY, f"init={base}", "--quiet"]
    assert run_cli([*args, "--out", str(tmp_path / "full")], capsys)[0] == 0
    killed = tmp_path / "killed"  # what a kill before the first checkpoint leaves: the config alone
    killed.mkdir()
    (killed / "config.yaml").write_text((tmp_path / "full" / "config.yaml").read_text())
    assert run_cli([*args, "--out", str(killed), "--resume"], capsys)[0] == 0
    assert_same_weights(weights(tmp_path / "full"), weights(killed))
