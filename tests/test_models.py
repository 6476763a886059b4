"""Model factory: activation replacement, normalization as the first layer, bn_eval."""

import pytest
import torch
from torch import nn

from natgrad import models
from natgrad.errors import UserError


def _types(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules()}


@pytest.mark.parametrize("name,kwargs,old,new", [
    ("resnet18", {}, nn.ReLU, "gelu"),
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}, nn.GELU, "silu"),
    ("cnn-small", {}, None, "silu"),
    ("preact-resnet18", {}, nn.ReLU, "gelu"),
])
def test_act_replaces_every_activation(name, kwargs, old, new):
    before = models.create(name, 10, **kwargs)
    old = old or type(next(m for m in before.modules() if isinstance(m, models.ACTIVATION_TYPES)))
    assert old in _types(before)
    model = models.create(name, 10, act=new, **kwargs)
    new_type = models.act_layer(new)
    acts = [m for m in model.modules() if isinstance(m, models.ACTIVATION_TYPES)]
    assert acts and all(type(m) is new_type for m in acts)
    assert old not in _types(model) or old is new_type


def test_normalization_is_applied_exactly_once():
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    model = models.create("resnet18", 10, mean=mean, std=std).eval()
    calls = []
    model.normalize.register_forward_hook(lambda *a: calls.append(1))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        expected = model.net((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    assert len(calls) == 1
    torch.testing.assert_close(out, expected)
    assert not any(isinstance(m, models.Normalize) for m in model.net.modules()), "no second normalization inside"


def test_timm_model_has_no_internal_normalization_and_default_stats():
    model = models.create("resnet18", 10)
    torch.testing.assert_close(model.normalize.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    torch.testing.assert_close(model.normalize.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))


def test_bn_eval_keeps_batchnorm_in_eval_mode():
    model = models.create("preact-resnet18", 10, bn_eval=True).train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert model.training and bns and not any(m.training for m in bns)
    before = bns[0].running_mean.clone()
    model(torch.rand(4, 3, 32, 32))
    assert torch.equal(bns[0].running_mean, before)
    plain = models.create("preact-resnet18", 10).train()
    assert all(m.training for m in plain.modules() if isinstance(m, nn.BatchNorm2d))


def test_builtin_shapes():
    assert models.create("cnn-small", 10, in_chans=1)(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert models.create("preact-resnet18", 7)(torch.rand(2, 3, 32, 32)).shape == (2, 7)


def test_unknown_model_and_activation():
    with pytest.raises(UserError, match="did you mean"):
        models.create("resnet81", 10)
    with pytest.raises(UserError, match="unknown activation"):
        models.create("cnn-small", 10, act="sigmoidish")
