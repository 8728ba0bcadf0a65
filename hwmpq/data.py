"""Datasets for ``--data``: the built-in ones that work offline (Fashion-MNIST from the Debian package
dataset-fashion-mnist, sklearn digits) and the user's own: an image folder, a .npz file, or
``path/to/file.py:factory``. :func:`load_data` turns any of them into one :class:`Splits` record, so every
command trains, searches and calibrates on them alike.

Splits are deterministic: Fashion-MNIST's validation split is a seeded slice of the training set (used by
the searches for architecture steps and by NEMO's accuracy proxy) and its test split is the official one;
the user's data is split by a seeded permutation (80/10/10) unless it comes split already.

Bad input raises :class:`DataSourceError` while loading, before any training or calibration, with the file
named. Pillow is imported only when an image folder is read."""

from __future__ import annotations

import gzip
import importlib.util
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("fashion-mnist", "digits")
SOURCES = "an image folder, a .npz file or path/to/file.py:factory"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.449,), (0.226,)  # ImageNet's averaged over RGB, for --channels 1
DEFAULT_IMAGE_SIZE = 224
HELD_OUT_FRACTION = 0.1  # of the user's data, for each of val and test when they are not given
SPLIT_NAMES = ("train", "val", "test")
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


class DatasetMissingError(FileNotFoundError):
    """The data files are not on this machine; the message says how to get them."""


class DataSourceError(ValueError):
    """A ``--data`` source cannot be used as given; the message names the file and says what to fix."""


@dataclass(frozen=True)
class Splits:
    """train/val/test datasets of (image float32 C,H,W, label int64) samples. Unlabelled data has labels -1
    and ``num_classes`` 0: enough for calibration and for agreement with a float model, not for training or
    accuracy (:func:`require_labels`)."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]  # C, H, W
    classes: tuple[str, ...] = ()  # class names by label index, where the data names them (image folders)

    @property
    def labelled(self) -> bool:
        return self.num_classes > 0

    def loader(self, split: str, batch_size: int = 128, shuffle: bool = False, seed: int = 0) -> DataLoader:
        ds = getattr(self, split)
        g = torch.Generator().manual_seed(seed)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, drop_last=False)


class LazyDataset(Dataset):
    """A dataset whose samples are made in ``__getitem__``. ``tensors`` stacks all of them once (cached), for
    code written for TensorDataset (the searches take whole batches from ``splits.train.tensors``)."""

    _tensors: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tensors is None:
            xs, ys = zip(*(self[i] for i in range(len(self))), strict=True)
            self._tensors = (torch.stack(xs), torch.stack(ys))
        return self._tensors

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_tensors"}  # workers rebuild it if they need it


class Rows(LazyDataset):
    """The rows ``indices`` of ``base`` (a seeded split or a --limit of a dataset that is not a TensorDataset)."""

    def __init__(self, base: Dataset, indices: Sequence[int]) -> None:
        self.base, self.indices = base, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[self.indices[i]]


# ---------------------------------------------------------------- built-in datasets

def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated idx file ({arr.size} values, header says {dims})")
    return arr.reshape(dims)


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get("HWMPQ_DATA", FASHION_DIR))


# Fashion-MNIST per-pixel statistics of the training set (mean 0.2860, std 0.3530 on [0, 1])
_FMNIST_MEAN, _FMNIST_STD = 0.2860, 0.3530


def load_fashion_mnist(val_size: int = 5000, seed: int = 0, limit: int | None = None) -> Splits:
    root = fashion_mnist_dir()
    files = {s: (root / f"{s}-images-idx3-ubyte.gz", root / f"{s}-labels-idx1-ubyte.gz") for s in ("train", "t10k")}
    missing = [str(p) for pair in files.values() for p in pair if not p.is_file()]
    if missing:
        raise DatasetMissingError(
            f"Fashion-MNIST not found: missing {missing}. Install the Debian package "
            f"(apt-get install dataset-fashion-mnist) or set HWMPQ_DATA to a folder holding the four idx .gz files."
        )

    def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(_read_idx(files[split][0]).astype(np.float32) / 255.0).unsqueeze(1)
        y = torch.from_numpy(_read_idx(files[split][1]).astype(np.int64))
        return (x - _FMNIST_MEAN) / _FMNIST_STD, y

    xtr, ytr = load("train")
    xte, yte = load("t10k")
    perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed))
    val_idx, tr_idx = perm[:val_size], perm[val_size:]
    if limit is not None:
        tr_idx, val_idx = tr_idx[:limit], val_idx[: max(1, limit // 5)]
        xte, yte = xte[:limit], yte[:limit]
    return Splits("fashion-mnist", TensorDataset(xtr[tr_idx], ytr[tr_idx]), TensorDataset(xtr[val_idx], ytr[val_idx]),
                  TensorDataset(xte, yte), 10, (1, 28, 28))


def load_digits(seed: int = 0) -> Splits:
    """sklearn's 1,797 8x8 digits (bundled with scikit-learn): 60/20/20 split, for fast tests."""
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    x = torch.from_numpy((d.images / 16.0 - 0.5).astype(np.float32) / 0.5).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_tr, n_val = int(0.6 * len(x)), int(0.2 * len(x))
    tr, va, te = perm[:n_tr], perm[n_tr:n_tr + n_val], perm[n_tr + n_val:]
    return Splits("digits", TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va]), TensorDataset(x[te], y[te]),
                  10, (1, 8, 8))


# ---------------------------------------------------------------- dispatch

def load_data(spec: str, *, image_size: int | Sequence[int] | None = None, mean: Sequence[float] | None = None,
              std: Sequence[float] | None = None, channels: int | None = None, seed: int = 0,
              limit: int | None = None) -> Splits:
    """The :class:`Splits` named by a ``--data`` value: ``fashion-mnist``, ``digits``, an image folder, a
    ``.npz`` file or ``path/to/file.py:factory``. ``image_size`` (N or (H, W)), ``mean``/``std`` and
    ``channels`` (1 or 3) shape the images of a folder; ``mean``/``std`` also normalise a .npz. An option the
    source cannot honour is refused rather than ignored. ``limit`` keeps the first N training and test
    samples and N // 5 validation samples (quick runs); ``seed`` fixes the split of data not split already."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    options = {"image_size": image_size, "mean": mean, "std": std, "channels": channels}
    kind = source_kind(spec)
    if kind == "folder":
        splits = load_image_folder(spec, seed=seed, **options)
    elif kind == "npz":
        _refuse(spec, options, allowed=("mean", "std", "channels"))
        splits = load_npz(spec, mean=mean, std=std, channels=channels, seed=seed)
    elif kind == "factory":
        _refuse(spec, options)
        splits = load_factory(spec, seed=seed)
    else:
        _refuse(spec, options)
        if spec == "fashion-mnist":
            return load_fashion_mnist(seed=seed, limit=limit)
        splits = load_digits(seed=seed)
    return limit_splits(splits, limit)


def load_dataset(name: str, **kwargs: Any) -> Splits:
    """:func:`load_data` under its first name (the searches and the benchmarks call it)."""
    return load_data(name, **kwargs)


def source_kind(spec: str) -> str:
    """"named", "factory", "npz" or "folder" for a ``--data`` value; a source that cannot exist raises."""
    if spec in DATASETS:
        return "named"
    if not spec.strip():
        raise DataSourceError(f"--data is empty; give {DATASETS[0]}, {DATASETS[1]}, {SOURCES}")
    if spec.endswith(".py") or ".py:" in spec:
        return "factory"
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".npz":
        if not path.is_file():
            raise DataSourceError(f"--data {spec!r}: no such file")
        return "npz"
    if path.is_dir():
        return "folder"
    if path.exists():
        raise DataSourceError(f"--data {spec!r} is a file but not a .npz; give {SOURCES}")
    if os.sep in spec or "/" in spec:
        raise DataSourceError(f"--data {spec!r}: no such file or folder")
    raise DataSourceError(f"unknown dataset {spec!r}; known: {DATASETS}, or {SOURCES} "
                          f"(there is no file or folder {spec!r} here either)")


def is_image_folder(spec: str) -> bool:
    return spec not in DATASETS and Path(spec).expanduser().is_dir()


_OPTION_FLAGS = {"image_size": "--image-size", "mean": "--mean", "std": "--std", "channels": "--channels"}


def _refuse(spec: str, options: dict[str, Any], allowed: Sequence[str] = ()) -> None:
    """Options given for a source that does not use them are an error: silently ignored they would mislead."""
    given = [_OPTION_FLAGS[k] for k, v in options.items() if v is not None and k not in allowed]
    if given:
        raise DataSourceError(f"--data {spec} does not take {' or '.join(given)} (those shape the images of an "
                              "image folder; a .npz is used at its own size)")


def limit_splits(splits: Splits, n: int | None) -> Splits:
    """The first ``n`` training samples, n // 5 validation and n test samples (quick runs)."""
    if n is None:
        return splits
    if n < 1:
        raise ValueError(f"--limit must be >= 1, got {n}")
    return replace(splits, train=_head(splits.train, n), val=_head(splits.val, max(1, n // 5)),
                   test=_head(splits.test, n))


def _head(ds: Dataset, k: int) -> Dataset:
    if isinstance(ds, TensorDataset):
        return TensorDataset(*(t[:k] for t in ds.tensors))
    return Rows(ds, range(min(k, len(ds))))


def _take(ds: Dataset, indices: list[int]) -> Dataset:
    if isinstance(ds, TensorDataset):
        return TensorDataset(*(t[indices] for t in ds.tensors))
    return Rows(ds, indices)


def _held_out(n: int, parts: Sequence[str], seed: int, where: str) -> dict[str, list[int]]:
    """Seeded split of ``n`` samples: 10% (at least one) for each of ``parts``, the rest for train; each split's
    indices ascending, so the same data and seed always give the same splits."""
    if n < len(parts) + 1:
        raise DataSourceError(f"{where} holds {n} sample(s): too few to split off {' and '.join(parts)} "
                              f"(need at least {len(parts) + 1})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = max(1, round(n * HELD_OUT_FRACTION))
    out = {p: sorted(perm[i * k:(i + 1) * k]) for i, p in enumerate(parts)}
    out["train"] = sorted(perm[len(parts) * k:])
    return out


# ---------------------------------------------------------------- checks the commands make

def require_labels(splits: Splits, what: str = "training") -> None:
    """Unlabelled data (a folder of images without class subfolders) cannot train or measure accuracy."""
    if not splits.labelled:
        raise DataSourceError(f"--data {splits.name} has no labels: {what} needs labelled data. Put the images "
                              f"in one subfolder per class (DIR/<class>/*.png) or give labels (y in a .npz); "
                              f"unlabelled data serves for calibration only")


def check_input_shape(splits: Splits, input_shape: Sequence[int]) -> None:
    """The data's images must have the channels and size of the model's input (``input_shape`` N,C,H,W as
    --input-shape gives it, or C,H,W): a mismatch is named before any calibration or training."""
    c, h, w = (int(v) for v in tuple(input_shape)[-3:])
    dc, dh, dw = splits.input_shape
    shape = ",".join(map(str, input_shape))
    if dc != c:
        raise DataSourceError(f"data {splits.name} has {dc} channel{'s' if dc != 1 else ''}, the model expects {c} "
                              f"(input shape {shape}); for an image folder give --channels {c}, or give the model "
                              f"an input shape with {dc} channel{'s' if dc != 1 else ''}")
    if (dh, dw) != (h, w):
        raise DataSourceError(f"data {splits.name} has {dh}x{dw} images, the model expects {h}x{w} (input shape "
                              f"{shape}); for an image folder give --image-size {h if h == w else f'{h},{w}'}, or "
                              f"give the model --input-shape 1,{dc},{dh},{dw}")


# ---------------------------------------------------------------- option text from the command line

def parse_image_size(text: str | None) -> tuple[int, int] | None:
    """``"224"`` -> (224, 224), ``"224,160"`` -> (224, 160) (H, W)."""
    if text is None:
        return None
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        dims = ()
    if len(dims) not in (1, 2) or min(dims) < 1:
        raise DataSourceError(f"--image-size {text!r}: expected N or H,W positive integers, e.g. 224 or 224,160")
    return (dims[0], dims[-1])


def parse_floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    """``"0.5"`` or ``"0.485,0.456,0.406"`` -> a tuple of floats (for --mean and --std)."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise DataSourceError(f"{flag} {text!r}: expected one number or one per channel, e.g. 0.5 or "
                              "0.485,0.456,0.406") from None


def _image_hw(image_size: int | Sequence[int] | None) -> tuple[int, int]:
    if image_size is None:
        return (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    dims = (int(image_size),) * 2 if isinstance(image_size, int) else tuple(int(v) for v in image_size)
    if len(dims) != 2 or min(dims) < 1:
        raise DataSourceError(f"--image-size {image_size!r}: expected N or (H, W) positive integers")
    return dims


def _per_channel(values: Sequence[float] | None, default: tuple[float, ...], c: int, flag: str) -> tuple[float, ...]:
    """One value per channel: the default, one value for all, or exactly ``c``."""
    values = default if values is None else tuple(float(v) for v in values)
    if len(values) == 1:
        values = values * c
    if len(values) != c:
        raise DataSourceError(f"{flag} has {len(values)} values but the data has {c} channels: give 1 or {c}")
    if flag == "--std" and min(values) <= 0:
        raise DataSourceError(f"--std must be positive, got {values}")
    return values


def _normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel of a C,H,W or N,C,H,W tensor."""
    shape = (-1, 1, 1)
    return (x - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


# ---------------------------------------------------------------- image folders

class ImageFiles(LazyDataset):
    """Image files decoded in ``__getitem__``: converted to ``mode`` (L or RGB), resized (shorter side to fit,
    then centre crop) to ``size`` (H, W), scaled to [0, 1] and normalised. It holds only paths and numbers,
    so DataLoader workers can pickle it."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int], size: tuple[int, int], mode: str,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        self.files, self.labels = [str(f) for f in files], list(labels)
        self.size, self.mode, self.mean, self.std = tuple(size), mode, tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = _normalise(decode_image(self.files[i], self.size, self.mode), self.mean, self.std)
        return x, torch.tensor(self.labels[i], dtype=torch.int64)


def decode_image(path: str | Path, size: tuple[int, int], mode: str) -> torch.Tensor:
    """One image file as a float32 C,H,W tensor in [0, 1] (C 1 for mode L, 3 for RGB)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(_fit(im.convert(mode), *size), dtype=np.float32) / 255.0
    except Exception as e:  # any failure to decode this file is this file's fault
        raise DataSourceError(f"{path}: cannot decode the image ({type(e).__name__}: {e})") from None
    t = torch.from_numpy(arr)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def _fit(im, h: int, w: int):
    """Resize so the image covers h x w (the shorter side fits), then crop its centre to h x w."""
    from PIL import Image

    w0, h0 = im.size
    scale = max(h / h0, w / w0)
    nw, nh = max(w, round(w0 * scale)), max(h, round(h0 * scale))
    if (nw, nh) != (w0, h0):
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - w) // 2, (nh - h) // 2
    return im.crop((left, top, left + w, top + h))


def load_image_folder(root: str | Path, *, image_size: int | Sequence[int] | None = None,
                      mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                      channels: int | None = None, seed: int = 0) -> Splits:
    """An image folder: DIR/<class>/*.png (labelled, classes sorted by name give the label indices) or
    DIR/*.png (unlabelled: labels -1, num_classes 0); DIR/train, DIR/val, DIR/test are used as the splits
    when present (a missing val or test is split off train), else the files are split 80/10/10 by ``seed``.
    Every file is opened and checked here, so a corrupt one is named before any work."""
    root = Path(root).expanduser()
    split_files, classes = _folder_splits(root, seed)
    mode = _image_mode([f for files, _ in split_files.values() for f in files], channels, root)
    c = 1 if mode == "L" else 3
    mean = _per_channel(mean, GRAY_MEAN if c == 1 else IMAGENET_MEAN, c, "--mean")
    std = _per_channel(std, GRAY_STD if c == 1 else IMAGENET_STD, c, "--std")
    size = _image_hw(image_size)
    ds = {s: ImageFiles(files, labels, size, mode, mean, std) for s, (files, labels) in split_files.items()}
    return Splits(str(root), ds["train"], ds["val"], ds["test"], len(classes), (c, *size), tuple(classes))


def _image_files(folder: Path, recursive: bool) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
                  and p.is_file())


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_tree(folder: Path) -> tuple[list[Path], list[str | None]]:
    """(files, class name of each file): from class subfolders, or None for a flat folder of images."""
    top = _image_files(folder, recursive=False)
    by_class = [(d, _image_files(d, recursive=True)) for d in _subfolders(folder)]
    filled = [(d, files) for d, files in by_class if files]
    if top and filled:
        raise DataSourceError(f"{folder} holds images ({top[0].name}, ...) and class subfolders "
                              f"({filled[0][0].name}/, ...): put every image in a class subfolder, or none")
    if top:
        return top, [None] * len(top)
    if not filled:
        raise DataSourceError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}), neither directly nor "
                              "in class subfolders")
    empty = [d for d, files in by_class if not files]
    if empty:
        raise DataSourceError(f"class folder {empty[0]} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [f for _, files in filled for f in files], [d.name for d, files in filled for _ in files]


def _folder_splits(root: Path, seed: int) -> tuple[dict[str, tuple[list[Path], list[int]]], list[str]]:
    """{split: (files, labels)} and the sorted class names (empty when unlabelled)."""
    subs = {p.name: p for p in _subfolders(root)}
    if "train" in subs and set(subs) <= set(SPLIT_NAMES) and not _image_files(root, recursive=False):
        trees = {s: _read_tree(subs[s]) for s in SPLIT_NAMES if s in subs}
    else:
        files, names = _read_tree(root)
        idx = _held_out(len(files), ("val", "test"), seed, str(root))
        trees = {s: ([files[i] for i in ix], [names[i] for i in ix]) for s, ix in idx.items()}
    labelled = {s: names[0] is not None for s, (_, names) in trees.items()}
    if len(set(labelled.values())) > 1:
        raise DataSourceError(f"{root}: {', '.join(s + '/' for s, v in labelled.items() if v)} has class subfolders "
                              f"but {', '.join(s + '/' for s, v in labelled.items() if not v)} has not: give "
                              "every split the same layout")
    missing = [s for s in ("val", "test") if s not in trees]
    if missing:
        files, names = trees["train"]
        idx = _held_out(len(files), missing, seed, str(root / "train"))
        trees.update({s: ([files[i] for i in ix], [names[i] for i in ix]) for s, ix in idx.items()})
    classes = sorted({n for _, names in trees.values() for n in names if n is not None})
    index = {name: i for i, name in enumerate(classes)}
    return {s: (trees[s][0], [index.get(n, -1) for n in trees[s][1]]) for s in SPLIT_NAMES}, classes


def _is_gray(path: Path) -> bool:
    """Whether one image file is single-channel; the file is verified, so a corrupt one is named here."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = im.mode
            im.verify()
    except Exception as e:  # any failure to read this file is this file's fault
        raise DataSourceError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    return mode in _GRAY_MODES


def _image_mode(files: Sequence[Path], channels: int | None, root: Path) -> str:
    """"L" or "RGB": as asked by ``channels``, else as the files are; a mix of both must be asked for."""
    if channels not in (None, 1, 3):
        raise DataSourceError(f"--channels {channels}: image folders convert to 1 (grayscale) or 3 (RGB)")
    gray = [_is_gray(f) for f in files]
    if channels is not None:
        return "L" if channels == 1 else "RGB"
    if all(gray):
        return "L"
    if any(gray):
        g = next(f for f, is_g in zip(files, gray, strict=True) if is_g)
        rgb = next(f for f, is_g in zip(files, gray, strict=True) if not is_g)
        raise DataSourceError(f"{root} mixes grayscale images ({sum(gray)}, e.g. {g}) and colour images "
                              f"({len(gray) - sum(gray)}, e.g. {rgb}): give --channels 1 or --channels 3 to "
                              "convert them all")
    return "RGB"


# ---------------------------------------------------------------- .npz arrays

def load_npz(path: str | Path, *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
             channels: int | None = None, seed: int = 0) -> Splits:
    """A .npz with ``x`` (N,C,H,W or N,H,W; float, used as is, or uint8, scaled to [0, 1]) and optional ``y``
    (N integer labels; without it the data is unlabelled), optional ``x_val``/``y_val`` and
    ``x_test``/``y_test``; splits not given are split off ``x`` by ``seed``. ``mean``/``std`` normalise
    per channel when given; ``channels`` only checks."""
    path = Path(path).expanduser()
    arrays = _read_npz(path)
    given = {s: _npz_split(arrays, s, path) for s in SPLIT_NAMES if _key(s, "x") in arrays}
    shapes = {s: tuple(x.shape[1:]) for s, (x, _) in given.items()}
    if len(set(shapes.values())) > 1:
        raise DataSourceError(f"{path}: the image arrays differ in shape per sample: {shapes}")
    c = shapes["train"][0]
    if channels is not None and channels != c:
        raise DataSourceError(f"{path}: x has {c} channel(s) per image, --channels asks for {channels}")
    if mean is not None or std is not None:
        m, s_ = _per_channel(mean, (0.0,), c, "--mean"), _per_channel(std, (1.0,), c, "--std")
        given = {s: (_normalise(x, m, s_), y) for s, (x, y) in given.items()}
    if len({y is None for _, y in given.values()}) > 1:
        raise DataSourceError(f"{path}: labels are given for some image arrays only; give y with x, y_val with "
                              "x_val and y_test with x_test, or no labels at all")
    splits = _carve_missing(given, seed, str(path))
    num_classes = 0 if given["train"][1] is None else int(max(int(y.max()) for _, y in given.values())) + 1
    return Splits(str(path), *(TensorDataset(*splits[s]) for s in SPLIT_NAMES), num_classes, shapes["train"])


def _key(split: str, what: str) -> str:
    return what if split == "train" else f"{what}_{split}"


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # not a zip, a pickled object array, a truncated file: all this file's fault
        raise DataSourceError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    if "x" not in arrays:
        raise DataSourceError(f"{path} has no array 'x' (it holds {sorted(arrays) or 'nothing'}): save the images "
                              "as x (N,C,H,W or N,H,W) and the labels as y, e.g. np.savez(path, x=x, y=y)")
    return arrays


def _npz_split(arrays: dict[str, np.ndarray], split: str, path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    xk, yk = _key(split, "x"), _key(split, "y")
    x = _npz_images(arrays[xk], xk, path)
    if yk not in arrays:
        return x, None
    y = arrays[yk]
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DataSourceError(f"{path}: {yk} must be {len(x)} integer labels (one per image of {xk}), got "
                              f"{y.dtype} of shape {y.shape}")
    if len(y) and y.min() < 0:
        raise DataSourceError(f"{path}: {yk} has negative labels ({int(y.min())}); labels are 0..num_classes-1")
    return x, torch.from_numpy(y.astype(np.int64))


def _npz_images(x: np.ndarray, key: str, path: Path) -> torch.Tensor:
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or len(x) == 0:
        raise DataSourceError(f"{path}: {key} must be images N,C,H,W or N,H,W, got shape {x.shape}")
    if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        raise DataSourceError(f"{path}: {key} of shape {x.shape} looks channels-last (N,H,W,C); save it as "
                              "N,C,H,W, e.g. x.transpose(0, 3, 1, 2)")
    if x.dtype == np.uint8:
        return torch.from_numpy(x.astype(np.float32) / 255.0)
    if not np.issubdtype(x.dtype, np.floating):
        raise DataSourceError(f"{path}: {key} has dtype {x.dtype}; expected float (used as is) or uint8 (scaled to [0, 1])")
    if not np.isfinite(x).all():
        raise DataSourceError(f"{path}: {key} holds NaN or infinite values")
    return torch.from_numpy(x.astype(np.float32))


def _carve_missing(given: dict[str, tuple[torch.Tensor, torch.Tensor | None]], seed: int,
                   where: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) per split; val/test not given are split off train, missing labels become -1."""
    with_y = {s: (x, y if y is not None else torch.full((len(x),), -1, dtype=torch.int64)) for s, (x, y) in given.items()}
    missing = [s for s in ("val", "test") if s not in with_y]
    if missing:
        x, y = with_y["train"]
        idx = _held_out(len(x), missing, seed, f"{where}: x")
        with_y.update({s: (x[ix], y[ix]) for s, ix in idx.items()})
    return with_y


# ---------------------------------------------------------------- path/to/file.py:factory

class Samples(LazyDataset):
    """A user's dataset with every sample made (image float32 C,H,W, label int64 scalar): a bare image gets
    label -1, an H,W image a channel axis."""

    def __init__(self, base: Dataset, where: str) -> None:
        self.base, self.where = base, where

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _as_sample(self.base[i], f"{self.where}[{i}]")


def _as_sample(sample: Any, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = (sample[0], sample[1] if len(sample) > 1 else -1) if isinstance(sample, (tuple, list)) and sample \
        else (sample, -1)
    if not isinstance(x, (torch.Tensor, np.ndarray)):
        hint = "; give the dataset a transform that makes tensors" if type(x).__module__.startswith("PIL") else ""
        raise DataSourceError(f"{where}: the image is a {type(x).__name__}, expected a tensor or array{hint}")
    try:
        x = torch.as_tensor(x).float()
        y = torch.as_tensor(y).to(torch.int64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise DataSourceError(f"{where}: expected an integer label, got {type(y).__name__} ({e})") from None
    if x.ndim == 2:
        x = x.unsqueeze(0)
    if x.ndim != 3 or y.ndim != 0:
        raise DataSourceError(f"{where}: expected an image C,H,W (or H,W) and one integer label, got image shape "
                              f"{tuple(x.shape)} and label shape {tuple(y.shape)}")
    return x, y


def load_factory(spec: str, *, seed: int = 0) -> Splits:
    """``path/to/file.py:factory``: ``factory()`` returns a torch Dataset (split 80/10/10 by ``seed``), a
    (train, val, test) tuple or a dict with those keys (and optionally ``num_classes``). Samples are (image,
    label) or bare images (unlabelled); input_shape comes from the first sample, num_classes from the labels
    (``targets``/``tensors`` when the dataset has them, else by reading every label)."""
    out = _call_factory(spec)
    declared = None
    if isinstance(out, dict):
        out = dict(out)
        declared = out.pop("num_classes", None)
    parts, labelled_by = _factory_parts(out, spec, seed)
    shapes = {s: tuple(ds[0][0].shape) for s, ds in parts.items()}
    if len(set(shapes.values())) > 1:
        raise DataSourceError(f"--data {spec!r}: the splits' images differ in shape: {shapes}")
    num_classes = _num_classes(labelled_by, declared, spec)
    return Splits(spec, parts["train"], parts["val"], parts["test"], num_classes, shapes["train"])


def splits_from_datasets(name: str, train: Dataset, val: Dataset, test: Dataset,
                         num_classes: int | None = None) -> Splits:
    """A :class:`Splits` over datasets taken as they are (no re-split): for a caller that holds its splits
    already (``hwmpq.api`` wraps DataLoaders with it). One dataset may serve as several splits. Samples are
    checked like a factory's (their first one made now, so a malformed one is named before any work);
    ``num_classes`` defaults to 1 + the largest label."""
    wrapped: dict[int, Dataset] = {}  # one wrapper per distinct dataset: its labels are counted once
    parts = {}
    for split, ds in zip(SPLIT_NAMES, (train, val, test), strict=True):
        if id(ds) not in wrapped:
            wrapped[id(ds)] = _as_samples(ds, name, split)
        parts[split] = wrapped[id(ds)]
    shapes = {s: tuple(ds[0][0].shape) for s, ds in parts.items()}
    if len(set(shapes.values())) > 1:
        raise DataSourceError(f"--data {name!r}: the splits' images differ in shape: {shapes}")
    classes = _num_classes(list(wrapped.values()), num_classes, name)
    return Splits(name, parts["train"], parts["val"], parts["test"], classes, shapes["train"])


def _call_factory(spec: str) -> Any:
    path, _, name = spec.rpartition(":") if ".py:" in spec else (spec, "", "")
    if not name:
        raise DataSourceError(f"--data {spec!r}: give the factory too, as path/to/file.py:factory")
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataSourceError(f"--data {spec!r}: file {file} does not exist")
    mspec = importlib.util.spec_from_file_location(f"hwmpq_user_data_{abs(hash(str(file.resolve())))}", file)
    module = importlib.util.module_from_spec(mspec)
    try:
        mspec.loader.exec_module(module)
    except Exception as e:  # the user's module: any failure is reported, not raised through
        raise DataSourceError(f"--data {spec!r}: importing {file} failed: {type(e).__name__}: {e}") from e
    fn: Callable[[], Any] | None = getattr(module, name, None)
    if not callable(fn):
        raise DataSourceError(f"--data {spec!r}: {file} has no callable {name!r}")
    try:
        return fn()
    except Exception as e:  # the user's factory
        raise DataSourceError(f"--data {spec!r}: factory {name}() raised {type(e).__name__}: {e}") from e


def _is_dataset(obj: Any) -> bool:
    return hasattr(obj, "__getitem__") and hasattr(obj, "__len__") and not isinstance(obj, (dict, tuple, list, str))


def _factory_parts(out: Any, spec: str, seed: int) -> tuple[dict[str, Dataset], list[Dataset]]:
    """({split: dataset of (image, label) samples}, the datasets holding all labels) from what the factory
    returned."""
    if _is_dataset(out):
        whole = _as_samples(out, spec, "dataset")
        idx = _held_out(len(whole), ("val", "test"), seed, f"--data {spec!r}")
        return {s: _take(whole, ix) for s, ix in idx.items()}, [whole]
    got = _describe(out)
    if isinstance(out, (tuple, list)) and len(out) == 3:
        out = dict(zip(SPLIT_NAMES, out, strict=True))
    if not (isinstance(out, dict) and set(out) == set(SPLIT_NAMES) and all(map(_is_dataset, out.values()))):
        raise DataSourceError(f"--data {spec!r}: the factory returned {got}; expected a torch Dataset (map-style, "
                              "with __len__), a (train, val, test) tuple of them or a dict with keys 'train', "
                              "'val', 'test' (and optionally 'num_classes')")
    parts = {s: _as_samples(out[s], spec, s) for s in SPLIT_NAMES}
    return parts, list(parts.values())


def _describe(out: Any) -> str:
    if isinstance(out, dict):
        return f"a dict with keys {sorted(map(str, out))}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)}: ({', '.join(type(v).__name__ for v in out)})"
    return type(out).__name__


def _as_samples(ds: Dataset, spec: str, split: str) -> Dataset:
    """``ds`` itself when it already is a TensorDataset of N,C,H,W float32 images and int64 labels, else wrapped
    in :class:`Samples`; its first sample is made here, so a malformed one is named before any work."""
    if len(ds) == 0:
        raise DataSourceError(f"--data {spec!r}: the {split} split is empty")
    t = getattr(ds, "tensors", None)
    if (isinstance(ds, TensorDataset) and len(t) == 2 and t[0].ndim == 4 and t[0].dtype == torch.float32
            and t[1].dtype == torch.int64 and t[1].ndim == 1):
        return ds
    wrapped = Samples(ds, f"--data {spec!r} {split}")
    wrapped[0]  # made now: a malformed sample is named before any work
    return wrapped


def _labels(ds: Dataset) -> torch.Tensor:
    """Every label of a dataset: from ``tensors``/``targets`` when it has them, else sample by sample."""
    base = ds.base if isinstance(ds, Samples) else ds
    if isinstance(base, TensorDataset):
        return base.tensors[1].long() if len(base.tensors) > 1 else torch.full((len(base),), -1)
    if getattr(base, "targets", None) is not None:
        return torch.as_tensor(base.targets).long()
    return torch.stack([ds[i][1] for i in range(len(ds))])


def _num_classes(datasets: Sequence[Dataset], declared: Any, spec: str) -> int:
    """The declared count, else 1 + the largest label (0 when there are no labels)."""
    if declared is not None:
        if not isinstance(declared, int) or declared < 0:
            raise DataSourceError(f"--data {spec!r}: num_classes must be a non-negative int, got {declared!r}")
        return declared
    labels = torch.cat([_labels(ds).reshape(-1) for ds in datasets])
    if int(labels.max()) < 0:
        return 0
    if int(labels.min()) < 0:
        raise DataSourceError(f"--data {spec!r}: some samples have labels and some have none (-1): label all of "
                              "them, or none")
    return int(labels.max()) + 1
