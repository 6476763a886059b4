"""Adversarial training: PGD-k (Madry et al. 2018; Appendix G: k=3, step 2*eps/k) and FGSM with random
initialization (Wong et al. 2020; the paper's Appendix B baseline)."""

from __future__ import annotations

import torch
from torch import nn

from natgrad.attacks import pgd
from natgrad.attacks.fgsm import STEP_RATIO
from natgrad.choices import AttackForm
from natgrad.losses import per_sample_ce
from natgrad.objectives.base import Objective, linear_warmup


class PGDTraining(Objective):
    """Cross-entropy on PGD-k examples; the attack runs in eval mode and its step warms up linearly.

    ``form="code"`` attacks as the authors' ``adv_generator`` does: weight gradients computed (and here
    dropped) at every step, a uniform random start whatever ``random_start`` says, and the strongest iterate,
    judged after one more forward.
    """

    def __init__(self, model: nn.Module, eps: float, steps: int = 3, step_size: float | None = None,
                 random_start: bool | None = False, warmup_epochs: float = 0.0, form: AttackForm = "natgrad"):
        super().__init__(model)
        self.eps, self.steps, self.random_start, self.warmup_epochs = eps, steps, bool(random_start), warmup_epochs
        self.step_size = 2 * eps / steps if step_size is None else step_size
        self.form = form

    def __call__(self, x: torch.Tensor, y: torch.Tensor, epoch_fraction: float = 0.0) -> dict:
        step = self.step_size * linear_warmup(epoch_fraction, self.warmup_epochs)
        code = self.form == "code"
        x_adv = pgd(self.model, x, y, self.eps, self.steps, step_size=step, random_start=self.random_start or code,
                    keep_best=code, param_grads=code)
        logits = self.loss_model(x_adv)
        ce = per_sample_ce(logits, y).mean()
        return {"loss": ce, "logits": logits, "ce": ce.item(), "attack_step": step}


class FGSMTraining(PGDTraining):
    """Cross-entropy on FGSM examples: uniform start in the eps-ball, one step of ``1.25 * eps``
    (see :func:`natgrad.attacks.fgsm`)."""

    def __init__(self, model: nn.Module, eps: float, step_size: float | None = None, random_start: bool | None = True,
                 warmup_epochs: float = 0.0):
        super().__init__(model, eps, steps=1, step_size=STEP_RATIO * eps if step_size is None else step_size,
                         random_start=True if random_start is None else random_start, warmup_epochs=warmup_epochs)
