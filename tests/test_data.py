"""Datasets: deterministic, disjoint splits; Fashion-MNIST from the Debian package; clear errors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from hwmpq.data import DatasetMissingError, fashion_mnist_dir, load_dataset, load_digits, load_fashion_mnist

HAVE_FMNIST = (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="dataset-fashion-mnist is not installed")


def _rows(ds) -> set[float]:
    """One random projection per image: equal images (only) collide."""
    r = torch.randn(28 * 28, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return set((ds.tensors[0].flatten(1).double() @ r).tolist())


def test_digits_splits(digits):
    assert (len(digits.train), len(digits.val), len(digits.test)) == (1078, 359, 360)
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    x, y = digits.train.tensors
    assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert set(y.tolist()) == set(range(10))


def test_digits_split_is_deterministic_and_seeded(digits):
    again = load_digits(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(digits.train.tensors, again.train.tensors, strict=True))
    other = load_digits(seed=1)
    assert not torch.equal(digits.train.tensors[1], other.train.tensors[1])
    # same data, only split differently
    assert sorted(digits.train.tensors[1].tolist() + digits.val.tensors[1].tolist()
                  + digits.test.tensors[1].tolist()) == sorted(
        other.train.tensors[1].tolist() + other.val.tensors[1].tolist() + other.test.tensors[1].tolist())


def test_loader_shuffle_is_seeded(digits):
    first = [next(iter(digits.loader("train", 16, shuffle=True, seed=s)))[1].tolist() for s in (0, 0, 1)]
    assert first[0] == first[1] != first[2]
    assert next(iter(digits.loader("test", 16)))[1].tolist() == digits.test.tensors[1][:16].tolist()


@needs_fmnist
@pytest.mark.slow
def test_fashion_mnist_full():
    s = load_fashion_mnist()
    assert (len(s.train), len(s.val), len(s.test)) == (55_000, 5_000, 10_000)
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10
    assert s.train.tensors[0].shape[1:] == (1, 28, 28)
    assert abs(float(s.train.tensors[0].mean())) < 0.05  # normalised with the training-set statistics
    assert not (_rows(s.train) & _rows(s.val))  # validation is held out of training
    assert torch.bincount(s.test.tensors[1]).tolist() == [1000] * 10  # the official test split
    again = load_fashion_mnist()
    assert torch.equal(s.val.tensors[1], again.val.tensors[1])


@needs_fmnist
def test_fashion_mnist_limit_and_dispatch():
    s = load_dataset("fashion-mnist", limit=100)
    assert (len(s.train), len(s.val), len(s.test)) == (100, 20, 100)


def test_missing_dataset_names_package_and_variable(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("HWMPQ_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetMissingError, match=r"dataset-fashion-mnist.*HWMPQ_DATA") as e:
        load_dataset("fashion-mnist")
    assert "nowhere" in str(e.value)


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_hwmpq_data_overrides_location(monkeypatch, tmp_path: Path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 10)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    monkeypatch.setenv("HWMPQ_DATA", str(tmp_path))
    s = load_fashion_mnist(val_size=5)
    assert (len(s.train), len(s.val), len(s.test)) == (25, 5, 10)


def test_truncated_idx_file_is_refused(monkeypatch, tmp_path: Path):
    test_hwmpq_data_overrides_location(monkeypatch, tmp_path)
    raw = gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz").read()
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(raw[:-3])
    monkeypatch.setenv("HWMPQ_DATA", str(tmp_path))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz: truncated idx file"):
        load_fashion_mnist()


def test_unknown_dataset():
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar10'; known: \('fashion-mnist', 'digits'\)"):
        load_dataset("cifar10")
