"""Datasets that work offline: Fashion-MNIST (Debian package dataset-fashion-mnist) and sklearn digits.

Splits are deterministic: the validation split is a seeded slice of the training set (used by the
searches for architecture steps and by NEMO's accuracy proxy), the test split is the official one."""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("fashion-mnist", "digits")


class DatasetMissingError(FileNotFoundError):
    """The data files are not on this machine; the message says how to get them."""


@dataclass(frozen=True)
class Splits:
    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, int, int]  # C, H, W

    def loader(self, split: str, batch_size: int = 128, shuffle: bool = False, seed: int = 0) -> DataLoader:
        ds = getattr(self, split)
        g = torch.Generator().manual_seed(seed)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, drop_last=False)


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


def load_dataset(name: str, **kwargs) -> Splits:
    if name == "fashion-mnist":
        return load_fashion_mnist(**kwargs)
    if name == "digits":
        return load_digits(**{k: v for k, v in kwargs.items() if k == "seed"})
    raise ValueError(f"unknown dataset {name!r}; known: {DATASETS}")
