"""natgrad: robust image classifiers from natural input gradients.

Implements "Characterizing Model Robustness via Natural Input Gradients"
(Rodriguez-Munoz, Wang, Torralba, ECCV 2024).

The public names below are loaded on first use, so that importing a light module (``natgrad.config``)
does not load torch's attack stack and AutoAttack.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute or None for the module itself)
_PUBLIC = {
    "analysis": ("natgrad.analysis", None),
    "attacks": ("natgrad.attacks", None),
    "config": ("natgrad.config", None),
    "data": ("natgrad.data", None),
    "models": ("natgrad.models", None),
    "objectives": ("natgrad.objectives", None),
    "fgsm": ("natgrad.attacks", "fgsm"),
    "pgd": ("natgrad.attacks", "pgd"),
    "RunConfig": ("natgrad.config", "RunConfig"),
    "evaluate": ("natgrad.evaluation", "evaluate"),
    "train": ("natgrad.engine.train", "train"),
    "UserError": ("natgrad.errors", "UserError"),
    "input_gradient": ("natgrad.gradients", "input_gradient"),
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'natgrad' has no attribute {name!r}")
    module, attribute = _PUBLIC[name]
    value = importlib.import_module(module)
    return value if attribute is None else getattr(value, attribute)


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
