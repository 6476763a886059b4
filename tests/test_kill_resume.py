"""SIGKILL at random moments, resume after each: the end is the uninterrupted run, bit for bit (slow).

The fast tests cover the same behaviour piece by piece: resume from epoch and step checkpoints
(test_train), SIGTERM and SIGINT (test_train), atomic writes (a kill leaves the previous file).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY, assert_same_weights, weights

KILLS = 20
ARGS = ["train", "fmnist-natural", *TINY, "data.synthetic_size=4096", "epochs=4", "method=gradnorm", "ema=true",
        "checkpoint_every=2", "--quiet"]


def _start(out: Path, resume: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "natgrad", *ARGS, "--out", str(out), *(["--resume"] if resume else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def _kill_during_a_checkpoint_write(proc: subprocess.Popen, out: Path, timeout: float) -> bool:
    """Poll for a new temporary file of an atomic write and kill the moment one exists."""
    def temporary() -> set[str]:
        return {str(p) for f in (out,
                                 out / "checkpoints") if f.is_dir() for p in f.iterdir() if p.name.endswith(".tmp")}

    stale = temporary()
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if temporary() - stale:
            proc.kill()
            return True
        time.sleep(0.0005)
    return False


@pytest.mark.slow
def test_twenty_sigkills_then_resume_equal_one_uninterrupted_run(tmp_path):
    ref = tmp_path / "reference"
    proc = _start(ref, resume=False)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()

    out = tmp_path / "killed"
    rng = random.Random(0)
    kills = during_writes = 0
    while kills < KILLS:
        proc = _start(out, resume=(out / "config.yaml").exists())  # a kill may come before the config is written
        if kills % 2:
            during_writes += _kill_during_a_checkpoint_write(proc, out, timeout=rng.uniform(2.0, 8.0))
        else:
            time.sleep(rng.uniform(1.0, 5.0))  # start-up, data, a step, an evaluation or a write
        if proc.poll() is not None:  # finished before the kill: start a new run of the same folder
            assert proc.returncode == 0, proc.stderr.read().decode()
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    proc = _start(out, resume=(out / "config.yaml").exists())
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()

    assert kills == KILLS, f"the run finished after {kills} kills; make it longer"
    assert during_writes >= 3, f"only {during_writes} kills landed during a write"
    for name in ("model.safetensors", "model_ema.safetensors"):
        assert_same_weights(weights(ref, name), weights(out, name))

    def strip(m):
        return {k: v for k, v in m.items() if "seconds" not in k and k not in ("elapsed", "images_per_s")}

    metrics = [[strip(json.loads(line)) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (ref, out)]
    assert metrics[0] == metrics[1]
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == torch.load(ref / "checkpoints" / "last.pt", weights_only=True)["step"]
    summary = json.loads((out / "summary.json").read_text())
    assert not [p for d in (out, out / "checkpoints") for p in d.iterdir() if p.name.endswith(".tmp")]
    (tmp_path / "kills.json").write_text(json.dumps({"kills": kills, "during_writes": during_writes}))
    print(f"\n{kills} SIGKILLs ({during_writes} during a checkpoint or weights write); final step {summary['steps']}, "
          "weights, EMA weights and metrics equal to the uninterrupted run")
