"""Hostile and careless input, second round: no wrong number, no lost work, nothing touched that natgrad
did not write, and one line with exit code 2 where the user must fix something."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import TINY, assert_same_weights, run_cli, weights
from natgrad import config, evaluation, pipeline
from natgrad.errors import Preempted, UserError
from natgrad.rundir import LOCK, RunLock
from natgrad.signals import StopSignals

TRAIN = ["train", "fmnist-natural", *TINY, "epochs=1", "--quiet"]


def _one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, (f, err)


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trust") / "a"
    assert run_cli([*TRAIN, "ema=true", "ema_decay=0.5", "--out", str(out)])[0] == 0
    return out


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


# ---------------------------------------------------------------------------- evaluation state bound to the weights


def _weaker(run: Path, dest: Path) -> Path:
    """``run`` with its classifier's sign flipped in every weights file: another model, much less accurate."""
    out = _copy(run, dest)
    for name in ("model.safetensors", "model_ema.safetensors"):
        state = load_file(str(out / name))
        last = sorted(k for k in state if k.endswith("weight"))[-1]
        state[last] = -state[last]
        save_file(state, str(out / name))
    return out


AA = ["--attacks", "clean,autoattack-custom", "--aa-attacks", "apgd-ce", "--eps", "0.1", "--n", "32",
      "--batch-size", "16", "--quiet"]


def _interrupt_second_batch(monkeypatch):
    from pyautoattack import AutoAttack

    real = AutoAttack.run_standard_evaluation
    calls = []

    def interrupted(self, x, y, *a, **k):
        calls.append(len(x))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, x, y, *a, **k)

    monkeypatch.setattr(AutoAttack, "run_standard_evaluation", interrupted)
    return lambda: monkeypatch.setattr(AutoAttack, "run_standard_evaluation", real)


def _rows(path: Path) -> list[dict]:
    return [{k: r[k] for k in ("attack", "eps", "n", "robust_acc")} for r in json.loads(path.read_text())["results"]]


@pytest.mark.parametrize("switch", ["other-weights", "no-ema", "explicit-state"])
def test_a_resumed_autoattack_state_never_reports_another_models_numbers(run_a, tmp_path, monkeypatch, capsys, switch):
    run = _copy(run_a, tmp_path / "run")
    b = _weaker(run_a, tmp_path / "b")
    state = ["--aa-state", str(tmp_path / "state")] if switch == "explicit-state" else []
    restore = _interrupt_second_batch(monkeypatch)
    assert run_cli(["eval", str(run), *AA, *state], capsys)[0] == 130  # model A, interrupted on its second batch
    restore()
    if switch == "no-ema":  # the same command with the other weights of the folder
        fresh_dir = _copy(run_a, tmp_path / "fresh")
        assert run_cli(["eval", str(fresh_dir), *AA, "--no-ema"])[0] == 0
        assert run_cli(["eval", str(run), *AA, "--no-ema"])[0] == 0
    else:  # model B's weights put in A's place (more training, a copy, a mistake)
        for name in ("model.safetensors", "model_ema.safetensors"):
            shutil.copy(b / name, run / name)
        fresh_dir = b
        if switch == "explicit-state":
            code, err = run_cli(["eval", str(run), *AA, *state], capsys)
            _one_line_error(code, err, "from another evaluation", "model_sha256")
            return
        assert run_cli(["eval", str(fresh_dir), *AA])[0] == 0
        assert run_cli(["eval", str(run), *AA])[0] == 0
    resumed, fresh = _rows(run / "eval.json"), _rows(fresh_dir / "eval.json")
    assert resumed == fresh
    a_alone = _copy(run_a, tmp_path / "a-alone")
    assert run_cli(["eval", str(a_alone), *AA, *(["--no-ema"] if switch == "no-ema" else [])])[0] == 0
    if switch == "other-weights":
        assert _rows(a_alone / "eval.json") != fresh, "A and B must differ for the test to mean anything"
    assert json.loads((run / "eval.json").read_text())["weights_sha256"] == json.loads(
        (fresh_dir / "eval.json").read_text())["weights_sha256"]


def test_state_key_holds_the_weights_digest(run_a):
    from natgrad.attacks.autoattack import _state_key

    model = evaluation.load_model(run_a).model
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    key = _state_key(model, x, y, 0.1, "custom", ["apgd-ce"], 0, 5000)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert _state_key(model, x, y, 0.1, "custom", ["apgd-ce"], 0, 5000)["model_sha256"] != key["model_sha256"]


# ---------------------------------------------------------------------------- numbers from broken weights or configs


def test_non_finite_outputs_stop_the_evaluation(run_a, tmp_path, capsys):
    run = _copy(run_a, tmp_path / "nan")
    for name in ("model.safetensors", "model_ema.safetensors"):
        state = load_file(str(run / name))
        first = sorted(k for k in state if k.endswith("weight"))[0]
        state[first] = torch.full_like(state[first], float("nan"))
        save_file(state, str(run / name))
    for attacks in ("clean", "pgd", "autoattack-custom"):
        code, err = run_cli(["eval", str(run), "--attacks", attacks, "--aa-attacks", "apgd-ce", "--n", "16",
                             "--pgd-steps", "2", "--quiet"], capsys)
        _one_line_error(code, err, "NaN or infinite")
    assert not (run / "eval.json").exists() or json.loads((run / "eval.json").read_text()) == json.loads(
        (run_a / "eval.json").read_text()) if (run_a / "eval.json").exists() else True


def test_a_relabelled_dtype_is_refused(run_a, tmp_path, capsys):
    run = _copy(run_a, tmp_path / "dtype")
    for name in ("model.safetensors", "model_ema.safetensors"):
        state = load_file(str(run / name))
        save_file({k: v.double() if v.is_floating_point() else v for k, v in state.items()}, str(run / name))
    code, err = run_cli(["eval", str(run), "--attacks", "clean", "--quiet"], capsys)
    _one_line_error(code, err, "does not fit this model", "dtype")


@pytest.mark.parametrize("content", ["eps: 7.0\n", "data: {name: mnist3}\n", "::: not yaml [\n", "", "- 1\n- 2\n",
                                     "method: natural\nmethod: pgd\n", "a: &x [1]\nb: *x\n"])
def test_a_hand_edited_config_yaml_is_validated_everywhere(run_a, tmp_path, capsys, content):
    run = _copy(run_a, tmp_path / "edited")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    if content.startswith(("eps", "data")):
        saved.update(yaml.safe_load(content))
        text = yaml.safe_dump(saved)
    else:
        text = content
    (run / "config.yaml").write_text(text)
    before = sorted(p.name for p in run.iterdir())
    for args in (["eval", str(run), "--attacks", "clean"], ["analyze", str(run), "--n", "8"],
                 [*TRAIN, "--resume", "--out", str(run)]):
        code, err = run_cli(args, capsys)
        _one_line_error(code, err, "config.yaml")
    assert sorted(p.name for p in run.iterdir()) == before


# ---------------------------------------------------------------------------- config files and values


def test_yaml_refuses_duplicate_keys_aliases_and_non_utf8(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("inherit: fmnist-natural\ndata: {name: synthetic}\nepochs: 2\ndata: {limit_train: 5}\n")
    with pytest.raises(UserError, match="key 'data' is given twice"):
        config.load(str(dup))
    bomb = tmp_path / "bomb.yaml"
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]"
                                                   for p, c in zip("abcdefgh", "bcdefghi")]
    bomb.write_text("\n".join(lines) + "\n")
    assert len(bomb.read_bytes()) < 400
    with pytest.raises(UserError, match="aliases") as e:
        config.load(str(bomb))
    assert len(str(e.value)) < 300
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("description: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        config.load(str(latin))


def test_inherit_is_read_from_the_recipes_own_folder(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "base.yaml").write_text("inherit: fmnist-natural\nepochs: 7\n")
    (folder / "child.yaml").write_text("inherit: base.yaml\nlr: 0.005\n")
    monkeypatch.chdir(tmp_path)  # not the recipes' folder
    cfg = config.load(str(folder / "child.yaml"))
    assert (cfg.epochs, cfg.lr) == (7, 0.005)


def test_long_values_are_cut_in_messages(capsys, tmp_path):
    code, err = run_cli([*TRAIN, "data.name=" + "x" * 100_000, "--out", str(tmp_path / "r")], capsys)
    _one_line_error(code, err, "characters")
    assert len(err) < 400


@pytest.mark.parametrize("override", ["lr=.inf", "lr=inf", "lr=nan", "eps=.nan"])
def test_non_finite_numbers_are_refused(override):
    with pytest.raises(UserError, match="not a"):
        config.load("fmnist-natural", [override])


def test_every_numeric_key_has_a_range_and_every_string_key_a_check():
    numeric = {k for k, t in _scalar_types().items() if t in (int, float)}
    assert numeric - set(config.RANGES) == set(), "a numeric key without a range"
    checked = set(config.CHOICES) | {"optim.name", "aug.rand_augment", "model.name", "model.act", "data.root",
                                     "data.val_subset", "init", "description"}
    strings = {k for k, t in _scalar_types().items() if t is str}
    assert strings - checked == set(), "a string key that nothing checks"


def _scalar_types() -> dict[str, type]:
    import dataclasses
    import typing

    out = {}

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            t = hints[f.name]
            if dataclasses.is_dataclass(t):
                walk(t, prefix + f.name + ".")
            else:
                args = [a for a in typing.get_args(t) if a is not type(None)] or [t]
                out[prefix + f.name] = args[0]
    walk(config.RunConfig)
    return out


def test_an_empty_data_root_is_refused_not_replaced(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run_cli(["train", "fmnist-natural", f"data.root={empty}", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "Fashion-MNIST" in err and not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------- the run folder


def test_a_second_process_cannot_train_into_a_busy_folder(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    with RunLock(out):
        for extra in ([], ["--resume"]):
            code, err = run_cli([*TRAIN, *extra, "--out", str(out)], capsys)
            _one_line_error(code, err, "in use by another natgrad process", f"pid {os.getpid()}")
    assert sorted(p.name for p in out.iterdir()) == []
    # A lock file left by a process that died holds no lock: the next run takes it.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK).write_text(dead.stdout.strip())
    assert run_cli([*TRAIN, "--out", str(out)])[0] == 0
    assert not (out / LOCK).exists(), "the lock is removed when training ends"


def test_two_trainings_into_one_folder_at_once(tmp_path):
    out = tmp_path / "race"
    cmd = [sys.executable, "-m", "natgrad", *TRAIN[:2], *TINY, "epochs=2", "data.synthetic_size=4096", "--quiet",
           "--out", str(out)]  # long enough for the second process to start while the first trains
    first = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / LOCK).exists() and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert second.returncode == 2 and "in use by another natgrad process" in second.stderr
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_a_failure_before_the_first_checkpoint_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    from natgrad import objectives
    from natgrad.objectives.natural import Natural

    class Diverges(Natural):
        def __call__(self, x, y, epoch_fraction=0.0):
            out = super().__call__(x, y, epoch_fraction)
            out["loss"] = out["loss"] * float("nan")
            return out

    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        mp.setitem(objectives.REGISTRY, "natural", Diverges)
        code, err = run_cli([*TRAIN, "--out", str(out)], capsys)
    _one_line_error(code, err, "non-finite loss", "no checkpoint had been written yet")
    assert not out.exists(), "no half-written run folder"
    assert run_cli([*TRAIN, "--out", str(out)])[0] == 0, "the same command simply runs again"
    # into a folder that existed before (empty): it stays, empty
    kept = tmp_path / "kept"
    kept.mkdir()
    with monkeypatch.context() as mp:
        mp.setitem(objectives.REGISTRY, "natural", Diverges)
        assert run_cli([*TRAIN, "--out", str(kept)], capsys)[0] == 2
    assert kept.is_dir() and list(kept.iterdir()) == []


def test_files_natgrad_did_not_write_are_left_alone(run_a, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.tmp").write_text("my notes")
    code, err = run_cli([*TRAIN, "--out", str(mine)], capsys)
    _one_line_error(code, err, "already holds files")
    assert (mine / "notes.tmp").read_text() == "my notes"

    run = _copy(run_a, tmp_path / "linked")
    elsewhere = tmp_path / "elsewhere.jsonl"
    shutil.move(run / "metrics.jsonl", elsewhere)
    (run / "metrics.jsonl").symlink_to(elsewhere)
    before = elsewhere.read_text()
    code, err = run_cli(["train", "fmnist-natural", *TINY, "epochs=2", "--quiet", "--resume", "--out", str(run)],
                        capsys)
    _one_line_error(code, err, "symbolic link")
    assert elsewhere.read_text() == before

    weights_before = (run_a / "model.safetensors").read_bytes()
    code, err = run_cli(["report", str(run_a), "--out", str(run_a / "model.safetensors")], capsys)
    _one_line_error(code, err, "not an HTML file")
    assert (run_a / "model.safetensors").read_bytes() == weights_before
    code, err = run_cli(["eval", str(run_a), "--attacks", "clean", "--json", str(run_a / "model.safetensors")], capsys)
    _one_line_error(code, err, "not a JSON file")
    assert (run_a / "model.safetensors").read_bytes() == weights_before


def test_an_interrupted_analysis_leaves_no_folder_for_ever(run_a, tmp_path):
    run = _copy(run_a, tmp_path / "an")
    stale = run / ".analysis.natgrad-abcd1234.tmp"
    stale.mkdir()
    (stale / "analysis.json").write_text("{}")
    assert run_cli(["analyze", str(run), "--n", "8", "--analyses", "gradients", "--quiet"])[0] == 0
    assert not stale.exists() and (run / "analysis" / "analysis.json").is_file()


def test_destinations_are_checked_before_the_work(run_a, tmp_path, capsys, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("attacked before the destination was checked")

    monkeypatch.setattr(evaluation, "evaluate_model", no_work)
    folder = tmp_path / "a-folder"
    folder.mkdir()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for args, fragment in ((["--json", str(folder)], "is a folder"), (["--attacks", "eps-sweep", "--plots",
                                                                       str(a_file)],
                                                                      "is a file, not a folder"),
                           (["--robustbench-json", str(folder)], "is a folder")):
        code, err = run_cli(["eval", str(run_a), *args], capsys)
        _one_line_error(code, err, fragment)
    code, err = run_cli(["analyze", str(run_a), "--out", str(a_file)], capsys)
    _one_line_error(code, err, "is a file")
    code, err = run_cli(["bench", "--json", str(folder)], capsys)
    _one_line_error(code, err, "is a folder")


def test_a_failed_write_keeps_the_results(run_a, tmp_path, capsys, monkeypatch):
    from natgrad.evaluation import run as evaluation_run

    real = evaluation_run.atomic_write_text

    def disk_full(path, text):
        if Path(path).name == "eval.json":
            raise OSError(28, "No space left on device")
        real(path, text)

    monkeypatch.setattr(evaluation_run, "atomic_write_text", disk_full)
    run = _copy(run_a, tmp_path / "full")
    code, err = run_cli(["eval", str(run), "--attacks", "clean", "--n", "16", "--quiet"], capsys)
    _one_line_error(code, err, "No space left on device", "kept in")
    kept = Path(err.split("kept in ")[1].split()[0])
    report = json.loads(kept.read_text())
    assert report["results"][0]["attack"] == "clean" and report["n"] == 16
    kept.unlink()


def test_a_write_error_in_training_is_one_line(tmp_path, capsys, monkeypatch):
    from natgrad.engine import checkpoint

    def read_only(path, state):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(checkpoint, "save_state", read_only)
    code, err = run_cli([*TRAIN, "--out", str(tmp_path / "ro")], capsys)
    _one_line_error(code, err, "Read-only file system")


def test_data_workers_are_capped_by_the_machine(tmp_path, capsys):
    code, err = run_cli([*TRAIN, "data.num_workers=100000", "--out", str(tmp_path / "w")], capsys)
    _one_line_error(code, err, "data.num_workers=100000", "must be at most")
    assert not (tmp_path / "w").exists()
    cpus = len(os.sched_getaffinity(0))
    cfg = config.load("fmnist-natural", [f"data.num_workers={cpus + 3}"])
    assert config.capped_workers(cfg).data.num_workers == cpus
    assert config.capped_workers(config.load("fmnist-natural")).data.num_workers == 0


@pytest.mark.parametrize("bad", ["list", "keys", "optimizer"])
def test_a_checkpoint_of_the_wrong_structure_is_refused(run_a, tmp_path, capsys, bad):
    run = _copy(run_a, tmp_path / "ckpt")
    path = run / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    if bad == "list":
        torch.save([1, 2, 3], path)
    elif bad == "keys":
        torch.save({"model": state["model"]}, path)
    else:  # SGD's state where AdamW's is expected
        sgd = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
        torch.save({**state, "optimizer": sgd.state_dict()}, path)
    code, err = run_cli([*TRAIN, "ema=true", "ema_decay=0.5", "--resume", "--out", str(run)], capsys)
    _one_line_error(code, err, "last.pt")


def test_a_tiny_eps_is_not_shown_as_zero_255ths():
    table = evaluation.format_results([{"attack": "pgd-10", "eps": 1e-300, "n": 1, "robust_acc": 1.0},
                             {"attack": "pgd-10", "eps": 4 / 255, "n": 1, "robust_acc": 1.0}])
    assert "(0/255)" not in table and "(4/255)" in table


# ---------------------------------------------------------------------------- signals


def test_sigterm_while_evaluating_the_last_epoch_stops_and_resumes_exactly(tmp_path, capsys, monkeypatch):
    train_mod = sys.modules["natgrad.engine.train"]
    args = ["train", "fmnist-natural", *TINY, "epochs=2", "method=pgd", "attack.random_start=true", "--quiet"]
    assert run_cli([*args, "--out", str(tmp_path / "full")])[0] == 0
    real = train_mod.evaluate
    calls = []

    def signalled(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # the last epoch's evaluation
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "evaluate", signalled)
    out = tmp_path / "stopped"
    code, err = run_cli([*args, "--out", str(out)], capsys)
    assert code == 143 and "while evaluating epoch 2" in err and "--resume" in err, err
    assert not (out / "summary.json").exists()
    monkeypatch.setattr(train_mod, "evaluate", real)
    assert run_cli([*args, "--resume", "--out", str(out)])[0] == 0
    assert_same_weights(weights(tmp_path / "full"), weights(out))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    for m, r in zip(lines, reference):
        assert (m["train_loss"], m["clean_acc"], m["pgd_acc"]) == (r["train_loss"], r["clean_acc"], r["pgd_acc"])


def test_a_signal_noted_but_not_acted_on_is_passed_on():
    with pytest.raises(Preempted) as stopped, StopSignals(raising=True):
        with StopSignals():  # training's: notes the signal
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
        raise AssertionError("the outer block goes on")
    assert stopped.value.exit_code == 143


def test_a_signal_during_a_pipeline_stage_stops_the_pipeline(tmp_path):
    ran = []

    def stage(name, signals=False):
        def run():
            ran.append(name)
            if signals:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)  # an evaluation that would go on
                ran.append(f"{name} went on")
        return pipeline.Stage(name, name, lambda: False, run)

    state = {"stages": {}}
    with pytest.raises(Preempted, match="during eval b"), StopSignals(raising=True):
        pipeline.run_stages(tmp_path, "t", "state.json", state, [stage("train a"), stage("eval b", True),
                                                                 stage("train c")], lambda _: None)
    assert ran == ["train a", "eval b"]
    assert "eval b" in json.loads((tmp_path / "state.json").read_text())["interrupted"]


def test_reproduce_with_a_missing_dataset_writes_nothing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "repro"
    code, err = run_cli(["reproduce", "fmnist", "--budget", "short", "--out", str(out), f"data.root={empty}"], capsys)
    assert code == 2 and "Fashion-MNIST" in err and len(err.strip().splitlines()) == 1
    assert not out.exists(), "no state file that would refuse the corrected command"


def test_the_report_leaves_out_results_of_other_weights(run_a, tmp_path):
    from natgrad.report.runs import load_run

    run = _copy(run_a, tmp_path / "rep")
    assert run_cli(["eval", str(run), "--attacks", "clean", "--n", "16", "--quiet"])[0] == 0
    assert load_run(run).eval is not None and not load_run(run).problems
    b = _weaker(run_a, tmp_path / "b")
    shutil.copy(b / "model_ema.safetensors", run / "model_ema.safetensors")  # trained on, after the evaluation
    loaded = load_run(run)
    assert loaded.eval is None and any("other weights" in p for p in loaded.problems)
