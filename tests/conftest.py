"""Shared fixtures: tiny synthetic runs that train in seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from natgrad import config, data, models
from natgrad.cli import main
from natgrad.errors import UserError

TINY = [
    "data.name=synthetic", "data.synthetic_size=256", "data.image_size=28", "data.channels=1",
    "data.limit_eval=64", "batch_size=32", "eval.pgd_steps=2", "eval.batch_size=64", "device=cpu",
]


# Models whose training steps are compared across implementations: (channels, image size, train_mode)
STEP_MODELS = {"cnn-small": (1, 28, "train"), "resnet10t": (3, 32, "eval"), "resnet10t-train": (3, 32, "train")}


def step_model(name: str) -> tuple[models.Classifier, torch.Tensor, torch.Tensor]:
    """A seeded model of :data:`STEP_MODELS` with a batch of 4 images and labels."""
    channels, size, mode = STEP_MODELS[name]
    torch.manual_seed(0)
    model = models.create(name.removesuffix("-train"), 10, channels, train_mode=mode)
    return model, torch.rand(4, channels, size, size), torch.randint(0, 10, (4,))


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def run_cli(args: list[str], capsys: pytest.CaptureFixture | None = None) -> tuple[int, str]:
    """Run ``natgrad`` in-process; returns the exit code and stderr."""
    code = main(args)
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def weights(run: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(run / name))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k] - b[k]).abs().max().item()}"
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=f"{k} differs")


def write_image_folder(root: Path, classes: tuple[str, ...], per_split: dict[str, int], size: int) -> None:
    """train/ and val/ ImageFolder trees of random ``size`` x ``size`` RGB PNGs, ``per_split[split]`` per class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in per_split.items():
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.fixture
def fmnist() -> Path:
    """The Fashion-MNIST folder; the test is skipped where it is not installed (`make test` installs it)."""
    try:
        return data.find_fashion_mnist(config.DataConfig())
    except UserError:
        pytest.skip("Fashion-MNIST is not installed (make test installs it)")
