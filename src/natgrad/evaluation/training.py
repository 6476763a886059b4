"""Clean and PGD-k accuracy during training: the evaluation of ``natgrad eval`` with two attacks."""

from __future__ import annotations

from torch import nn
from torch.utils.data import Dataset

from natgrad.engine.distributed import Context
from natgrad.evaluation.runner import evaluate_model
from natgrad.evaluation.settings import EvalSettings


def evaluate(
    model: nn.Module,
    ds: Dataset,
    eps: float,
    pgd_steps: int = 10,
    batch_size: int = 256,
    ctx: Context | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Clean accuracy and, when ``pgd_steps`` and ``eps`` are positive, PGD-k accuracy (step eps/4, random start).

    Exact under torchrun (no padded duplicates); the attack's randomness comes from a seeded fork of
    the RNG, so evaluating does not change what training draws afterwards.
    """
    ctx = ctx or Context(0, 1, next(model.parameters()).device)
    attack = pgd_steps > 0 and eps > 0
    settings = EvalSettings(attacks=["clean", "pgd"] if attack else ["clean"], eps=[eps], pgd_steps=(pgd_steps,),
                            batch_size=batch_size, seed=seed, progress=progress)
    rows = {r["attack"]: r for r in evaluate_model(model, ds, settings, ctx)["results"]}
    return {
        "n": rows["clean"]["n"],
        "clean_acc": rows["clean"]["robust_acc"],
        "pgd_acc": rows[f"pgd-{pgd_steps}"]["robust_acc"] if attack else None,
        "pgd_steps": pgd_steps if attack else 0,
        "eps": eps,
    }
