"""torchrun: `natgrad analyze` in two gloo processes writes the analysis.json of one process."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import TINY, run_cli

TIMING_KEYS = ("seconds", "time", "elapsed")  # none is written today; excluded should one be added


def _same(a, b, where="analysis.json"):
    """Equal JSON, floats within 1e-6 relative: the processes gather every per-image value and every batch's
    total and reduce them in the one-process order, so no summation order differs; the tolerance is only for
    the kernels of two process trees (threads, allocation) rounding differently."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = {k for k in a.keys() | b.keys() if not any(t in k for t in TIMING_KEYS)}
        assert {k for k in a if k in keys} == {k for k in b if k in keys}, f"{where}: keys differ"
        for k in sorted(keys):
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{where}: {len(a)} != {len(b)} entries"
        for i, (u, v) in enumerate(zip(a, b)):
            _same(u, v, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, int | float) and isinstance(b, int | float), f"{where}: {a!r} != {b!r}"
        assert a == pytest.approx(b, rel=1e-6, abs=1e-12) or (math.isnan(a) and math.isnan(b)), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_two_process_analyze_matches_one_process(tmp_path):
    """21 images in batches of 8 (8 + 8 + 5): rank 0 takes global batches 0 and 2, rank 1 batch 1; the pictures
    (the first 8) are rank 0's, the scatter images (the first 3) come from batch 0."""
    run = tmp_path / "run"
    assert run_cli(["train", "fmnist-natural", *TINY, "epochs=1", "model.name=cnn-small", "--out", str(run),
                    "--quiet"])[0] == 0
    # --num-images, not --n: torchrun's parser would take --n for an (ambiguous) abbreviation of its own options
    args = [str(run), "--num-images", "21", "--batch-size", "8", "--power-iterations", "2", "--quiet"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the torchrun processes below
    try:
        assert run_cli(["analyze", *args, "--out", str(tmp_path / "one")])[0] == 0
    finally:
        torch.set_num_threads(threads)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "natgrad", "analyze", *args, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("natgrad: analysis in") == 1, "only rank 0 reports"
    one = json.loads((tmp_path / "one" / "analysis.json").read_text())
    two = json.loads((tmp_path / "two" / "analysis.json").read_text())
    assert one["n"] == two["n"] == 21 and two["gradients"]["n"] == 21 and two["pictures"]["n"] == 8
    _same(one, two)
    # the figures of particular images (the first 8, the first 3 of the scatter plots) show the same images
    for name in ("pictures.png", "edges.png"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    figures = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert figures == sorted(["analysis.json", *two["figures"].values()]) and len(two["figures"]) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "run", "two"], "no second set, no leftovers"
