"""The model and the test images an evaluation runs on."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch.utils.data import Dataset

from natgrad import config as config_mod
from natgrad import data
from natgrad.build import LoadedModel, load_trained
from natgrad.config import RunConfig
from natgrad.errors import UserError
from natgrad.rundir import RunDir


def load_model(source: str | Path, recipe: str | None = None, model_name: str | None = None,
               device: torch.device | str = "cpu", ema: bool = True) -> LoadedModel:
    """A run folder (its EMA weights when it has them) or a safetensors file with ``recipe``."""
    source = Path(source)
    if source.is_dir():
        return RunDir(source).load_model(ema, device, model_name)
    if source.is_file():
        if recipe is None:
            raise UserError(f"{source} is a weights file: also give --recipe (the recipe it was trained with)")
        cfg = config_mod.load(recipe)
        if model_name is not None:
            cfg.model.name = model_name
        return load_trained(cfg, source, source.stem, device)
    raise UserError(f"{source} does not exist; give a run folder or a .safetensors file")


def eval_dataset(cfg: RunConfig, n: int | None) -> Dataset:
    """The recipe's test set, or a fixed seeded subset of ``n`` images (the one training evaluates on)."""
    full = data.build(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, limit_eval=None)), "test")
    if n is not None:
        if n < 1 or n > len(full):  # type: ignore[arg-type]
            raise UserError(f"--n {n} is outside 1..{len(full)}, the size of the {cfg.data.name} test set")  # type: ignore[arg-type]
        return data.fixed_subset(full, n, seed=4321)
    return full
