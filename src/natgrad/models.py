"""Models: any timm model by name plus small built-in nets, always with normalization as the first layer.

Every model takes float NCHW images in [0, 1]; :class:`Normalize` maps them to the
dataset's standardized space inside the model, so attacks and epsilons live in pixel units.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import timm
import torch
from timm.layers import activations as timm_act
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from natgrad.errors import UserError, did_you_mean

# Activation modules that ``act=`` replaces: torch's and timm's ReLU, GELU and SiLU families.
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.ELU, nn.CELU, nn.SELU, nn.Softplus,
    timm_act.GELU, timm_act.GELUTanh, timm_act.QuickGELU, timm_act.Swish, timm_act.Mish, timm_act.HardSwish,
    timm_act.HardMish, timm_act.PReLU,
)


class Normalize(nn.Module):
    """(x - mean) / std with per-channel statistics; the first layer of every natgrad model."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """``net(normalize(x))``; with ``bn_eval`` its BatchNorm layers stay in eval mode in training."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], bn_eval: bool = False):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net
        self.bn_eval = bn_eval
        self.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.bn_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self


# ---------------------------------------------------------------------------- built-in nets


def cnn_small(num_classes: int, in_chans: int, act_layer: Callable[[], nn.Module] = nn.GELU, **_: object) -> nn.Module:
    """A 3-conv net for 28x28 inputs.

    Strided convolutions instead of pooling, and a strided first layer, keep the activations that
    double backprop runs over small: a stride-1 first layer made every method about 1.7x slower and
    GradNorm about as slow as PGD-3 (docs/RESULTS.md, issue 6).
    """
    return nn.Sequential(
        nn.Conv2d(in_chans, 32, 3, stride=2, padding=1), act_layer(),
        nn.Conv2d(32, 64, 3, padding=1), act_layer(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1), act_layer(),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128), act_layer(),
        nn.Linear(128, num_classes),
    )


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016, "Identity mappings in deep residual networks")."""

    def __init__(self, cin: int, cout: int, stride: int, act_layer: Callable[[], nn.Module]):
        super().__init__()
        self.bn1, self.act1 = nn.BatchNorm2d(cin), act_layer()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.act2 = nn.BatchNorm2d(cout), act_layer()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.act2(self.bn2(out)))
        return out + skip


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 for 32x32 inputs, the paper's CIFAR-10 network (Appendix F)."""

    def __init__(self, num_classes: int, in_chans: int, act_layer: Callable[[], nn.Module] = nn.ReLU, **_: object):
        super().__init__()
        self.stem = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [PreActBlock(cin, cout, stride, act_layer), PreActBlock(cout, cout, 1, act_layer)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn, self.act = nn.BatchNorm2d(512), act_layer()
        self.head = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn(self.layers(self.stem(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


BUILTIN: dict[str, Callable[..., nn.Module]] = {
    "cnn-small": cnn_small,
    "preact-resnet18": PreActResNet18,
}
BUILTIN_DEFAULT_ACT = {"cnn-small": "gelu", "preact-resnet18": "relu"}


# ---------------------------------------------------------------------------- activations


def act_layer(name: str) -> type[nn.Module]:
    """The activation class timm registers under ``name`` (relu, gelu, silu, gelu_tanh, ...)."""
    try:
        layer = timm.layers.get_act_layer(name)
    except Exception:
        layer = None
    if layer is None:
        raise UserError(f"unknown activation {name!r}; use one of relu, gelu, silu, gelu_tanh, mish, softplus, elu")
    return layer


def replace_activations(model: nn.Module, act: str) -> int:
    """Replace every activation module of ``model`` by a fresh ``act``; returns how many were replaced."""
    new = act_layer(act)
    count = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, ACTIVATION_TYPES):
                setattr(parent, child_name, new())
                count += 1
    return count


# ---------------------------------------------------------------------------- factory


def takes_img_size(name: str) -> bool:
    """Whether a timm model fixes its input size when built (vision transformers), per its pretrained config."""
    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    return bool(cfg is not None and cfg.fixed_input_size)


def create(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    act: str | None = None,
    bn_eval: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> Classifier:
    """Create a model that takes [0, 1] images.

    Args:
        name: a built-in net (``cnn-small``, ``preact-resnet18``) or any timm model name.
        num_classes: output classes.
        in_chans: input channels.
        act: replace every activation module with this one (``relu``, ``gelu``, ``silu``, ...).
        bn_eval: keep BatchNorm layers in eval mode while training.
        mean: per-channel normalization mean (default: timm's pretrained config, or 0.5).
        std: per-channel normalization std (default: timm's pretrained config, or 0.5).
        **kwargs: passed to timm.create_model (e.g. ``img_size``, ``drop_path_rate``).
    """
    if name in BUILTIN:
        net = BUILTIN[name](num_classes, in_chans, act_layer(act or BUILTIN_DEFAULT_ACT[name]))
        default_mean, default_std = (0.5,) * in_chans, (0.5,) * in_chans
    else:
        if not timm.is_model(name):
            hint = did_you_mean(name, list(BUILTIN) + timm.list_models())
            raise UserError(f"unknown model {name!r}{hint}; use cnn-small, preact-resnet18 or a name from "
                            f"timm.list_models()")
        net = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
        cfg = getattr(net, "pretrained_cfg", {}) or {}
        default_mean = tuple(cfg.get("mean", (0.5,) * 3))[:in_chans] if in_chans == 3 else (0.5,) * in_chans
        default_std = tuple(cfg.get("std", (0.5,) * 3))[:in_chans] if in_chans == 3 else (0.5,) * in_chans
        if act:
            replace_activations(net, act)
    mean = tuple(mean) if mean is not None else default_mean
    std = tuple(std) if std is not None else default_std
    if len(mean) != in_chans or len(std) != in_chans:
        raise UserError(f"mean/std have {len(mean)}/{len(std)} values but the model has {in_chans} input channels")
    return Classifier(net, mean, std, bn_eval=bn_eval)
