"""natgrad: robust image classifiers from natural input gradients.

Implements "Characterizing Model Robustness via Natural Input Gradients"
(Rodriguez-Munoz, Wang, Torralba, ECCV 2024).
"""

from natgrad import analysis, attacks, config, data, models, objectives
from natgrad.attacks import fgsm, pgd
from natgrad.config import RunConfig
from natgrad.engine import evaluate, train
from natgrad.errors import UserError
from natgrad.objectives.gradnorm import input_gradient

__version__ = "0.1.0"
__all__ = ["RunConfig", "UserError", "analysis", "attacks", "config", "data", "evaluate", "fgsm", "input_gradient",
           "models", "objectives", "pgd", "train"]
