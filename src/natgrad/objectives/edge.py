"""Edge regularization, the paper's Section 5.3 (Eq. 3-4), by double backprop.

``loss = CE + w(epoch) * (1 - cos(student, teacher))`` where the student is the input gradient of
the logit of a class ``t ~ softmax(logits / tau)`` and the teacher is the image's oriented energy
``|g_u * x|^2 + |g_v * x|^2`` (no gradient flows into it). The authors' released code differs from
the text: ``teacher="magnitude"`` (the blurred image's gradient magnitude), ``cosine="batch"`` (one
cosine over the whole batch), and ``w = min(1 + 0.09 * epoch, 19)`` (``weight_per_epoch``,
``weight_max``). Appendix E's alternatives: ``student="loss"`` (grad_x CE) and ``student="saliency"``
(per-pixel max over channels of ``|grad_x logit_t|``, against the channel-summed teacher).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from natgrad.analysis.edges import edge_map
from natgrad.choices import EdgeCosine, EdgeStudent, EdgeTeacher
from natgrad.gradients import input_gradient
from natgrad.losses import per_sample_ce
from natgrad.objectives.base import Objective


def sample_classes(logits: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """One class per row, drawn from ``softmax(logits / tau)``."""
    probs = torch.softmax(logits.detach().float() / tau, dim=1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor, mode: EdgeCosine = "per_image") -> torch.Tensor:
    """``1 - cos(student, teacher)``: per image then averaged (``per_image``) or over the whole batch (``batch``).

    0 when the student is a positive multiple of the teacher, 2 when it is a negative one.
    """
    student, teacher = student.float(), teacher.float()
    if mode == "batch":
        return 1 - F.cosine_similarity(student.flatten(), teacher.flatten(), dim=0)
    return (1 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1)).mean()


class EdgeRegularization(Objective):
    """Align input gradients with image edges."""

    def __init__(self, model: nn.Module, weight: float = 1.0, weight_per_epoch: float = 0.0,
                 weight_max: float | None = None, tau: float = 0.5, sigma: float = 1.0, student: EdgeStudent = "class",
                 teacher: EdgeTeacher = "energy", cosine: EdgeCosine = "per_image"):
        """Parameters as ``config.EdgeConfig``, whose ranges and choices ``config.validate`` checks."""
        super().__init__(model)
        self.weight, self.weight_per_epoch, self.weight_max = weight, weight_per_epoch, weight_max
        self.tau, self.sigma, self.student, self.teacher, self.cosine = tau, sigma, student, teacher, cosine

    def weight_at(self, epoch_fraction: float) -> float:
        """``weight + weight_per_epoch * finished epochs``, capped at ``weight_max``."""
        w = self.weight + self.weight_per_epoch * math.floor(epoch_fraction)
        return w if self.weight_max is None else min(w, self.weight_max)

    def _sampled_logit(self, logits: torch.Tensor) -> torch.Tensor:
        t = sample_classes(logits, self.tau)
        return logits.gather(1, t[:, None]).squeeze(1)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, epoch_fraction: float = 0.0) -> dict:
        output = None if self.student == "loss" else self._sampled_logit
        logits, _, student = input_gradient(self.model, x, y, create_graph=True, output=output)
        teacher = edge_map(x.detach(), self.sigma, self.teacher)
        if self.student == "saliency":
            student = student.abs().amax(1, keepdim=True)
            teacher = teacher.sum(1, keepdim=True)
        edge = cosine_loss(student, teacher, self.cosine)
        weight = self.weight_at(epoch_fraction)
        ce = per_sample_ce(logits, y).mean()
        loss = ce + weight * edge
        return {"loss": loss, "logits": logits, "ce": ce.item(), "edge": edge.item(), "edge_weight": weight}
