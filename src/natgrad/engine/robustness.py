"""Robustness evaluation behind ``natgrad eval``: load a model, run named attacks at several eps.

Every attack shards the images across torchrun processes by global batch (batch ``b`` goes to rank
``b % world``, and its randomness is seeded by ``seed + b``) and merges exact counts, so the
numbers are the same for any number of processes. Each row of
the result is ``{"attack", "eps", "n", "robust_acc", ...}``; ``clean`` is the attack with eps 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from natgrad import config as config_mod
from natgrad import data
from natgrad.attacks import eval_mode, finite_logits, paper_step_size, pgd
from natgrad.build import LoadedModel, load_trained
from natgrad.config import RunConfig
from natgrad.engine import checkpoint as ckpt
from natgrad.engine.distributed import Context, gather_unique, sum_over_processes
from natgrad.errors import UserError, did_you_mean
from natgrad.rundir import AUTOATTACK_STATE, RunDir

PER_EPS = ("clean", "pgd", "pgd-l2dir", "autoattack", "autoattack-plus", "autoattack-custom", "transfer")
SWEEPS = ("eps-sweep", "steps-sweep")
ATTACKS = PER_EPS + SWEEPS
REFERENCE_EPS = 4 / 255  # the paper's eps; sweeps and step sizes scale from it


def load_model(source: str | Path, recipe: str | None = None, model_name: str | None = None,
               device: torch.device | str = "cpu", ema: bool = True) -> LoadedModel:
    """A run folder (its EMA weights when it has them) or a safetensors file with ``recipe``."""
    source = Path(source)
    if source.is_dir():
        return RunDir(source).load_model(ema, device, model_name)
    if source.is_file():
        if recipe is None:
            raise UserError(f"{source} is a weights file: also give --recipe (the recipe it was trained with)")
        cfg = config_mod.load(recipe)
        if model_name is not None:
            cfg.model.name = model_name
        return load_trained(cfg, source, source.stem, device)
    raise UserError(f"{source} does not exist; give a run folder or a .safetensors file")


def eval_dataset(cfg: RunConfig, n: int | None) -> Dataset:
    """The recipe's test set, or a fixed seeded subset of ``n`` images (the one training evaluates on)."""
    full = data.build(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, limit_eval=None)), "test")
    if n is not None:
        if n < 1 or n > len(full):
            raise UserError(f"--n {n} is outside 1..{len(full)}, the size of the {cfg.data.name} test set")
        return data.fixed_subset(full, n, seed=4321)
    return full


def parse_attacks(names: str | list[str]) -> list[str]:
    out = [a.strip() for a in names.split(",")] if isinstance(names, str) else list(names)
    for a in out:
        if a not in ATTACKS:
            raise UserError(f"unknown attack {a!r}{did_you_mean(a, ATTACKS)}; known: {', '.join(ATTACKS)}")
    return out


def parse_eps(text: str | list[float]) -> list[float]:
    """``"1/255,2/255,4/255"`` -> floats in [0, 1]."""
    values = []
    for part in text.split(",") if isinstance(text, str) else text:
        v = config_mod.parse_number(part)
        if v is None:
            raise UserError(f"--eps value {part!r} is not a number; write e.g. 0.1 or 4/255")
        if not 0.0 <= v <= 1.0:
            raise UserError(f"--eps value {part} is outside [0, 1]; eps is in pixel units of [0, 1] images")
        values.append(v)
    return values


# ---------------------------------------------------------------------------- counting over shards


def shard_batches(ds: Dataset, batch_size: int, ctx: Context, seed: int, desc: str,
                  progress: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This process's global batches, in order, each with the global RNG seeded by ``seed + b``."""
    starts = range(0, len(ds), batch_size)
    mine = [list(range(a, min(a + batch_size, len(ds)))) for b, a in enumerate(starts) if b % ctx.world == ctx.rank]
    loader = DataLoader(ds, batch_sampler=mine)
    for k, (x, y) in enumerate(tqdm(loader, desc=desc, leave=False, disable=not (progress and ctx.is_main))):
        torch.manual_seed(seed + ctx.rank + k * ctx.world)  # = seed + global batch index
        yield x.to(ctx.device), y.to(ctx.device)


def _accuracy_counts(model: nn.Module, ds: Dataset, ctx: Context, s: EvalSettings, desc: str,
                     perturb: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None) -> tuple[int, int]:
    """(images, correct) over all processes; ``perturb(x, y)`` makes the attacked batch."""
    counts = torch.zeros(2, dtype=torch.float64)
    for x, y in shard_batches(ds, s.batch_size, ctx, s.seed, desc, s.progress):
        x_adv = x if perturb is None else perturb(x, y)
        with torch.no_grad():
            counts[1] += (finite_logits(model(x_adv), f"the images of {desc}").argmax(1) == y).sum().item()
        counts[0] += len(y)
    counts = sum_over_processes(counts.to(ctx.device), ctx.world).cpu()
    return int(counts[0]), int(counts[1])


def _row(attack: str, eps: float, n: int, correct: int, **extra: Any) -> dict:
    return {"attack": attack, "eps": eps, "n": n, "robust_acc": correct / max(n, 1), **extra}


@dataclasses.dataclass
class EvalSettings:
    """What ``evaluate_model`` runs; defaults are the paper's."""

    attacks: list[str]
    eps: list[float]
    pgd_steps: tuple[int, ...] = (10, 100)
    restarts: int = 1
    batch_size: int = 256
    seed: int = 0
    aa_attacks: list[str] | None = None  # for autoattack-custom
    source: nn.Module | None = None  # for transfer
    source_steps: int = 100
    sweep_eps: list[float] | None = None  # default 0..8 eps_ref in 16 steps, scaled to the recipe's eps
    sweep_steps: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100)
    progress: bool = True
    state_dir: Path | None = None  # AutoAttack saves its progress here per batch and resumes from it
    square_queries: int | None = None  # None: AutoAttack's 5000


def autoattack_state_dir(run: Path, model: nn.Module, s: EvalSettings, n: int) -> Path:
    """Where a run folder keeps AutoAttack's progress for one evaluation: a folder per digest of the weights
    and of every setting that decides AutoAttack's work, so that an interrupted evaluation continues and
    no other weights or settings can ever pick its numbers up."""
    what = json.dumps([ckpt.model_digest(model), s.attacks, s.eps, n, s.seed, s.batch_size, s.square_queries,
                       s.aa_attacks])
    return Path(run) / AUTOATTACK_STATE / hashlib.sha256(what.encode()).hexdigest()[:16]


def remove_autoattack_state(state_dir: Path) -> None:
    """Delete a finished evaluation's progress (and the parent folder when no other evaluation left any)."""
    shutil.rmtree(state_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        state_dir.parent.rmdir()


def evaluate_model(model: nn.Module, ds: Dataset, settings: EvalSettings, ctx: Context) -> dict:
    """Run every named attack at every eps on ``ds``; returns ``{"results": [...], "sweeps": {...}}``."""
    s = settings
    rows: list[dict] = []
    sweeps: dict[str, Any] = {}
    devices = [ctx.device] if ctx.device.type == "cuda" else []
    was_training = model.training
    with eval_mode(model), torch.random.fork_rng(devices=devices):
        integrity = _integrity(model, ds, ctx, s, was_training)
        for attack in s.attacks:
            if attack == "clean":
                n, correct = _accuracy_counts(model, ds, ctx, s, "clean", None)
                rows.append(_row("clean", 0.0, n, correct))
            elif attack in ("pgd", "pgd-l2dir"):
                direction = "sign" if attack == "pgd" else "l2"
                for eps in s.eps:
                    for steps in s.pgd_steps:
                        def perturb(x, y, eps=eps, steps=steps, direction=direction):
                            return pgd(model, x, y, eps, steps, paper_step_size(eps), random_start=True, keep_best=True,
                                       direction=direction, restarts=s.restarts)
                        name = f"{attack}-{steps}"
                        n, correct = _accuracy_counts(model, ds, ctx, s, f"{name} eps={eps:.4g}", perturb)
                        rows.append(_row(name, eps, n, correct, steps=steps, step_size=paper_step_size(eps), restarts=s.restarts))
            elif attack.startswith("autoattack"):
                for eps in s.eps:
                    rows.append(_autoattack_row(model, ds, ctx, attack, eps, s))
            elif attack == "transfer":
                if s.source is None:
                    raise UserError("the transfer attack needs --source RUN_DIR (the model the examples are made on)")
                for eps in s.eps:
                    def perturb(x, y, eps=eps):
                        return pgd(s.source, x, y, eps, s.source_steps, paper_step_size(eps), random_start=True, keep_best=True)
                    n, correct = _accuracy_counts(model, ds, ctx, s, f"transfer eps={eps:.4g}", perturb)
                    rows.append(_row("transfer", eps, n, correct, source_steps=s.source_steps))
            elif attack == "eps-sweep":
                sweeps["eps"] = _eps_sweep(model, ds, ctx, s)
            elif attack == "steps-sweep":
                sweeps["steps"] = _steps_sweep(model, ds, ctx, s)
    integrity["autoattack_warnings"] = [w for r in rows for w in r.get("warnings", [])]
    return {"results": rows, "sweeps": sweeps, "integrity": integrity}


def _integrity(model: nn.Module, ds: Dataset, ctx: Context, s: EvalSettings, was_training: bool) -> dict:
    """What every evaluation reports about the model: whether it came in train mode (it is evaluated in
    eval mode), modules that stay in train mode after ``eval()``, and whether two identical forward
    passes of the first batch agree (randomness masks gradients and flatters attacks)."""
    in_train = [name or type(m).__name__ for name, m in model.named_modules() if m.training]
    same = deterministic(model, ds, ctx, s)
    warnings = []
    if was_training:
        warnings.append("the model was in train mode; it was evaluated in eval mode")
    if in_train:
        warnings.append(f"modules stay in train mode after eval(): {', '.join(in_train[:5])}")
    if not same:
        warnings.append("two identical forward passes differ: dropout or other randomness is on, which masks "
                        "gradients and makes attacks look weaker")
    return {"model_was_in_train_mode": was_training, "modules_in_train_mode": in_train,
            "deterministic": same, "warnings": warnings}


def deterministic(model: nn.Module, ds: Dataset, ctx: Context, s: EvalSettings) -> bool:
    """Whether two forward passes of the first batch, in the model's current mode, give the same logits."""
    x = next(shard_batches(ds, s.batch_size, Context(0, 1, ctx.device), s.seed, "determinism", False))[0]
    with torch.no_grad():
        return bool(torch.equal(finite_logits(model(x), "the first clean batch"), model(x)))


def default_sweep_eps(eps: float) -> list[float]:
    """0 to 32/255 in steps of 2/255 (Figure 2), scaled by eps / (4/255) for other datasets, at most 1."""
    scale = eps / REFERENCE_EPS
    grid = [min(1.0, k * 2 / 255 * scale) for k in range(17)]  # eps beyond 1 means nothing for [0, 1] images
    return sorted(set(grid))


def _eps_sweep(model: nn.Module, ds: Dataset, ctx: Context, s: EvalSettings) -> dict:
    grid = s.sweep_eps or default_sweep_eps(s.eps[0] if s.eps else REFERENCE_EPS)
    steps = max(s.pgd_steps)
    accs = []
    for eps in grid:
        def perturb(x, y, eps=eps):
            return pgd(model, x, y, eps, steps, paper_step_size(eps), random_start=True, keep_best=True) if eps > 0 else x
        n, correct = _accuracy_counts(model, ds, ctx, s, f"eps-sweep {eps:.4g}", perturb)
        accs.append(correct / max(n, 1))
    return {"attack": f"pgd-{steps}", "eps": grid, "robust_acc": accs, "n": n}


def _steps_sweep(model: nn.Module, ds: Dataset, ctx: Context, s: EvalSettings) -> dict:
    """Accuracy and mean loss of the final PGD iterate against the number of steps (Figure 13)."""
    eps = s.eps[0] if s.eps else REFERENCE_EPS
    accs, losses = [], []
    for steps in s.sweep_steps:
        totals = torch.zeros(3, dtype=torch.float64)  # n, correct, loss sum
        for x, y in shard_batches(ds, s.batch_size, ctx, s.seed, f"steps-sweep {steps}", s.progress):
            x_adv = pgd(model, x, y, eps, steps, paper_step_size(eps), random_start=True)
            with torch.no_grad():
                logits = finite_logits(model(x_adv), f"the images of steps-sweep {steps}")
                totals += torch.tensor([len(y), (logits.argmax(1) == y).sum().item(),
                                        torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()],
                                       dtype=torch.float64)
        totals = sum_over_processes(totals.to(ctx.device), ctx.world).cpu()
        accs.append(totals[1].item() / max(totals[0].item(), 1))
        losses.append(totals[2].item() / max(totals[0].item(), 1))
    return {"eps": eps, "steps": list(s.sweep_steps), "robust_acc": accs, "loss": losses, "n": int(totals[0])}


def _autoattack_row(model: nn.Module, ds: Dataset, ctx: Context, attack: str, eps: float, s: EvalSettings) -> dict:
    from natgrad.attacks.autoattack import RESULT_NAMES, SQUARE_FLAG, autoattack, square_warnings

    version = {name: v for v, name in RESULT_NAMES.items()}[attack]
    if version == "custom" and not s.aa_attacks:
        raise UserError("autoattack-custom needs --aa-attacks, e.g. --aa-attacks apgd-ce,square")
    counts, names, warnings = None, [], []
    for b, (x, y) in enumerate(shard_batches(ds, s.batch_size, ctx, s.seed, f"{attack} eps={eps:.4g}", s.progress)):
        batch_index = ctx.rank + b * ctx.world
        state = None
        if s.state_dir is not None:
            attacks = "-".join(s.aa_attacks) if version == "custom" else version
            state = Path(s.state_dir) / f"{attacks}-eps{eps:.6g}-batch{batch_index}-of{s.batch_size}.pt"
        out = autoattack(model, x, y, eps, version=version, attacks=s.aa_attacks if version == "custom" else None,
                         batch_size=s.batch_size, seed=s.seed + batch_index, state_path=state,
                         square_queries=s.square_queries)
        n = len(y)
        names = [p["attack"] for p in out["per_attack"]]
        batch = torch.tensor([n, round(out["clean_acc"] * n), round(out["robust_acc"] * n)]
                             + [round(p["robust_acc"] * n) for p in out["per_attack"]], dtype=torch.float64)
        counts = batch if counts is None else counts + batch
        # the Square check is redone below on the merged counts, where its threshold is meant to apply
        warnings += [w for w in out["warnings"] if w not in warnings and not w.startswith(SQUARE_FLAG)]
    if counts is None:  # a process with no batch still joins the all-reduce
        counts = torch.zeros(3 + len(_aa_names(version, s.aa_attacks)), dtype=torch.float64)
    counts = sum_over_processes(counts.to(ctx.device), ctx.world).cpu()
    total = int(counts[0])
    names = names or _aa_names(version, s.aa_attacks)
    breakdown = [{"attack": name, "robust_acc": counts[3 + i].item() / max(total, 1)} for i, name in enumerate(names)]
    warnings = gather_unique(warnings, ctx.world) + square_warnings(counts[1].item() / max(total, 1), breakdown)
    return _row(attack, eps, total, int(counts[2]), version=version, per_attack=breakdown, warnings=warnings)


def _aa_names(version: str, custom: list[str] | None) -> list[str]:
    from natgrad.attacks.autoattack import attack_names

    return attack_names(version, custom)


def format_table(rows: list[dict]) -> str:
    """The result rows as an aligned text table."""
    lines = [f"{'attack':<20} {'eps':>16} {'n':>7} {'accuracy':>9}"]
    for r in rows:
        eps = r["eps"]
        eps_text = f"{eps:.4g}"
        if round(eps * 255) >= 1 and math.isclose(eps * 255, round(eps * 255), abs_tol=1e-6):
            eps_text += f" ({round(eps * 255)}/255)"
        lines.append(f"{r['attack']:<20} {eps_text:>16} {r['n']:>7} {100 * r['robust_acc']:>8.2f}%")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- Appendix C sanity checks


def _check(name: str, ok: bool | None, numbers: dict, detail: str) -> dict:
    status = "SKIP" if ok is None else ("PASS" if ok else "WARN")
    return {"check": name, "status": status, "numbers": numbers, "detail": detail}


SANITY_CHECKS = ("deterministic", "large eps reaches chance", "more iterations", "l2 direction weaker", "transfer weaker",
                 "black-box weaker", "autoattack flags")


def sanity_checks(model: nn.Module, ds: Dataset, settings: EvalSettings, ctx: Context, num_classes: int,
                  only: list[str] | None = None, done: list[dict] | None = None) -> list[dict]:
    """Carlini et al.'s checklist as the paper's Appendix C runs it; each check PASS, WARN or SKIP.

    ``only`` restricts the report to some of :data:`SANITY_CHECKS` (and runs only the attacks they need);
    ``done`` holds result rows of :func:`evaluate_model` on the same images and settings, which are reused
    instead of attacking again.
    """
    s = settings
    eps = s.eps[0] if s.eps else REFERENCE_EPS
    k = max(s.pgd_steps)
    wanted = set(SANITY_CHECKS if only is None else only)
    checks = []

    if "deterministic" in wanted:
        with eval_mode(model):
            same = deterministic(model, ds, ctx, s)
        checks.append(_check("deterministic", same, {}, "two forward passes in eval mode give the same logits"
                             if same else "two forward passes in eval mode differ: dropout or other randomness is on, "
                             "which masks gradients; evaluate a deterministic model"))
    if wanted <= {"deterministic"}:
        return checks

    def run(attacks: list[str], **changes: Any) -> list[dict]:
        """One row per attack, PGD step count and eps: from ``done`` where it is there, else attacked now."""
        eps_list = changes.pop("eps", [eps])
        steps = changes.pop("pgd_steps", s.pgd_steps)
        rows = []
        for a in attacks:
            for k in steps if a.startswith("pgd") else [None]:
                for e in eps_list:
                    row = _find(done or [], f"{a}-{k}" if k else a, e, changes.get("aa_attacks"))
                    if row is None:  # per-batch seeds make a row the same whether made alone or with others
                        one = dataclasses.replace(s, attacks=[a], eps=[e], pgd_steps=(k,) if k else s.pgd_steps, **changes)
                        (row,) = evaluate_model(model, ds, one, ctx)["results"]
                    rows.append(row)
        return rows

    chance = 1.0 / num_classes
    big = min(1.0, 8 * eps)
    (huge,) = run(["pgd"], eps=[big], pgd_steps=(k,))
    checks.append(_check("large eps reaches chance", huge["robust_acc"] <= chance,
                         {"eps": big, "robust_acc": huge["robust_acc"], "chance": chance},
                         f"PGD-{k} at eps {big:.4g} leaves {100 * huge['robust_acc']:.2f}% (chance {100 * chance:.2f}%)"))
    (single, double) = run(["pgd"], pgd_steps=(k, 2 * k))
    change = abs(single["robust_acc"] - double["robust_acc"]) * 100
    checks.append(_check("more iterations", change < 0.5,
                         {f"pgd-{k}": single["robust_acc"], f"pgd-{2 * k}": double["robust_acc"], "change_points": change},
                         f"doubling PGD steps {k} -> {2 * k} changes robust accuracy by {change:.2f} points (want < 0.5)"))
    (l2dir,) = run(["pgd-l2dir"], pgd_steps=(k,))
    checks.append(_check("l2 direction weaker", l2dir["robust_acc"] >= single["robust_acc"],
                         {"pgd-l2dir": l2dir["robust_acc"], "pgd": single["robust_acc"]},
                         "the L2-direction attack should not beat the sign attack under an L-infinity constraint"))
    if s.source is not None:
        (transfer,) = run(["transfer"])
        checks.append(_check("transfer weaker", transfer["robust_acc"] >= single["robust_acc"],
                             {"transfer": transfer["robust_acc"], "white_box": single["robust_acc"]},
                             "examples made on another model should fool this one less than its own white-box attack"))
    else:
        checks.append(_check("transfer weaker", None, {}, "no --source model given"))
    (square,) = run(["autoattack-custom"], aa_attacks=["square"])
    (aa,) = run(["autoattack"])
    checks.append(_check("black-box weaker", square["robust_acc"] >= min(aa["robust_acc"], single["robust_acc"]),
                         {"square": square["robust_acc"], "autoattack": aa["robust_acc"], "pgd": single["robust_acc"]},
                         "the black-box Square attack should not beat the white-box attacks"))
    flags = aa.get("warnings", []) + square.get("warnings", [])
    checks.append(_check("autoattack flags", not flags, {"warnings": flags},
                         "AutoAttack raised no flags" if not flags else "; ".join(flags)))
    return checks


def _find(rows: list[dict], attack: str, eps: float, aa_attacks: list[str] | None) -> dict | None:
    for r in rows:
        if r["attack"] == attack and math.isclose(r["eps"], eps) and (
                attack != "autoattack-custom" or [p["attack"] for p in r["per_attack"]] == aa_attacks):
            return r
    return None


def format_sanity(checks: list[dict]) -> str:
    return "\n".join(f"{c['status']:<5} {c['check']:<26} {c['detail']}" for c in checks)


# ---------------------------------------------------------------------------- figures and exports


def plot_sweep(sweep: dict, kind: str, path: Path, title: str) -> None:
    """A PNG of robust accuracy against eps (Figure 2) or of accuracy and loss against steps (Figure 13)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    if kind == "eps":
        ax.plot([e * 255 for e in sweep["eps"]], [100 * a for a in sweep["robust_acc"]], marker="o")
        ax.set_xlabel("eps (x 1/255)")
        ax.set_ylabel(f"{sweep['attack'].upper()} accuracy (%)")
    else:
        ax.plot(sweep["steps"], [100 * a for a in sweep["robust_acc"]], marker="o", label="accuracy")
        ax.set_xscale("log")
        ax.set_xlabel("PGD steps")
        ax.set_ylabel("robust accuracy (%)")
        twin = ax.twinx()
        twin.plot(sweep["steps"], sweep["loss"], marker="s", color="tab:red", label="loss")
        twin.set_ylabel("cross-entropy", color="tab:red")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    ckpt.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def check_robustbench(cfg: RunConfig, settings: EvalSettings) -> None:
    """Fail before attacking when the evaluation will not hold what :func:`robustbench_info` needs."""
    if not ({"clean", "autoattack"} <= set(settings.attacks) and any(math.isclose(e, cfg.eps) for e in settings.eps)):
        raise UserError(f"--robustbench-json needs the clean and autoattack results at the recipe's eps {cfg.eps:.4g}; "
                        f"add --attacks clean,autoattack --eps {cfg.eps:.6g}")


def robustbench_info(name: str, cfg: RunConfig, rows: list[dict]) -> dict:
    """RobustBench's model_info fields from the evaluation rows (AutoAttack standard at the recipe's eps)."""
    clean = next(r["robust_acc"] for r in rows if r["attack"] == "clean")
    aa = next(r for r in rows if r["attack"] == "autoattack" and math.isclose(r["eps"], cfg.eps))
    return {
        "name": name, "architecture": cfg.model.name, "training": cfg.method, "dataset": cfg.data.name,
        "threat_model": "Linf", "eps": f"{cfg.eps * 255:.4g}/255", "clean_acc": f"{100 * clean:.2f}",
        "autoattack_acc": f"{100 * aa['robust_acc']:.2f}", "number_forward_passes": 1, "additional_data": False,
        "footnote": f"natgrad {cfg.method} recipe; evaluated on {aa['n']} test images", "reference": "", "venue": "",
    }
