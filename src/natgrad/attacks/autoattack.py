"""AutoAttack (Croce & Hein 2020) under L-infinity: an adapter over the reference code, ``pyautoattack``.

The adapter hands ``pyautoattack.AutoAttack.run_standard_evaluation`` one attack at a time (as the package's own
``run_standard_evaluation_individual`` does), each on the images still robust, so it reads the robust accuracy
after every attack without reimplementing any of them; the results equal one ``run_standard_evaluation`` call's.
Resume is the adapter's own, per attack (docs/RESULTS.md, issue 16, says why the package's is not used).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, get_args

import torch
from pyautoattack import AutoAttack, checks
from pyautoattack.autoattack import AttackName
from torch import nn

from natgrad.attacks.pgd import finite_logits
from natgrad.digest import model_digest
from natgrad.errors import UserError, check_choice
from natgrad.files import atomic_write
from natgrad.gradients import eval_mode, frozen_parameters

RESULT_NAMES = {"standard": "autoattack", "plus": "autoattack-plus", "custom": "autoattack-custom"}
ATTACKS: tuple[str, ...] = get_args(AttackName)
# The DLR loss divides by the gap to the third largest logit, its targeted form by the gap to the fourth.
MIN_CLASSES = {"apgd-dlr": 3, "apgd-t": 4}


def autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    version: str = "standard",
    attacks: Sequence[str] | None = None,
    batch_size: int = 256,
    seed: int = 0,
    state_path: str | os.PathLike | None = None,
    verbose: bool = False,
    square_queries: int | None = None,
) -> dict[str, Any]:
    """Evaluate L-infinity robustness with AutoAttack, attack after attack on the images still robust.

    Args:
        model: takes [0, 1] images and returns logits; run in eval mode and restored afterwards.
        x: clean images in [0, 1]; the evaluation runs on their device.
        y: integer labels, shape (N,).
        eps: radius in pixel units, in [0, 1].
        version: ``standard`` (APGD-CE, APGD-T, FAB-T, Square), ``plus`` or ``custom``.
        attacks: for ``custom`` only, names from :data:`ATTACKS` in the order to run them.
        batch_size: images per forward pass.
        seed: seeds every attack; the caller's random streams are left as they were.
        state_path: file that records the evaluation after each attack (atomically); a call that finds a
            matching file (same weights, eps, version, attacks, seed, images and labels) continues from it, and
            a finished one returns its result without attacking. A file from another evaluation is a :class:`UserError`.
        verbose: print the clean accuracy, the robust accuracy after each attack and AutoAttack's warnings.
        square_queries: Square's query budget; default AutoAttack's 5000 (fewer is a weaker attack).

    Returns:
        ``attack``, ``version``, ``eps``, ``n``, ``clean_acc``, ``robust_acc``, ``per_attack`` (the robust
        accuracy after each attack, in AutoAttack's order; attacks skipped because no image was left robust
        repeat it), ``warnings`` (AutoAttack's checks: randomness, probability outputs, zero gradients, ...)
        and ``x_adv`` (detached, on x's device: the adversarial image where an attack succeeded, else x).
        With fewer than 10 classes the targeted attacks use every other class as a target.
    """
    _check_arguments(x, y, eps, version, attacks, batch_size)
    if square_queries is not None and square_queries < 1:
        raise UserError(f"autoattack square_queries={square_queries} must be at least 1")
    x, y = x.detach(), y.detach().to(x.device, torch.long)
    adversary = AutoAttack(model, attacks=None if attacks is None else list(attacks), device=x.device,
                           eps=float(eps), norm="Linf", seed=seed, version=version)
    # Its own log would report accuracies of the subsets handed to it, not of all N images.
    adversary.verbose = False
    if square_queries is not None:
        adversary.square.n_queries = square_queries
    order = list(adversary.attacks_to_run)
    path = None if state_path is None else Path(state_path)
    key = _state_key(model, x, y, eps, version, order, seed, adversary.square.n_queries) if path is not None else {}
    state = _load_state(path, key) if path is not None and path.exists() else None

    with (frozen_parameters(model), eval_mode(model), _own_rng(x.device),
          _captured_warnings(adversary.logger) as new_warnings):
        if state is None:
            with torch.no_grad():
                logits = finite_logits(torch.cat([model(chunk) for chunk in x.split(batch_size)]), "the clean images")
            clean = logits.argmax(1) == y
            state = {"n_classes": logits.shape[1], "clean": clean, "robust": clean.clone(), "x_fooled": x[:0],
                     "per_attack": [], "warnings": []}
        n_classes = state["n_classes"]
        for name in order:
            if n_classes < MIN_CLASSES.get(name, 2):
                raise UserError(f"autoattack {name} needs at least {MIN_CLASSES[name]} classes and the model has "
                                f"{n_classes}; use version='custom' with attacks among {', '.join(ATTACKS)}")
        for attack in (adversary.apgd_targeted, adversary.fab):
            attack.n_target_classes = min(attack.n_target_classes, n_classes - 1)

        clean, robust = state["clean"].to(x.device), state["robust"].to(x.device)
        x_adv = x.clone()
        x_adv[clean & ~robust] = state["x_fooled"].to(x.device, x.dtype)
        per_attack, old_warnings = list(state["per_attack"]), state["warnings"]
        clean_acc = clean.float().mean().item()
        if verbose:
            print(f"natgrad: autoattack {version} eps={eps:.5g} on {len(x)} images: clean accuracy {clean_acc:.2%}",
                  flush=True)

        for name in order[len(per_attack):]:
            start = time.perf_counter()
            todo = robust.nonzero().squeeze(1)
            if len(todo):
                adversary.attacks_to_run = [name]
                x_sub, y_sub = adversary.run_standard_evaluation(x[todo], y[todo], batch_size=batch_size)
                hit = y_sub != y[todo]
                x_adv[todo[hit]] = x_sub[hit].to(x.dtype)
                robust[todo[hit]] = False
            per_attack.append({"attack": name, "robust_acc": robust.float().mean().item()})
            if path is not None:
                _save_state(path, {**key, "n_classes": n_classes, "clean": clean.cpu(), "robust": robust.cpu(),
                                   "x_fooled": x_adv[clean & ~robust].cpu(), "per_attack": per_attack,
                                   "warnings": _unique(old_warnings + new_warnings)})
            if verbose:
                print(f"natgrad: autoattack {name}: robust accuracy {per_attack[-1]['robust_acc']:.2%} "
                      f"({time.perf_counter() - start:.1f} s)", flush=True)
        # Run once over the whole breakdown: each single-attack run above sees only its own accuracy.
        found = _unique(old_warnings + new_warnings + square_warnings(clean_acc, per_attack))

    if verbose:
        for message in found:
            print(f"natgrad: autoattack warning: {message}", flush=True)
    return {
        "attack": RESULT_NAMES[version],
        "version": version,
        "eps": float(eps),
        "n": len(x),
        "clean_acc": clean_acc,
        "robust_acc": robust.float().mean().item(),
        "per_attack": per_attack,
        "warnings": found,
        "x_adv": x_adv.detach(),
    }


def _check_arguments(
    x: torch.Tensor, y: torch.Tensor, eps: float, version: str, attacks: Sequence[str] | None, batch_size: int
) -> None:
    check_choice("autoattack version", version, RESULT_NAMES)
    if version == "custom":
        if not attacks:
            raise UserError(f"autoattack version='custom' needs attacks, a list from {', '.join(ATTACKS)}")
        for name in attacks:
            check_choice("autoattack attack", name, ATTACKS)
    elif attacks is not None:
        raise UserError(f"autoattack attacks= applies only to version='custom', not {version!r}; drop it or use custom")
    if not 0 <= eps <= 1:
        raise UserError(f"autoattack eps={eps} is outside [0, 1]; give it in pixel units of [0, 1] images (8/255, not "
                        f"8)")
    if batch_size < 1:
        raise UserError(f"autoattack batch_size={batch_size} must be at least 1")
    if len(x) == 0 or not x.is_floating_point() or x.min() < 0 or x.max() > 1:
        raise UserError("autoattack needs a non-empty batch of float images in [0, 1]; normalize inside the model")
    if y.shape != (len(x),) or y.is_floating_point():
        raise UserError(f"autoattack needs integer labels of shape ({len(x)},), got {tuple(y.shape)} {y.dtype}")


SQUARE_FLAG = "Square Attack has decreased"


def square_warnings(clean_acc: float, per_attack: list[dict[str, Any]]) -> list[str]:
    """AutoAttack's check that Square, a black-box attack, adds (almost) nothing to the white-box ones.

    Takes a whole breakdown, so callers that attack in batches can check the merged accuracies:
    its threshold (0.2 points) means something else on a batch of 200 images than on 10000.
    """
    logger = logging.getLogger("natgrad.autoattack.checks")
    with _captured_warnings(logger) as found:
        checks.check_square_sr({"clean": clean_acc, **{p["attack"]: p["robust_acc"] for p in per_attack}},
                               logger=logger)
    return list(found)


def _unique(messages: list[str]) -> list[str]:
    return list(dict.fromkeys(messages))


class _WarningLog(logging.Filter):
    """Keeps the text of warning records and drops every record, so nothing prints once per attack."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            self.messages.append(record.getMessage())
        return False


@contextlib.contextmanager
def _captured_warnings(logger: logging.Logger) -> Iterator[list[str]]:
    """Collect what AutoAttack's checks log as warnings while the block runs."""
    log = _WarningLog()
    logger.addFilter(log)
    try:
        yield log.messages
    finally:
        logger.removeFilter(log)


@contextlib.contextmanager
def _own_rng(device: torch.device) -> Iterator[None]:
    """Let AutoAttack reseed the global generators (on x's GPU) without changing the caller's streams."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []), (
        torch.cuda.device(device) if cuda else contextlib.nullcontext()
    ):
        yield


def _state_key(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, version: str, order: list[str],
               seed: int, square_queries: int) -> dict[str, Any]:
    """Everything that changes the numbers, the weights first: saved progress never speaks for another model."""
    return {"model_sha256": model_digest(model), "eps": float(eps), "version": version, "attacks": order, "seed": seed,
            "n": len(x), "square_queries": square_queries,
            "images_sha256": hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest(),
            "labels_sha256": hashlib.sha256(y.cpu().numpy().tobytes()).hexdigest()}


def _load_state(path: Path, key: dict[str, Any]) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"autoattack state {path} cannot be read ({type(e).__name__}); delete it to start over") from e
    differ = [k for k in key if not isinstance(state, dict) or state.get(k) != key[k]]
    if differ:
        raise UserError(f"autoattack state {path} is from another evaluation ({', '.join(differ)} differ); "
                        "delete it or pass another state_path")
    return state


def _save_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def attack_names(version: str, attacks: Sequence[str] | None = None) -> list[str]:
    """The attacks ``version`` runs, in AutoAttack's order."""
    adversary = AutoAttack(nn.Identity(), attacks=None if attacks is None else list(attacks), device="cpu",
                           eps=0.0, norm="Linf", version=version)
    return list(adversary.attacks_to_run)
