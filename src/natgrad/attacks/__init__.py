"""Adversarial attacks. Each runs the model in eval mode, restores its mode, and leaves no parameter gradients."""

from natgrad.attacks.autoattack import autoattack
from natgrad.attacks.fgsm import fgsm
from natgrad.attacks.pgd import eval_mode, finite_logits, frozen_parameters, paper_step_size, pgd

__all__ = ["autoattack", "eval_mode", "fgsm", "finite_logits", "frozen_parameters", "paper_step_size", "pgd"]
