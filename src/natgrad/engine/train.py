"""The training engine: one loop for every objective.

AdamW and a per-iteration cosine schedule with warmup (timm), gradient clipping, EMA of the
weights (timm), bf16 autocast on CUDA, per-epoch clean and PGD accuracy, atomic checkpoints,
exact ``--resume``, and DistributedDataParallel under torchrun (gradients communicated once per optimizer
step; SyncBatchNorm on request).

Run folder: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/last.pt``, ``model.safetensors``
(and ``model_ema.safetensors`` when EMA is on), ``summary.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import yaml
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import Dataset

from natgrad import config as config_mod
from natgrad import data, models
from natgrad.build import build_model, build_objective, build_optimizer, build_scheduler, seed_everything
from natgrad.choices import DOUBLE_BACKPROP
from natgrad.config import RunConfig
from natgrad.engine import checkpoint as ckpt
from natgrad.engine.distributed import (
    Context,
    barrier,
    data_parallel,
    gradient_sync,
    setup,
    sum_over_processes,
    sync_batchnorm,
)
from natgrad.errors import NonFiniteLossError, Preempted, UserError
from natgrad.evaluation import evaluate
from natgrad.objectives import Objective
from natgrad.progress import Progress
from natgrad.rundir import (
    RunDir,
    RunLock,
    is_empty,
    locked,
    refuse_symlinks,
    remove_leftovers,
    weights_file,
)
from natgrad.signals import StopSignals

MIN_FREE_BYTES = 64 * 2**20

def _check_out_dir(out: Path, resume: bool, cfg: RunConfig) -> None:
    """Refuse to overwrite a run or resume an incompatible one, before any work starts."""
    if out.is_dir():
        RunLock(out).refuse_if_held()
    if resume:
        if not RunDir(out).config.is_file():
            raise UserError(f"--resume: {out} holds no natgrad run (no config.yaml); train without --resume first")
        refuse_symlinks(out)
        saved = RunDir(out).read_config()
        diff = config_mod.differences(saved, cfg)
        if diff:
            raise UserError(f"--resume: {out} was trained with another config ({'; '.join(diff[:3])}); "
                            "resume with the same recipe and overrides, or use a new --out")
        return
    if out.exists() and (not out.is_dir() or not is_empty(out)):
        raise UserError(f"{out} already holds files; pass --resume to continue that run, or choose another --out")
    if out.is_symlink():
        raise UserError(f"--out {out} is a symbolic link; give the real folder")
    parent = next(p for p in [out, *out.parents] if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {parent}; choose an --out in a writable folder")
    if shutil.disk_usage(parent).free < MIN_FREE_BYTES:
        raise UserError(f"{parent} has under {MIN_FREE_BYTES >> 20} MB free; free space or choose another --out")


def _check_init(cfg: RunConfig) -> None:
    """The weights to fine-tune from exist (checked before any work)."""
    stage = config_mod.init_stage(cfg)
    if stage is not None:
        raise UserError(f"init={cfg.init}: this recipe fine-tunes the model of recipe {stage}; train that first and "
                        f"give init=ITS_RUN_FOLDER (`natgrad reproduce` chains the stages)")
    if cfg.init is not None and not weights_file(cfg.init).is_file():
        raise UserError(f"init={cfg.init} is neither a .safetensors file nor a run folder holding model.safetensors; "
                        "give the weights to start from")


def _autocast(ctx: Context, cfg: RunConfig) -> contextlib.AbstractContextManager:
    if ctx.device.type == "cuda" and cfg.amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def train(cfg: RunConfig, out: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train as configured into the run folder ``out``; returns the summary written to ``summary.json``.

    SIGTERM or SIGINT stops training at the next step boundary with a checkpoint of that step, and
    raises :class:`~natgrad.errors.Preempted`; ``resume=True`` continues from it bit-for-bit.
    """
    out = Path(out)
    with StopSignals() as signals, _RunFolder(out) as folder:
        return _train(cfg, out, resume, progress, signals, folder)


class _RunFolder:
    """The run folder while this process trains in it: created and locked by :meth:`open`; if training
    fails before its first checkpoint, the files this process wrote are removed again (and the folder,
    when it made it), so that the same command can simply be run again."""

    def __init__(self, out: Path):
        self.out = out
        self.run = RunDir(out)
        self.created = False
        self.wrote = False
        self.lock: Any = None

    def open(self, main: bool, fresh: bool) -> None:
        """Create (rank 0) and lock the folder; a fresh run must find it empty once it holds the lock."""
        if not main:
            return
        self.created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock = locked(self.out)
        self.lock.__enter__()
        if fresh and not is_empty(self.out):
            raise UserError(f"{self.out} already holds files; pass --resume to continue that run, "
                            "or choose another --out")
        refuse_symlinks(self.out)
        remove_leftovers(self.out)  # temporary files of writes a kill interrupted

    def __enter__(self) -> _RunFolder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        run = self.run
        try:
            if exc_type is not None and self.wrote and not run.checkpoint.is_file():
                for path in (run.config, run.metrics, run.weights, run.ema_weights, run.summary):
                    path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    run.checkpoint.parent.rmdir()
        finally:
            if self.lock is not None:
                self.lock.__exit__(None, None, None)
            if exc_type is not None and self.created:
                with contextlib.suppress(OSError):
                    self.out.rmdir()  # only when nothing is left in it


@dataclass
class _Run:
    """One training run while this process trains it: what it is built of, and the state the loop changes
    (step, training seconds, the open epoch's sums), which the checkpoint saves and ``--resume`` restores."""

    cfg: RunConfig
    ctx: Context
    rundir: RunDir
    progress: bool
    signals: StopSignals
    train_ds: Dataset
    eval_ds: Dataset
    steps_per_epoch: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler | None
    ema: ModelEmaV3 | None
    objective: Objective
    mixup: Callable | None
    step: int = 0
    elapsed: float = 0.0
    sums: dict[str, Any] = field(default_factory=dict)
    epoch_open: bool = False  # the checkpoint's last epoch is trained but not yet evaluated and written
    last_metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch

    @property
    def talks(self) -> bool:
        """Whether this process prints progress: the main process, unless quiet."""
        return self.ctx.is_main and self.progress

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def save_checkpoint(self, open_sums: dict | None = None) -> None:
        """The state at the current step; ``open_sums``: the epoch's training is done, its end is not."""
        if self.ctx.is_main:
            ckpt.save_state(self.rundir.checkpoint, {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "step": self.step, "elapsed": self.elapsed,
                "epoch_sums": self.sums if open_sums is None else open_sums,
                "epoch_open": open_sums is not None, "rng": ckpt.rng_state(),
            })


def _train(cfg: RunConfig, out: Path, resume: bool, progress: bool, signals: StopSignals, folder: _RunFolder) -> dict:
    cfg, ctx = _checked_setup(cfg, out, resume, progress)
    run = _build_run(cfg, ctx, out, resume, progress, signals)
    finished = _open_run(run, folder, resume)
    if finished is not None:
        return finished
    if run.talks:
        print(f"natgrad: {cfg.method} on {cfg.data.name} ({len(cast(Sized, run.train_ds))} train / "
              f"{len(cast(Sized, run.eval_ds))} eval images), {cfg.model.name}, {cfg.epochs} epochs of "
              f"{run.steps_per_epoch} steps, eps={cfg.eps:.4g}, device={ctx.device}"
              + (f", {ctx.world} processes" if ctx.world > 1 else ""), flush=True)
    first = run.step // run.steps_per_epoch - run.epoch_open
    for epochs_this_run, epoch in enumerate(range(first, cfg.epochs), start=1):
        start, train_seconds, unreadable_before = _train_epoch(run, epoch)
        _finish_epoch(run, epoch, start, train_seconds, unreadable_before)
        if _stop_after_epoch(run, epoch, epochs_this_run):
            break
    barrier(ctx.world)
    return _write_summary(run)


def _checked_setup(cfg: RunConfig, out: Path, resume: bool, progress: bool) -> tuple[RunConfig, Context]:
    """The checked config (data workers capped to the machine) and the processes' context; refuses bad
    input on every process before any work, and before rank 0 writes into ``out``."""
    config_mod.validate(cfg)
    _check_init(cfg)
    if _starts_pretrained(cfg, out, resume):
        models.check_pretrained(cfg.model.name, cfg.model.pretrained)
    if cfg.data.num_workers > config_mod.usable_cpus() and progress and int(os.environ.get("RANK", "0")) == 0:
        print(f"natgrad: data.num_workers={cfg.data.num_workers} is more than this machine's "
              f"{config_mod.usable_cpus()} CPUs; using {config_mod.usable_cpus()}", flush=True)
    cfg = config_mod.capped_workers(cfg)
    ctx = setup(cfg.device)
    if ctx.device.type == "cpu":
        # Well-fitted models have tiny input gradients; their denormal floats slow CPU arithmetic many-fold.
        torch.set_flush_denormal(True)
    _check_split(cfg, ctx.world)
    _check_sync_bn(cfg, ctx)
    if cfg.compile and ctx.world > 1:
        raise UserError("compile=true runs in one process for now (DistributedDataParallel around a compiled "
                        "input gradient is untested); drop compile=true under torchrun")
    _check_out_dir(out, resume, cfg)  # on every process, so that all stop together on bad input
    barrier(ctx.world)  # before rank 0 starts writing into ``out``
    return cfg, ctx


def _starts_pretrained(cfg: RunConfig, out: Path, resume: bool) -> bool:
    """Whether this run starts from ``model.pretrained``'s weights: set, and neither ``init`` nor a checkpoint
    to resume replaces them."""
    return bool(cfg.model.pretrained) and cfg.init is None and not (resume and RunDir(out).checkpoint.is_file())


def _check_split(cfg: RunConfig, world: int) -> None:
    """Every process's every micro-batch gets images (pairs of them where mixup pairs images)."""
    unit = data.mixup_unit(cfg)
    shares = world * cfg.accum_steps
    if cfg.batch_size < unit * shares:
        what = "image pairs (mixup/cutmix)" if unit == 2 else "images"
        raise UserError(f"batch_size={cfg.batch_size} gives fewer {what} than the {world} process(es) x "
                        f"accum_steps={cfg.accum_steps} micro-batches; use batch_size >= {unit * shares} or lower "
                        "accum_steps")
    if unit == 2 and cfg.batch_size % 2:
        raise UserError(f"mixup/cutmix pair the images of a batch; batch_size={cfg.batch_size} is odd: use "
                        f"{cfg.batch_size - 1} or {cfg.batch_size + 1}")


def _check_sync_bn(cfg: RunConfig, ctx: Context) -> None:
    """``model.sync_bn`` can work here: GPUs, and no double backward through train-mode BatchNorm."""
    if not cfg.model.sync_bn or ctx.world == 1:
        return
    if ctx.device.type != "cuda":
        raise UserError("model.sync_bn=true needs GPUs (SyncBatchNorm has no CPU kernels); drop it on "
                        f"{ctx.device.type}, or freeze BatchNorm with model.train_mode=eval")
    batchnorm_trains = cfg.model.train_mode == "train" and not cfg.model.bn_eval
    if batchnorm_trains and cfg.method in DOUBLE_BACKPROP:
        raise UserError(f"model.sync_bn=true: SyncBatchNorm has no double backward, which {cfg.method} takes "
                        "through train-mode BatchNorm; use model.train_mode=eval (the paper's setting) or "
                        "model.bn_eval=true, or drop sync_bn")


def _build_run(cfg: RunConfig, ctx: Context, out: Path, resume: bool, progress: bool, signals: StopSignals) -> _Run:
    """Data, model (fine-tuning: with the ``init`` weights unless resuming), optimizer, schedule, EMA,
    objective and mixup, in the order that draws the seeded random numbers as every run does."""
    train_ds = data.build(cfg, "train")
    eval_ds = data.build(cfg, "test")
    di = data.info(cfg.data)
    n_train = len(cast(Sized, train_ds))
    steps_per_epoch = n_train // cfg.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"the training set has {n_train} images, fewer than batch_size={cfg.batch_size}; "
                        "lower batch_size")
    seed_everything(cfg.seed)
    model: nn.Module = build_model(cfg, pretrained=_starts_pretrained(cfg, out, resume)).to(ctx.device)
    if cfg.model.sync_bn:
        model = sync_batchnorm(model, ctx)
    if cfg.init and not (resume and RunDir(out).checkpoint.is_file()):  # fine-tuning, unless a checkpoint follows
        ckpt.load_weights(model, weights_file(cfg.init))
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None
    objective = build_objective(cfg, model)
    objective.distribute(data_parallel(model, ctx))  # after the weights are final: DDP broadcasts rank 0's
    mixup = data.create_mixup(cfg, di.num_classes)
    return _Run(cfg, ctx, RunDir(out), progress, signals, train_ds, eval_ds, steps_per_epoch, model, optimizer,
                scheduler, ema, objective, mixup)


def _open_run(run: _Run, folder: _RunFolder, resume: bool) -> dict | None:
    """Lock the folder and restore the checkpoint (resuming) or write ``config.yaml`` (a fresh run);
    returns the saved summary when a resumed run has nothing left to do, else None."""
    rundir, ctx = run.rundir, run.ctx
    folder.open(ctx.is_main, fresh=not resume)  # a folder to resume was checked to hold this run's config
    if resume and not rundir.checkpoint.is_file():  # stopped before its first checkpoint: nothing to continue
        if run.talks:
            print(f"natgrad: {rundir.path} has no checkpoint yet; training from the beginning", flush=True)
        resume = False
    if resume:
        _restore(run)
        run.last_metrics = _metrics_up_to(rundir, run.step // run.steps_per_epoch - run.epoch_open, ctx.is_main)
        if run.step >= run.total_steps and not run.epoch_open and rundir.summary.is_file():
            if run.talks:
                print(f"natgrad: {rundir.path} already finished all {run.cfg.epochs} epochs; nothing to do", flush=True)
            return json.loads(rundir.summary.read_text())
    elif ctx.is_main:
        rundir.metrics.unlink(missing_ok=True)  # of a run killed before its first checkpoint
        folder.wrote = True
        ckpt.atomic_write_text(rundir.config, yaml.safe_dump(dataclasses.asdict(run.cfg), sort_keys=False))
    return None


def _restore(run: _Run) -> None:
    """The model, optimizer, EMA, loop state and random generators of the checkpoint."""
    path = run.rundir.checkpoint
    state = ckpt.load_state(path)
    try:
        ckpt.load_state_dict(run.model, state["model"], path)
        run.optimizer.load_state_dict(state["optimizer"])
        if run.ema is not None:
            run.ema.load_state_dict(state["ema"])
        run.step, run.elapsed, run.sums = int(state["step"]), float(state["elapsed"]), dict(state["epoch_sums"])
        run.epoch_open = bool(state.get("epoch_open", False))
        ckpt.set_rng_state(state["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
        raise UserError(f"{path} does not fit this run ({type(e).__name__}: {str(e)[:120]}); it was "
                        "written by another version or optimizer: train into a new --out") from None
    if not 0 <= run.step <= run.total_steps:
        raise UserError(f"{path} is at step {run.step}, outside this run's 0..{run.total_steps}; "
                        "train into a new --out")


def _train_epoch(run: _Run, epoch: int) -> tuple[int, float, int]:
    """Train the rest of ``epoch``. Returns the step within the epoch it started from, the training seconds
    since the epoch's last checkpoint, and the count of unreadable images before it. A signal stops it at
    the next step boundary with a checkpoint; ``checkpoint_every`` saves one every so many steps."""
    cfg, ctx, spe = run.cfg, run.ctx, run.steps_per_epoch
    run.model.train()
    start = run.step - epoch * spe
    loader = data.train_loader(run.train_ds, cfg, epoch, ctx.rank, ctx.world, start=start)
    bar = Progress(_micro_batches(loader, cfg.accum_steps), total=spe, initial=start,
                   desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not run.talks,
                   dynamic_ncols=True)
    t0 = time.perf_counter()
    unreadable_before = data.unreadable_count(run.train_ds)
    for micro in bar:
        _train_step(run, micro, epoch)
        dt = time.perf_counter() - t0
        if run.sums.get("steps"):  # none yet when the epoch's first steps were skipped as non-finite
            bar.set_postfix(loss=f"{run.sums['loss'] / run.sums['steps']:.4f}",
                            img_s=f"{(run.step - epoch * spe - start) * cfg.batch_size / max(dt, 1e-9):.0f}")
        _check_unreadable(run, epoch, unreadable_before)
        stop = _received(run.signals, ctx)
        if stop is not None and run.step % spe:  # at an epoch's end the epoch is finished first
            run.signals.act()
            run.elapsed += time.perf_counter() - t0
            run.save_checkpoint()
            bar.close()
            raise Preempted(f"stopped by {signal.Signals(stop).name} at step {run.step} (epoch {epoch + 1}); the "
                            f"checkpoint is saved in {run.rundir.checkpoint}: run the same command with --resume to "
                            "continue", stop)
        if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0 and run.step % spe:
            run.elapsed += time.perf_counter() - t0
            t0 = time.perf_counter()
            run.save_checkpoint()
    bar.close()
    train_seconds = time.perf_counter() - t0
    run.elapsed += train_seconds
    return start, train_seconds, unreadable_before


def _micro_batches(loader: Iterable, accum: int) -> Iterator[list]:
    """The loader's micro-batches, ``accum`` at a time: one optimizer step's worth."""
    step: list = []
    for batch in loader:
        step.append(batch)
        if len(step) == accum:
            yield step
            step = []


def _train_step(run: _Run, micro: list[tuple[torch.Tensor, torch.Tensor]], epoch: int) -> None:
    """One optimizer step on this process's micro-batches (then the EMA and the epoch's sums), or, where the
    loss or the gradient is not finite on some process, the ``on_nonfinite`` policy.

    Each micro-batch's mean loss is weighted by its share of the global batch (times the processes, whose
    gradients are averaged), so the step's gradient is the global batch's mean for any split."""
    cfg, ctx = run.cfg, run.ctx
    if run.scheduler is not None:
        run.scheduler.step_update(run.step)
    run.optimizer.zero_grad(set_to_none=True)
    n_local = sum(len(y) for _, y in micro)
    means: dict[str, float] = {}
    fault = None
    for i, (x, y) in enumerate(micro):
        n = len(y)
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        if run.mixup is not None:
            x, y = run.mixup(x, y)
        with gradient_sync(run.objective.loss_model, sync=i == len(micro) - 1):
            with _autocast(ctx, cfg):
                result = run.objective(x, y, epoch_fraction=run.step / run.steps_per_epoch)
            loss = result["loss"]
            if not _finite(loss.detach(), ctx):
                fault = "loss"
                break
            # DDP averages over processes: the weight makes the sum the global batch's mean
            run.objective.backward(loss * (n * ctx.world / cfg.batch_size))
        for k, v in [*result.items(), ("loss", loss.item())]:
            if isinstance(v, float):
                means[k] = means.get(k, 0.0) + v * n / n_local
    if fault is None:
        # the gradient norm, clipped where the recipe asks (max_norm inf leaves the gradients as they are)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.optim.clip_grad or math.inf)
        fault = None if _finite(grad_norm, ctx) else "gradient"
    if fault is not None:
        _skip_step(run, fault, epoch, loss, result)
        return
    run.optimizer.step()
    run.step += 1
    if run.ema is not None:
        run.ema.update(run.model, step=run.step)
    sums = run.sums
    for k, v in means.items():
        sums[k] = sums.get(k, 0.0) + v
    sums["steps"] = sums.get("steps", 0) + 1


def _skip_step(run: _Run, fault: str, epoch: int, loss: torch.Tensor, result: dict) -> None:
    """A non-finite ``fault`` ("loss" or "gradient"): stop with the last good checkpoint, or skip the step."""
    parts = ", ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float))
    where = f"non-finite {fault} at step {run.step} (epoch {epoch + 1}): loss={loss.item()}, {parts}"
    if run.cfg.on_nonfinite == "stop":
        raise NonFiniteLossError(f"{where}; {_kept(run.rundir)}; lower lr or the regularization weight, or set "
                                 "on_nonfinite=skip")
    run.optimizer.zero_grad(set_to_none=True)  # skipped: the parameters and EMA stay as they were
    run.sums["skipped_steps"] = run.sums.get("skipped_steps", 0) + 1
    if run.talks:
        Progress.write(f"natgrad: skipped the step ({where})")
    run.step += 1


def _check_unreadable(run: _Run, epoch: int, unreadable_before: int) -> None:
    """Stop when the epoch skipped more unreadable images than ``data.max_unreadable``."""
    cfg = run.cfg
    unreadable = data.unreadable_count(run.train_ds) - unreadable_before
    if unreadable > cfg.data.max_unreadable:
        raise UserError(f"{unreadable} unreadable images skipped in epoch {epoch + 1}, more than "
                        f"data.max_unreadable={cfg.data.max_unreadable}; check the files under {cfg.data.root} "
                        f"or raise the limit ({_kept(run.rundir)})")


def _finish_epoch(run: _Run, epoch: int, start: int, train_seconds: float, unreadable_before: int) -> None:
    """The trained epoch's metrics and evaluation; then (rank 0) its weights and metrics line, and after
    them the checkpoint: a kill in between repeats the epoch (its metrics line is dropped on resume) and
    ends with the same files."""
    cfg, spe = run.cfg, run.steps_per_epoch
    open_sums = dict(run.sums)
    metrics = _train_metrics(run, epoch, unreadable_before)
    if (epoch + 1) % cfg.eval.every == 0 or epoch + 1 == cfg.epochs:
        metrics.update(_evaluate_epoch(run, epoch, open_sums))
    metrics.update({"lr": run.optimizer.param_groups[0]["lr"], "seconds": train_seconds, "elapsed": run.elapsed})
    if start < spe:  # not an epoch whose training a previous run finished
        metrics["images_per_s"] = (spe - start) * cfg.batch_size / max(train_seconds, 1e-9)
    run.last_metrics = metrics
    if run.ctx.is_main:
        ckpt.save_weights(run.model, run.rundir.weights)
        if run.ema is not None:
            ckpt.save_weights(run.ema.module, run.rundir.ema_weights)
        with open(run.rundir.metrics, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        run.save_checkpoint()
        if run.progress:
            print(_epoch_line(metrics, cfg.epochs), flush=True)


def _train_metrics(run: _Run, epoch: int, unreadable_before: int) -> dict[str, Any]:
    """The epoch's training means (and counts of unreadable images and skipped steps); empties the sums."""
    sums, train_ds = run.sums, run.train_ds
    metrics: dict[str, Any] = {"epoch": epoch + 1, "step": run.step}
    n_steps = max(sums.pop("steps", 1), 1)
    metrics["train_loss"] = sums.pop("loss", math.nan) / n_steps
    if data.unreadable_count(train_ds) > unreadable_before:
        metrics["unreadable_images"] = data.unreadable_count(train_ds) - unreadable_before
    if "skipped_steps" in sums:
        metrics["skipped_steps"] = sums.pop("skipped_steps")
    metrics.update({f"train_{k}": v / n_steps for k, v in sums.items()})
    run.sums = {}
    return metrics


def _evaluate_epoch(run: _Run, epoch: int, open_sums: dict[str, Any]) -> dict[str, Any]:
    """Clean and PGD accuracy of the (EMA) model. A signal during the evaluation stops it at once, with a
    checkpoint that marks the epoch open; a signal before it lets it finish first."""
    cfg, signals = run.cfg, run.signals
    t1 = time.perf_counter()
    try:
        with signals.raise_now() if signals.signum is None else nullcontext():
            result = evaluate(run.eval_model, run.eval_ds, cfg.eps, cfg.eval.pgd_steps, cfg.eval.batch_size, run.ctx,
                              seed=cfg.seed, progress=run.progress)
    except Preempted as stopped:
        run.save_checkpoint(open_sums)
        raise Preempted(f"stopped by {signal.Signals(stopped.exit_code - 128).name} while evaluating epoch "
                        f"{epoch + 1}; the checkpoint is saved in {run.rundir.checkpoint}: run the same command "
                        "with --resume to evaluate it and continue", stopped.exit_code - 128) from None
    return {"clean_acc": result["clean_acc"], "pgd_acc": result["pgd_acc"], "pgd_steps": result["pgd_steps"],
            "eval_n": result["n"], "eval_seconds": time.perf_counter() - t1}


def _stop_after_epoch(run: _Run, epoch: int, epochs_this_run: int) -> bool:
    """Raise :class:`Preempted` on a signal, or return True where ``stop_after`` epochs are done (not after
    the last epoch: the run then completes)."""
    cfg = run.cfg
    stop = _received(run.signals, run.ctx)
    if stop is not None and epoch + 1 < cfg.epochs:  # after the last one the run completes, then stops
        run.signals.act()
        raise Preempted(f"stopped by {signal.Signals(stop).name} after epoch {epoch + 1}; the checkpoint is saved "
                        f"in {run.rundir.checkpoint}: run the same command with --resume to continue", stop)
    if cfg.stop_after is not None and epochs_this_run >= cfg.stop_after and epoch + 1 < cfg.epochs:
        if run.talks:
            print(f"natgrad: stopped after {epochs_this_run} epoch(s) as asked; continue with --resume", flush=True)
        return True
    return False


def _write_summary(run: _Run) -> dict:
    """The run's summary (its last epoch's metrics included), written by rank 0 to ``summary.json``."""
    cfg, ctx = run.cfg, run.ctx
    summary = {"method": cfg.method, "model": cfg.model.name, "data": cfg.data.name, "eps": cfg.eps,
               "epochs_done": run.step // run.steps_per_epoch, "epochs": cfg.epochs, "steps": run.step,
               "train_seconds": run.elapsed, "world_size": ctx.world, "device": str(ctx.device),
               "ema": run.ema is not None, **{k: v for k, v in run.last_metrics.items() if k not in ("epoch", "step")}}
    if ctx.is_main:
        ckpt.atomic_write_text(run.rundir.summary, json.dumps(summary, indent=2))
    return summary


def _metrics_up_to(rundir: RunDir, epochs: int, main: bool) -> dict[str, Any]:
    """Keep the metrics lines of the first ``epochs`` epochs (a later line belongs to an epoch that the
    checkpoint does not hold, and will be made again); returns the last one kept."""
    path = rundir.metrics
    lines = path.read_text().splitlines() if path.is_file() else []
    kept = []
    for line in lines:
        try:
            m = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if m.get("epoch", 0) <= epochs:
            kept.append(m)
    if main and len(kept) != len(lines):
        ckpt.atomic_write_text(path, "".join(json.dumps(m) + "\n" for m in kept))
    return kept[-1] if kept else {}


def _finite(value: torch.Tensor, ctx: Context) -> bool:
    """Whether ``value`` is finite on every process (all processes take the same decision)."""
    bad = torch.tensor([0.0 if torch.isfinite(value).all() else 1.0], device=ctx.device)
    return sum_over_processes(bad, ctx.world).item() == 0


def _received(signals: StopSignals, ctx: Context) -> int | None:
    """The signal received by any process since training started, or None (all processes agree)."""
    if ctx.world > 1:
        flag = torch.tensor([float(signals.signum or 0)], device=ctx.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None
    return signals.signum


def _kept(rundir: RunDir) -> str:
    """What is left of the run after a failure, in words."""
    if rundir.checkpoint.is_file():
        return f"the last good checkpoint is kept in {rundir.checkpoint}"
    return "no checkpoint had been written yet, so the run folder was cleared: run the same command again"


def _epoch_line(m: dict, epochs: int) -> str:
    parts = [f"epoch {m['epoch']}/{epochs}", f"train_loss {m['train_loss']:.4f}"]
    if "clean_acc" in m:
        parts.append(f"clean {100 * m['clean_acc']:.2f}%")
        if m["pgd_acc"] is not None:
            parts.append(f"PGD-{m['pgd_steps']} {100 * m['pgd_acc']:.2f}%")
        parts.append(f"(n={m['eval_n']})")
    if m.get("unreadable_images"):
        parts.append(f"{m['unreadable_images']} unreadable images skipped")
    if m.get("skipped_steps"):
        parts.append(f"{m['skipped_steps']} non-finite steps skipped")
    parts.append(f"{m['seconds']:.1f}s")
    return "natgrad: " + ", ".join(parts)


__all__ = ["MIN_FREE_BYTES", "train"]
