"""torchrun: two gloo processes give the weights of one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest

from conftest import TINY, assert_same_weights, run_cli, weights


@pytest.mark.parametrize("split", [[], ["batch_size=31", "accum_steps=2"]], ids=["even", "uneven-accumulated"])
def test_two_process_gloo_matches_single_process(tmp_path, split):
    """Also a global batch of 31 in shares of 16 and 15, each in 2 micro-batches (8 + 8, 8 + 7)."""
    # cnn-small has no BatchNorm, so per-process batch statistics cannot differ.
    args = ["fmnist-gradnorm", *TINY, "epochs=1", "data.limit_eval=63", "model.name=cnn-small", "--quiet", *split]
    assert run_cli(["train", *[a for a in args if not a.startswith("accum_steps")], "--out",
                    str(tmp_path / "one")])[0] == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "natgrad", "train", *args, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"), atol=1e-5)
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["world_size"] == 2
    assert one["eval_n"] == two["eval_n"] == 63, "evaluation counts every image once, no padding"
    assert abs(one["clean_acc"] - two["clean_acc"]) <= 1 / 63
