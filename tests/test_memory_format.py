"""model.channels_last: the same function and the same training step in NHWC memory order."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import STEP_MODELS, step_model
from natgrad import config, models, objectives
from natgrad.build import build_model
from natgrad.engine import bench
from natgrad.engine.checkpoint import load_weights, save_weights
from natgrad.errors import UserError

CASES = {"natural": {}, "gradnorm": {"eps": 0.1}, "gradnorm-fd": {"eps": 0.1}, "edge": {"student": "class"},
         "pgd": {"eps": 0.1, "steps": 2, "step_size": 0.05}}


def _step(method: str, model: models.Classifier, x: torch.Tensor, y: torch.Tensor
          ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(1)  # the same random start (pgd) and sampled classes (edge)
    loss = objectives.create(method, model, **CASES[method])(x, y)["loss"]
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


@pytest.mark.parametrize("model_name", list(STEP_MODELS))
@pytest.mark.parametrize("method", list(CASES))
def test_channels_last_step_equals_contiguous(method, model_name):
    nchw, x, y = step_model(model_name)
    nhwc = copy.deepcopy(nchw).memory_format(channels_last=True)
    kernels = _kernels(nhwc)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
    assert any(not p.is_contiguous() for p in kernels)  # (a 1-channel kernel is contiguous either way)
    loss_a, grads_a = _step(method, nchw, x, y)
    loss_b, grads_b = _step(method, nhwc, x, y)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-4 * ga.abs().max().item() + 1e-8)
    for key, value in nchw.state_dict().items():  # train-mode BatchNorm moved its statistics the same way
        torch.testing.assert_close(nhwc.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def _kernels(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.dim() == 4]


def test_config_key_builds_channels_last_and_checkpoints_load_either_way(tmp_path):
    cfg = config.load("fmnist-gradnorm", ["model.channels_last=true"])
    torch.manual_seed(0)
    nhwc = build_model(cfg)
    assert nhwc.channels_last
    assert not _kernels(nhwc)[-1].is_contiguous()
    save_weights(nhwc, tmp_path / "w.safetensors")
    nchw = build_model(config.load("fmnist-gradnorm"))
    load_weights(nchw, tmp_path / "w.safetensors")
    assert _kernels(nchw)[-1].is_contiguous()
    back = build_model(cfg)
    load_weights(back, tmp_path / "w.safetensors")
    assert _kernels(back)[-1].is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        want = nhwc.eval()(x)
        torch.testing.assert_close(nchw.eval()(x), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(back.eval()(x), want, rtol=0, atol=0)


def test_bench_layout_suffix_runs_the_method_channels_last():
    assert bench.parse_methods("gradnorm,gradnorm-nhwc,pgd-paper-nhwc") == ["gradnorm", "gradnorm-nhwc",
                                                                           "pgd-paper-nhwc"]
    with pytest.raises(UserError, match="unknown method 'gradnrom-nhwc'.*-nhwc"):
        bench.parse_methods("gradnrom-nhwc")
    cfg = bench.bench_config(bench.BenchSettings())
    paper = bench.method_config(cfg, "pgd-paper-nhwc")
    assert paper.method == "pgd" and paper.attack.form == "code" and paper.model.channels_last
    assert not bench.method_config(cfg, "pgd-paper").model.channels_last
    model = build_model(cfg, channels=1, input_size=28)
    steps = bench.build_steps(cfg, ["gradnorm", "gradnorm-nhwc"], model, torch.device("cpu"))
    assert not steps["gradnorm"].model.channels_last and steps["gradnorm-nhwc"].model.channels_last
    out = bench.run_bench(bench.BenchSettings(methods=["natural", "natural-nhwc"], batch=4, steps=1, warmup=0,
                                              device="cpu", progress=False))
    assert out["channels_last"] is False and list(out["methods"]) == ["natural", "natural-nhwc"]
    assert out["methods"]["natural-nhwc"]["flops"] == out["methods"]["natural"]["flops"]
