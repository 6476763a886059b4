"""The named attacks of ``natgrad eval``: ``name -> AttackSpec``, every one called the same way."""

from __future__ import annotations

import dataclasses

from torch import nn
from torch.utils.data import Dataset

from natgrad.engine.distributed import Context
from natgrad.errors import UserError, did_you_mean
from natgrad.evaluation import white_box
from natgrad.evaluation.autoattack_rows import autoattack_attack
from natgrad.evaluation.settings import AttackFn, AttackResult, EvalSettings
from natgrad.evaluation.sweeps import eps_sweep, steps_sweep
from natgrad.gradients import eval_mode


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """A named attack; calling it runs it in eval mode and restores the model's mode afterwards."""

    name: str
    run: AttackFn
    sweep: str | None = None  # the key of its curve in the report's ``sweeps``; None: it makes result rows

    def __call__(self, model: nn.Module, ds: Dataset, ctx: Context, s: EvalSettings) -> AttackResult:
        with eval_mode(model):
            return self.run(model, ds, ctx, s)


REGISTRY: dict[str, AttackSpec] = {spec.name: spec for spec in (
    AttackSpec("clean", white_box.clean),
    AttackSpec("pgd", white_box.pgd_attack("pgd", "sign")),
    AttackSpec("pgd-l2dir", white_box.pgd_attack("pgd-l2dir", "l2")),
    AttackSpec("autoattack", autoattack_attack("autoattack")),
    AttackSpec("autoattack-plus", autoattack_attack("autoattack-plus")),
    AttackSpec("autoattack-custom", autoattack_attack("autoattack-custom")),
    AttackSpec("transfer", white_box.transfer),
    AttackSpec("eps-sweep", eps_sweep, sweep="eps"),
    AttackSpec("steps-sweep", steps_sweep, sweep="steps"),
)}
ATTACKS = tuple(REGISTRY)
SWEEPS = tuple(name for name, spec in REGISTRY.items() if spec.sweep)
PER_EPS = tuple(name for name in ATTACKS if name not in SWEEPS)


def get_attack(name: str) -> AttackSpec:
    """The spec of ``name``; a UserError naming the known attacks otherwise."""
    if name not in REGISTRY:
        raise UserError(f"unknown attack {name!r}{did_you_mean(name, ATTACKS)}; known: {', '.join(ATTACKS)}")
    return REGISTRY[name]


def parse_attacks(names: str | list[str]) -> list[str]:
    """``"clean,pgd"`` (or a list) -> the names, each checked."""
    out = [a.strip() for a in names.split(",")] if isinstance(names, str) else list(names)
    for a in out:
        get_attack(a)
    return out
