"""Real image-classification data that installs offline, as ``datasets.Dataset`` objects or raw arrays."""

from .loaders import (
    FASHION_MNIST_LABELS,
    DataNotFoundError,
    load_digits_dataset,
    load_fashion_mnist,
    load_fashion_mnist_arrays,
    load_mnist_subset,
)

__all__ = [
    "DataNotFoundError",
    "FASHION_MNIST_LABELS",
    "load_digits_dataset",
    "load_fashion_mnist",
    "load_fashion_mnist_arrays",
    "load_mnist_subset",
]
