"""Atomic files, safetensors weights and training state that loads without running code."""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from natgrad.rundir import TEMP_PREFIX
from natgrad.errors import UserError


def _file_mode() -> int:
    """The mode ``open()`` would give a new file: 0o666 less the umask (mkstemp's files are owner-only)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, flush it to disk, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TEMP_PREFIX}", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())  # after write: some writers (safetensors) create the file anew
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_weights(model: nn.Module, path: Path) -> None:
    """Model weights (and buffers) as safetensors."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))


def weights_file(path: str | Path) -> Path:
    """A .safetensors file as given, or a run folder's ``model.safetensors``."""
    path = Path(path)
    return path / "model.safetensors" if path.is_dir() else path


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
                        f"{len(wrong)} tensors of another shape or dtype, e.g. {detail}); check model.name and the dataset")
    model.load_state_dict(state)


def model_digest(model: nn.Module) -> str:
    """SHA-256 of a model's weights and buffers (names, dtypes, shapes and values): what an evaluation's
    saved progress is keyed by, so that it can never be reused for other weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    """Every random state training draws on, in types ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
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
        raise UserError(f"{path} is not a valid natgrad checkpoint ({first[:160]}); it was refused without running it") from None


# What a file natgrad may overwrite must already look like: it never replaces another kind of file.
_KINDS: dict[str, tuple[str, Callable[[bytes], bool]]] = {
    "json": ("a JSON file", lambda head: head.lstrip()[:1] in (b"{", b"[")),
    "html": ("an HTML file", lambda head: head.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html"))),
}


def check_destination(path: Path, kind: str, flag: str) -> None:
    """Refuse, before any work, a destination that cannot be written or would replace something else.

    ``kind`` is ``json`` or ``html`` for a file (an existing file must be of that kind), ``folder`` for a
    folder; ``flag`` names the option in the message.
    """
    path = Path(path)
    if path.is_symlink():
        raise UserError(f"{flag} {path} is a symbolic link; give the real path")
    if kind == "folder":
        if path.exists() and not path.is_dir():
            raise UserError(f"{flag} {path} is a file, not a folder; give a folder")
    else:
        what, looks_right = _KINDS[kind]
        if path.is_dir():
            raise UserError(f"{flag} {path} is a folder; give a file name, e.g. {path / ('results.' + kind)}")
        if path.exists():
            with open(path, "rb") as f:
                head = f.read(64)
            if head and not looks_right(head):
                raise UserError(f"{flag} {path} exists and is not {what}; natgrad does not overwrite other files: "
                                "choose another name")
    parent = next(p for p in [path if kind == "folder" else path.parent, *path.parents] if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write in {parent}; choose a writable place")
