"""Everything a run is built from its config: device, seeds, model, objective, optimizer, schedule.

Training, the benchmark and model loading for evaluation all build through these functions, so a
model is made one way everywhere.
"""

from __future__ import annotations

import dataclasses
import inspect
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from timm.optim import create_optimizer_v2, get_optimizer_info
from timm.scheduler import CosineLRScheduler
from torch import nn

from natgrad import models, objectives
from natgrad.choices import DEVICES, TrainMode
from natgrad.config import RunConfig
from natgrad.datainfo import info
from natgrad.digest import model_digest
from natgrad.engine.checkpoint import load_weights
from natgrad.errors import UserError


def select_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` (a GPU when one is visible), ``cpu`` or ``cuda``; under torchrun each local rank its own GPU."""
    if name not in DEVICES:
        raise UserError(f"device={name!r} is not one of {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA GPU is visible; use device=cpu or device=auto")
    use_cuda = name == "cuda" or (name == "auto" and torch.cuda.is_available())
    return torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def build_model(cfg: RunConfig, channels: int | None = None, input_size: int | None = None,
                pretrained: bool = False, keep_head: bool = False) -> models.Classifier:
    """The configured model with the dataset's classes and normalization inside.

    Args:
        channels: input channels when they differ from the dataset's (the benchmark's shapes); the
            normalization is then the identity.
        input_size: the image size a vision transformer is built for (convolutional nets take any size).
        pretrained: load ``model.pretrained``'s weights (a fresh run without ``init``); otherwise the weights are
            random (to be overwritten by a checkpoint). With ``model.pretrained`` set, the normalization is
            always the pretrained config's, so both builds are the same model.
        keep_head: refuse pretrained weights whose classifier the data's classes would reset (evaluation).
    """
    m = cfg.model
    di = info(cfg.data)
    channels = di.in_chans if channels is None else channels
    own_stats = channels == di.in_chans and not m.pretrained
    kwargs: dict[str, Any] = {}
    if m.name not in models.BUILTIN:
        kwargs = {"drop_rate": m.drop, "drop_path_rate": m.drop_path}
        if input_size is not None and models.takes_img_size(m.name):
            kwargs["img_size"] = input_size
    return models.create(m.name, di.num_classes, channels, act=m.act, bn_eval=m.bn_eval,
                         train_mode=cast(TrainMode, m.train_mode), channels_last=m.channels_last,
                         mean=di.mean if own_stats else None, std=di.std if own_stats else None,
                         pretrained=m.pretrained if pretrained else False, keep_head=keep_head, **kwargs)


def _gradnorm_params(cfg: RunConfig) -> dict[str, Any]:
    g, a = cfg.gradnorm, cfg.attack
    params = {"eps": cfg.eps, "penalty_eps": g.eps, "ce_weight": g.ce_weight, "gn_weight": g.gn_weight,
              "warmup_epochs": g.warmup_epochs,
              "norm": g.norm, "channel_weights": g.channel_weights, "input_noise": g.input_noise,
              "noise_std": g.noise_std, "attack_steps": a.steps, "attack_step_size": a.step_size,
              "attack_random_start": a.random_start}
    if cfg.method == "gradnorm":
        return {**params, "double_backward": cfg.double_backward}
    return {**params, "fd_step": g.fd_step, "fd_scheme": g.fd_scheme, "fd_precision": g.fd_precision}


def _attack_params(cfg: RunConfig) -> dict[str, Any]:
    a = cfg.attack
    params = {"eps": cfg.eps, "step_size": a.step_size, "warmup_epochs": a.warmup_epochs}
    if a.random_start is not None:
        params["random_start"] = a.random_start
    return params if cfg.method == "fgsm" else {**params, "steps": a.steps, "form": a.form}


_PARAMS = {
    "natural": lambda cfg: {},
    "gradnorm": _gradnorm_params,
    "gradnorm-fd": _gradnorm_params,
    "pgd": _attack_params,
    "fgsm": _attack_params,
    "edge": lambda cfg: {**dataclasses.asdict(cfg.edge), "double_backward": cfg.double_backward},
}


def objective_params(cfg: RunConfig) -> dict[str, Any]:
    """The parameters ``objectives.create`` takes for the configured method."""
    return _PARAMS[cfg.method](cfg)


def build_objective(cfg: RunConfig, model: nn.Module) -> objectives.Objective:
    """The configured training objective on ``model``."""
    return objectives.create(cfg.method, model, compile=cfg.compile, **objective_params(cfg))


def has_fused(name: str) -> bool:
    """Whether timm's optimizer ``name`` is a PyTorch optimizer with a fused implementation (one kernel
    updates every parameter; the same update as the per-tensor loop, to float rounding)."""
    cls = get_optimizer_info(name).opt_class  # a string for the ones imported on use (apex, bitsandbytes)
    return isinstance(cls, type) and "fused" in inspect.signature(cls).parameters


def build_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """timm's optimizer as configured (``optim.name``, lr, weight decay, eps, momentum), fused where
    ``optim.fused`` asks for it and the optimizer has a fused form. Build it after the model is on its device."""
    o = cfg.optim
    kwargs: dict[str, Any] = {"fused": True} if o.fused and has_fused(o.name) else {}
    return create_optimizer_v2(model, opt=o.name, lr=cfg.lr, weight_decay=o.weight_decay, eps=o.opt_eps,
                               momentum=o.momentum, **kwargs)


def build_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> CosineLRScheduler | None:
    """timm's per-iteration cosine schedule with warmup, or None for a constant lr."""
    o = cfg.optim
    if o.sched != "cosine":
        return None
    return CosineLRScheduler(optimizer, t_initial=cfg.epochs * steps_per_epoch, lr_min=o.min_lr,
                             warmup_t=round(o.warmup_epochs * steps_per_epoch), warmup_lr_init=o.warmup_lr,
                             warmup_prefix=True, t_in_epochs=False)


@dataclass
class LoadedModel:
    """A trained model ready for evaluation, with where its weights came from."""

    cfg: RunConfig
    model: nn.Module
    weights: Path
    name: str
    sha256: str  # of the loaded weights and buffers (digest.model_digest)


def load_trained(cfg: RunConfig, weights: Path, name: str, device: torch.device | str = "cpu") -> LoadedModel:
    """The model of ``cfg`` with the safetensors ``weights``, in eval mode on ``device``."""
    model = build_model(cfg)
    load_weights(model, weights)
    return LoadedModel(cfg, model.to(device).eval(), weights, name, model_digest(model))
