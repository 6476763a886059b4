"""The data layer under careless and hostile input: one class list, named roots, checked files, bombs counted."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from natgrad import config, data
from natgrad.errors import UserError

TREE = ["data.name=imagenet", "data.image_size=28", "data.limit_eval=null", "data.limit_train=null"]


def _one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


def _png(path: Path, size: int = 28, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _tree(root: Path, classes: dict[str, tuple[str, ...]], per_class: int = 2) -> Path:
    """An ImageFolder root: for each split, a folder of ``per_class`` PNGs per named class."""
    for split, names in classes.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for c in names:
            for i in range(per_class):
                _png(root / split / c / f"{i}.png", seed=i)
    return root


def _build(root: Path, split: str, *overrides: str):
    return data.build(config.load("fmnist-natural", [*TREE, f"data.root={root}", *overrides]), split)


# ---------------------------------------------------------------------------- ImageFolder class lists


def test_val_labels_follow_train_class_list_when_val_lacks_a_class(tmp_path):
    root = _tree(tmp_path, {"train": ("ant", "bee", "cat", "dog"), "val": ("ant", "cat", "dog")})
    train_index = {c: i for i, c in enumerate(["ant", "bee", "cat", "dog"])}
    val = _build(root, "test")
    labels = [val[i][1] for i in range(len(val))]
    names = [Path(p).parent.name for p, _ in val.ds.samples]
    assert len(labels) == 6 and labels == [train_index[n] for n in names]  # cat is 2 and dog 3, not 1 and 2
    assert val.ds.classes == ["ant", "bee", "cat", "dog"]


def test_val_class_that_train_lacks_is_named(tmp_path):
    root = _tree(tmp_path, {"train": ("ant", "bee"), "val": ("ant", "bee", "wasp")})
    with pytest.raises(UserError) as e:
        _build(root, "test")
    assert "'wasp'" in _one_line(e) and "train/ lacks" in str(e.value)


@pytest.mark.parametrize("split", ["train", "val"])
def test_empty_tree_is_one_line(tmp_path, split):
    root = _tree(tmp_path, {"train": ("ant", "bee"), "val": ("ant", "bee")})
    for f in (root / split).rglob("*.png"):
        f.unlink()
    with pytest.raises(UserError) as e:
        _build(root, "train" if split == "train" else "test")
    assert f"{root / split} holds no images" in _one_line(e)
    for d in (root / split).iterdir():
        d.rmdir()
    with pytest.raises(UserError) as e:
        _build(root, "train" if split == "train" else "test")
    assert f"{root / split} has no class folders" in _one_line(e)


def test_train_class_without_images_keeps_its_index(tmp_path):
    root = _tree(tmp_path, {"train": ("ant", "cat"), "val": ("ant", "cat")})
    (root / "train" / "bee").mkdir()
    train = _build(root, "train")
    assert sorted({y for _, y in train.ds.samples}) == [0, 2] and train.ds.classes == ["ant", "bee", "cat"]


def test_test_split_without_train_tree_says_it_is_needed(tmp_path):
    root = _tree(tmp_path, {"val": ("ant", "bee")})
    with pytest.raises(UserError) as e:
        _build(root, "test")
    assert f"{root / 'train'} does not exist" in _one_line(e) and "labels follow train/'s class folders" in str(e.value)


def test_more_train_classes_than_outputs_is_refused(tmp_path):
    root = _tree(tmp_path, {"train": ("a", "b", "c")}, per_class=1)
    with pytest.raises(UserError) as e:
        data.image_folder_classes(root, num_classes=2)
    assert "3 class folders but the model has 2 outputs" in _one_line(e)


def test_unreadable_val_subset_file_is_one_line(tmp_path):
    root = _tree(tmp_path, {"train": ("ant",), "val": ("ant",)})
    (tmp_path / "list.txt").write_bytes(b"\xff\xfe not utf-8 \x80")
    with pytest.raises(UserError) as e:
        _build(root, "test", f"data.val_subset={tmp_path / 'list.txt'}")
    assert "cannot read data.val_subset=" in _one_line(e)


# ---------------------------------------------------------------------------- decompression bombs


def test_decompression_bomb_is_counted_unreadable(tmp_path, monkeypatch):
    root = _tree(tmp_path, {"train": ("ant", "bee"), "val": ("ant", "bee")}, per_class=3)
    _png(root / "train" / "bee" / "bomb.png", size=64)  # 4096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses images over twice this; 28x28 is below
    with pytest.raises(Image.DecompressionBombError):
        Image.open(root / "train" / "bee" / "bomb.png")
    train = _build(root, "train", "data.num_workers=0")
    items = [train[i] for i in range(len(train))]
    assert len(items) == 7 and all(x.shape == (3, 28, 28) for x, _ in items)
    assert data.unreadable_count(train) == 1


# ---------------------------------------------------------------------------- named data roots


FILES = [stem for pair in data.FASHION_FILES.values() for stem in pair]


def _write_idx(path: Path, array: np.ndarray, ndim: int | None = None) -> Path:
    """An unsigned-byte IDX file (gzipped where the name ends in .gz); ``ndim`` may lie about the array."""
    shape = array.shape if ndim is None else array.shape[:ndim]
    raw = bytes([0, 0, 8, len(shape)]) + b"".join(d.to_bytes(4,
                                                             "big") for d in shape) + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def _fashion_root(folder: Path, n: int = 12, test_labels: np.ndarray | None = None) -> Path:
    """A tiny Fashion-MNIST folder: ``n`` 28x28 images and labels per split."""
    for split, (images, labels) in data.FASHION_FILES.items():
        _write_idx(folder / images, np.zeros((n, 28, 28)))
        lab = test_labels if split == "test" and test_labels is not None else np.arange(n) % 10
        _write_idx(folder / labels, lab)
    return folder


@pytest.fixture
def fallback_would_work(monkeypatch, tmp_path):
    """Debian's copy is a complete folder, so a silent fall back to it would succeed."""
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", _fashion_root(tmp_path / "debian"))
    monkeypatch.setattr(data, "_dpkg_dirs", lambda package: [])
    monkeypatch.delenv("NATGRAD_DATA", raising=False)
    return tmp_path / "debian"


def test_named_root_without_files_is_refused_not_replaced(tmp_path, fallback_would_work):
    (tmp_path / "mine").mkdir()
    with pytest.raises(UserError) as e:
        data.find_fashion_mnist(config.DataConfig(root=str(tmp_path / "mine")))
    message = _one_line(e)
    assert f"data.root={tmp_path / 'mine'} lacks" in message and all(f in message for f in FILES)
    assert "data.download=true" in message
    assert data.find_fashion_mnist(config.DataConfig()) == fallback_would_work  # neither named: Debian's copy


def test_named_root_missing_some_files_names_only_those(tmp_path, fallback_would_work):
    mine = _fashion_root(tmp_path / "mine")
    (mine / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(UserError) as e:
        data.build(config.load("fmnist-natural", [f"data.root={mine}"]), "test")
    message = _one_line(e)
    assert "lacks Fashion-MNIST's t10k-labels-idx1-ubyte (or .gz)" in message and "train-images" not in message


def test_natgrad_data_without_files_is_refused_and_root_wins_over_it(tmp_path, fallback_would_work, monkeypatch):
    (tmp_path / "env").mkdir()
    monkeypatch.setenv("NATGRAD_DATA", str(tmp_path / "env"))
    with pytest.raises(UserError) as e:
        data.find_fashion_mnist(config.DataConfig())
    assert f"$NATGRAD_DATA={tmp_path / 'env'} lacks" in _one_line(e)
    mine = _fashion_root(tmp_path / "mine")
    assert data.find_fashion_mnist(config.DataConfig(root=str(mine))) == mine


def test_download_goes_into_the_named_root(tmp_path, fallback_would_work, monkeypatch):
    import torchvision

    roots = []

    def fake_download(root, train, download):
        roots.append(Path(root))
        _fashion_root(Path(root) / "FashionMNIST" / "raw")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake_download)
    mine = tmp_path / "mine"
    assert data.find_fashion_mnist(config.DataConfig(root=str(mine), download=True)) == mine
    assert roots == [mine, mine]


# ---------------------------------------------------------------------------- IDX contents


def test_fashion_label_out_of_range_names_the_file(tmp_path, fallback_would_work):
    mine = _fashion_root(tmp_path / "mine", test_labels=np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 255]))
    with pytest.raises(UserError) as e:
        data.build(config.load("fmnist-natural", [f"data.root={mine}", "data.limit_eval=null"]), "test")
    assert f"{mine / 't10k-labels-idx1-ubyte'}: label 10 is outside 0..9 (2 such labels)" in _one_line(e)
    assert len(data.build(config.load("fmnist-natural", [f"data.root={mine}"]), "train")) == 12


@pytest.mark.parametrize("stem, array, ndim, shape", [
    ("t10k-images-idx3-ubyte", np.zeros((12, 28, 27)), None, "(12, 28, 27), not (N, 28, 28)"),
    ("t10k-images-idx3-ubyte", np.zeros((12, 784)), None, "(12, 784), not (N, 28, 28)"),
    ("t10k-labels-idx1-ubyte", np.zeros((12, 1)), None, "(12, 1), not (N,)"),
    ("t10k-labels-idx1-ubyte", np.zeros(1), 0, "(), not (N,)"),
    ("t10k-images-idx3-ubyte", np.zeros(1), 0, "(), not (N, 28, 28)"),
])
def test_idx_of_the_wrong_shape_names_the_file(tmp_path, fallback_would_work, stem, array, ndim, shape):
    mine = _fashion_root(tmp_path / "mine")
    _write_idx(mine / stem, array, ndim)
    with pytest.raises(UserError) as e:
        data.build(config.load("fmnist-natural", [f"data.root={mine}"]), "test")
    assert f"{mine / stem} holds an array of shape {shape}" in _one_line(e)


def test_idx_image_and_label_counts_must_agree(tmp_path, fallback_would_work):
    mine = _fashion_root(tmp_path / "mine", test_labels=np.arange(11) % 10)
    with pytest.raises(UserError) as e:
        data.build(config.load("fmnist-natural", [f"data.root={mine}"]), "test")
    assert "12 images but 11 labels" in _one_line(e)


def test_idx_header_sizes_that_overflow_are_refused(tmp_path):
    huge = b"".join((2**32 - 1).to_bytes(4, "big") for _ in range(4))
    path = tmp_path / "x-idx4-ubyte"
    path.write_bytes(bytes([0, 0, 8, 4]) + huge)
    with pytest.raises(UserError, match="is truncated or corrupt"):
        data.read_idx(path)


def test_array_labels_checked_for_every_dataset():
    images = np.zeros((3, 4, 4), dtype=np.uint8)
    data.check_arrays(data.Arrays(images, np.array([0, 1, 9]), "CIFAR-10 in /x"), 10)
    with pytest.raises(UserError, match=r"CIFAR-10 in /x: label -1 is outside 0\.\.9"):
        data.check_arrays(data.Arrays(images, np.array([0, -1, 9]), "CIFAR-10 in /x"), 10)


# ---------------------------------------------------------------------------- synthetic sizes


@pytest.mark.parametrize("key, value", [("num_classes", 0), ("channels", 0), ("image_size", -8), ("synthetic_size", 0)])
def test_synthetic_sizes_below_one_are_one_line(key, value):
    cfg = config.RunConfig()
    cfg.data = config.DataConfig(name="synthetic", **{key: value})  # built directly: past the config's own checks
    with pytest.raises(UserError) as e:
        data.build(cfg, "train")
    assert f"data.{key}={value} is not a positive count" in _one_line(e)


@pytest.mark.parametrize("size", [10, 30])
def test_synthetic_image_size_need_not_be_a_multiple_of_four(size):
    cfg = config.load("fmnist-natural", ["data.name=synthetic", f"data.image_size={size}", "data.synthetic_size=16"])
    x, y = data.build(cfg, "train")[0]
    assert x.shape == (1, size, size) and 0 <= y < 10


def test_cli_refuses_an_empty_data_root_in_one_line(tmp_path, fallback_would_work, capsys):
    from conftest import run_cli

    (tmp_path / "empty").mkdir()
    code, err = run_cli(["train", "fmnist-natural", f"data.root={tmp_path / 'empty'}", "device=cpu",
                         "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "lacks Fashion-MNIST's" in err, err
