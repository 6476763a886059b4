"""Loss helpers shared by objectives, attacks and evaluation."""

import torch
import torch.nn.functional as F


def per_sample_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per image, in at least float32; ``y`` is integer labels or soft targets (mixup, smoothing)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if y.is_floating_point():
        return -(y * F.log_softmax(logits, dim=1)).sum(1)
    return F.cross_entropy(logits, y, reduction="none")
