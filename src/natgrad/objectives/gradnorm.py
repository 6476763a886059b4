"""GradNorm, the paper's Eq. 2, by double backprop.

``loss = ce_weight * CE + gn_weight * w(t) * eps * mean_i ||grad_x CE_i||_1`` with x in
pixel space, which equals the paper's ``(eps / sigma) ||grad_{x_normalized} CE||_1``.
Gradients are taken of the *sum* of per-image losses, so each image's gradient is its own
(not 1/B of it, as the gradient of a batch-mean loss would be).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from natgrad.losses import per_sample_ce
from natgrad.objectives.base import Objective, linear_warmup


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, per-image CE and per-image input gradients of CE.

    Fused scaled-dot-product-attention kernels have no double backward, so with
    ``create_graph`` the math kernel is selected (it is a no-op for models without attention).
    """
    x = x.detach().requires_grad_(True)
    with sdpa_kernel([SDPBackend.MATH]) if create_graph else torch.enable_grad():
        logits = model(x)
        ce = per_sample_ce(logits, y)
        (grad,) = torch.autograd.grad(ce.sum(), x, create_graph=create_graph)
    return logits, ce, grad


class GradNorm(Objective):
    """Penalize the L1 norm of the loss-input gradient on natural images."""

    def __init__(self, model: nn.Module, eps: float, ce_weight: float = 1.0, gn_weight: float = 1.0, warmup_epochs: float = 0.0):
        super().__init__(model)
        self.eps, self.ce_weight, self.gn_weight, self.warmup_epochs = eps, ce_weight, gn_weight, warmup_epochs

    def __call__(self, x: torch.Tensor, y: torch.Tensor, epoch_fraction: float = 0.0) -> dict:
        logits, ce, grad = input_gradient(self.model, x, y, create_graph=True)
        reg = self.eps * grad.abs().flatten(1).sum(1).mean()
        weight = self.gn_weight * linear_warmup(epoch_fraction, self.warmup_epochs)
        ce = ce.mean()
        loss = self.ce_weight * ce + weight * reg
        return {"loss": loss, "logits": logits, "ce": ce.item(), "reg": reg.item(), "gn_weight": weight}
