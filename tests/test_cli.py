"""The command line: bad input gets one line, exit code 2, and nothing written."""

import os
import subprocess
import sys

import pytest

from conftest import TINY, run_cli, weights


@pytest.mark.parametrize("args,message", [
    (["train", "no-such-recipe"], "unknown recipe 'no-such-recipe'"),
    (["train", "fmnist-natural", "epochz=3"], "did you mean epochs"),
    (["train", "fmnist-natural", "eps=-0.1"], "eps=-0.1 is outside [0, 1]"),
    (["train", "fmnist-natural", "eps=2"], "eps=2.0 is outside [0, 1]"),
    (["train", "fmnist-natural", "epochs=0"], "epochs=0 must be at least 1"),
    (["train", "fmnist-natural", "model.name=resnet81"], "unknown model 'resnet81'"),
    (["train", "fmnist-natural", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "fmnist-natural", *TINY, "batch_size=1000"], "fewer than batch_size=1000"),
    (["train", "fmnist-natural", *TINY, "aug.mixup=0.8", "batch_size=31"], "batch_size=31 is odd: use 30 or 32"),
    (["train", "fmnist-edge", "edge.tau=0"], "edge.tau=0.0 must be positive"),
    (["train", "fmnist-edge", "edge.sigma=-1"], "edge.sigma=-1.0 must be positive"),
    (["train", "fmnist-edge", "edge.teacher=sobel"], "edge.teacher='sobel' is not one of energy, magnitude"),
    (["train", "fmnist-gradnorm", "gradnorm.channel_weights=[1,2,1]"], "has 3 entries but fashion-mnist images have 1"),
    (["train", "fmnist-gradnorm", "gradnorm.channel_weights=green"], "not a valid list of float"),
    (["train", "fmnist-gradnorm-fd", "gradnorm.fd_step=0"], "gradnorm.fd_step=0.0 must be positive"),
    (["train", "fmnist-gradnorm", "gradnorm.input_noise=gauss"], "did you mean gaussian"),
    (["train", "fmnist-gradnorm", "init=/no/such/weights.safetensors"], "init=/no/such/weights.safetensors is neither"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    code, err = run_cli(args + ["--out", str(out)], capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_missing_dataset_says_how_to_get_it(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    code, err = run_cli(["train", "cifar10-prn18-natural", f"data.root={empty}", "--out", str(out)], capsys)
    assert code == 2 and "CIFAR-10 not found" in err and "data.download=true" in err
    assert not out.exists()


def test_existing_run_is_not_overwritten_and_resume_checks_config(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "fmnist-natural", *TINY, "epochs=1", "eval.pgd_steps=0", "--quiet", "--out", str(out)]
    assert run_cli(base)[0] == 0
    before = weights(out)
    listing = sorted(p.name for p in out.rglob("*"))
    code, err = run_cli(base, capsys)
    assert code == 2 and "already holds files" in err
    code, err = run_cli(base + ["lr=0.5", "--resume"], capsys)
    assert code == 2 and "another config" in err and "lr: 0.002 -> 0.5" in err
    assert sorted(p.name for p in out.rglob("*")) == listing
    assert all((before[k] == v).all() for k, v in weights(out).items())
    code, err = run_cli(["train", "fmnist-natural", "--resume", "--out", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "holds no natgrad run" in err


def test_recipes_lists_every_recipe_with_a_line(capsys):
    assert run_cli(["recipes"])[0] == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("fmnist-gradnorm ") for line in lines)
    assert all(len(line.split(None, 1)) == 2 for line in lines)


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "natgrad", "train", "nope"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2 and proc.stderr.startswith("natgrad: error: unknown recipe")


def test_an_unwritable_output_folder_is_refused_before_any_work(tmp_path, capsys):
    afile = tmp_path / "notes.txt"
    afile.write_text("keep")
    code, err = run_cli(["train", "fmnist-natural", *TINY, "--out", str(afile / "run")], capsys)
    assert code == 2 and f"cannot write to {afile}" in err and len(err.strip().splitlines()) == 1
    assert afile.read_text() == "keep"
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        code, err = run_cli(["train", "fmnist-natural", *TINY, "--out", str(locked / "run")], capsys)
        assert code == 2 and f"cannot write to {locked}" in err and not (locked / "run").exists()
    if not os.access("/sys", os.W_OK):  # a read-only file system, for root too
        code, err = run_cli(["train", "fmnist-natural", *TINY, "--out", "/sys/natgrad-run"], capsys)
        assert code == 2 and "cannot write to /sys" in err
