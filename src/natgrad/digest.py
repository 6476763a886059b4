"""A digest of a model's weights: what saved evaluation progress and results are keyed by."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of weights and buffers (names, dtypes, shapes and values), in a fixed order."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_digest(model: nn.Module) -> str:
    """:func:`state_digest` of a model: an evaluation's saved progress is keyed by it, so that it can never
    be reused for other weights."""
    return state_digest(model.state_dict())


def file_digest(path: Path) -> str | None:
    """:func:`state_digest` of a safetensors file, or None when it cannot be read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return state_digest(load_file(str(path)))
    except (SafetensorError, OSError, ValueError):
        return None
