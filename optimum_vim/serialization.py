"""Checks on saved checkpoints before any weight is loaded: safetensors headers, sizes, format stamps."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

METADATA_FORMAT_KEY = "optimum_vim_format_version"
METADATA_RECIPE_KEY = "optimum_vim_recipe"
_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


class CheckpointFormatError(ValueError):
    """A quantized checkpoint is truncated, corrupt, or does not match its quantization config."""


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """Parses a safetensors header without loading tensors: ``({name: {dtype, shape, data_offsets}}, metadata)``.

    Raises :class:`CheckpointFormatError` when the file is shorter than its header says (truncated download/copy).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointFormatError(f"{path} is truncated: {size} bytes, not even a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointFormatError(f"{path} is truncated: header claims {n} bytes, the file has {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointFormatError(f"{path} has a corrupt safetensors header: {err}") from err
    metadata = header.pop("__metadata__", None) or {}
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointFormatError(
            f"{path} is truncated: tensors need {8 + n + end} bytes, the file has {size}. Download or copy it again."
        )
    return header, metadata


def check_quantized_checkpoint(files, expected: dict[str, tuple[tuple[int, ...], str]], format_version: int) -> None:
    """Verifies that ``files`` (safetensors shards) carry every quantized tensor with the expected shape and dtype,
    and the format stamp written at save time."""
    found: dict[str, dict] = {}
    for file in files or []:
        if not str(file).endswith(".safetensors"):
            raise CheckpointFormatError(f"quantized Vim checkpoints are safetensors files; got {file}")
        header, metadata = read_safetensors_header(file)
        stamp = metadata.get(METADATA_FORMAT_KEY)
        if stamp is not None and stamp != str(format_version):
            raise CheckpointFormatError(
                f"{file} was written in optimum-vim storage format v{stamp} but its config says v{format_version}"
            )
        found.update(header)
    missing = sorted(k for k in expected if k not in found)
    if missing:
        raise CheckpointFormatError(
            f"the checkpoint lacks {len(missing)} quantized tensor(s) its config announces, e.g. {missing[:4]}"
        )
    bad = []
    for name, (shape, dtype) in expected.items():
        entry = found[name]
        got_dtype = _DTYPE_NAMES.get(entry["dtype"], entry["dtype"])
        if tuple(entry["shape"]) != tuple(shape) or got_dtype != dtype:
            bad.append(f"{name}: file {tuple(entry['shape'])} {got_dtype}, config {tuple(shape)} {dtype}")
    if bad:
        raise CheckpointFormatError(f"{len(bad)} quantized tensor(s) do not match the config: {bad[:4]}")
