"""`natgrad bench`: counted passes, the JSON contract, real training steps, and bad input."""

import json
import statistics

import numpy as np
import pytest
import torch

from conftest import run_cli
from natgrad.build import build_model
from natgrad.engine import bench

TINY = ["--batch", "4", "--steps", "3", "--warmup", "0", "--quiet"]

# forward, backward, double backward, backward with weight gradients per step; a backward that also runs
# through an earlier backward's graph (double backprop) counts once as a backward and once as a double backward.
PASSES = {
    "natural": (1, 1, 0, 1),
    "gradnorm": (1, 2, 1, 1),  # the input gradient's backward takes no weight gradients
    "gradnorm-fd": (2, 2, 0, 2),
    "pgd": (4, 4, 0, 1),  # PGD-3: three attack steps (input gradients only), then the training step
    # the authors' PGD-3: weight gradients at every attack step, one more forward to pick the strongest iterate
    "pgd-paper": (5, 4, 0, 4),
    "fgsm": (2, 2, 0, 1),
    "edge": (1, 2, 1, 1),
    "gradnorm-fd-amp": (2, 2, 0, 2),
    "gradnorm-fd-central": (3, 3, 0, 2),  # the pass at x takes the input gradient only
    "gradnorm-autograd": (1, 2, 1, 1),
}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    assert run_cli(["bench", *TINY, "--json", str(path)])[0] == 0
    return json.loads(path.read_text())


def test_passes_are_counted(result):
    for method, (f, b, d, w) in PASSES.items():
        assert result["methods"][method]["passes"] == {"forward": f, "backward": b, "double_backward": d,
                                                       "weight_gradients": w}, method


def test_json_holds_the_contract(result):
    assert set(result["methods"]) == set(bench.METHODS)
    assert result["model"] == "cnn-small" and result["input_size"] == 28 and result["batch"] == 4
    assert result["device"] == "cpu" and result["steps"] == 3 and result["pgd_steps"] == 3
    assert isinstance(result["threads"], int) and result["torch"] == torch.__version__
    for m in result["methods"].values():
        assert {"seconds_per_step", "passes", "peak_memory_bytes", "relative_to_pgd", "seconds_all"} <= set(m)
        assert len(m["seconds_all"]) == 3 and all(s > 0 for s in m["seconds_all"])
        assert m["seconds_per_step"] == statistics.median(m["seconds_all"])
        assert m["relative_to_pgd"] == m["seconds_per_step"] / result["methods"]["pgd"]["seconds_per_step"]
        assert m["relative_to_pgd_paper"] == m["seconds_per_step"] / result["methods"]["pgd-paper"]["seconds_per_step"]
        assert m["peak_memory_bytes"] is None or m["peak_memory_bytes"] >= 0
    assert result["methods"]["pgd"]["relative_to_pgd"] == 1.0
    pgd_all = np.array(result["methods"]["pgd"]["seconds_all"])
    for m in result["methods"].values():  # the quartiles of the per-round ratio (rounds interleave the methods)
        ratios = np.array(m["seconds_all"]) / pgd_all
        np.testing.assert_allclose(m["relative_to_pgd_iqr"], np.percentile(ratios, [25, 75], method="weibull"))
    assert result["methods"]["pgd"]["relative_to_pgd_iqr"] == [1.0, 1.0]
    flops = {name: m["flops"] for name, m in result["methods"].items()}
    for name, m in result["methods"].items():
        assert m["flops_relative_to_pgd"] == flops[name] / flops["pgd"]
    # natural F+B < FGSM 2F+2B < double backprop < PGD-3 4F+4B, on the same model and batch
    assert 0 < flops["natural"] < flops["fgsm"] < flops["gradnorm"] < flops["pgd"] < flops["pgd-paper"]


def test_flops_are_counted_against_the_formula():
    n, i, o = 5, 7, 3
    layer = torch.nn.Linear(i, o, bias=False)
    x = torch.rand(n, i, requires_grad=True)
    with bench.CountFlops() as counter:
        out = layer(x)
    assert counter.total == 2 * n * i * o  # one multiply and one add per weight and image
    with bench.CountFlops() as counter:
        out.sum().backward()  # the input's and the weight's gradient: two more products
    assert counter.total == 2 * 2 * n * i * o
    with bench.CountFlops() as counter:
        (grad,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
        # double backprop: forward, input gradient, then back to the weight through the input
        # gradient's graph (two products) and through the forward's (one, the weight's only)
        torch.autograd.grad(grad.abs().sum(), layer.weight)
    assert counter.total == 5 * 2 * n * i * o


def test_no_ratio_without_pgd_and_the_table(capsys):
    out = bench.run_bench(bench.BenchSettings(methods=["natural"], batch=2, steps=1, warmup=0, progress=False))
    assert list(out["methods"]) == ["natural"] and out["methods"]["natural"]["relative_to_pgd"] is None
    table = bench.format_bench(out)
    assert "natural" in table and "1F+1B" in table


def test_every_method_really_trains():
    cfg = bench.bench_config(bench.BenchSettings())
    torch.manual_seed(0)
    model = build_model(cfg, channels=1, input_size=28)
    initial = [p.detach().clone() for p in model.parameters()]
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    for method, step in bench.build_steps(cfg, bench.METHODS, model, torch.device("cpu")).items():
        fresh = all(torch.equal(a, p) for a, p in zip(initial, step.model.parameters(), strict=True))
        assert fresh, f"{method}: not a fresh copy"
        step(x, y)
        changed = [not torch.equal(a, p) for a, p in zip(initial, step.model.parameters(), strict=True)]
        assert all(changed), f"{method}: a step left parameters unchanged"
        assert all(p.grad is None for p in step.model.parameters()), f"{method}: gradients left after the step"
    unchanged = all(torch.equal(a, p) for a, p in zip(initial, model.parameters(), strict=True))
    assert unchanged, "the shared initial model changed"


def test_steps_run_past_every_warmup():
    cfg = bench.bench_config(bench.BenchSettings(recipe="fmnist-gradnorm-fd"))
    assert cfg.gradnorm.warmup_epochs == 1 and bench.steady_epoch_fraction(cfg) == 1.0


@pytest.mark.parametrize("args,message", [
    (["--methods", "natural,pgd5"], "unknown method 'pgd5' (did you mean pgd?); choose from natural, gradnorm"),
    (["--methods", ","], "--methods is empty"),
    (["--model", "resnet81"], "unknown model 'resnet81'"),
    (["--input-size", "32"], "cnn-small does not take 1x32x32 images"),
    (["--steps", "0"], "--steps 0 must be at least 1"),
    (["--batch", "0"], "--batch 0 must be at least 1"),
    (["--warmup", "-1"], "--warmup -1 must be at least 0"),
    (["epz=0.1"], "unknown config key 'epz'"),
    (["--recipe", "no-such-recipe"], "unknown recipe 'no-such-recipe'"),
])
def test_bad_input_exits_2_with_one_line(capsys, args, message):
    code, err = run_cli(["bench", *TINY, *args], capsys)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
