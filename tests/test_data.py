"""Data: Fashion-MNIST reading, fixed subsets, global batches that do not depend on the world size."""

import gzip
import json
import shutil

import numpy as np
import pytest
import torch
from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

from conftest import run_cli, write_image_folder
from natgrad import config, data
from natgrad.data import EpochBatches
from natgrad.errors import UserError


def test_fashion_mnist_matches_torchvision_reader(tmp_path, fmnist):
    folder = fmnist
    src = data._idx_file(folder, "t10k-labels-idx1-ubyte")
    raw = tmp_path / "labels"
    opener = gzip.open if src.suffix == ".gz" else open
    with opener(src, "rb") as f, open(raw, "wb") as g:
        shutil.copyfileobj(f, g)
    ours = data.read_idx(src)
    theirs = read_sn3_pascalvincent_tensor(str(raw))
    assert np.array_equal(ours, theirs.numpy())
    ds = data.build(config.load("fmnist-natural", ["data.limit_eval=50"]), "test")
    x, y = ds[0]
    assert len(ds) == 50 and x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert x.min() >= 0.0 and x.max() <= 1.0 and 0 <= y < 10


def test_truncated_idx_names_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    header = bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    path.write_bytes(header + bytes(100))
    with pytest.raises(UserError, match="train-images-idx3-ubyte is truncated"):
        data.read_idx(path)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nothing")
    monkeypatch.setattr(data, "_dpkg_dirs", lambda package: [])
    monkeypatch.delenv("NATGRAD_DATA", raising=False)
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        data.find_fashion_mnist(config.DataConfig(root=str(tmp_path)))


def test_fixed_subset_is_seeded_and_stable():
    cfg = config.load("fmnist-natural", ["data.name=synthetic", "data.synthetic_size=300", "data.limit_train=40"])
    a, b = data.build(cfg, "train"), data.build(cfg, "train")
    assert len(a) == 40 and a.indices == b.indices


@pytest.mark.parametrize("world", [2, 4])
def test_global_batches_do_not_depend_on_world_size(world):
    single = list(EpochBatches(100, 16, seed=3, epoch=2))
    shards = [list(EpochBatches(100, 16, seed=3, epoch=2, rank=r, world=world)) for r in range(world)]
    assert len(single) == 6
    for b, batch in enumerate(single):
        assert sorted(sum((s[b] for s in shards), [])) == sorted(batch)
    resumed = list(EpochBatches(100, 16, seed=3, epoch=2, start=4))
    assert resumed == single[4:]
    assert list(EpochBatches(100, 16, seed=3, epoch=3)) != single


def test_synthetic_pixels_in_unit_range_and_augmentation_keeps_it():
    cfg = config.load("fmnist-natural", ["data.name=synthetic", "data.channels=3", "data.image_size=32",
                                         "aug.rand_augment=rand-m9-mstd0.5-inc1", "aug.reprob=1.0", "aug.hflip=0.5"])
    ds = data.build(cfg, "train")
    xs = torch.stack([ds[i][0] for i in range(16)])
    assert xs.shape == (16, 3, 32, 32) and xs.min() >= 0 and xs.max() <= 1


def test_mixup_gives_soft_targets():
    cfg = config.load("fmnist-natural", ["aug.mixup=0.8", "aug.cutmix=1.0", "aug.smoothing=0.1"])
    mixup = data.create_mixup(cfg, 10)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    xm, ym = mixup(x, y)
    assert ym.shape == (8, 10) and torch.allclose(ym.sum(1), torch.ones(8))
    assert xm.min() >= 0 and xm.max() <= 1


def test_rand_augment_at_full_severity_works_with_current_pillow():
    """timm's increasing-severity Posterize keeps 0 bits at magnitude 10: a black image, not Pillow's error."""
    from PIL import Image

    from natgrad import config, data

    cfg = config.load("cifar10-prn18-gradnorm", ["aug.rand_augment=rand-m10-n8-inc1-mstd0"])
    transform = data.train_transform("cifar10", cfg.aug, data.info(cfg.data))
    image = Image.new("RGB", (32, 32), (200, 100, 50))
    for _ in range(20):  # 8 ops per image at magnitude 10: Posterize comes up
        out = transform(image)
        assert out.shape == (3, 32, 32) and out.min() >= 0 and out.max() <= 1
    assert data._posterize(image, 0).getextrema() == ((0, 0),) * 3
    assert data._posterize(image, 8) is image


def _image_tree(root, bad: int) -> None:
    """train/ and val/ ImageFolder trees of 28x28 PNGs, with ``bad`` unreadable files in train/ and one in val/."""
    write_image_folder(root, ("a", "b"), {"train": 8, "val": 4}, 28)
    good = (root / "train" / "a" / "0.png").read_bytes()
    corrupt = [b"not an image at all", good[: len(good) // 2]]  # garbage, and a truncated PNG
    for i in range(bad):
        (root / "train" / "b" / f"bad{i}.png").write_bytes(corrupt[i % 2])
    (root / "val" / "a" / "bad.png").write_bytes(corrupt[0])


IMAGE_TREE_ARGS = ["data.name=imagenet", "data.image_size=28", "data.limit_eval=null", "batch_size=6",
                   "eval.pgd_steps=1", "epochs=2", "device=cpu", "--quiet"]


def test_unreadable_images_are_skipped_and_counted(tmp_path, capsys):
    _image_tree(tmp_path / "tree", bad=2)
    out = tmp_path / "run"
    args = ["train", "fmnist-natural", f"data.root={tmp_path / 'tree'}", *IMAGE_TREE_ARGS, "data.max_unreadable=2"]
    code, err = run_cli([*args, "--out", str(out)], capsys)
    assert code == 0, err
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["unreadable_images"] for m in metrics] == [2, 2]  # both bad files, in each epoch
    assert metrics[-1]["eval_n"] == 9  # val/ has 9 files; the unreadable one is replaced by a readable image

    code, err = run_cli([*args[:-1], "data.max_unreadable=1", "--out", str(tmp_path / "strict")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "2 unreadable images skipped in epoch 1, more than data.max_unreadable=1" in err


def test_holdout_splits_the_training_set_and_replaces_the_test_set():
    cfg = config.load("fmnist-natural", ["data.name=synthetic", "data.synthetic_size=256", "data.holdout=64",
                                         "data.limit_eval=null"])
    train, held = data.build(cfg, "train"), data.build(cfg, "test")
    assert len(train) == 192 and len(held) == 64
    full = data.build(config.load("fmnist-natural", ["data.name=synthetic", "data.synthetic_size=256"]), "train")

    def as_bytes(ds):
        return {ds[i][0].numpy().tobytes() for i in range(len(ds))}

    assert as_bytes(train).isdisjoint(as_bytes(held)) and as_bytes(train) | as_bytes(held) == as_bytes(full)
    assert as_bytes(data.build(cfg, "test")) == as_bytes(held)  # the same images every time
    with pytest.raises(UserError, match="holdout=256 leaves no training images"):
        data.build(config.load("fmnist-natural", ["data.name=synthetic", "data.synthetic_size=256",
                                                  "data.holdout=256"]), "train")
