"""The optimizer training builds: timm's, with PyTorch's fused update where it has one (``optim.fused``)."""

import pytest
import torch

from natgrad import config, models
from natgrad.build import build_optimizer, has_fused
from natgrad.errors import UserError


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.create("cnn-small", 10, 1)


def test_fused_only_where_pytorch_has_it():
    assert has_fused("adamw") and has_fused("AdamW") and has_fused("sgd")
    assert not has_fused("lamb") and not has_fused("adamwlegacy")  # timm's own implementations
    assert not has_fused("fusedadamw")  # apex's, imported on use: not a PyTorch class with ``fused``


@pytest.mark.parametrize(("overrides", "fused"), [([], True), (["optim.fused=false"], None),
                                                  (["optim.name=sgd"], True), (["optim.name=lamb"], None)])
def test_build_optimizer_asks_for_the_fused_update(overrides, fused):
    cfg = config.load("fmnist-gradnorm", overrides)
    optimizer = build_optimizer(cfg, _model())
    assert optimizer.param_groups[0].get("fused") == fused
    assert type(optimizer).__name__.lower() == cfg.optim.name


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_fused_update_equals_the_per_tensor_loop(name):
    """Five steps of the same gradients move the weights alike, to float32 rounding."""
    cfgs = [config.load("fmnist-gradnorm", [f"optim.name={name}", f"optim.fused={f}"]) for f in ("true", "false")]
    nets = [_model(), _model()]
    optimizers = [build_optimizer(c, n) for c, n in zip(cfgs, nets)]
    torch.manual_seed(1)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in nets[0].parameters()]
        for net, optimizer in zip(nets, optimizers):
            for p, g in zip(net.parameters(), grads):
                p.grad = g.clone()
            optimizer.step()
    moved = False
    for a, b, start in zip(nets[0].parameters(), nets[1].parameters(), _model().parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        moved |= not torch.equal(a, start)
    assert moved


def test_fused_is_a_boolean_key():
    with pytest.raises(UserError, match="optim.fused=.* give true or false"):
        config.load("fmnist-gradnorm", ["optim.fused=sometimes"])
