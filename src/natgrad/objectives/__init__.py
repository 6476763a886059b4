"""Training objectives, one module each, all with one contract.

``create(name, model, **params)`` returns a callable ``objective(x, y, epoch_fraction=0.0) -> dict``
whose ``loss`` is the scalar to backward; ``logits`` are the logits the loss saw, and
``ce`` plus the objective's own parts (``reg`` for GradNorm) are floats for logging.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from natgrad.errors import UserError, did_you_mean
from natgrad.objectives.base import Objective
from natgrad.objectives.edge import EdgeRegularization
from natgrad.objectives.gradnorm import GradNorm, GradNormFD
from natgrad.objectives.natural import Natural
from natgrad.objectives.pgd import FGSMTraining, PGDTraining

REGISTRY: dict[str, Callable[..., Objective]] = {
    "natural": Natural,
    "gradnorm": GradNorm,
    "gradnorm-fd": GradNormFD,
    "pgd": PGDTraining,
    "fgsm": FGSMTraining,
    "edge": EdgeRegularization,
}


def create(name: str, model: nn.Module, compile: bool = False, **params: Any) -> Objective:
    """Build the objective ``name`` for ``model`` with its parameters (e.g. ``eps``, ``gn_weight``); ``compile``:
    through ``torch.compile`` (:meth:`Objective.compile`)."""
    if name not in REGISTRY:
        raise UserError(f"unknown objective {name!r}{did_you_mean(name, REGISTRY)}; choose from {', '.join(REGISTRY)}")
    try:
        objective = REGISTRY[name](model, **params)
    except TypeError as e:
        raise UserError(f"objective {name}: {e}") from None
    if compile:
        objective.compile()
    return objective


__all__ = [
    "REGISTRY",
    "EdgeRegularization",
    "FGSMTraining",
    "GradNorm",
    "GradNormFD",
    "Natural",
    "Objective",
    "PGDTraining",
    "create",
]
