"""Atomic files, safetensors weights and training state that loads without running code."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from natgrad.digest import model_digest
from natgrad.errors import UserError
from natgrad.files import atomic_write, atomic_write_text, check_destination


def save_weights(model: nn.Module, path: Path) -> None:
    """Model weights (and buffers) as safetensors."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))


def load_weights(model: nn.Module, path: Path) -> None:
    """Load safetensors weights, refusing files that do not fit the model."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); give a natgrad model.safetensors") from None
    load_state_dict(model, state, path)


def load_state_dict(model: nn.Module, state: dict, source: Path) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and (own[k].shape != state[k].shape or own[k].dtype != state[k].dtype)]
    if missing or unexpected or wrong:
        detail = (missing or unexpected or wrong)[0]
        raise UserError(f"{source} does not fit this model ({len(missing)} missing, {len(unexpected)} unexpected, "
                        f"{len(wrong)} tensors of another shape or dtype, e.g. {detail}); check model.name and the "
                        "dataset")
    model.load_state_dict(state)


def rng_state() -> dict[str, Any]:
    """Every random state training draws on, in types ``torch.load(weights_only=True)`` accepts."""
    np_state: tuple = np.random.get_state(legacy=True)  # type: ignore[assignment]
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict[str, Any]:
    """Training state, read with ``weights_only=True`` so that a malicious pickle cannot run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for bad or unsafe files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a valid natgrad checkpoint ({first[:160]}); it was refused without running "
                        "it") from None


__all__ = ["atomic_write", "atomic_write_text", "check_destination", "model_digest"]
