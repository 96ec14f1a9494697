"""Calibration data: turn whatever the user passes into a fixed, seeded list of pixel_values batches.

Accepted sources: a ``datasets.Dataset`` or ``IterableDataset`` (image column + image processor), a path to an image
folder, a list of PIL images, a tensor batch (N, C, H, W) of already processed pixel values, or a DataLoader /
iterable yielding ``{"pixel_values": ...}`` dicts or ``(pixel_values, ...)`` tuples.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class CalibrationDataError(ValueError):
    """The calibration data is empty, non-finite, of the wrong shape or of an unsupported type."""


def describe_source(source) -> str:
    """A short provenance string for config.json (the data itself is never serialized)."""
    if source is None:
        return "none"
    if isinstance(source, (str, os.PathLike)):
        return f"image folder {Path(source).name}"
    if isinstance(source, torch.Tensor):
        return f"tensor batch {tuple(source.shape)}"
    name = type(source).__name__
    info = getattr(source, "info", None)
    builder = getattr(info, "builder_name", None) or getattr(info, "dataset_name", None)
    size = len(source) if hasattr(source, "__len__") else "?"
    return f"{name}({builder or 'local'}, {size} examples)"


def _sample_indices(n: int, k: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[: min(k, n)].sort().values.tolist()


def _process(images, processor) -> torch.Tensor:
    if processor is None:
        raise CalibrationDataError(
            "calibration images need an image processor: pass one to ViMQuantizationConfig(image_processor=...) or "
            "load the model from a folder that has a preprocessor_config.json, or pass processed pixel_values"
        )
    return processor(images, return_tensors="pt").pixel_values


IMAGE_COLUMNS = ("image", "img", "pixel_values")


def find_image_column(columns) -> str | None:
    """The image column of a data set (the first of :data:`IMAGE_COLUMNS` present), or None; calibration and
    evaluation read the same columns."""
    return next((name for name in IMAGE_COLUMNS if name in columns), None)


def image_column(columns) -> str:
    name = find_image_column(columns)
    if name is None:
        raise CalibrationDataError(
            f"the calibration data set has no image column ({' / '.join(IMAGE_COLUMNS)}): {list(columns)}"
        )
    return name


def collect_pixel_values(source, processor, num_samples: int, seed: int) -> torch.Tensor:
    """Draws ``num_samples`` examples (seeded) from ``source`` and returns them as one (N, C, H, W) float tensor."""
    if num_samples < 1:
        raise CalibrationDataError(f"num_calibration_samples must be >= 1; got {num_samples}")
    if source is None:
        raise CalibrationDataError("this recipe needs calibration data: set ViMQuantizationConfig(calibration_dataset=...)")
    try:
        import datasets
    except ImportError:  # pragma: no cover - a dependency
        datasets = None
    from PIL import Image

    if isinstance(source, torch.Tensor):
        if source.dim() != 4:
            raise CalibrationDataError(f"a tensor calibration batch must be (N, C, H, W); got {tuple(source.shape)}")
        idx = _sample_indices(source.shape[0], num_samples, seed)
        return source[idx].float()
    if datasets is not None and isinstance(source, datasets.Dataset):
        if len(source) == 0:
            raise CalibrationDataError("the calibration data set is empty")
        col = image_column(source.column_names)
        rows = source.select(_sample_indices(len(source), num_samples, seed))
        values = list(rows[col])
        return torch.as_tensor(values).float() if col == "pixel_values" else _process(values, processor)
    if datasets is not None and isinstance(source, datasets.IterableDataset):
        values = []
        col = None
        for row in source.shuffle(seed=seed, buffer_size=max(4 * num_samples, 256)):
            col = col or image_column(list(row))
            values.append(row[col])
            if len(values) >= num_samples:
                break
        if not values:
            raise CalibrationDataError("the calibration data set is empty")
        return torch.as_tensor(values).float() if col == "pixel_values" else _process(values, processor)
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if not root.is_dir():
            raise CalibrationDataError(f"calibration image folder {root} does not exist")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
        if not files:
            raise CalibrationDataError(f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) under {root}")
        chosen = [files[i] for i in _sample_indices(len(files), num_samples, seed)]
        images = []
        for path in chosen:
            with Image.open(path) as im:
                images.append(im.copy())
        return _process(images, processor)
    if isinstance(source, (list, tuple)) and source and all(isinstance(x, Image.Image) for x in source):
        images = [source[i] for i in _sample_indices(len(source), num_samples, seed)]
        return _process(images, processor)
    if isinstance(source, (list, tuple)) and not source:
        raise CalibrationDataError("the calibration image list is empty")
    if hasattr(source, "__iter__"):
        chunks, count = [], 0
        for batch in source:
            px = batch["pixel_values"] if isinstance(batch, dict) else batch[0] if isinstance(batch, (list, tuple)) else batch
            px = torch.as_tensor(px)
            chunks.append(px)
            count += px.shape[0]
            if count >= num_samples:
                break
        if not chunks:
            raise CalibrationDataError("the calibration DataLoader yielded nothing")
        return torch.cat(chunks)[:num_samples].float()
    raise CalibrationDataError(
        f"unsupported calibration data type {type(source).__name__}: pass a datasets.Dataset/IterableDataset, an image "
        "folder path, a list of PIL images, a (N, C, H, W) tensor or a DataLoader"
    )


def prepare_calibration_batches(
    source, processor, num_samples: int, batch_size: int, seed: int, expected_shape: tuple[int, int, int]
) -> list[torch.Tensor]:
    """Seeded calibration set as a list of (B, C, H, W) batches, validated against the model's input shape."""
    if batch_size < 1:
        raise CalibrationDataError(f"calibration_batch_size must be >= 1; got {batch_size}")
    pixels = collect_pixel_values(source, processor, num_samples, seed)
    if pixels.shape[0] == 0:
        raise CalibrationDataError("the calibration data is empty")
    if tuple(pixels.shape[1:]) != tuple(expected_shape):
        raise CalibrationDataError(
            f"calibration images have shape {tuple(pixels.shape[1:])} but the model expects {tuple(expected_shape)} "
            "(channels, height, width); use the model's image processor"
        )
    if not torch.isfinite(pixels).all():
        bad = int((~torch.isfinite(pixels)).flatten(1).any(1).sum())
        raise CalibrationDataError(f"{bad} calibration image(s) contain NaN or infinite values")
    if pixels.shape[0] < num_samples:
        logger.warning("only %d calibration samples available (%d requested)", pixels.shape[0], num_samples)
    return list(pixels.split(batch_size))
