"""Run configuration: dataclasses, named recipes, ``key=value`` overrides and validation.

A recipe is a YAML file shaped like :class:`RunConfig` (nested sections as mappings).
It may name another recipe under ``inherit:`` and change only what differs.
Everything is checked before any work starts; problems raise :class:`UserError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import fractions
import math
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from natgrad.choices import (
    ATTACK_FORMS,
    BUILTIN_NETS,
    DATASETS,
    DEVICES,
    DOUBLE_BACKWARDS,
    EDGE_COSINES,
    EDGE_FORMS,
    EDGE_STUDENTS,
    EDGE_TEACHERS,
    ERASE_MODES,
    FD_PRECISIONS,
    FD_SCHEMES,
    GRADNORM_NORMS,
    INPUT_NOISES,
    INTERPOLATIONS,
    METHODS,
    MIXUP_MODES,
    ON_NONFINITE,
    SCHEDULES,
    TRAIN_MODES,
)
from natgrad.datainfo import info
from natgrad.errors import UserError, check_choice, did_you_mean, short


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
    pretrained: bool | str = False  # timm models: true (timm's weights of the name's tag) or a checkpoint path
    train_mode: str = "train"  # eval: the whole model in eval mode while training (the authors' code, every method)
    bn_eval: bool = False  # keep only BatchNorm in eval mode while training
    sync_bn: bool = False  # under several processes: BatchNorm statistics over the global batch (SyncBatchNorm, GPUs)
    channels_last: bool = False  # NHWC weights and activations (the same function; faster convolutions on some devices)
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
    fused: bool = True  # PyTorch's fused update where the optimizer has one (adam, adamw, sgd, ...); false: per tensor
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
    eps: float | None = None  # the penalty's eps (default the run's eps; the authors' CIFAR-10 code: 4/255 at 8/255)
    fd_step: float | None = None  # gradnorm-fd: finite-difference step h in pixels (default: GradNormFD's table)
    fd_scheme: str = "forward"  # gradnorm-fd: forward (2 forward + 2 backward passes) or central (3 + 3)
    fd_precision: str = "float32"  # gradnorm-fd's passes: float32 even under amp, or autocast (bf16 under amp)


@dataclass
class AttackConfig:
    """PGD adversarial training (Appendix G: 3 steps of 2*eps/3), FGSM training (one step of 1.25*eps from a random
    start),
    and gradnorm.input_noise=pgd."""

    steps: int = 3  # PGD steps (FGSM always takes one)
    step_size: float | None = None  # default: 2 * eps / steps for PGD, 1.25 * eps for FGSM
    random_start: bool | None = None  # start uniformly in the eps-ball; default: no for PGD, yes for FGSM
    warmup_epochs: float = 0.0  # attack step rises linearly 0 -> 1 over this many epochs
    # PGD training: natgrad (input gradients only) or code, the authors' adv_generator: weight gradients at
    # every step (their loss.backward()), a uniform start, the strongest iterate after one more forward
    form: str = "natgrad"


@dataclass
class EdgeConfig:
    """Edge regularization (Section 5.3, Eq. 3-4): CE + w(epoch) * (1 - cos(student, teacher)).

    ``form=code`` is instead the loss of the authors' released code (adversarial_training_logit.py with
    gradient_teachers.ContourEnergy): CE + w * MSE of the batch-RMS-normalized student and teacher, i.e.
    w * 2 (1 - one cosine over the batch); the teacher is the code's contour energy; student and teacher
    are taken w.r.t. the model's normalized input; w grows per iteration. The code form fixes the teacher
    and the cosine: config.validate refuses teacher or cosine set to anything but their defaults (which it
    then does not use). weight, weight_per_epoch, weight_max, tau, sigma and student keep their meaning
    (the code's --alpha start, step, max, --temp, --sigma, and its class / --saliency / _loss scripts).
    """

    form: str = "paper"  # paper: the text's Eq. 3-4; code: the authors' released code's loss, exactly
    weight: float = 1.0  # w at epoch 0
    weight_per_epoch: float = 0.0  # paper: w grows by this much each finished epoch; code: continuously, per step
    weight_max: float | None = None  # and stops here (the authors' configs: weight 1, per epoch 0.09, max 19)
    tau: float = 0.5  # the class t is drawn from softmax(logits / tau)
    sigma: float = 1.0  # paper: Gaussian-derivative scale in pixels; code: its discrete Gaussian's t (variance)
    student: str = "class"  # class: grad_x logit_t (the paper); loss: grad_x CE; saliency: max_c |grad_x logit_t|
    teacher: str = "energy"  # paper form: energy |g_u*x|^2 + |g_v*x|^2 (the paper) or magnitude: its square root
    cosine: str = "per_image"  # paper form: per_image (the paper) or batch: one cosine over the whole batch


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
    batch_size: int = 128  # global batch per optimizer step: split across torchrun processes and accum_steps
    accum_steps: int = 1  # micro-batches accumulated per optimizer step (each process)
    lr: float = 1.0e-3
    eps: float = 0.1  # attack / GradNorm radius in pixel units of [0, 1] images
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast (CUDA only)
    compile: bool = False  # torch.compile: the loss with its input gradient (gradnorm, edge), else the model
    double_backward: str = "natgrad"  # gradnorm, edge: convolutions differentiated twice by natgrad or by autograd
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


# ``init: stage:RECIPE`` in a recipe: it fine-tunes the model that RECIPE trains, whose run folder must be given.
STAGE_PREFIX = "stage:"


def init_stage(cfg: RunConfig) -> str | None:
    """The recipe whose model ``cfg`` must start from (``init: stage:RECIPE``), or None."""
    return cfg.init[len(STAGE_PREFIX):] if cfg.init and cfg.init.startswith(STAGE_PREFIX) else None


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


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping and aliases (``*name``): a config
    has no use for them, and nested aliases expand exponentially (a few hundred bytes can fill memory)."""

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(f"line {mark.line + 1}: YAML aliases (*name) are not accepted in a config; "
                                 "write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.YAMLError(f"line {key_node.start_mark.line + 1}: key {short(key)} is given twice; "
                                     "keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def safe_load(text: str) -> Any:
    """YAML as :func:`yaml.safe_load` reads it, without duplicate keys or aliases (a ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml_mapping(path: Path, what: str) -> dict:
    """The mapping a YAML file holds; a one-line :class:`UserError` naming ``what`` when it is not readable
    text, not valid YAML, or not a mapping."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what} is not UTF-8 text; save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {what} ({e.strerror}); check the path") from None
    return _load_yaml(text, what)


def _load_yaml(text: str, source: str) -> dict:
    try:
        data = safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{source} is not valid YAML ({first[:200]}); fix the file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{source} must be a YAML mapping of config keys, not a {type(data).__name__}")
    return data


def _is_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) or os.sep in name


def _load_recipe_dict(name_or_path: str, _seen: tuple[str, ...] = (), base_dir: Path | None = None) -> dict:
    """A recipe's mapping with its ``inherit:`` chain merged in; a relative path in ``inherit:`` is read
    from the folder of the recipe file that names it."""
    if name_or_path in _seen:
        raise UserError(f"recipe {name_or_path} inherits from itself; fix its 'inherit:' key")
    if _is_path(name_or_path):
        path = Path(name_or_path)
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        if not path.is_file():
            raise UserError(f"recipe file {path} does not exist; give a path to a YAML file or a name from `natgrad "
                            f"recipes`")
        data = read_yaml_mapping(path, f"recipe file {path}")
        name_or_path, base_dir = str(path), path.parent
    else:
        entry = _recipe_dir() / f"{name_or_path}.yaml"
        if not entry.is_file():
            names = [p.name[:-5] for p in _recipe_dir().iterdir() if p.name.endswith(".yaml")]
            raise UserError(f"unknown recipe {short(name_or_path)}{did_you_mean(name_or_path, names)}; "
                            "`natgrad recipes` lists them")
        data = _load_yaml(entry.read_text(encoding="utf-8"), f"recipe {name_or_path}")
        base_dir = None
    parent = data.pop("inherit", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise UserError(f"'inherit: {short(parent)}' in {name_or_path} must name one recipe or YAML file")
    base = _load_recipe_dict(parent, _seen + (name_or_path,), base_dir)
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
    return UserError(f"unknown config key {short(key)}{hint_text} (keys: {', '.join(sections)}; `natgrad recipes "
                     f"--keys` lists all)")


def resolve_key(key: str) -> str:
    """The dotted key ``key`` names: itself, or the one key whose last part it is
    (``gn_weight`` -> ``gradnorm.gn_weight``)."""
    keys = all_keys()
    if key in keys:
        return key
    matches = [k for k in keys if k.rsplit(".", 1)[-1] == key]
    if len(matches) > 1:
        raise UserError(f"config key {short(key)} is ambiguous; write one of {', '.join(matches)}")
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
        if bool in inner and isinstance(value, bool):
            return value
        for arm in inner[1:]:  # a later arm that takes the value as it is (``bool | str``: a path)
            if arm is not bool and isinstance(value, arm):
                return value
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
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            number = parse_number(value)
        if number is not None:
            if not math.isfinite(number):
                raise UserError(f"{key}={short(value)} is not a finite number; give a finite float")
            return number
    elif typ is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (inner,) = typing.get_args(typ)
            return [_coerce(key, v, inner) for v in value]
        name = f"list of {typing.get_args(typ)[0].__name__}"
        raise UserError(f"{key}={short(value)} is not a valid {name}; give a list such as [1, 2, 1]")
    name = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}.get(
        getattr(typ, "__name__", ""), str(typ))
    raise UserError(f"{key}={short(value)} is not a valid {getattr(typ, '__name__', typ)}; give {name}")


def from_dict(data: dict, cls: type = RunConfig, prefix: str = "") -> Any:
    """Build a config dataclass from a nested mapping, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in data.items():
        if not isinstance(k, str) or k not in hints:
            raise _unknown_key(prefix + str(k))
        if dataclasses.is_dataclass(hints[k]):
            if not isinstance(v, dict):
                raise UserError(f"{prefix + k} is a section; set its keys, e.g. "
                                f"{prefix + k}.{dataclasses.fields(hints[k])[0].name}=...")
            kwargs[k] = from_dict(v, hints[k], prefix + k + ".")
        else:
            kwargs[k] = _coerce(prefix + k, v, hints[k])
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> (``"a.b"``, YAML-parsed value)."""
    if "=" not in text:
        raise UserError(f"override {short(text)} must look like key=value, e.g. epochs=3")
    key, raw = text.split("=", 1)
    try:
        value = safe_load(raw) if raw != "" else None
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
    fa, fb = flatten(dataclasses.asdict(a)), flatten(dataclasses.asdict(b))
    return [f"{k}: {short(fa[k])} -> {short(fb[k])}" for k in fa if k not in ignore and fa[k] != fb[k]]


# ---------------------------------------------------------------------------- validation


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


INF = math.inf


@dataclass(frozen=True)
class Range:
    """Allowed values from ``low`` to ``high`` (``open_low``/``open_high`` exclude the end); ``interval``
    words a violation as "is outside [low, high]" rather than "must be at least / at most"."""

    low: float
    high: float = INF
    open_low: bool = False
    open_high: bool = False
    note: str = ""
    interval: bool = False

    def problem(self, v: float) -> str | None:
        """What is wrong with ``v``, in words, or None when it is allowed."""
        too_low = v <= self.low if self.open_low else v < self.low
        too_high = v >= self.high if self.open_high else v > self.high
        if not (too_low or too_high):
            return None
        if self.interval:
            return (f"is outside {'(' if self.open_low else '['}{number_text(self.low)}, {number_text(self.high)}"
                    f"{')' if self.open_high else ']'}")
        if too_low:
            if self.open_low:
                return "must be positive" if self.low == 0 else f"must be above {number_text(self.low)}"
            return f"must be at least {number_text(self.low)}"
        limit = number_text(self.high)
        return f"must be below {limit}" if self.open_high else f"must be at most {limit}"


def number_text(v: float) -> str:
    """An int as written, a float in ``%g``."""
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:g}"


UNIT = Range(0.0, 1.0, interval=True)
PIXELS = Range(0.0, 1.0, open_low=True, note="pixel units of [0, 1] images")
# Every numeric key, with its range; null (where a key allows it) is always accepted.
RANGES: dict[str, Range] = {
    "epochs": Range(1, 1_000_000), "batch_size": Range(1, 2**20), "accum_steps": Range(1, 65536),
    "lr": Range(0.0, 10.0, open_low=True),
    "eps": Range(0.0, 1.0, note="eps is in pixel units of [0, 1] images (e.g. eps=4/255)", interval=True),
    "seed": Range(0, 2**32 - 1), "ema_decay": Range(0.0, 1.0, True, True, interval=True),
    "checkpoint_every": Range(0, 2**40,
    note="0: at epoch ends only"), "stop_after": Range(1, 1_000_000),
    "data.limit_train": Range(1, 2**40, note="or null for the whole set"),
    "data.limit_eval": Range(1, 2**40, note="or null for the whole set"),
    "data.holdout": Range(0, 2**40, note="0 evaluates on the test set"), "data.num_workers": Range(0, 1024),
    "data.image_size": Range(8, 4096, note="pixels"), "data.max_unreadable": Range(0, 2**40),
    "data.synthetic_size": Range(1, 10_000_000), "data.channels": Range(1, 16), "data.num_classes": Range(2, 100_000),
    "aug.color_jitter": Range(0.0, 10.0), "aug.hflip": UNIT, "aug.reprob": UNIT, "aug.recount": Range(1, 100),
    "aug.mixup": Range(0.0, 100.0, note="a Beta-distribution alpha"), "aug.cutmix": Range(0.0, 100.0,
    note="a Beta-distribution alpha"), "aug.mixup_prob": UNIT, "aug.mixup_switch_prob": UNIT, "aug.smoothing": UNIT,
    "model.drop_path": Range(0.0, 1.0, open_high=True, interval=True),
    "model.drop": Range(0.0, 1.0, open_high=True, interval=True),
    "optim.weight_decay": Range(0.0, 10.0), "optim.opt_eps": Range(0.0, 1.0, open_low=True),
    "optim.momentum": Range(0.0, 1.0, open_high=True, interval=True), "optim.clip_grad": Range(0.0, 1e6, open_low=True,
    note="the largest gradient norm; null for no clipping"), "optim.warmup_epochs": Range(0.0, 1_000_000),
    "optim.warmup_lr": Range(0.0, 10.0), "optim.min_lr": Range(0.0, 10.0),
    "gradnorm.ce_weight": Range(0.0, 1000.0), "gradnorm.gn_weight": Range(0.0, 1000.0),
    "gradnorm.warmup_epochs": Range(0.0, 1_000_000), "gradnorm.noise_std": PIXELS, "gradnorm.eps": PIXELS,
    "gradnorm.fd_step": Range(0.0, 1.0, open_low=True, note="a finite-difference step in pixel units, e.g. 0.01"),
    "attack.steps": Range(1, 100_000), "attack.step_size": PIXELS, "attack.warmup_epochs": Range(0.0, 1_000_000),
    "edge.weight": Range(0.0, 1e6), "edge.weight_per_epoch": Range(0.0, 1e6), "edge.weight_max": Range(0.0, 1e6),
    "edge.tau": Range(0.0, 100.0, open_low=True, note="a softmax temperature, the paper uses 0.5"),
    "edge.sigma": Range(0.0, 32.0, open_low=True, note="the Gaussian-derivative filter scale in pixels, the paper's 1"),
    "eval.pgd_steps": Range(0, 100_000, note="0: no PGD evaluation"), "eval.every": Range(1, 1_000_000),
    "eval.batch_size": Range(1, 2**16),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHODS, "data.name": DATASETS, "device": DEVICES, "optim.sched": SCHEDULES,
    "on_nonfinite": ON_NONFINITE, "aug.mixup_mode": MIXUP_MODES, "aug.remode": ERASE_MODES,
    "aug.interpolation": INTERPOLATIONS, "gradnorm.norm": GRADNORM_NORMS, "gradnorm.input_noise": INPUT_NOISES,
    "gradnorm.fd_scheme": FD_SCHEMES, "gradnorm.fd_precision": FD_PRECISIONS,
    "model.train_mode": TRAIN_MODES, "edge.form": EDGE_FORMS, "edge.student": EDGE_STUDENTS,
    "attack.form": ATTACK_FORMS, "edge.teacher": EDGE_TEACHERS, "edge.cosine": EDGE_COSINES,
    "double_backward": DOUBLE_BACKWARDS,
}


def validate(cfg: RunConfig) -> None:
    """Every choice and range check of a config: what ``train``, ``eval``, ``analyze``, ``--resume`` and the
    pipelines accept, configs read from run folders included. Raises :class:`UserError`."""
    flat = flatten(dataclasses.asdict(cfg))
    for key, choices in CHOICES.items():
        check_choice(key, flat[key], choices)
    for key, allowed in RANGES.items():
        value = flat[key]
        problem = None if value is None else allowed.problem(value)
        if problem:
            note = f"; {allowed.note}" if allowed.note else ""
            raise UserError(f"{key}={value} {problem}{note}")
    from timm.optim import list_optimizers

    optimizers = list_optimizers()
    _require(cfg.optim.name.lower() in optimizers,
             f"optim.name={short(cfg.optim.name)} is not an optimizer timm knows"
             f"{did_you_mean(cfg.optim.name.lower(), optimizers)}; e.g. adamw, sgd, lamb")
    o = cfg.optim
    if o.sched == "cosine":
        _require(o.min_lr <= cfg.lr,
                 f"optim.min_lr={o.min_lr:g} is above lr={cfg.lr:g}; the schedule decays lr towards min_lr: lower it")
        _require(o.warmup_lr <= cfg.lr,
                 f"optim.warmup_lr={o.warmup_lr:g} is above lr={cfg.lr:g}; warmup rises from it to lr: lower it")
    if cfg.aug.rand_augment:
        _check_rand_augment(cfg.aug.rand_augment)
    weights = cfg.gradnorm.channel_weights
    if weights is not None:
        channels = info(cfg.data).in_chans
        _require(len(weights) == channels, f"gradnorm.channel_weights has {len(weights)} entries but {cfg.data.name} "
                 f"images have {channels} channel(s); give one weight per channel")
        _require(all(0 <= w <= 1000 for w in weights), "gradnorm.channel_weights must be in [0, 1000]")
    _require(cfg.accum_steps <= cfg.batch_size,
             f"accum_steps={cfg.accum_steps} is more than batch_size={cfg.batch_size}; each micro-batch needs an image")
    _require(not (cfg.model.pretrained and cfg.model.name in BUILTIN_NETS),
             f"model.pretrained is for timm models; {cfg.model.name} is a natgrad net: start it from natgrad "
             "weights with init=RUN_OR_FILE")
    e = cfg.edge
    _require(e.weight_max is None or e.weight_max >= e.weight,
             f"edge.weight_max={e.weight_max} must be at least edge.weight={e.weight}")
    _require(cfg.attack.form == "natgrad" or cfg.method == "pgd",
             f"attack.form={cfg.attack.form} is PGD training's attack as the authors' code runs it; with "
             f"method={cfg.method} use attack.form=natgrad")
    if e.form == "code":
        _check_edge_code_form(e, info(cfg.data).image_size)
    _require(cfg.data.root is None or Path(cfg.data.root).is_dir(),
             f"data.root={cfg.data.root} is not a folder; point it at the dataset's folder")
    _require(cfg.data.val_subset is None or Path(cfg.data.val_subset).is_file(),
             f"data.val_subset={cfg.data.val_subset} does not exist; give a file listing validation images")


def _check_edge_code_form(e: EdgeConfig, image_size: int) -> None:
    """``edge.form=code`` fixes the teacher and the cosine: both must keep their defaults."""
    default = EdgeConfig()
    for key in ("teacher", "cosine"):
        value, fixed = getattr(e, key), getattr(default, key)
        _require(value == fixed,
                 f"edge.{key}={value} does not apply with edge.form=code (the code's teacher is its contour energy, "
                 f"its loss one batch-wide MSE): set edge.{key}={fixed} (the default) or edge.form=paper")
    radius = math.ceil(3 * e.sigma)
    _require(radius < image_size, f"edge.sigma={e.sigma:g} blurs {radius} pixels, too wide for {image_size}-pixel "
             f"images with the code's reflect padding; use edge.sigma at most {(image_size - 1) / 3:g}")


def _check_rand_augment(spec: str) -> None:
    """timm's RandAugment string (``rand-m9-mstd0.5-inc1``), parsed the way training will parse it."""
    from timm.data.auto_augment import rand_augment_transform

    try:
        rand_augment_transform(spec, {})
    except Exception:  # timm raises AssertionError, ValueError or KeyError on a malformed string
        raise UserError(f"aug.rand_augment={short(spec)} is not a timm RandAugment string; write e.g. "
                        "rand-m9-mstd0.5-inc1") from None


def usable_cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def capped_workers(cfg: RunConfig) -> RunConfig:
    """``cfg`` with at most one data worker per usable CPU: a recipe written for a big machine still runs on a
    small one, and no value starts more processes than the machine has CPUs."""
    cpus = usable_cpus()
    if cfg.data.num_workers <= cpus:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=cpus))
