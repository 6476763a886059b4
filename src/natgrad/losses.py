"""Loss helpers shared by objectives, attacks and evaluation."""

import torch
import torch.nn.functional as F


def per_sample_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per image; ``y`` is integer labels or soft targets (mixup, label smoothing)."""
    if y.is_floating_point():
        return -(y * F.log_softmax(logits.float(), dim=1)).sum(1)
    return F.cross_entropy(logits.float(), y, reduction="none")
