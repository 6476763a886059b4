"""compile=true: the compiled steps give the eager steps' loss and parameter gradients.

The fast tests compile with the ``aot_eager`` backend and ``fullgraph=True`` (one graph, no breaks): Dynamo
and AOTAutograd trace ``torch.func.grad`` and differentiate the traced graph as Inductor would take it,
without generating C++ (minutes per model on this CPU). The slow test runs Inductor itself.
"""

from __future__ import annotations

import functools

import pytest
import torch

from natgrad import models, objectives
from natgrad.errors import UserError

CASES = {
    "gradnorm": {"eps": 0.1},
    "edge": {"student": "loss"},
    "edge-class": {"student": "class"},
    "gradnorm-fd": {"eps": 0.1},
    "pgd": {"eps": 0.1, "steps": 2},
    "natural": {},
}
MODELS = {"cnn-small": (1, 28), "resnet10t": (3, 32)}  # natgrad's net and a timm model (BatchNorm, eval mode)


def _step(objective: objectives.Objective, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int
          ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same sampled classes for edge's class student
    loss = objective(x, y)["loss"]
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _compare(name: str, model_name: str) -> None:
    channels, size = MODELS[model_name]
    torch.manual_seed(0)
    model = models.create(model_name, 10, channels, train_mode="eval")
    x, y = torch.rand(4, channels, size, size), torch.randint(0, 10, (4,))
    method = name.split("-class")[0]
    eager = objectives.create(method, model, **CASES[name])
    compiled = objectives.create(method, model, compile=True, **CASES[name])
    for seed in (1, 2):  # the second call runs the cached graph
        loss_e, grads_e = _step(eager, model, x, y, seed)
        loss_c, grads_c = _step(compiled, model, x, y, seed)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        for ge, gc in zip(grads_e, grads_c, strict=True):
            torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-5 * ge.abs().max().item() + 1e-8)


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager", fullgraph=True))
    torch._dynamo.reset()


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("name", ["gradnorm", "edge", "edge-class"])
def test_compiled_input_gradient_losses_equal_eager(aot_eager, name, model_name):
    _compare(name, model_name)


@pytest.mark.parametrize("name", ["gradnorm-fd", "pgd", "natural"])
def test_compiled_models_equal_eager(aot_eager, name):
    _compare(name, "cnn-small")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gradnorm", "edge"])
def test_inductor_equals_eager(name):
    torch._dynamo.reset()
    _compare(name, "cnn-small")


def test_bench_compiled_counts_the_eager_passes(aot_eager):
    from natgrad.engine import bench

    settings = bench.BenchSettings(methods=["gradnorm", "pgd-paper"], batch=2, steps=1, warmup=0, progress=False)
    eager = bench.run_bench(settings)
    compiled = bench.run_bench(bench.BenchSettings(**{**settings.__dict__, "compile": True}))
    assert compiled["compile"] is True and eager["compile"] is False
    for name in ("gradnorm", "pgd-paper"):
        assert compiled["methods"][name]["passes"] == eager["methods"][name]["passes"]
        assert compiled["methods"][name]["flops"] == eager["methods"][name]["flops"]
    assert "compiled" in bench.format_bench(compiled)


@pytest.mark.parametrize("method", ["gradnorm", "edge"])
def test_compiled_input_gradient_refuses_train_mode_batchnorm(aot_eager, method):
    model = models.create("resnet10t", 10, 3, train_mode="train")
    objective = objectives.create(method, model, compile=True, **CASES[method])
    with pytest.raises(UserError, match=r"train-mode BatchNorm; use model.train_mode=eval"):
        objective(torch.rand(2, 3, 32, 32), torch.randint(0, 10, (2,)))
    frozen = models.create("resnet10t", 10, 3, train_mode="train", bn_eval=True)
    objectives.create(method, frozen, compile=True, **CASES[method])(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))
