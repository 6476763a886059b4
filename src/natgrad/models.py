"""Models: any timm model by name plus small built-in nets, always with normalization as the first layer.

Every model takes float NCHW images in [0, 1]; :class:`Normalize` maps them to the
dataset's standardized space inside the model, so attacks and epsilons live in pixel units.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import timm
import torch
from timm.layers import activations as timm_act
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from natgrad.choices import BUILTIN_NETS, TrainMode
from natgrad.errors import UserError, did_you_mean, short

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


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last (NHWC) memory order when it is a batch of images; other tensors as they are."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


class Classifier(nn.Module):
    """``net(normalize(x))``. In training, ``train_mode="eval"`` keeps the whole net in eval mode (BatchNorm
    statistics frozen, dropout and drop-path off: the authors' setting); ``bn_eval`` only its BatchNorm layers.
    ``channels_last`` stores the net's 4-D weights and runs its input in NHWC order (the same function)."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], bn_eval: bool = False,
                 train_mode: TrainMode = "train", channels_last: bool = False):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net
        self.bn_eval = bn_eval
        self.train_mode = train_mode
        self.channels_last = False
        if channels_last:
            self.memory_format(channels_last=True)
        self.train()

    def memory_format(self, channels_last: bool) -> Classifier:
        """Keep the net's 4-D weights, and run its input, in NHWC order (``channels_last``) or in NCHW."""
        self.net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self.channels_last = channels_last
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.normalize(x)
        return self.net(to_channels_last(z) if self.channels_last else z)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.train_mode == "eval":
            self.net.eval()
        elif self.bn_eval:
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
assert tuple(BUILTIN) == BUILTIN_NETS
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


def pretrained_tag(name: str) -> str:
    """``name`` with timm's default pretrained tag when it has none (``resnet50`` -> ``resnet50.a1_in1k``)."""
    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    tag = getattr(cfg, "tag", None) if cfg is not None else None
    return name if "." in name or not tag else f"{name}.{tag}"


def _check_timm_name(name: str) -> None:
    """A timm model name, with a pretrained tag timm knows where one is given."""
    if not timm.is_model(name.split(".")[0]):
        hint = did_you_mean(name, list(BUILTIN) + timm.list_models())
        raise UserError(f"unknown model {short(name)}{hint}; use cnn-small, preact-resnet18 or a name from "
                        "timm.list_models()")
    if "." in name and name not in timm.list_pretrained(name.split(".")[0] + ".*"):
        tags = timm.list_pretrained(name.split(".")[0] + ".*")
        raise UserError(f"timm has no pretrained tag {short(name)}{did_you_mean(name, tags)}; "
                        f"timm.list_pretrained({name.split('.')[0]!r}+'.*') lists them")


def _timm_net(name: str, num_classes: int, in_chans: int, pretrained: bool | str, keep_head: bool = False,
              **kwargs: Any) -> nn.Module:
    """timm's model; ``pretrained`` True loads timm's own weights (its hub), a path loads that checkpoint through
    timm's pretrained-config mechanism (classifier reset for another ``num_classes``, ``in_chans`` adapted)."""
    net = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if pretrained:
        _load_pretrained(net, pretrained, num_classes, in_chans, keep_head)
    return net


def _classifier_keys(cfg: dict[str, Any]) -> list[str]:
    heads = cfg.get("classifier") or ()
    return [f"{h}.{p}" for h in ((heads,) if isinstance(heads, str) else heads) for p in ("weight", "bias")]


def _load_pretrained(net: nn.Module, pretrained: bool | str, num_classes: int, in_chans: int,
                     keep_head: bool = False) -> None:
    """timm's ``load_pretrained`` with the model's own pretrained config (a file's state dict in place of the
    hub's weights, with the classes of the file's classifier) and its family's checkpoint filter.

    Refuses a checkpoint that leaves any weight unloaded but a classifier reset for other classes (and that
    too with ``keep_head``, for evaluation), or holds weights the model lacks (timm only logs those)."""
    cfg: dict[str, Any] = dict(cast(dict, net.pretrained_cfg))
    arch = cfg["architecture"]
    where = f"model.pretrained={pretrained}" if isinstance(pretrained, str) else f"timm's weights of {arch}"

    def refuse(problem: str) -> UserError:
        return UserError(f"{where} does not fit {arch}: {problem}; give a checkpoint of this architecture "
                         "(safetensors or a state dict)")

    if isinstance(pretrained, str):
        try:
            state = timm.models.load_state_dict(pretrained, weights_only=True)
        except (RuntimeError, KeyError, ValueError, OSError, EOFError, pickle.UnpicklingError) as e:
            raise refuse(f"it does not read as weights ({type(e).__name__}: {short(str(e), 120)})") from None
        weight = next((state[k] for k in _classifier_keys(cfg) if k.endswith(".weight") and k in state), None)
        cfg.update(state_dict=state, file=None, source="")
        if weight is not None and weight.ndim >= 1:
            cfg["num_classes"] = int(weight.shape[0])
    reset = set(_classifier_keys(cfg)) if num_classes != cfg.get("num_classes") else set()
    if reset and keep_head:
        raise UserError(f"{where} classifies {cfg.get('num_classes')} classes, the data {num_classes}: its "
                        "classifier would be new and untrained; evaluate it on data with its own classes")
    filter_fn = getattr(sys.modules.get(type(net).__module__), "checkpoint_filter_fn", None)
    results: list[Any] = []
    load = net.load_state_dict

    def recording(state_dict: Any, strict: bool = True, **kw: Any) -> Any:
        results.append(load(state_dict, strict=strict, **kw))
        return results[-1]

    net.load_state_dict = recording  # type: ignore[method-assign,assignment]
    try:
        timm.models.load_pretrained(net, pretrained_cfg=cfg, num_classes=num_classes, in_chans=in_chans,
                                    filter_fn=filter_fn, strict=True)
    except (RuntimeError, KeyError, ValueError, OSError, pickle.UnpicklingError, AssertionError) as e:
        raise refuse(f"{type(e).__name__}: {short(str(e), 160)}") from None
    finally:
        del net.load_state_dict
    missing = [k for k in (results[-1].missing_keys if results else ["everything"]) if k not in reset]
    unexpected = list(results[-1].unexpected_keys) if results else []
    if missing or unexpected:
        keys = missing or unexpected
        listed = ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else "")
        raise refuse(f"the checkpoint lacks {listed}" if missing else f"the checkpoint has weights it lacks: {listed}")


HUB_HOST = "huggingface.co"


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("TIMM_OFFLINE"):
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def check_pretrained(name: str, pretrained: bool | str) -> None:
    """Refuse, before any work, a ``model.pretrained`` that cannot load: a missing file, or timm's weights
    neither in the local cache nor downloadable (no internet)."""
    if not pretrained or name in BUILTIN:
        return
    if isinstance(pretrained, str):
        if not Path(pretrained).is_file():
            raise UserError(f"model.pretrained={short(pretrained)} is not a file; give a checkpoint (safetensors or "
                            "a state dict) or true for timm's own weights")
        return
    _check_timm_name(name)
    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise UserError(f"timm publishes no weights for {short(name)}; choose a tagged name from "
                        f"timm.list_pretrained() or give model.pretrained=PATH")
    hub_file = cfg.hf_hub_filename or "model.safetensors"
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        if any(isinstance(try_to_load_from_cache(cfg.hf_hub_id, f), str)
               for f in (hub_file, "pytorch_model.bin")):
            return
    if _hub_reachable():
        return
    source = f"{hub_file} of hf-hub:{cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url
    raise UserError(f"model.pretrained=true needs timm's weights for {pretrained_tag(name)} ({source}) and "
                    f"{HUB_HOST} cannot be reached; download that file on a machine with internet and give "
                    "model.pretrained=PATH")


def create(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    act: str | None = None,
    bn_eval: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    train_mode: TrainMode = "train",
    pretrained: bool | str = False,
    keep_head: bool = False,
    channels_last: bool = False,
    **kwargs: Any,
) -> Classifier:
    """Create a model that takes [0, 1] images.

    Args:
        name: a built-in net (``cnn-small``, ``preact-resnet18``) or any timm model name, optionally with a
            pretrained tag (``resnet50.a1_in1k``) that selects timm's pretrained config.
        num_classes: output classes.
        in_chans: input channels.
        act: replace every activation module with this one (``relu``, ``gelu``, ``silu``, ...), after
            loading pretrained weights.
        bn_eval: keep BatchNorm layers in eval mode while training.
        mean: per-channel normalization mean (default: timm's pretrained config, or 0.5).
        std: per-channel normalization std (default: timm's pretrained config, or 0.5).
        train_mode: ``eval`` keeps the whole net in eval mode while training.
        pretrained: timm models only: True for timm's published weights, or a checkpoint file's path.
        keep_head: refuse pretrained weights whose classifier would be reset for ``num_classes`` (evaluation).
        channels_last: keep the net's weights and activations in NHWC memory order (faster convolutions on
            some devices; the same function).
        **kwargs: passed to timm.create_model (e.g. ``img_size``, ``drop_path_rate``).
    """
    if name in BUILTIN:
        if pretrained:
            raise UserError(f"{name} is a natgrad net without published weights; model.pretrained is for timm "
                            "models: start from natgrad weights with init=RUN_OR_FILE")
        net = BUILTIN[name](num_classes, in_chans, act_layer(act or BUILTIN_DEFAULT_ACT[name]))
        default_mean, default_std = (0.5,) * in_chans, (0.5,) * in_chans
    else:
        _check_timm_name(name)
        net = _timm_net(name, num_classes, in_chans, pretrained, keep_head, **kwargs)
        cfg = getattr(net, "pretrained_cfg", {}) or {}
        default_mean = tuple(cfg.get("mean", (0.5,) * 3))[:in_chans] if in_chans == 3 else (0.5,) * in_chans
        default_std = tuple(cfg.get("std", (0.5,) * 3))[:in_chans] if in_chans == 3 else (0.5,) * in_chans
        if act:
            replace_activations(net, act)
    mean = tuple(mean) if mean is not None else default_mean
    std = tuple(std) if std is not None else default_std
    if len(mean) != in_chans or len(std) != in_chans:
        raise UserError(f"mean/std have {len(mean)}/{len(std)} values but the model has {in_chans} input channels")
    return Classifier(net, mean, std, bn_eval=bn_eval, train_mode=train_mode, channels_last=channels_last)
