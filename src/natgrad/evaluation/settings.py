"""What an evaluation runs (:class:`EvalSettings`), what one attack returns, and the eps parser."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset

from natgrad import config as config_mod
from natgrad.engine.distributed import Context
from natgrad.errors import UserError

REFERENCE_EPS = 4 / 255  # the paper's eps; sweeps and step sizes scale from it


@dataclasses.dataclass
class EvalSettings:
    """What ``evaluate_model`` runs; defaults are the paper's."""

    attacks: list[str]
    eps: list[float]
    pgd_steps: tuple[int, ...] = (10, 100)
    restarts: int = 1
    batch_size: int = 256
    seed: int = 0
    aa_attacks: list[str] | None = None  # for autoattack-custom
    source: nn.Module | None = None  # for transfer
    source_steps: int = 100
    sweep_eps: list[float] | None = None  # default 0..8 eps_ref in 16 steps, scaled to the recipe's eps
    sweep_steps: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100)
    progress: bool = True
    state_dir: Path | None = None  # AutoAttack saves its progress here per batch and resumes from it
    square_queries: int | None = None  # None: AutoAttack's 5000

    @property
    def first_eps(self) -> float:
        """The eps of the sweeps and sanity checks: the first given, else the paper's."""
        return self.eps[0] if self.eps else REFERENCE_EPS


@dataclasses.dataclass
class AttackResult:
    """What one named attack measured: result rows, or one sweep curve."""

    rows: list[dict] = dataclasses.field(default_factory=list)
    sweep: dict | None = None


AttackFn = Callable[[nn.Module, Dataset, Context, EvalSettings], AttackResult]


def parse_eps(text: str | list[float]) -> list[float]:
    """``"1/255,2/255,4/255"`` -> floats in [0, 1]."""
    values = []
    for part in text.split(",") if isinstance(text, str) else text:
        v = config_mod.parse_number(str(part))
        if v is None:
            raise UserError(f"--eps value {part!r} is not a number; write e.g. 0.1 or 4/255")
        if not 0.0 <= v <= 1.0:
            raise UserError(f"--eps value {part} is outside [0, 1]; eps is in pixel units of [0, 1] images")
        values.append(v)
    return values
