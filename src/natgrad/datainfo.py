"""Facts about each dataset a model needs: classes, channels, image size and normalization statistics.

Kept apart from :mod:`natgrad.data` (which reads the images) so that the config can check a value
against a dataset without importing the data pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from natgrad.errors import UserError

if TYPE_CHECKING:
    from natgrad.config import DataConfig


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about a dataset."""

    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


INFO = {
    "fashion-mnist": DataInfo(10, 1, 28, (0.2860,), (0.3530,)),
    "cifar10": DataInfo(10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet": DataInfo(1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def info(cfg: DataConfig) -> DataInfo:
    """Classes, channels, size and normalization statistics of the configured dataset."""
    if cfg.name == "synthetic":
        _check_synthetic(cfg)
        return DataInfo(cfg.num_classes, cfg.channels, cfg.image_size or 28, (0.5,) * cfg.channels,
                        (0.25,) * cfg.channels)
    base = INFO[cfg.name]
    if cfg.name == "imagenet" and cfg.image_size:
        return DataInfo(base.num_classes, base.in_chans, cfg.image_size, base.mean, base.std)
    return base


def _check_synthetic(cfg: DataConfig) -> None:
    """Synthetic data's sizes are counts: each at least 1 (``image_size`` may be left unset)."""
    sizes = {"num_classes": cfg.num_classes, "channels": cfg.channels, "synthetic_size": cfg.synthetic_size,
             "image_size": 28 if cfg.image_size is None else cfg.image_size}
    for key, value in sizes.items():
        if value < 1:
            raise UserError(f"data.{key}={value} is not a positive count; synthetic data needs data.{key} >= 1")
