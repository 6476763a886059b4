"""Adversarial attacks. Each runs the model in eval mode, restores its mode, and leaves no parameter gradients."""

from natgrad.attacks.autoattack import autoattack
from natgrad.attacks.fgsm import fgsm
from natgrad.attacks.pgd import finite_logits, paper_step_size, pgd
from natgrad.gradients import eval_mode, frozen_parameters

__all__ = ["autoattack", "eval_mode", "fgsm", "finite_logits", "frozen_parameters", "paper_step_size", "pgd"]
