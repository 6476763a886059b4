"""Run configuration: dataclasses, named recipes, ``key=value`` overrides and validation.

A recipe is a YAML file shaped like :class:`RunConfig` (nested sections as mappings).
It may name another recipe under ``inherit:`` and change only what differs.
Everything is checked before any work starts; problems raise :class:`UserError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import fractions
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from natgrad.errors import UserError, check_choice, did_you_mean
from natgrad.objectives.edge import COSINES, STUDENTS, TEACHERS
from natgrad.objectives.gradnorm import NOISES, NORMS

METHODS = ("natural", "gradnorm", "gradnorm-fd", "pgd", "fgsm", "edge")
DATASETS = ("fashion-mnist", "cifar10", "imagenet", "synthetic")


@dataclass
class DataConfig:
    """Which images to train and evaluate on."""

    name: str = "fashion-mnist"
    root: str | None = None  # folder holding the data; see natgrad.data for the search order
    limit_train: int | None = None  # fixed, seeded subset of the training set
    limit_eval: int | None = 1000  # fixed, seeded subset of the test set used in per-epoch evaluation
    holdout: int = 0  # hold out this many training images and evaluate on them instead of the test set (tuning)
    num_workers: int = 0
    image_size: int | None = None  # imagenet crop size (224) or synthetic side length
    val_subset: str | None = None  # imagenet: file listing validation images (paths relative to val/)
    max_unreadable: int = 100  # imagenet: unreadable images skipped per epoch before training stops with an error
    download: bool = False  # let torchvision download cifar10 / fashion-mnist when missing
    synthetic_size: int = 512  # synthetic: number of training images
    channels: int = 1  # synthetic: image channels
    num_classes: int = 10  # synthetic: classes


@dataclass
class AugConfig:
    """Training augmentation, all from timm; off by default."""

    rand_augment: str | None = None  # timm auto_augment string, e.g. rand-m9-mstd0.5-inc1
    color_jitter: float | None = None
    hflip: float = 0.0
    reprob: float = 0.0  # random erasing probability
    remode: str = "pixel"
    recount: int = 1
    mixup: float = 0.0  # mixup alpha
    cutmix: float = 0.0  # cutmix alpha
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.0  # label smoothing
    interpolation: str = "bicubic"


@dataclass
class ModelConfig:
    name: str = "cnn-small"
    act: str | None = None  # replace every activation module (relu, gelu, silu, ...)
    bn_eval: bool = False  # keep BatchNorm in eval mode while training (paper Section 4.2)
    drop_path: float = 0.0
    drop: float = 0.0


@dataclass
class OptimConfig:
    """AdamW + cosine schedule with warmup, as in the paper's Appendix G (timm)."""

    name: str = "adamw"
    weight_decay: float = 0.05
    opt_eps: float = 1.0e-8
    momentum: float = 0.9
    clip_grad: float | None = None  # max gradient norm
    sched: str = "cosine"
    warmup_epochs: float = 0.0
    warmup_lr: float = 1.0e-6
    min_lr: float = 1.0e-5


@dataclass
class GradNormConfig:
    """Eq. 2: ce_weight * CE + gn_weight * w(t) * eps * mean_i ||c * grad_x CE_i||_norm (gradnorm, gradnorm-fd)."""

    ce_weight: float = 1.0
    gn_weight: float = 1.0
    warmup_epochs: float = 0.0  # w(t) rises linearly 0 -> 1 over this many epochs, per iteration
    norm: str = "l1"  # l1 (the paper; dual of the L-inf ball) or l2
    channel_weights: list[float] | None = None  # c, one weight per image channel (Section 5.2: [1, 2, 1])
    input_noise: str = "none"  # none | gaussian | uniform | pgd: take the loss at a perturbed input (Table 8)
    noise_std: float | None = None  # gaussian noise std in pixel units (default eps)
    fd_step: float | None = None  # gradnorm-fd: finite-difference step h in pixel units (default eps / 32)


@dataclass
class AttackConfig:
    """PGD adversarial training (Appendix G: 3 steps of 2*eps/3), FGSM training (one step of 1.25*eps from a random start),
    and gradnorm.input_noise=pgd."""

    steps: int = 3  # PGD steps (FGSM always takes one)
    step_size: float | None = None  # default: 2 * eps / steps for PGD, 1.25 * eps for FGSM
    random_start: bool | None = None  # start uniformly in the eps-ball; default: no for PGD, yes for FGSM
    warmup_epochs: float = 0.0  # attack step rises linearly 0 -> 1 over this many epochs


@dataclass
class EdgeConfig:
    """Edge regularization (Section 5.3, Eq. 3-4): CE + w(epoch) * (1 - cos(student, teacher))."""

    weight: float = 1.0  # w at epoch 0
    weight_per_epoch: float = 0.0  # w grows by this much each finished epoch (the authors' code: 0.09)
    weight_max: float | None = None  # and stops here (the authors' code: 19)
    tau: float = 0.5  # the class t is drawn from softmax(logits / tau)
    sigma: float = 1.0  # scale of the Gaussian-derivative filters, in pixels
    student: str = "class"  # class: grad_x logit_t (the paper); loss: grad_x CE; saliency: max_c |grad_x logit_t|
    teacher: str = "energy"  # energy: |g_u*x|^2 + |g_v*x|^2 (the paper); magnitude: its square root (the authors' code)
    cosine: str = "per_image"  # per_image (the paper) or batch: one cosine over the whole batch (the authors' code)


@dataclass
class EvalConfig:
    """Per-epoch evaluation on data.limit_eval test images."""

    pgd_steps: int = 10  # PGD-k robust accuracy at eps, step eps/4 (the paper's 1/255 at 4/255)
    every: int = 1  # evaluate every this many epochs (and always after the last)
    batch_size: int = 256


@dataclass
class RunConfig:
    method: str = "natural"
    epochs: int = 1
    batch_size: int = 128  # global batch: split evenly across torchrun processes
    lr: float = 1.0e-3
    eps: float = 0.1  # attack / GradNorm radius in pixel units of [0, 1] images
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast (CUDA only)
    ema: bool = False
    ema_decay: float = 0.9998
    checkpoint_every: int = 0  # also checkpoint every N optimizer steps (0: at epoch ends only)
    stop_after: int | None = None  # stop after this many epochs in this invocation (resume later)
    on_nonfinite: str = "stop"  # a non-finite loss or gradient: stop (keeping the last checkpoint) or skip the step
    init: str | None = None  # start from these weights: a .safetensors file or a run folder (fine-tuning)
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    gradnorm: GradNormConfig = field(default_factory=GradNormConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    edge: EdgeConfig = field(default_factory=EdgeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Keys that may differ between a run and its --resume without changing what it computes.
RESUME_FREE_KEYS = ("stop_after", "on_nonfinite", "device", "data.num_workers", "data.root", "description")


# ---------------------------------------------------------------------------- recipes


def _recipe_dir() -> resources.abc.Traversable:
    return resources.files("natgrad") / "recipes"


def list_recipes() -> dict[str, str]:
    """Names of the built-in recipes with their one-line descriptions."""
    out = {}
    for entry in sorted(_recipe_dir().iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            name = entry.name[: -len(".yaml")]
            out[name] = str(_load_recipe_dict(name).get("description", ""))
    return out


def _load_yaml(text: str, source: str) -> dict:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{source} is not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(data, dict):
        raise UserError(f"{source} must be a YAML mapping of config keys")
    return data


def _load_recipe_dict(name_or_path: str, _seen: tuple[str, ...] = ()) -> dict:
    if name_or_path in _seen:
        raise UserError(f"recipe {name_or_path} inherits from itself; fix its 'inherit:' key")
    if name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise UserError(f"recipe file {name_or_path} does not exist; give a path to a YAML file or a name from `natgrad recipes`")
        data = _load_yaml(path.read_text(), str(path))
    else:
        entry = _recipe_dir() / f"{name_or_path}.yaml"
        if not entry.is_file():
            names = [p.name[:-5] for p in _recipe_dir().iterdir() if p.name.endswith(".yaml")]
            raise UserError(f"unknown recipe {name_or_path!r}{did_you_mean(name_or_path, names)}; `natgrad recipes` lists them")
        data = _load_yaml(entry.read_text(), f"recipe {name_or_path}")
    parent = data.pop("inherit", None)
    if parent is None:
        return data
    base = _load_recipe_dict(str(parent), _seen + (name_or_path,))
    base.pop("description", None)
    return _deep_merge(base, data)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------------------- keys and values


def all_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += all_keys(hints[f.name], prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown_key(key: str) -> UserError:
    keys = all_keys()
    by_leaf: dict[str, list[str]] = {}
    for k in keys:
        by_leaf.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:  # the right name in the wrong section, or a typo of a name in some section
        leaf = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(by_leaf), n=1, cutoff=0.6)
        close = by_leaf[leaf[0]][:1] if leaf else []
    hint_text = f"; did you mean {close[0]}?" if close else ""
    sections = sorted({k.split(".")[0] for k in keys})
    return UserError(f"unknown config key {key!r}{hint_text} (keys: {', '.join(sections)}; `natgrad recipes --keys` lists all)")


def resolve_key(key: str) -> str:
    """The dotted key ``key`` names: itself, or the one key whose last part it is (``gn_weight`` -> ``gradnorm.gn_weight``)."""
    keys = all_keys()
    if key in keys:
        return key
    matches = [k for k in keys if k.rsplit(".", 1)[-1] == key]
    if len(matches) > 1:
        raise UserError(f"config key {key!r} is ambiguous; write one of {', '.join(matches)}")
    if not matches:
        raise _unknown_key(key)
    return matches[0]


def parse_number(text: str) -> float | None:
    """``"0.1"`` or a fraction such as ``"4/255"`` as a float; None when it is neither."""
    try:
        return float(fractions.Fraction(str(text).replace(" ", "")))
    except (ValueError, ZeroDivisionError):
        return None


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check ``value`` against the annotated type, converting where that is unambiguous."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            parsed = parse_number(value)
            if parsed is not None:
                return parsed
    elif typ is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (inner,) = typing.get_args(typ)
            return [_coerce(key, v, inner) for v in value]
        name = f"list of {typing.get_args(typ)[0].__name__}"
        raise UserError(f"{key}={value!r} is not a valid {name}; give a list such as [1, 2, 1]")
    name = getattr(typ, "__name__", str(typ))
    raise UserError(f"{key}={value!r} is not a valid {name}; give a {name}")


def from_dict(data: dict, cls: type = RunConfig, prefix: str = "") -> Any:
    """Build a config dataclass from a nested mapping, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in data.items():
        if k not in hints:
            raise _unknown_key(prefix + k)
        if dataclasses.is_dataclass(hints[k]):
            if not isinstance(v, dict):
                raise UserError(f"{prefix + k} is a section; set its keys, e.g. {prefix + k}.{dataclasses.fields(hints[k])[0].name}=...")
            kwargs[k] = from_dict(v, hints[k], prefix + k + ".")
        else:
            kwargs[k] = _coerce(prefix + k, v, hints[k])
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> (``"a.b"``, YAML-parsed value)."""
    if "=" not in text:
        raise UserError(f"override {text!r} must look like key=value, e.g. epochs=3")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        if not isinstance(node.get(p, {}), dict):
            raise _unknown_key(key)
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def load(recipe: str, overrides: list[str] | None = None) -> RunConfig:
    """Resolve a recipe name or YAML path plus ``key=value`` overrides into a checked config."""
    data = _load_recipe_dict(recipe)
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(data, resolve_key(key), value)
    cfg = from_dict(data)
    validate(cfg)
    return cfg


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def differences(a: RunConfig, b: RunConfig, ignore: tuple[str, ...] = RESUME_FREE_KEYS) -> list[str]:
    """Dotted keys whose values differ, as ``key: a -> b``."""
    fa, fb = flatten(to_dict(a)), flatten(to_dict(b))
    return [f"{k}: {fa[k]!r} -> {fb[k]!r}" for k in fa if k not in ignore and fa[k] != fb[k]]


# ---------------------------------------------------------------------------- validation


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)



def validate(cfg: RunConfig) -> None:
    """Range and choice checks that types alone cannot express."""
    flat = flatten(to_dict(cfg))
    check_choice("method", cfg.method, METHODS)
    check_choice("data.name", cfg.data.name, DATASETS)
    check_choice("device", cfg.device, ("auto", "cpu", "cuda"))
    check_choice("optim.sched", cfg.optim.sched, ("cosine", "none"))
    from timm.optim import list_optimizers

    optimizers = list_optimizers()
    _check(cfg.optim.name.lower() in optimizers, f"optim.name={cfg.optim.name!r} is not an optimizer timm knows"
           f"{did_you_mean(cfg.optim.name.lower(), optimizers)}; e.g. adamw, sgd, lamb")
    check_choice("aug.mixup_mode", cfg.aug.mixup_mode, ("batch", "pair", "elem"))
    _check(0.0 <= cfg.eps <= 1.0, f"eps={cfg.eps} is outside [0, 1]; eps is in pixel units of [0, 1] images (e.g. eps=4/255)")
    _check(cfg.epochs >= 1, f"epochs={cfg.epochs} must be at least 1")
    _check(cfg.batch_size >= 1, f"batch_size={cfg.batch_size} must be at least 1")
    _check(cfg.lr > 0, f"lr={cfg.lr} must be positive")
    _check(cfg.stop_after is None or cfg.stop_after >= 1, f"stop_after={cfg.stop_after} must be at least 1")
    _check(cfg.data.holdout >= 0, f"data.holdout={cfg.data.holdout} must be 0 (evaluate on the test set) or more")
    _check(cfg.data.max_unreadable >= 0, f"data.max_unreadable={cfg.data.max_unreadable} must be 0 or more")
    _check(cfg.on_nonfinite in ("stop", "skip"), f"on_nonfinite={cfg.on_nonfinite!r} is not one of stop, skip")
    _check(cfg.checkpoint_every >= 0, f"checkpoint_every={cfg.checkpoint_every} must be 0 (epoch ends) or a number of steps")
    _check(0.0 < cfg.ema_decay < 1.0, f"ema_decay={cfg.ema_decay} must be in (0, 1)")
    for key in ("data.limit_train", "data.limit_eval"):
        value = flat[key]
        _check(value is None or value >= 1, f"{key}={value} must be at least 1 (or null for the whole set)")
    _check(cfg.data.num_workers >= 0, "data.num_workers must be 0 or more")
    _check(cfg.gradnorm.ce_weight >= 0 and cfg.gradnorm.gn_weight >= 0, "gradnorm.ce_weight and gradnorm.gn_weight must be non-negative")
    _check(cfg.attack.steps >= 1, f"attack.steps={cfg.attack.steps} must be at least 1")
    _check(cfg.attack.step_size is None or cfg.attack.step_size > 0, "attack.step_size must be positive")
    check_choice("gradnorm.norm", cfg.gradnorm.norm, NORMS)
    check_choice("gradnorm.input_noise", cfg.gradnorm.input_noise, NOISES)
    _check(cfg.gradnorm.noise_std is None or cfg.gradnorm.noise_std > 0, f"gradnorm.noise_std={cfg.gradnorm.noise_std} must be positive")
    _check(cfg.gradnorm.fd_step is None or cfg.gradnorm.fd_step > 0,
           f"gradnorm.fd_step={cfg.gradnorm.fd_step} must be positive (a finite-difference step in pixel units, e.g. 0.01)")
    weights = cfg.gradnorm.channel_weights
    if weights is not None:
        from natgrad.data import (
            info,  # here, not at the top: natgrad.data imports this module
        )

        channels = info(cfg.data).in_chans
        _check(len(weights) == channels, f"gradnorm.channel_weights has {len(weights)} entries but {cfg.data.name} images have "
                                         f"{channels} channel(s); give one weight per channel")
        _check(all(w >= 0 for w in weights), "gradnorm.channel_weights must be non-negative")
    e = cfg.edge
    _check(e.tau > 0, f"edge.tau={e.tau} must be positive (a softmax temperature, the paper uses 0.5)")
    _check(e.sigma > 0, f"edge.sigma={e.sigma} must be positive (the Gaussian-derivative filter scale in pixels)")
    _check(e.weight >= 0 and e.weight_per_epoch >= 0, "edge.weight and edge.weight_per_epoch must be non-negative")
    _check(e.weight_max is None or e.weight_max >= e.weight, f"edge.weight_max={e.weight_max} must be at least edge.weight={e.weight}")
    check_choice("edge.student", e.student, STUDENTS)
    check_choice("edge.teacher", e.teacher, TEACHERS)
    check_choice("edge.cosine", e.cosine, COSINES)
    from natgrad.engine.checkpoint import (
        weights_file,  # lazily: the engine imports this module
    )

    _check(cfg.init is None or weights_file(cfg.init).is_file(),
           f"init={cfg.init} is neither a .safetensors file nor a run folder holding model.safetensors; give the weights to start from")
    _check(cfg.eval.pgd_steps >= 0, "eval.pgd_steps must be 0 (no PGD evaluation) or more")
    _check(cfg.eval.every >= 1, "eval.every must be at least 1")
    for key in ("aug.reprob", "aug.mixup_prob", "aug.mixup_switch_prob", "aug.smoothing", "aug.hflip"):
        value = flat[key]
        _check(0.0 <= value <= 1.0, f"{key}={value} must be in [0, 1]")
    _check(cfg.aug.mixup >= 0 and cfg.aug.cutmix >= 0, "aug.mixup and aug.cutmix are Beta-distribution alphas and must be >= 0")
    _check(min(cfg.optim.warmup_epochs, cfg.gradnorm.warmup_epochs, cfg.attack.warmup_epochs) >= 0, "warmup epochs must be >= 0")
    _check(cfg.data.root is None or Path(cfg.data.root).is_dir(), f"data.root={cfg.data.root} is not a folder; point it at the dataset's folder")
    _check(cfg.data.val_subset is None or Path(cfg.data.val_subset).is_file(), f"data.val_subset={cfg.data.val_subset} does not exist; give a file listing validation images")
