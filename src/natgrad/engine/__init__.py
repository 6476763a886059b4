"""Training loop, evaluation, checkpoints and distributed helpers."""

from natgrad.engine.train import train
from natgrad.evaluation import evaluate

__all__ = ["evaluate", "train"]
