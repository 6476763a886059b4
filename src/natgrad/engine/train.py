"""The training engine: one loop for every objective.

AdamW and a per-iteration cosine schedule with warmup (timm), gradient clipping, EMA of the
weights (timm), bf16 autocast on CUDA, per-epoch clean and PGD accuracy, atomic checkpoints,
exact ``--resume``, and data parallelism under torchrun.

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
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import yaml
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from tqdm.auto import tqdm

from natgrad import config as config_mod
from natgrad import data, objectives
from natgrad.build import build_model, objective_params, seed_everything
from natgrad.config import RunConfig
from natgrad.engine import checkpoint as ckpt
from natgrad.engine.distributed import Context, all_reduce_gradients, barrier, setup, sum_over_processes
from natgrad.errors import NonFiniteLossError, Preempted, UserError
from natgrad.evaluation import evaluate
from natgrad.rundir import (
    CHECKPOINT,
    CONFIG,
    EMA_WEIGHTS,
    METRICS,
    SUMMARY,
    WEIGHTS,
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
        if not (out / CONFIG).is_file():
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
    if not parent.is_dir() or not _writable(parent):
        raise UserError(f"cannot write to {parent}; choose an --out in a writable folder")
    if shutil.disk_usage(parent).free < MIN_FREE_BYTES:
        raise UserError(f"{parent} has under {MIN_FREE_BYTES >> 20} MB free; free space or choose another --out")


def _check_init(cfg: RunConfig) -> None:
    """The weights to fine-tune from exist (checked before any work)."""
    if cfg.init is not None and not weights_file(cfg.init).is_file():
        raise UserError(f"init={cfg.init} is neither a .safetensors file nor a run folder holding model.safetensors; "
                        "give the weights to start from")


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def _autocast(ctx: Context, cfg: RunConfig):
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
            raise UserError(f"{self.out} already holds files; pass --resume to continue that run, or choose another --out")
        refuse_symlinks(self.out)
        remove_leftovers(self.out)  # temporary files of writes a kill interrupted

    def __enter__(self) -> _RunFolder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            if exc_type is not None and self.wrote and not (self.out / CHECKPOINT).is_file():
                for name in (CONFIG, METRICS, WEIGHTS, EMA_WEIGHTS, SUMMARY):
                    (self.out / name).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    (self.out / CHECKPOINT.parent).rmdir()
        finally:
            if self.lock is not None:
                self.lock.__exit__(None, None, None)
            if exc_type is not None and self.created:
                with contextlib.suppress(OSError):
                    self.out.rmdir()  # only when nothing is left in it


def _train(cfg: RunConfig, out: Path, resume: bool, progress: bool, signals: StopSignals, folder: _RunFolder) -> dict:
    config_mod.validate(cfg)
    _check_init(cfg)
    if cfg.data.num_workers > config_mod.usable_cpus() and progress and int(os.environ.get("RANK", "0")) == 0:
        print(f"natgrad: data.num_workers={cfg.data.num_workers} is more than this machine's "
              f"{config_mod.usable_cpus()} CPUs; using {config_mod.usable_cpus()}", flush=True)
    cfg = config_mod.capped_workers(cfg)
    ctx = setup(cfg.device)
    if ctx.device.type == "cpu":
        # Well-fitted models have tiny input gradients; their denormal floats slow CPU arithmetic many-fold.
        torch.set_flush_denormal(True)
    if cfg.batch_size % ctx.world:
        raise UserError(f"batch_size={cfg.batch_size} is not divisible by the {ctx.world} processes; use a multiple of {ctx.world}")
    if (cfg.aug.mixup > 0 or cfg.aug.cutmix > 0) and (cfg.batch_size // ctx.world) % 2:
        raise UserError(f"mixup/cutmix need an even batch per process (got {cfg.batch_size // ctx.world}); change batch_size")
    _check_out_dir(out, resume, cfg)  # on every process, so that all stop together on bad input
    barrier(ctx.world)  # before rank 0 starts writing into ``out``

    train_ds = data.build(cfg, "train")
    eval_ds = data.build(cfg, "test")
    di = data.info(cfg.data)
    steps_per_epoch = data.steps_per_epoch(len(train_ds), cfg.batch_size)
    if steps_per_epoch == 0:
        raise UserError(f"the training set has {len(train_ds)} images, fewer than batch_size={cfg.batch_size}; lower batch_size")
    total_steps = cfg.epochs * steps_per_epoch

    seed_everything(cfg.seed)
    model = build_model(cfg).to(ctx.device)
    if cfg.init and not resume:  # fine-tuning; checked before the run folder is created
        ckpt.load_weights(model, weights_file(cfg.init))
    optimizer = create_optimizer_v2(model, opt=cfg.optim.name, lr=cfg.lr, weight_decay=cfg.optim.weight_decay,
                                    eps=cfg.optim.opt_eps, momentum=cfg.optim.momentum)
    scheduler = None
    if cfg.optim.sched == "cosine":
        scheduler = CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=cfg.optim.min_lr,
                                      warmup_t=round(cfg.optim.warmup_epochs * steps_per_epoch),
                                      warmup_lr_init=cfg.optim.warmup_lr, warmup_prefix=True, t_in_epochs=False)
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None
    objective = objectives.create(cfg.method, model, **objective_params(cfg))
    mixup = data.create_mixup(cfg, di.num_classes)

    step, elapsed, sums = 0, 0.0, {}
    last_metrics: dict[str, Any] = {}
    if resume and not (out / CHECKPOINT).is_file():  # stopped before its first checkpoint: nothing to continue
        if ctx.is_main and progress:
            print(f"natgrad: {out} has no checkpoint yet; training from the beginning", flush=True)
        resume = False
    folder.open(ctx.is_main, fresh=not resume)
    epoch_open = False  # the checkpoint's last epoch is trained but not yet evaluated and written
    if resume:
        state = ckpt.load_state(out / CHECKPOINT)
        try:
            ckpt.load_state_dict(model, state["model"], out / CHECKPOINT)
            optimizer.load_state_dict(state["optimizer"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
            step, elapsed, sums = int(state["step"]), float(state["elapsed"]), dict(state["epoch_sums"])
            epoch_open = bool(state.get("epoch_open", False))
            ckpt.set_rng_state(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
            raise UserError(f"{out / CHECKPOINT} does not fit this run ({type(e).__name__}: {str(e)[:120]}); it was "
                            "written by another version or optimizer: train into a new --out") from None
        if not 0 <= step <= total_steps:
            raise UserError(f"{out / CHECKPOINT} is at step {step}, outside this run's 0..{total_steps}; "
                            "train into a new --out")
        last_metrics = _metrics_up_to(out, step // steps_per_epoch - epoch_open, ctx.is_main)
        if step >= total_steps and not epoch_open and (out / SUMMARY).is_file():
            if ctx.is_main and progress:
                print(f"natgrad: {out} already finished all {cfg.epochs} epochs; nothing to do", flush=True)
            return json.loads((out / SUMMARY).read_text())
    elif ctx.is_main:
        (out / METRICS).unlink(missing_ok=True)  # of a run killed before its first checkpoint
        folder.wrote = True
        ckpt.atomic_write_text(out / CONFIG, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))

    def save_checkpoint(open_sums: dict | None = None) -> None:
        """The state at the current step; ``open_sums``: the epoch's training is done, its end is not."""
        if ctx.is_main:
            ckpt.save_state(out / CHECKPOINT, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "step": step, "elapsed": elapsed, "epoch_sums": sums if open_sums is None else open_sums,
                "epoch_open": open_sums is not None, "rng": ckpt.rng_state(),
            })

    eval_model = ema.module if ema is not None else model
    epochs_this_run = 0
    if ctx.is_main and progress:
        print(f"natgrad: {cfg.method} on {cfg.data.name} ({len(train_ds)} train / {len(eval_ds)} eval images), "
              f"{cfg.model.name}, {cfg.epochs} epochs of {steps_per_epoch} steps, eps={cfg.eps:.4g}, device={ctx.device}"
              + (f", {ctx.world} processes" if ctx.world > 1 else ""), flush=True)
    for epoch in range(step // steps_per_epoch - epoch_open, cfg.epochs):
        model.train()
        start = step - epoch * steps_per_epoch
        loader = data.train_loader(train_ds, cfg, epoch, ctx.rank, ctx.world, start=start)
        bar = tqdm(loader, total=steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (progress and ctx.is_main), dynamic_ncols=True)
        t0 = time.perf_counter()
        unreadable_before = data.unreadable_count(train_ds)
        for x, y in bar:
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            if mixup is not None:
                x, y = mixup(x, y)
            if scheduler is not None:
                scheduler.step_update(step)
            with _autocast(ctx, cfg):
                result = objective(x, y, epoch_fraction=step / steps_per_epoch)
            loss = result["loss"]
            optimizer.zero_grad(set_to_none=True)
            fault = None if _finite(loss.detach(), ctx) else "loss"
            if fault is None:
                loss.backward()
                all_reduce_gradients(model, ctx.world)
                # the gradient norm, clipped where the recipe asks (max_norm inf leaves the gradients as they are)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad or math.inf)
                fault = None if _finite(grad_norm, ctx) else "gradient"
            if fault is not None:
                parts = ", ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float))
                where = f"non-finite {fault} at step {step} (epoch {epoch + 1}): loss={loss.item()}, {parts}"
                if cfg.on_nonfinite == "stop":
                    raise NonFiniteLossError(f"{where}; {_kept(out)}; lower lr or the regularization weight, or set "
                                             "on_nonfinite=skip")
                optimizer.zero_grad(set_to_none=True)  # skipped: the parameters and EMA stay as they were
                sums["skipped_steps"] = sums.get("skipped_steps", 0) + 1
                if ctx.is_main and progress:
                    tqdm.write(f"natgrad: skipped the step ({where})")
                step += 1
            else:
                optimizer.step()
                step += 1
                if ema is not None:
                    ema.update(model, step=step)
                for k, v in result.items():
                    if isinstance(v, float):
                        sums[k] = sums.get(k, 0.0) + v
                sums["loss"] = sums.get("loss", 0.0) + loss.item()
                sums["steps"] = sums.get("steps", 0) + 1
            dt = time.perf_counter() - t0
            bar.set_postfix(loss=f"{sums['loss'] / sums['steps']:.4f}",
                            img_s=f"{(step - epoch * steps_per_epoch - start) * cfg.batch_size / max(dt, 1e-9):.0f}")
            unreadable = data.unreadable_count(train_ds) - unreadable_before
            if unreadable > cfg.data.max_unreadable:
                raise UserError(f"{unreadable} unreadable images skipped in epoch {epoch + 1}, more than "
                                f"data.max_unreadable={cfg.data.max_unreadable}; check the files under {cfg.data.root} "
                                f"or raise the limit ({_kept(out)})")
            stop = _received(signals, ctx)
            if stop is not None and step % steps_per_epoch:  # at an epoch's end the epoch is finished first
                signals.act()
                elapsed += time.perf_counter() - t0
                save_checkpoint()
                bar.close()
                raise Preempted(f"stopped by {signal.Signals(stop).name} at step {step} (epoch {epoch + 1}); the "
                                f"checkpoint is saved in {out / CHECKPOINT}: run the same command with --resume to "
                                "continue", stop)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step % steps_per_epoch:
                elapsed += time.perf_counter() - t0
                t0 = time.perf_counter()
                save_checkpoint()
        bar.close()
        train_seconds = time.perf_counter() - t0
        elapsed += train_seconds
        open_sums = dict(sums)
        metrics: dict[str, Any] = {"epoch": epoch + 1, "step": step}
        n_steps = max(sums.pop("steps", 1), 1)
        metrics["train_loss"] = sums.pop("loss", math.nan) / n_steps
        if data.unreadable_count(train_ds) > unreadable_before:
            metrics["unreadable_images"] = data.unreadable_count(train_ds) - unreadable_before
        if "skipped_steps" in sums:
            metrics["skipped_steps"] = sums.pop("skipped_steps")
        metrics.update({f"train_{k}": v / n_steps for k, v in sums.items()})
        sums = {}
        if (epoch + 1) % cfg.eval.every == 0 or epoch + 1 == cfg.epochs:
            t1 = time.perf_counter()
            try:  # a signal during the evaluation stops it at once; a signal before it lets it finish first
                with signals.raise_now() if signals.signum is None else nullcontext():
                    result = evaluate(eval_model, eval_ds, cfg.eps, cfg.eval.pgd_steps, cfg.eval.batch_size, ctx,
                                      seed=cfg.seed, progress=progress)
            except Preempted as stopped:
                save_checkpoint(open_sums)
                raise Preempted(f"stopped by {signal.Signals(stopped.exit_code - 128).name} while evaluating epoch "
                                f"{epoch + 1}; the checkpoint is saved in {out / CHECKPOINT}: run the same command "
                                "with --resume to evaluate it and continue", stopped.exit_code - 128) from None
            metrics.update({"clean_acc": result["clean_acc"], "pgd_acc": result["pgd_acc"], "pgd_steps": result["pgd_steps"],
                            "eval_n": result["n"], "eval_seconds": time.perf_counter() - t1})
        metrics.update({"lr": optimizer.param_groups[0]["lr"], "seconds": train_seconds, "elapsed": elapsed})
        if start < steps_per_epoch:  # not an epoch whose training a previous run finished
            metrics["images_per_s"] = (steps_per_epoch - start) * cfg.batch_size / max(train_seconds, 1e-9)
        last_metrics = metrics
        if ctx.is_main:
            # Weights and metrics before the checkpoint: a kill in between repeats the epoch (its metrics line
            # is dropped on resume) and ends with the same files.
            ckpt.save_weights(model, out / WEIGHTS)
            if ema is not None:
                ckpt.save_weights(ema.module, out / EMA_WEIGHTS)
            with open(out / METRICS, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            save_checkpoint()
            if progress:
                print(_epoch_line(metrics, cfg.epochs), flush=True)
        epochs_this_run += 1
        stop = _received(signals, ctx)
        if stop is not None and epoch + 1 < cfg.epochs:  # after the last one the run completes, then stops
            signals.act()
            raise Preempted(f"stopped by {signal.Signals(stop).name} after epoch {epoch + 1}; the checkpoint is saved "
                            f"in {out / CHECKPOINT}: run the same command with --resume to continue", stop)
        if cfg.stop_after is not None and epochs_this_run >= cfg.stop_after and epoch + 1 < cfg.epochs:
            if ctx.is_main and progress:
                print(f"natgrad: stopped after {epochs_this_run} epoch(s) as asked; continue with --resume", flush=True)
            break
    barrier(ctx.world)
    summary = {"method": cfg.method, "model": cfg.model.name, "data": cfg.data.name, "eps": cfg.eps,
               "epochs_done": step // steps_per_epoch, "epochs": cfg.epochs, "steps": step,
               "train_seconds": elapsed, "world_size": ctx.world, "device": str(ctx.device),
               "ema": ema is not None, **{k: v for k, v in last_metrics.items() if k not in ("epoch", "step")}}
    if ctx.is_main:
        ckpt.atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2))
    return summary


def _metrics_up_to(out: Path, epochs: int, main: bool) -> dict[str, Any]:
    """Keep the metrics lines of the first ``epochs`` epochs (a later line belongs to an epoch that the
    checkpoint does not hold, and will be made again); returns the last one kept."""
    path = out / METRICS
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


def _kept(out: Path) -> str:
    """What is left of the run after a failure, in words."""
    if (out / CHECKPOINT).is_file():
        return f"the last good checkpoint is kept in {out / CHECKPOINT}"
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
