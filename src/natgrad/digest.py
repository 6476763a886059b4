"""A digest of a model's weights: what saved evaluation progress is keyed by."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def model_digest(model: nn.Module) -> str:
    """SHA-256 of a model's weights and buffers (names, dtypes, shapes and values): what an evaluation's
    saved progress is keyed by, so that it can never be reused for other weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
