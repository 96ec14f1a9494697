"""Offline data loaders: real files, counts, labels, and actionable errors."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from optimum_vim.data import (
    FASHION_MNIST_LABELS,
    DataNotFoundError,
    load_digits_dataset,
    load_fashion_mnist,
    load_fashion_mnist_arrays,
    load_mnist_subset,
)
from optimum_vim.data.loaders import read_idx


def test_fashion_mnist_test_split_is_complete_and_balanced():
    x, y = load_fashion_mnist_arrays("test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [1000] * 10
    assert 0.28 < x.mean() / 255 < 0.29  # known pixel mean of Fashion-MNIST


def test_fashion_mnist_dataset_columns():
    ds = load_fashion_mnist("train", limit=16)
    assert len(ds) == 16 and ds.features["label"].names == list(FASHION_MNIST_LABELS)
    img = ds[0]["image"]
    assert img.size == (28, 28) and img.mode == "L"
    x, y = load_fashion_mnist_arrays("train")
    assert np.array_equal(np.asarray(img), x[0]) and ds[0]["label"] == y[0]


def test_missing_data_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIMUM_VIM_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DataNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist_arrays("test")
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist_arrays("validation")


def test_truncated_idx_file_is_refused(tmp_path):
    header = bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") + (28).to_bytes(4, "big")
    path = tmp_path / "bad-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(header + bytes(28 * 28 * 3))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)
    with gzip.open(path, "wb") as f:
        f.write(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="magic"):
        read_idx(path)


def test_mnist_subset_and_digits_splits_are_disjoint_and_seeded():
    test = load_mnist_subset("test")
    train = load_mnist_subset("train")
    assert len(test) == 1000 and len(train) == 4000
    again = load_mnist_subset("test")
    assert np.array_equal(np.asarray(test[5]["image"]), np.asarray(again[5]["image"]))
    d_test, d_train = load_digits_dataset("test"), load_digits_dataset("train")
    assert len(d_test) == 360 and len(d_train) == 1437
    assert d_test[0]["image"].size == (8, 8)
    assert max(np.asarray(d_test[i]["image"]).max() for i in range(20)) == 255
