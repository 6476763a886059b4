"""Edge regularization, the paper's Section 5.3 (Eq. 3-4), by double backprop; and the authors' code's form of it.

``form="paper"``: ``loss = CE + w(epoch) * (1 - cos(student, teacher))`` where the student is the input
gradient of the logit of a class ``t ~ softmax(logits / tau)`` and the teacher is the image's oriented
energy ``|g_u * x|^2 + |g_v * x|^2`` (no gradient flows into it); ``w`` grows by ``weight_per_epoch`` each
finished epoch up to ``weight_max``. Variants: ``teacher="magnitude"`` (the square root of the energy, per
channel), ``cosine="batch"`` (one cosine over the whole batch), and Appendix E's ``student="loss"`` (grad_x CE)
and ``student="saliency"`` (per-pixel max over channels of ``|grad_x logit_t|``, against the channel-summed
teacher). None of these is the authors' released code.

``form="code"``: the loss of the authors' released code (``adversarial_training_logit.py``), exactly:
``CE + w * mean((s / rms(s) - e / rms(e))^2)`` with rms over the whole batch (equal to
``w * 2 * (1 - cos_batch(s, e))``, twice the paper form's ``cosine="batch"`` term); the student ``s`` is the
gradient w.r.t. the model's *normalized* input (the code's models take normalized images) and the teacher
``e`` is :func:`natgrad.analysis.edges.contour_energy` of the normalized image; ``w = min(weight +
weight_per_epoch * epoch_fraction, weight_max)`` grows every iteration. ``teacher`` and ``cosine`` are not
used (``config.validate`` refuses values other than their defaults); ``student`` keeps its three choices
(the code's sampled class, its ``--saliency`` flag and ``adversarial_training_logit_loss.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from natgrad.analysis.edges import contour_energy, edge_map
from natgrad.choices import DoubleBackward, EdgeCosine, EdgeForm, EdgeStudent, EdgeTeacher
from natgrad.gradients import compiled_with_input_gradient, func_input_gradient, input_gradient
from natgrad.losses import per_sample_ce
from natgrad.models import Normalize
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


def normalized_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean((student / rms(student) - teacher / rms(teacher))^2)``, rms over all elements: the authors' code's
    edge loss, which equals ``2 * (1 - cos)`` of the two maps flattened (the student's rms keeps its gradient)."""
    student, teacher = student.float(), teacher.float()
    student = student / student.square().mean().sqrt()
    teacher = teacher / teacher.square().mean().sqrt()
    return F.mse_loss(student, teacher)


def normalization(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(mean, std)`` of the model's first :class:`natgrad.models.Normalize` layer, each (1, C, 1, 1); None without."""
    for module in model.modules():
        if isinstance(module, Normalize):
            return module.mean, module.std
    return None


class EdgeRegularization(Objective):
    """Align input gradients with image edges."""

    def __init__(self, model: nn.Module, weight: float = 1.0, weight_per_epoch: float = 0.0,
                 weight_max: float | None = None, tau: float = 0.5, sigma: float = 1.0, student: EdgeStudent = "class",
                 teacher: EdgeTeacher = "energy", cosine: EdgeCosine = "per_image", form: EdgeForm = "paper",
                 double_backward: DoubleBackward = "natgrad"):
        """Parameters as ``config.EdgeConfig``, whose ranges and choices ``config.validate`` checks;
        ``double_backward`` as :func:`natgrad.gradients.input_gradient`'s."""
        super().__init__(model)
        self.double_backward = double_backward
        self.weight, self.weight_per_epoch, self.weight_max = weight, weight_per_epoch, weight_max
        self.tau, self.sigma, self.student, self.teacher, self.cosine = tau, sigma, student, teacher, cosine
        self.form = form

    def weight_at(self, epoch_fraction: float) -> float:
        """``weight + weight_per_epoch * e``, capped at ``weight_max``: ``e`` the finished epochs (paper form) or
        the epoch fraction itself, counted in optimizer steps (code form)."""
        epochs = epoch_fraction if self.form == "code" else math.floor(epoch_fraction)
        w = self.weight + self.weight_per_epoch * epochs
        return w if self.weight_max is None else min(w, self.weight_max)

    def _sampled_logit(self, logits: torch.Tensor) -> torch.Tensor:
        t = sample_classes(logits, self.tau)
        return logits.gather(1, t[:, None]).squeeze(1)

    def _paper_edge(self, x: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        teacher = edge_map(x.detach(), self.sigma, self.teacher)
        if self.student == "saliency":
            student = student.abs().amax(1, keepdim=True)
            teacher = teacher.sum(1, keepdim=True)
        return cosine_loss(student, teacher, self.cosine)

    def _code_edge(self, x: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        """The code's term in the model's normalized input space: z = (x - mean) / std, grad_z = std * grad_x."""
        z = x.detach().float()
        stats = normalization(self.model)
        if stats is not None:
            mean, std = stats
            z = (z - mean) / std
            student = student.float() * std
        teacher = contour_energy(z, self.sigma)
        if self.student == "saliency":
            student = student.abs().amax(1, keepdim=True)
            teacher = teacher[:, :1]
        return normalized_mse(student, teacher)

    def terms(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, mean cross-entropy and the edge term, by double backprop."""
        output = None if self.student == "loss" else self._sampled_logit
        logits, _, student = input_gradient(self.loss_model, x, y, create_graph=True, output=output,
                                             double_backward=self.double_backward)
        return logits, per_sample_ce(logits, y).mean(), self._edge(x, student)

    def compiled_terms(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`terms` with the student by ``torch.func.grad``, for ``torch.compile``."""
        output = None if self.student == "loss" else self._sampled_logit
        logits, student = func_input_gradient(self.loss_model, x, y, output=output)
        return logits, per_sample_ce(logits, y).mean(), self._edge(x, student)

    def compile(self) -> None:
        compiled = compiled_with_input_gradient(self.compiled_terms, self.model, "edge")
        self.terms = compiled  # type: ignore[method-assign,assignment]

    def _edge(self, x: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        return self._code_edge(x, student) if self.form == "code" else self._paper_edge(x, student)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, epoch_fraction: float = 0.0) -> dict:
        logits, ce, edge = self.terms(x, y)
        weight = self.weight_at(epoch_fraction)
        loss = ce + weight * edge
        return {"loss": loss, "logits": logits, "ce": ce.item(), "edge": edge.item(), "edge_weight": weight}
