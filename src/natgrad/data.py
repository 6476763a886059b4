"""Datasets and loaders. Every loader yields float images in [0, 1] (NCHW) and integer labels.

Datasets: ``fashion-mnist`` (the embedded default), ``cifar10`` (torchvision),
``imagenet`` (an ImageFolder tree with ``train/`` and ``val/``), ``synthetic`` (for tests).
Augmentation comes from timm and is applied only when the config asks for it.
"""

from __future__ import annotations

import gzip
import math
import os
import subprocess
from collections.abc import Callable, Iterator, Sequence, Sized
from pathlib import Path
from typing import NamedTuple, cast

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from natgrad.config import AugConfig, DataConfig, RunConfig
from natgrad.datainfo import DataInfo, info
from natgrad.errors import UserError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def num_images(ds: Dataset) -> int:
    """The number of images of a map-style dataset (typed: ``Dataset`` itself declares no ``__len__``)."""
    return len(cast(Sized, ds))


class Arrays(NamedTuple):
    """A dataset held in memory: uint8 images, integer labels, and where they came from (for messages)."""

    images: np.ndarray
    labels: np.ndarray
    source: str


def check_arrays(arrays: Arrays, num_classes: int) -> None:
    """One label per image, every label in ``[0, num_classes)``; else an error naming the source."""
    images, labels, source = arrays
    if len(images) != len(labels):
        raise UserError(f"{source}: {len(images)} images but {len(labels)} labels; fetch the dataset again")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise UserError(f"{source}: label {int(bad[0])} is outside 0..{num_classes - 1} ({bad.size} such labels); "
                        "fetch the dataset again")


class ImageArrayDataset(Dataset):
    """uint8 images held in memory (N, H, W) or (N, H, W, C), with an optional PIL transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable | None = None):
        self.images = images
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        if self.transform is None:
            t = torch.from_numpy(np.ascontiguousarray(img))
            t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
            return t.float().div_(255.0), int(self.labels[i])
        return self.transform(Image.fromarray(img)), int(self.labels[i])


# ---------------------------------------------------------------------------- Fashion-MNIST


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped); a truncated or malformed file is an error naming it."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {path} ({e}); delete it and fetch the dataset again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path} is not an unsigned-byte IDX file; delete it and fetch the dataset again")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(shape)  # exact: a hostile header's sizes must not wrap around
    if len(raw) != expected:
        raise UserError(f"{path} is truncated or corrupt ({len(raw)} bytes, expected {expected}); delete it and fetch "
                        f"the dataset again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def read_idx_shaped(path: Path, item_shape: tuple[int, ...]) -> np.ndarray:
    """:func:`read_idx`, then an error naming the file unless it holds an array of shape (N, *item_shape)."""
    array = read_idx(path)
    if array.shape[1:] != item_shape or array.ndim != 1 + len(item_shape):
        want = f"(N, {', '.join(map(str, item_shape))})" if item_shape else "(N,)"
        raise UserError(f"{path} holds an array of shape {array.shape}, not {want}; delete it and fetch the dataset "
                        f"again")
    return array


def _idx_file(folder: Path, stem: str) -> Path | None:
    for sub in ("", "FashionMNIST/raw", "fashion-mnist"):
        for name in (stem, stem + ".gz"):
            p = folder / sub / name
            if p.is_file():
                return p
    return None


def _missing_fashion_files(folder: Path) -> list[str]:
    return [stem for pair in FASHION_FILES.values() for stem in pair if _idx_file(folder, stem) is None]


def named_data_root(cfg: DataConfig) -> tuple[str, Path] | None:
    """The data folder the user named, with how it was named: data.root, else $NATGRAD_DATA, else None."""
    if cfg.root:
        return "data.root", Path(cfg.root)
    if os.environ.get("NATGRAD_DATA"):
        return "$NATGRAD_DATA", Path(os.environ["NATGRAD_DATA"])
    return None


def find_fashion_mnist(cfg: DataConfig) -> Path:
    """Folder with the four IDX files.

    A folder the user names (data.root, else $NATGRAD_DATA) is the only one used: downloaded into with
    ``data.download=true``, else refused when it lacks files. Only with neither does Debian's package
    apply, then a download into ~/.cache/natgrad.
    """
    named = named_data_root(cfg)
    if named is not None:
        key, folder = named
        missing = _missing_fashion_files(folder)
        if not missing:
            return folder
        if cfg.download:
            return _download_fashion_mnist(folder)
        raise UserError(
            f"{key}={folder} lacks Fashion-MNIST's {', '.join(missing)} (or .gz); put the IDX files there, pass "
            f"data.download=true, or unset {key} to use Debian's copy (`apt-get install dataset-fashion-mnist`)"
        )
    for folder in [DEBIAN_FASHION_MNIST, *_dpkg_dirs("dataset-fashion-mnist")]:
        if not _missing_fashion_files(folder):
            return folder
    if cfg.download:
        return _download_fashion_mnist(Path.home() / ".cache" / "natgrad")
    raise UserError(
        f"Fashion-MNIST not found in {DEBIAN_FASHION_MNIST}; "
        "`apt-get install dataset-fashion-mnist`, set data.root, or pass data.download=true"
    )


def _download_fashion_mnist(root: Path) -> Path:
    import torchvision

    try:
        torchvision.datasets.FashionMNIST(str(root), train=True, download=True)
        torchvision.datasets.FashionMNIST(str(root), train=False, download=True)
    except Exception as e:  # network errors come in many types
        raise UserError(f"could not download Fashion-MNIST into {root} ({e}); `apt-get install dataset-fashion-mnist` "
                        f"or set data.root") from None
    return root


def _dpkg_dirs(package: str) -> list[Path]:
    try:
        out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({Path(line).parent for line in out.splitlines() if "idx" in line})


def _fashion_mnist(cfg: DataConfig, split: str) -> Arrays:
    folder = find_fashion_mnist(cfg)
    image_file, label_file = (cast(Path, _idx_file(folder, stem)) for stem in FASHION_FILES[split])  # found above
    return Arrays(read_idx_shaped(image_file, (28, 28)), read_idx_shaped(label_file, ()), str(label_file))


# ---------------------------------------------------------------------------- other datasets


def _cifar10(cfg: DataConfig, split: str) -> Arrays:
    import torchvision

    named = named_data_root(cfg)
    root = str(named[1] if named else Path.home() / ".cache" / "natgrad")
    try:
        ds = torchvision.datasets.CIFAR10(root, train=split == "train", download=cfg.download)
    except RuntimeError:
        raise UserError(f"CIFAR-10 not found under {root}; set data.root to the folder holding cifar-10-batches-py, or "
                        f"pass data.download=true where there is internet") from None
    return Arrays(ds.data, np.asarray(ds.targets), f"CIFAR-10 in {root}")


def _synthetic(cfg: DataConfig, split: str, seed: int) -> Arrays:
    """Learnable toy images: a fixed smooth pattern per class plus noise (sizes checked by :func:`info`)."""
    size = cfg.image_size or 28
    cells = -(-size // 4)  # 4x4-pixel cells, enough to cover any size
    g = np.random.default_rng(seed)
    templates = g.normal(size=(cfg.num_classes, cells, cells, cfg.channels))
    templates = templates.repeat(4, axis=1).repeat(4, axis=2)[:, :size, :size]
    n = cfg.synthetic_size if split == "train" else max(cfg.synthetic_size // 4, cfg.num_classes)
    g = np.random.default_rng(seed + (1 if split == "train" else 2))
    labels = g.integers(0, cfg.num_classes, size=n)
    x = 0.5 + 0.2 * templates[labels] + 0.1 * g.normal(size=(n, size, size, cfg.channels))
    images = (np.clip(x, 0, 1) * 255).round().astype(np.uint8)
    return Arrays(images[..., 0] if cfg.channels == 1 else images, labels, "synthetic data")


class SkipUnreadable(Dataset):
    """An image-folder dataset whose unreadable images (corrupt, truncated, not images) are replaced by the
    next readable one and counted in :attr:`unreadable`, shared with DataLoader workers (forked)."""

    # What PIL raises for bad files: UnidentifiedImageError is an OSError; DecompressionBombError (an image of
    # more than twice Image.MAX_IMAGE_PIXELS, which Pillow refuses to decode) is neither.
    ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

    def __init__(self, ds: Dataset):
        import multiprocessing

        self.ds = ds
        self.unreadable = multiprocessing.Value("i", 0)

    def __len__(self) -> int:
        return num_images(self.ds)

    def __getitem__(self, index: int):
        for k in range(num_images(self.ds)):
            try:
                return self.ds[(index + k) % num_images(self.ds)]
            except self.ERRORS:
                if k == 0:  # the image asked for; the ones tried in its place are counted when asked for
                    with self.unreadable.get_lock():
                        self.unreadable.value += 1
        raise UserError("no image of the dataset can be read; check data.root")


def unreadable_count(ds: Dataset) -> int:
    """Unreadable images skipped so far by ``ds`` (a :class:`SkipUnreadable`, possibly in a Subset), else 0."""
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds.unreadable.value if isinstance(ds, SkipUnreadable) else 0


class ClassListImageFolder(ImageFolder):
    """An ImageFolder labelled by a given class list rather than by its own folders, so that every split's
    labels agree; a class of the list may have no folder, or no images, here."""

    def __init__(self, root: Path, classes: Sequence[str], transform: Callable | None = None):
        self.class_list = list(classes)
        super().__init__(str(root), transform=transform, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self.class_list, {name: i for i, name in enumerate(self.class_list)}


def _class_folders(folder: Path) -> list[str]:
    """The class folders of an ImageFolder tree, sorted as torchvision sorts them; an error where there are none."""
    if not folder.is_dir():
        raise UserError(f"{folder} does not exist; data.root must hold train/ and val/ ImageFolder trees "
                        "(labels follow train/'s class folders)")
    try:
        return find_classes(str(folder))[0]
    except FileNotFoundError:
        raise UserError(f"{folder} has no class folders; an ImageFolder tree holds one folder of images per "
                        f"class") from None
    except OSError as e:
        raise UserError(f"cannot list {folder} ({e}); check data.root") from None


def _names(names: Sequence[str], most: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:most])  # repr: a folder name may hold a newline
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def image_folder_classes(root: Path, num_classes: int) -> list[str]:
    """The class list of an ImageFolder dataset, the same for every split: ``root/train``'s class folders."""
    classes = _class_folders(root / "train")
    if len(classes) > num_classes:
        raise UserError(f"{root / 'train'} has {len(classes)} class folders but the model has {num_classes} outputs; "
                        f"keep at most {num_classes} classes")
    return classes


def image_folder(folder: Path, classes: Sequence[str], transform: Callable | None) -> ClassListImageFolder:
    """One split's ImageFolder labelled by ``classes``; an error for a class not in the list, or no images."""
    known = set(classes)
    unknown = [name for name in _class_folders(folder) if name not in known]
    if unknown:
        raise UserError(f"{folder} has class folders that train/ lacks ({_names(unknown)}); the model knows only "
                        "train/'s classes: remove them or add them to train/")
    ds = ClassListImageFolder(folder, classes, transform)
    if not ds.samples:
        raise UserError(f"{folder} holds no images ({' '.join(IMG_EXTENSIONS)}) in its class folders; "
                        "put each class's images in its folder")
    return ds


def _imagenet(cfg: DataConfig, split: str, transform: Callable | None, num_classes: int) -> Dataset:
    if cfg.root is None:
        raise UserError("data.name=imagenet needs data.root: a folder with train/ and val/ ImageFolder trees")
    root = Path(cfg.root)
    folder = root / ("train" if split == "train" else "val")
    tree = image_folder(folder, image_folder_classes(root, num_classes), transform)
    ds: Dataset = SkipUnreadable(tree)
    if split != "train" and cfg.val_subset:
        wanted = _lines(Path(cfg.val_subset))
        keep = [i for i, (p, _) in enumerate(tree.samples)
                if os.path.relpath(p, folder) in wanted or Path(p).name in wanted]
        if not keep:
            raise UserError(f"none of the images listed in {cfg.val_subset} are in {folder}; list paths relative to "
                            f"val/")
        ds = Subset(ds, keep)
    return ds


def _lines(path: Path) -> set[str]:
    """The non-empty lines of a text file the user names; an error naming it where it cannot be read."""
    try:
        return {line.strip() for line in path.read_text().splitlines() if line.strip()}
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read data.val_subset={path} ({e}); give a text file of image paths, one a "
                        f"line") from None


# ---------------------------------------------------------------------------- transforms


class PixelSpaceErasing:
    """timm's RandomErasing, applied in normalized space as in the paper's recipe, then mapped back to [0, 1]."""

    def __init__(self, aug: AugConfig, mean: Sequence[float], std: Sequence[float]):
        from timm.data.random_erasing import RandomErasing

        self.erase = RandomErasing(probability=aug.reprob, mode=aug.remode, max_count=aug.recount, device="cpu")
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        z = self.erase((x - self.mean) / self.std)
        return (z * self.std + self.mean).clamp_(0.0, 1.0)


def _uses_augmentation(aug: AugConfig) -> bool:
    return bool(aug.rand_augment or aug.color_jitter or aug.hflip > 0 or aug.reprob > 0)


def _posterize(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """timm's posterize with Pillow < 11's answer for 0 bits (a black image) where newer Pillow raises."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _pillow_safe(transform: Callable) -> Callable:
    """Make timm's RandAugment in ``transform`` (a Compose, or RandAugment itself) work with current Pillow.

    With increasing severity (``inc1``, the DeiT/Swin recipe) and a magnitude at its maximum, timm keeps 0
    bits in Posterize; Pillow 11 and later refuse 0 bits where earlier versions returned a black image,
    so training would stop on a random image. The recipe's augmentation is kept as it was designed.
    """
    from timm.data import auto_augment

    for t in getattr(transform, "transforms", [transform]):
        for op in getattr(t, "ops", []):
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize
        if hasattr(t, "transforms"):
            _pillow_safe(t)
    return transform


def train_transform(name: str, aug: AugConfig, di: DataInfo) -> Callable | None:
    """PIL -> [0, 1] tensor with the recipe's timm augmentation; None where there is nothing to do."""
    from torchvision import transforms as T

    steps: list[Callable] = []
    if name == "imagenet":
        from timm.data.transforms_factory import transforms_imagenet_train

        steps.append(_pillow_safe(transforms_imagenet_train(
            di.image_size, hflip=aug.hflip, color_jitter=aug.color_jitter,  # type: ignore[arg-type]  # None: none
            auto_augment=aug.rand_augment,
            interpolation=aug.interpolation, mean=(0.0,) * 3, std=(1.0,) * 3, re_prob=0.0,
        )))
    else:
        if not _uses_augmentation(aug):
            return None
        if aug.hflip > 0:
            steps.append(T.RandomHorizontalFlip(aug.hflip))
        if aug.color_jitter:
            steps.append(T.ColorJitter(aug.color_jitter, aug.color_jitter, aug.color_jitter))
        if aug.rand_augment:
            from timm.data.auto_augment import rand_augment_transform

            fill = tuple(round(255 * m) for m in di.mean)
            steps.append(_pillow_safe(rand_augment_transform(aug.rand_augment,
                                                             {"img_mean": fill if len(fill) == 3 else fill[0]})))
        steps.append(T.ToTensor())
    if aug.reprob > 0:
        steps.append(PixelSpaceErasing(aug, di.mean, di.std))
    return T.Compose(steps)


def eval_transform(name: str, aug: AugConfig, di: DataInfo) -> Callable | None:
    if name != "imagenet":
        return None
    from timm.data.transforms_factory import transforms_imagenet_eval

    return transforms_imagenet_eval(di.image_size, interpolation=aug.interpolation, mean=(0.0,) * 3, std=(1.0,) * 3)


def create_mixup(cfg: RunConfig, num_classes: int) -> Callable | None:
    """timm's Mixup/CutMix with label smoothing (soft targets), or None when off."""
    aug = cfg.aug
    if aug.mixup <= 0 and aug.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob, switch_prob=aug.mixup_switch_prob,
        mode=aug.mixup_mode, label_smoothing=aug.smoothing, num_classes=num_classes,
    )


# ---------------------------------------------------------------------------- building


def fixed_subset(ds: Dataset, limit: int | None, seed: int) -> Dataset:
    """The first ``limit`` items of a seeded permutation: the same subset on every run."""
    if limit is None or limit >= num_images(ds):
        return ds
    perm = torch.randperm(num_images(ds), generator=torch.Generator().manual_seed(seed))
    return Subset(ds, sorted(perm[:limit].tolist()))


HOLDOUT_SEED = 999


def build(cfg: RunConfig, split: str) -> Dataset:
    """The train or test dataset of the config, with its transforms and ``limit_*`` subset applied.

    With ``data.holdout=N`` a fixed seeded set of N training images is held out: training uses the
    others, and the "test" split is the held-out images (for tuning without looking at the test set).
    """
    dc = cfg.data
    di = info(dc)
    transform = train_transform(dc.name, cfg.aug, di) if split == "train" else eval_transform(dc.name, cfg.aug, di)
    source = "train" if dc.holdout else split
    if dc.name == "imagenet":
        ds = _imagenet(dc, source, transform, di.num_classes)
    else:
        if dc.name == "fashion-mnist":
            arrays = _fashion_mnist(dc, source)
        elif dc.name == "cifar10":
            arrays = _cifar10(dc, source)
        else:
            arrays = _synthetic(dc, source, cfg.seed)
        check_arrays(arrays, di.num_classes)
        ds = ImageArrayDataset(arrays.images, arrays.labels, transform)
    if dc.holdout:
        if dc.holdout >= num_images(ds):
            raise UserError(f"data.holdout={dc.holdout} leaves no training images (the training set has "
                            f"{num_images(ds)}); "
                            "hold out fewer")
        perm = torch.randperm(num_images(ds), generator=torch.Generator().manual_seed(HOLDOUT_SEED)).tolist()
        ds = Subset(ds, sorted(perm[dc.holdout:] if split == "train" else perm[:dc.holdout]))
    limit = dc.limit_train if split == "train" else dc.limit_eval
    return fixed_subset(ds, limit, seed=1234 if split == "train" else 4321)


def split_sizes(total: int, parts: int, unit: int = 1) -> list[int]:
    """``total`` images in ``parts`` shares as equal as whole ``unit``s allow (the first shares the larger);
    a remainder below ``unit`` goes to the first share."""
    units, rest = divmod(total, unit)
    q, r = divmod(units, parts)
    sizes = [(q + (i < r)) * unit for i in range(parts)]
    sizes[0] += rest
    return sizes


class EpochBatches:
    """Global batches of a seeded per-epoch permutation; each process takes its share of every batch, in
    ``accum`` micro-batches.

    The union over processes and micro-batches of batch ``b`` is the same set of images for any world size
    and accumulation, so a torchrun job sees exactly what one process with the same global batch sees.
    Shares are as equal as ``unit`` allows (2 where mixup pairs images); the last partial batch is dropped.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1, start: int = 0,
                 accum: int = 1, unit: int = 1):
        self.perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        self.batch_size, self.rank, self.world, self.start = batch_size, rank, world, start
        shares = split_sizes(batch_size, world, unit)
        self.offset = sum(shares[:rank])
        self.micro = split_sizes(shares[rank], accum, unit)

    def __len__(self) -> int:
        return (len(self.perm) // self.batch_size - self.start) * len(self.micro)

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.start, len(self.perm) // self.batch_size):
            lo = b * self.batch_size + self.offset
            for size in self.micro:
                yield self.perm[lo : lo + size].tolist()
                lo += size


def mixup_unit(cfg: RunConfig) -> int:
    """Images per indivisible unit of a batch: 2 where mixup or cutmix pair each image with another."""
    return 2 if cfg.aug.mixup > 0 or cfg.aug.cutmix > 0 else 1


def train_loader(ds: Dataset, cfg: RunConfig, epoch: int, rank: int = 0, world: int = 1, start: int = 0) -> DataLoader:
    """This process's micro-batches of one epoch (``accum_steps`` per optimizer step), skipping the first
    ``start`` steps (for resuming mid-epoch)."""
    batches = EpochBatches(num_images(ds), cfg.batch_size, cfg.seed, epoch, rank, world, start, cfg.accum_steps,
                           mixup_unit(cfg))
    # A generator of our own keeps the loader from drawing on the global RNG (exact resume).
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    return DataLoader(ds, batch_sampler=batches, num_workers=cfg.data.num_workers, generator=gen,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)
