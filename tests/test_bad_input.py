"""Bad input at the edges: generated malformed configs and command lines, and files that are not what they claim.

Every case must end with exit code 2, a one-line message and no traceback, before any work starts:
no run folder for ``natgrad train``, nothing new in the run folder for ``natgrad eval``.
"""

from __future__ import annotations

import dataclasses
import pickle
import shutil
import string
import typing

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TINY, run_cli
from natgrad import config
from natgrad.errors import UserError

RECIPES = set(config.list_recipes())  # read once: it parses every recipe file
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _typed_keys(cls: type = config.RunConfig, prefix: str = "") -> dict[str, type]:
    """Every config key with its (non-optional) scalar type."""
    out: dict[str, type] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            out.update(_typed_keys(typ, prefix + f.name + "."))
        else:
            args = [a for a in typing.get_args(typ) if a is not type(None)] or [typ]
            out[prefix + f.name] = args[0]
    return out


KEYS = _typed_keys()
NUMERIC = sorted(k for k, t in KEYS.items() if t in (int, float))
BOOLEAN = sorted(k for k, t in KEYS.items() if t is bool)


def _is_word(text: str) -> bool:
    """Neither a number nor a YAML null/bool: a value no numeric or boolean key accepts."""
    return isinstance(yaml.safe_load(text), str) and config.parse_number(text) is None


words = st.text(string.ascii_letters, min_size=1, max_size=8).filter(_is_word)


def _unknown(key: str) -> bool:
    try:
        config.resolve_key(key)
    except UserError:
        return True
    return False


# Overrides that no config accepts, each for a different reason.
OUT_OF_RANGE = [
    "epochs=0", "epochs=-3", "batch_size=0", "lr=0", "lr=-1e-3", "eps=-0.1", "eps=1.5", "eps=300/255",
    "gradnorm.gn_weight=-1", "gradnorm.ce_weight=-0.5", "attack.steps=0", "data.limit_train=0",
    "checkpoint_every=-1", "data.max_unreadable=-1", "stop_after=0", "gradnorm.norm=l3", "method=pgdd",
    "model.act=relu7", "optim.sched=linear-ish", "on_nonfinite=ignore", "data.name=mnist3", "optim.name=sgdd",
    "model.name=resnet-9000", "gradnorm.input_noise=salt",
    # the second reliability round (issue 15): every numeric and choice key has its range
    "optim.clip_grad=-1", "optim.warmup_lr=-5", "optim.weight_decay=-1", "optim.min_lr=0.5", "seed=-1",
    "seed=100000000000000000000", "lr=1e300", "lr=.inf", "lr=inf", "lr=.nan", "model.drop=2", "model.drop_path=1",
    "aug.rand_augment=garbage", "aug.color_jitter=-1", "aug.remode=bogus", "aug.recount=-3", "optim.opt_eps=-1",
    "optim.momentum=-1", "edge.sigma=1e30", "attack.step_size=1e308", "data.num_classes=0", "data.channels=0",
    "data.image_size=-8", "eval.batch_size=0", "data.num_workers=100000", "aug.interpolation=cubic",
    "data.synthetic_size=0", "ema_decay=1", "edge.tau=1e9",
]
bad_overrides = st.one_of(
    st.sampled_from(OUT_OF_RANGE),
    st.tuples(st.sampled_from(NUMERIC), words).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.tuples(st.sampled_from(BOOLEAN), st.integers(2, 99)).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.tuples(st.from_regex(r"\A[a-z]{2,8}(\.[a-z_]{2,10})?\Z").filter(_unknown), st.integers(0, 9))
      .map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.sampled_from(["--frobnicate", "=3", "epochs", "--lr", "epochs=1=2", "eps=4/0"]),
)
good_overrides = st.lists(st.sampled_from(["epochs=1", "seed=3", "lr=1e-3", "data.limit_train=64", "eps=4/255"]),
                          max_size=3)


@SETTINGS
@given(good=good_overrides, bad=bad_overrides, recipe=st.sampled_from(["fmnist-natural", "fmnist-gradnorm",
                                                                      "fmnist-pgd", "cifar10-prn18-pgd"]))
def test_train_refuses_malformed_configs(tmp_path, capsys, good, bad, recipe):
    out = tmp_path / "run"
    code, err = run_cli(["train", recipe, *good, bad, "--out", str(out), "--quiet"], capsys)
    assert code == 2, (bad, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()


@SETTINGS
@given(name=st.from_regex(r"\A[a-z][a-z0-9-]{0,20}\Z"))
def test_train_refuses_unknown_recipes(tmp_path, capsys, name):
    if name in RECIPES:
        return
    out = tmp_path / "run"
    code, err = run_cli(["train", name, "--out", str(out)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "recipe" in err, err
    assert not out.exists()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    assert run_cli(["train", "fmnist-natural", *TINY, "epochs=1", "--out", str(run), "--quiet"])[0] == 0
    return run


bad_eval_args = st.one_of(
    st.tuples(st.just("--attacks"), words.filter(lambda w: w.lower() not in (
        "clean", "pgd", "autoattack", "transfer", "eps-sweep", "steps-sweep", "pgd-l2dir")).map(str.lower)),
    st.tuples(st.just("--eps"), st.one_of(words, st.floats(1.01, 1e6).map(str), st.floats(-1e6, -0.01).map(str),
                                          st.just("4/0"))),
    st.tuples(st.just("--n"), st.one_of(st.integers(-100, 0).map(str), words, st.just("1.5"))),
    st.tuples(st.just("--square-queries"), st.integers(-10, 0).map(str)),
    st.tuples(st.just("--attacks"), st.just("transfer")),  # needs --source
    st.tuples(st.just("--pgd-steps"), st.one_of(st.integers(-5, 0).map(str), words)),
    st.tuples(st.sampled_from(["--batch-size", "--restarts"]), st.integers(-5, 0).map(str)),
    st.tuples(st.just("--seed"), st.sampled_from(["-1", str(2**32), str(10**20)])),
    st.tuples(st.just("--json"), st.just("/")),  # a folder
)


@SETTINGS
@given(arg=bad_eval_args)
def test_eval_refuses_malformed_command_lines(run_dir, capsys, arg):
    before = sorted(p.name for p in run_dir.iterdir())
    code, err = run_cli(["eval", str(run_dir), *arg, "--quiet"], capsys)
    assert code == 2, (arg, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in run_dir.iterdir()) == before


class _Payload:
    """Unpickling this creates the file named ``path``: what a malicious checkpoint would do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_malicious_checkpoint_is_refused_and_its_payload_never_runs(tmp_path, capsys, run_dir):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    marker = tmp_path / "pwned"
    torch.save({"model": _Payload(str(marker)), "step": 0}, run / "checkpoints" / "last.pt")
    code, err = run_cli(["train", "fmnist-natural", *TINY, "epochs=1", "--resume", "--out", str(run), "--quiet"],
                        capsys)
    assert code == 2 and "refused without running it" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()
    # the check of the test itself: an unrestricted pickle load does run the payload
    torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert marker.exists()


def test_truncated_and_foreign_files_are_refused(tmp_path, capsys, run_dir):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:200])
    code, err = run_cli(["train", "fmnist-natural", *TINY, "epochs=1", "--resume", "--out", str(run), "--quiet"],
                        capsys)
    assert code == 2 and "is not a valid natgrad checkpoint" in err and len(err.strip().splitlines()) == 1

    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, err = run_cli(["eval", str(run), "--quiet"], capsys)
    assert code == 2 and "not a readable safetensors file" in err and len(err.strip().splitlines()) == 1

    (run / "model.safetensors").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    code, err = run_cli(["eval", str(run), "--quiet"], capsys)
    assert code == 2 and "not a readable safetensors file" in err

    other = tmp_path / "other.safetensors"
    shutil.copy(run_dir / "model.safetensors", other)
    code, err = run_cli(["eval", str(other), "--recipe", "cifar10-prn18-pgd", "--quiet"], capsys)
    assert code == 2 and "does not fit this model" in err and len(err.strip().splitlines()) == 1
