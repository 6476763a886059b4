"""torchrun on DistributedDataParallel (gloo): two processes, or two localhost "nodes", give the weights of one
process with the same global batch, for every objective; a run resumes on another number of processes.

Run as a script (``torchrun ... tests/test_distributed.py OUT JSON``), this file trains each ``[name, args]`` of
the JSON list into ``OUT/name`` in one process group, so that the processes start once for all objectives.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, assert_same_weights, run_cli, weights

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# cnn-small has no BatchNorm, so per-process batch statistics cannot differ. The randomness of an objective
# (FGSM's and PGD's random start, GradNorm's noisy inputs, edge's sampled class) is drawn per process, so a
# split draws other numbers than one process: these runs use the deterministic forms.
BASE = [*TINY, "epochs=1", "data.limit_eval=63", "model.name=cnn-small", "--quiet"]
OBJECTIVES = {
    "natural": ["fmnist-natural"],
    "gradnorm": ["fmnist-gradnorm"],
    # Adam divides by the gradient's scale and so magnifies the finite difference's float rounding (about 1e-4
    # relative, which depends on the micro-batch): plain SGD keeps the comparison at float tolerance.
    "gradnorm-fd": ["fmnist-gradnorm-fd", "optim.name=sgd", "lr=0.1", "optim.weight_decay=0"],
    "gradnorm-fd-central": ["fmnist-gradnorm-fd", "gradnorm.fd_scheme=central", "optim.name=sgd", "lr=0.1",
                            "optim.weight_decay=0"],
    "gradnorm-pgd-input": ["fmnist-gradnorm", "gradnorm.input_noise=pgd", "attack.random_start=false"],
    "pgd": ["fmnist-pgd"],
    "fgsm": ["fmnist-fgsm", "attack.random_start=false"],
    # the paper form's per-image cosine; the code form's batch-wide rms depends on how the batch is split
    "edge": ["fmnist-edge", "edge.student=loss"],
    "pgd-accumulated": ["fmnist-pgd", "batch_size=31", "accum_steps=2"],
}


def _torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def _one_process(args: list[str], out: Path) -> None:
    """``accum_steps`` only under several processes: one process takes the global batch at once."""
    assert run_cli(["train", *[a for a in args if not a.startswith("accum_steps")], "--out", str(out)])[0] == 0


def test_two_process_ddp_matches_single_process_for_every_objective(tmp_path):
    runs = [[name, [*recipe, *BASE]] for name, recipe in OBJECTIVES.items()]
    proc = _torchrun("--standalone", "--nproc-per-node=2", __file__, str(tmp_path / "two"), json.dumps(runs),
                     timeout=480)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, args in runs:
        _one_process(args, tmp_path / "one" / name)
        assert_same_weights(weights(tmp_path / "one" / name), weights(tmp_path / "two" / name), atol=1e-5)
        two = json.loads((tmp_path / "two" / name / "summary.json").read_text())
        assert two["world_size"] == 2
        assert two["eval_n"] == 63, "evaluation counts every image once, no padding"


@pytest.mark.parametrize("split", [[], ["batch_size=31", "accum_steps=2"]], ids=["even", "uneven-accumulated"])
def test_two_process_gloo_matches_single_process(tmp_path, split):
    """GradNorm through the CLI; also a global batch of 31 in shares of 16 and 15, each in 2 micro-batches
    (8 + 8, 8 + 7), which DDP communicates once per optimizer step."""
    args = ["fmnist-gradnorm", *BASE, *split]
    _one_process(args, tmp_path / "one")
    proc = _torchrun("--standalone", "--nproc-per-node=2", "-m", "natgrad", "train", *args,
                     "--out", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"), atol=1e-5)
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["world_size"] == 2
    assert one["eval_n"] == two["eval_n"] == 63
    assert abs(one["clean_acc"] - two["clean_acc"]) <= 1 / 63


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_localhost_nodes_match_single_process(tmp_path):
    """Two ``torchrun --nnodes=2`` invocations of one process each, as on two machines: the weights of one
    process, and only global rank 0 writes the run folder (each node is given its own --out to check)."""
    args = ["fmnist-gradnorm", *BASE]
    _one_process(args, tmp_path / "one")
    port = _free_port()
    nodes = [subprocess.Popen(
        [*TORCHRUN, "--nnodes=2", f"--node-rank={rank}", "--nproc-per-node=1", "--rdzv-backend=c10d",
         f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=natgrad-test", "-m", "natgrad", "train", *args,
         "--out", str(tmp_path / "two")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        for rank in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-2000:]
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"), atol=1e-5)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 1, "one writer"


def test_run_started_on_two_processes_resumes_on_one(tmp_path):
    """The checkpoint holds the unwrapped module's state and the loop's, whatever the number of processes."""
    args = ["fmnist-gradnorm", *BASE, "epochs=2"]
    _one_process(args, tmp_path / "one")
    proc = _torchrun("--standalone", "--nproc-per-node=2", "-m", "natgrad", "train", *args, "stop_after=1",
                     "--out", str(tmp_path / "split"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=False)
    assert not any(k.startswith("module.") for k in state["model"]), "the unwrapped module's keys"
    assert run_cli(["train", *args, "stop_after=1", "--out", str(tmp_path / "split"), "--resume"])[0] == 0
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "split"), atol=1e-5)
    summary = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert summary["epochs_done"] == 2 and summary["world_size"] == 1


def test_sync_bn_is_refused_where_it_cannot_work(tmp_path):
    """On CPUs (SyncBatchNorm has no CPU kernels) and for a double backward through train-mode BatchNorm."""
    from natgrad import config
    from natgrad.engine.distributed import Context
    from natgrad.engine.train import _check_sync_bn
    from natgrad.errors import UserError

    two_cpus = Context(0, 2, torch.device("cpu"))
    with pytest.raises(UserError, match="needs GPUs"):
        _check_sync_bn(config.load("fmnist-gradnorm", ["model.sync_bn=true"]), two_cpus)
    _check_sync_bn(config.load("fmnist-gradnorm", ["model.sync_bn=true"]), Context(0, 1, torch.device("cpu")))
    two_gpus = Context(0, 2, torch.device("cuda", 0))
    with pytest.raises(UserError, match="no double backward"):
        _check_sync_bn(config.load("fmnist-gradnorm", ["model.sync_bn=true"]), two_gpus)
    _check_sync_bn(config.load("fmnist-gradnorm", ["model.sync_bn=true", "model.train_mode=eval"]), two_gpus)
    _check_sync_bn(config.load("fmnist-pgd", ["model.sync_bn=true"]), two_gpus)


def test_sync_bn_in_one_process_leaves_the_model_as_it_is(tmp_path):
    """One process has the global batch's statistics already: the run equals one without sync_bn."""
    args = ["fmnist-natural", *TINY, "epochs=1", "model.name=preact-resnet18", "data.synthetic_size=64",
            "data.limit_eval=16", "--quiet"]
    assert run_cli(["train", *args, "--out", str(tmp_path / "plain")])[0] == 0
    assert run_cli(["train", *args, "model.sync_bn=true", "--out", str(tmp_path / "sync")])[0] == 0
    assert_same_weights(weights(tmp_path / "plain"), weights(tmp_path / "sync"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SyncBatchNorm runs on GPUs only; NCCL needs 2 of them")
def test_sync_bn_statistics_equal_one_process(tmp_path):
    """Train-mode BatchNorm under 2 NCCL processes with sync_bn: the running statistics of one process."""
    args = ["fmnist-natural", *TINY, "device=cuda", "epochs=1", "model.name=preact-resnet18", "optim.name=sgd",
            "lr=0.01", "data.synthetic_size=128", "--quiet"]
    _one_process(args, tmp_path / "one")
    proc = _torchrun("--standalone", "--nproc-per-node=2", "-m", "natgrad", "train", *args, "model.sync_bn=true",
                     "--out", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in one:
        if "running_" in k:
            torch.testing.assert_close(one[k], two[k], atol=1e-4, rtol=1e-3, msg=f"{k} differs")


def test_the_flat_all_reduce_is_gone():
    from natgrad.engine import distributed

    assert not hasattr(distributed, "all_reduce_gradients")


if __name__ == "__main__":
    from natgrad.cli import main

    out, runs = Path(sys.argv[1]), json.loads(sys.argv[2])
    for name, args in runs:
        code = main(["train", *args, "--out", str(out / name)])
        if code:
            sys.exit(code)
