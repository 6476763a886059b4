"""Training loop, evaluation, checkpoints and distributed helpers."""

from natgrad.engine.evaluate import evaluate
from natgrad.engine.train import train

__all__ = ["evaluate", "train"]
