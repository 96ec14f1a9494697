"""Top-1 evaluation of an image classifier on a labelled image data set, single process or data-parallel.

Under ``accelerate launch`` each process takes every ``world_size``-th example and the correct/total counts are summed
across processes, so the merged accuracy is exactly the single-process one (no padding duplicates).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .calibration.data import find_image_column

logger = logging.getLogger(__name__)

NAMED_DATASETS = ("fashion-mnist", "mnist-subset", "digits")


@dataclass
class EvalResult:
    """Outcome of :func:`evaluate`: ``top1 = correct / total``."""

    top1: float
    correct: int
    total: int
    seconds: float
    num_processes: int = 1
    device: str = "cpu"  # where this process ran its forward passes

    def to_dict(self) -> dict:
        return asdict(self)


def load_named_dataset(name: str, split: str = "test", limit: int | None = None):
    """A data set by name (``fashion-mnist``, ``mnist-subset``, ``digits``), a ``save_to_disk`` folder, or an image
    folder (``<root>/<class>/<image>``), as a ``datasets.Dataset`` with ``image`` and ``label`` columns."""
    from .data import load_digits_dataset, load_fashion_mnist, load_mnist_subset

    if name == "fashion-mnist":
        ds = load_fashion_mnist(split)
    elif name == "mnist-subset":
        ds = load_mnist_subset(split)
    elif name == "digits":
        ds = load_digits_dataset(split)
    else:
        path = Path(name)
        if not path.exists():
            raise ValueError(
                f"unknown data set {name!r}: use one of {NAMED_DATASETS}, a datasets.save_to_disk folder or an image folder"
            )
        import datasets

        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset("imagefolder", data_dir=str(path), split="train")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds


def image_and_label_columns(ds) -> tuple[str, str]:
    cols = set(ds.column_names)
    image_col = find_image_column(cols)
    label_col = next((c for c in ("label", "labels", "fine_label") if c in cols), None)
    if image_col is None or label_col is None:
        raise ValueError(f"data set needs an image column and a label column; found {sorted(cols)}")
    return image_col, label_col


def iter_batches(dataset, processor, batch_size: int, indices: Iterable[int] | None = None):
    """Yields ``(pixel_values, labels)`` batches from a ``datasets.Dataset`` (images through ``processor``), a
    DataLoader / iterable of dicts or ``(pixel_values, labels)`` tuples."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if datasets is not None and isinstance(dataset, datasets.Dataset):
        image_col, label_col = image_and_label_columns(dataset)
        idx = list(range(len(dataset))) if indices is None else list(indices)
        for start in range(0, len(idx), batch_size):
            rows = dataset.select(idx[start : start + batch_size])
            images, labels = list(rows[image_col]), torch.as_tensor(list(rows[label_col]))
            if image_col == "pixel_values":
                yield torch.as_tensor(images), labels
            else:
                if processor is None:
                    raise ValueError("an image processor is needed to turn the data set's images into pixel_values")
                yield processor(images, return_tensors="pt").pixel_values, labels
        return
    for batch in dataset:
        if isinstance(batch, dict):
            yield batch["pixel_values"], torch.as_tensor(batch.get("labels", batch.get("label")))
        else:
            yield batch[0], torch.as_tensor(batch[1])


@torch.no_grad()
def evaluate(
    model,
    dataset,
    processor=None,
    batch_size: int = 256,
    progress: bool = True,
    accelerator=None,
) -> EvalResult:
    """Top-1 accuracy of ``model`` on ``dataset``.

    Args:
        model: an image classifier returning ``.logits``.
        dataset: a ``datasets.Dataset`` with image and label columns (processed with ``processor``), or an iterable of
            ``{"pixel_values", "labels"}`` dicts / ``(pixel_values, labels)`` tuples (already processed).
        processor: image processor; defaults to none (required for raw images).
        batch_size: examples per forward pass.
        progress: show a progress bar (main process only).
        accelerator: an ``accelerate.Accelerator`` for data-parallel evaluation; created automatically when running
            under ``accelerate launch`` with several processes.
    """
    if accelerator is None:
        accelerator = _maybe_accelerator()
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    if accelerator is not None:
        model = model.to(device)
    model.eval()
    indices = None
    total_examples = None
    try:
        total_examples = len(dataset)
        if world > 1:
            indices = range(rank, total_examples, world)
    except TypeError:
        if world > 1:
            raise ValueError("data-parallel evaluation needs a data set with a length (a datasets.Dataset)") from None
    start = time.perf_counter()
    correct = torch.zeros((), dtype=torch.long, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    local = len(indices) if indices is not None else total_examples
    bar = tqdm(total=local, desc="evaluate", unit="img", disable=not progress or rank != 0)
    for pixel_values, labels in iter_batches(dataset, processor, batch_size, indices):
        logits = model(pixel_values.to(device)).logits
        labels = labels.to(device)
        correct += (logits.argmax(-1) == labels).sum()
        count += labels.numel()
        bar.update(labels.numel())
    bar.close()
    if accelerator is not None and world > 1:
        correct = accelerator.reduce(correct, reduction="sum")
        count = accelerator.reduce(count, reduction="sum")
    total = int(count)
    if total == 0:
        raise ValueError("the evaluation data set is empty")
    return EvalResult(int(correct) / total, int(correct), total, time.perf_counter() - start, world, str(device))


def _maybe_accelerator():
    """An Accelerator when launched with several processes (``accelerate launch``), else None."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())
