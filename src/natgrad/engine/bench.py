"""Cost of one training step per objective (the paper's Table 3): seconds, counted passes, peak memory.

Every method trains its own copy of the same initial model on the same random batch, with the
objective and optimizer that ``natgrad train`` builds from the recipe. Methods run interleaved,
round-robin with a rotating order, so that drift in the machine's speed hits all of them alike.

Per method, before any timed step, one step counts the passes through the model
(:func:`count_passes`) and the floating-point operations (:class:`CountFlops`), and one more
measures the peak memory (:func:`peak_memory`); then warm-up rounds and timed rounds of a full
optimizer step (:class:`MethodStep`). How each number is counted: docs/RESULTS.md, issues 6 and 16.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import functools
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from timm.utils import dispatch_clip_grad
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from natgrad import config, data, objectives
from natgrad.build import build_model, build_objective, build_optimizer, select_device
from natgrad.config import RunConfig
from natgrad.errors import UserError, did_you_mean
from natgrad.models import Classifier
from natgrad.progress import Progress

# Training's methods, and PGD training as the authors' code runs it (attack.form=code), as the paper timed it.
METHODS = (*config.METHODS, "pgd-paper", "gradnorm-fd-amp", "gradnorm-fd-central", "gradnorm-autograd")
# the bench methods that are a training method with other settings: method, the settings (section or "" for a
# top-level key, key, value)
VARIANTS: dict[str, tuple[str, list[tuple[str, str, str]]]] = {
    "pgd-paper": ("pgd", [("attack", "form", "code")]),  # the authors' PGD training attack
    "gradnorm-fd-amp": ("gradnorm-fd", [("gradnorm", "fd_precision", "autocast")]),  # bf16 under amp
    "gradnorm-fd-central": ("gradnorm-fd", [("gradnorm", "fd_scheme", "central"),
                                            ("gradnorm", "fd_precision", "autocast")]),
    "gradnorm-autograd": ("gradnorm", [("", "double_backward", "autograd")]),  # autograd's convolution double backward
}
LAYOUT_SUFFIX = "-nhwc"  # any method with the model in channels_last memory order (model.channels_last=true)
RSS_INTERVAL_S = 0.0005


@dataclass
class BenchSettings:
    """What to measure; None takes the recipe's value (its model, activation, image size and channels)."""

    recipe: str = "fmnist-gradnorm"
    overrides: Sequence[str] = ()  # key=value, applied after the flags below
    model: str | None = None  # a natgrad model name; the model's own activation unless ``act`` is given
    act: str | None = None
    input_size: int | None = None
    channels: int | None = None
    batch: int = 128
    methods: Sequence[str] = METHODS
    device: str = "auto"  # auto | cpu | cuda
    steps: int = 10
    warmup: int = 2
    compile: bool = False  # every method through torch.compile (config key ``compile``)
    progress: bool = True


# ---------------------------------------------------------------------------- pass counting


@dataclass
class PassCounts:
    forward: int = 0
    backward: int = 0
    double_backward: int = 0
    weight_gradients: int = 0  # backward passes that compute the parameters' gradients (kept or not)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class _Identity(torch.autograd.Function):
    """Identity on a tensor, keeping the counts for its subclasses' backward."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, counts: PassCounts) -> torch.Tensor:
        ctx.counts = counts
        return t.view_as(t)


class _CountBackward(_Identity):
    """Identity on the logits; its backward counts one backward pass."""

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.counts.backward += 1
        return grad, None


class _CountDoubleBackward(_Identity):
    """Identity on the input gradient; its backward runs when a later backward goes back through that gradient."""

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.counts.double_backward += 1
        return grad, None


class _MarkInputGradient(_Identity):
    """Identity on the input; under ``create_graph`` its backward marks the input gradient it returns."""

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _CountDoubleBackward.apply(grad, ctx.counts), None


@contextlib.contextmanager
def count_passes(model: nn.Module) -> Iterator[PassCounts]:
    """Count the forward, backward and double-backward passes through ``model`` while the block runs.

    A forward is a call of ``model``; a backward is a backward traversal that reaches its logits;
    a double backward is one that (also) runs back through the graph of an earlier backward, seen
    where that earlier backward produced the input gradient with ``create_graph``; a backward computes
    weight gradients where it computes the gradient of the first trainable parameter (the one nearest
    the input, which every such backward reaches).
    """
    counts = PassCounts()

    def weight_gradient(grad: torch.Tensor) -> None:
        counts.weight_gradients += 1

    def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
        if args and isinstance(args[0], torch.Tensor):
            return (_MarkInputGradient.apply(args[0], counts), *args[1:])
        return None

    def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
        counts.forward += 1
        return _CountBackward.apply(output, counts) if isinstance(output, torch.Tensor) else None

    first = next(p for p in model.parameters() if p.requires_grad)
    handles = [model.register_forward_pre_hook(pre_hook), model.register_forward_hook(hook),
               first.register_hook(weight_gradient)]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


class CountFlops(TorchDispatchMode):
    """Floating-point operations of the kernels ``torch.utils.flop_counter`` knows (matrix products,
    convolutions and their backward kernels, attention) run while the block is active.

    ``FlopCounterMode`` itself also tracks modules with hooks that ``torch.autograd.grad`` rejects.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


# ---------------------------------------------------------------------------- memory


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_memory(run: Callable[[], None], device: torch.device) -> int | None:
    """Bytes by which memory rose above its level before ``run()`` at its peak: the CUDA allocator's peak, or on
    CPU the resident set size sampled every :data:`RSS_INTERVAL_S` (None where ``/proc`` is missing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        allocated = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return max(torch.cuda.max_memory_allocated(device) - allocated, 0)
    _malloc_trim()
    before = _rss_bytes()
    if before is None:
        run()
        return None
    peak, stop = before, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(RSS_INTERVAL_S):
            peak = max(peak, _rss_bytes() or 0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run()
    finally:
        stop.set()
        sampler.join()
    return max(peak, _rss_bytes() or 0) - before


# ---------------------------------------------------------------------------- one training step


@dataclass
class MethodStep:
    """One method's model, optimizer and objective; calling it takes one full optimizer step."""

    method: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    objective: objectives.Objective
    epoch_fraction: float
    amp: bool = False
    clip_grad: float | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()
        with autocast:
            loss = self.objective(x, y, epoch_fraction=self.epoch_fraction)["loss"]
        self.objective.backward(loss)
        if self.clip_grad:
            dispatch_clip_grad(self.model.parameters(), self.clip_grad, mode="norm")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def bench_config(settings: BenchSettings) -> RunConfig:
    """The recipe with the model flags and then the ``key=value`` overrides applied."""
    flags = []
    if settings.model is not None:
        flags += [f"model.name={settings.model}", "model.act=null"]  # another model keeps its own activation
    if settings.act is not None:
        flags.append(f"model.act={settings.act}")
    if settings.compile:
        flags.append("compile=true")
    return config.load(settings.recipe, [*flags, *settings.overrides])


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """Method names from a list or a comma-separated string, checked, duplicates dropped."""
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else [m.strip() for m in methods]
    names = [m for m in names if m]
    if not names:
        raise UserError(f"--methods is empty; choose from {', '.join(METHODS)}")
    for m in names:
        if m.removesuffix(LAYOUT_SUFFIX) not in METHODS:
            raise UserError(f"unknown method {m!r}{did_you_mean(m, METHODS)}; choose from {', '.join(METHODS)}, "
                            f"each also with {LAYOUT_SUFFIX} (channels_last)")
    return list(dict.fromkeys(names))


def steady_epoch_fraction(cfg: RunConfig) -> float:
    """An ``epoch_fraction`` past every warm-up of the recipe, where each regularizer has its full weight."""
    return float(max(cfg.gradnorm.warmup_epochs, cfg.attack.warmup_epochs, 0.0))


def method_config(cfg: RunConfig, method: str) -> RunConfig:
    """The training config of a bench method: a training method itself, or one of :data:`VARIANTS`, either of
    them with :data:`LAYOUT_SUFFIX`."""
    if method.endswith(LAYOUT_SUFFIX):
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, channels_last=True))
        return method_config(cfg, method.removesuffix(LAYOUT_SUFFIX))
    if method not in VARIANTS:
        return dataclasses.replace(cfg, method=method)
    base, settings = VARIANTS[method]
    for section, key, value in settings:
        change: dict[str, Any] = {key: value}
        if section:  # a key of a config section; "" names a top-level key
            change = {section: dataclasses.replace(getattr(cfg, section), **change)}
        cfg = dataclasses.replace(cfg, **change)
    return dataclasses.replace(cfg, method=base)


def build_steps(cfg: RunConfig, methods: Sequence[str], model: Classifier,
                device: torch.device) -> dict[str, MethodStep]:
    """For each method a fresh copy of ``model`` (a :class:`~natgrad.models.Classifier`) in the method's memory
    order, with its optimizer and training objective, as training builds them."""
    steps = {}
    for method in methods:
        method_cfg = method_config(cfg, method)
        m = copy.deepcopy(model).memory_format(method_cfg.model.channels_last).to(device).train()
        objective = build_objective(method_cfg, m)
        steps[method] = MethodStep(method, m, build_optimizer(cfg, m), objective, steady_epoch_fraction(cfg),
                                   amp=device.type == "cuda" and cfg.amp, clip_grad=cfg.optim.clip_grad)
    return steps


# ---------------------------------------------------------------------------- the benchmark


def _timed(step: MethodStep, x: torch.Tensor, y: torch.Tensor) -> float:
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(x.device)
    t0 = time.perf_counter()
    step(x, y)
    if cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - t0


def _check_counts(settings: BenchSettings) -> None:
    for flag, value, least in (("--steps", settings.steps, 1), ("--batch", settings.batch, 1),
                               ("--warmup", settings.warmup, 0), ("--input-size", settings.input_size, 1),
                               ("--channels", settings.channels, 1)):
        if value is not None and value < least:
            raise UserError(f"{flag} {value} must be at least {least}")


def _check_input(model: nn.Module, x: torch.Tensor, name: str) -> None:
    """A UserError unless ``model`` takes images shaped like ``x``."""
    try:
        with torch.no_grad():
            model.eval()(x)
    except RuntimeError as e:
        shape = "x".join(map(str, x.shape[1:]))
        raise UserError(f"{name} does not take {shape} images ({str(e).splitlines()[0]}); "
                        "change --input-size or --channels") from None
    finally:
        model.train()


def round_ratio_quartiles(seconds: Sequence[float], reference: Sequence[float]) -> list[float]:
    """The first and third quartiles of a method's time over the reference method's in the same round
    (interleaved rounds: the machine's drift cancels within one), as ``statistics.quantiles`` takes them."""
    ratios = [s / r for s, r in zip(seconds, reference, strict=True)]
    if len(ratios) < 2:
        return [ratios[0], ratios[0]]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return [q1, q3]


def run_bench(settings: BenchSettings) -> dict:
    """Measure every method of ``settings``; returns the JSON-ready result (``methods``: per method, its
    ``seconds_per_step``, ``passes``, ``peak_memory_bytes``, ``relative_to_pgd`` (and the quartiles of its
    per-round ratio, ``relative_to_pgd_iqr``) and ``flops``)."""
    _check_counts(settings)
    methods = parse_methods(settings.methods)
    cfg = bench_config(settings)
    device = select_device(settings.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # as training does
    di = data.info(cfg.data)
    channels = settings.channels or di.in_chans
    size = settings.input_size or di.image_size
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, channels, size)
    x = torch.rand(settings.batch, channels, size, size).to(device)
    _check_input(model, x[:1].cpu(), cfg.model.name)
    y = torch.randint(0, di.num_classes, (settings.batch,)).to(device)
    steps = build_steps(cfg, methods, model, device)
    # Compiled code runs no Python hooks: passes and work are counted on the eager steps, which compute the same.
    counted = build_steps(dataclasses.replace(cfg, compile=False), methods, model, device) if cfg.compile else steps
    del model

    passes, memory, flops = {}, {}, {}
    for name, step in steps.items():
        with count_passes(counted[name].model) as counts, CountFlops() as flop_counter:
            counted[name](x, y)
        passes[name] = counts.as_dict()
        flops[name] = flop_counter.total
        if cfg.compile:
            step(x, y)  # compiles: the memory is the compiled step's
        memory[name] = peak_memory(functools.partial(step, x, y), device)
    del counted

    seconds: dict[str, list[float]] = {name: [] for name in methods}
    rounds = settings.warmup + settings.steps
    for r in Progress(range(rounds), desc="bench", disable=not settings.progress, dynamic_ncols=True):
        k = r % len(methods)
        for name in methods[k:] + methods[:k]:
            t = _timed(steps[name], x, y)
            if r >= settings.warmup:
                seconds[name].append(t)

    medians = {name: statistics.median(s) for name, s in seconds.items()}
    pgd, paper = medians.get("pgd"), medians.get("pgd-paper")
    return {
        "model": cfg.model.name, "act": cfg.model.act, "input_size": size, "channels": channels,
        "batch": settings.batch, "device": device.type, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "steps": settings.steps,
        "warmup": settings.warmup, "recipe": settings.recipe, "eps": cfg.eps, "pgd_steps": cfg.attack.steps,
        "amp": device.type == "cuda" and cfg.amp, "compile": cfg.compile, "channels_last": cfg.model.channels_last,
        "methods": {name: {
            "seconds_per_step": medians[name], "seconds_all": seconds[name], "passes": passes[name],
            "peak_memory_bytes": memory[name], "relative_to_pgd": None if pgd is None else medians[name] / pgd,
            "relative_to_pgd_iqr": None if pgd is None else round_ratio_quartiles(seconds[name], seconds["pgd"]),
            "relative_to_pgd_paper": None if paper is None else medians[name] / paper,
            "flops": flops[name], "flops_relative_to_pgd": None if "pgd" not in flops else flops[name] / flops["pgd"],
        } for name in methods},
    }


def _ratio_cell(ratio: float | None, quartiles: Sequence[float] | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.3f}" + ("" if quartiles is None else f" ({quartiles[0]:.3f}-{quartiles[1]:.3f})")


def format_bench(result: dict) -> str:
    """The result as a terminal table: method, s/step, ratio to PGD-k (with the quartiles of its per-round ratio)
    and to the paper's PGD-k, passes, conv/matmul work, peak memory."""
    pgd_label = f"PGD-{result['pgd_steps']}"
    header = ("method", "s/step", f"vs {pgd_label} (rounds' IQR)", "vs pgd-paper", "passes", "GFLOP",
              f"vs {pgd_label}", "peak MB")
    rows = [header]
    for name, m in result["methods"].items():
        p = m["passes"]
        double = f", {p['double_backward']} double" if p["double_backward"] else ""
        passes = f"{p['forward']}F+{p['backward']}B ({p['weight_gradients']} with weights{double})"
        rows.append((
            f"{name} ({pgd_label})" if name == "pgd" else name,
            f"{m['seconds_per_step']:.4f}",
            _ratio_cell(m["relative_to_pgd"], m.get("relative_to_pgd_iqr")),
            "-" if m.get("relative_to_pgd_paper") is None else f"{m['relative_to_pgd_paper']:.3f}",
            passes,
            f"{m['flops'] / 1e9:.2f}",
            "-" if m["flops_relative_to_pgd"] is None else f"{m['flops_relative_to_pgd']:.3f}",
            "-" if m["peak_memory_bytes"] is None else f"{m['peak_memory_bytes'] / 2**20:.1f}",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i in (0, 4) else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows]
    title = (f"{result['model']} ({result['act'] or 'own activation'}), {result['channels']}x{result['input_size']}x"
             f"{result['input_size']}, batch {result['batch']}, {result['device']}, {result['threads']} threads, "
             f"median of {result['steps']} steps" + (", compiled" if result.get("compile") else "")
             + (", channels last" if result.get("channels_last") else ""))
    return "\n".join([title, *lines])


__all__ = ["BenchSettings", "CountFlops", "MethodStep", "PassCounts", "build_steps", "count_passes", "format_bench",
           "peak_memory", "run_bench"]
