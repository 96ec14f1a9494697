"""Checks on saved checkpoints before any weight is loaded: safetensors headers, sizes, format stamps."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

from .modules.spec import quantized_buffer_names

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


def is_quantized_tensor_name(name: str) -> bool:
    """Whether a state-dict key names a buffer of an optimum-vim quantized module: one that only the quantized
    module kinds declare (their typed specs, :mod:`optimum_vim.modules.spec`), or one of their nested quantizers'."""
    return name.rsplit(".", 1)[-1] in quantized_buffer_names() or "_quantizer." in name


def refuse_quantized_checkpoint_as_float(files, quant_method: str | None, declared_method: str | None = None) -> None:
    """Raises :class:`CheckpointFormatError` when safetensors ``files`` hold a quantized optimum-vim checkpoint (format
    stamp in the header, or quantized buffers by name) but the model is being loaded without the ``vim`` quantizer,
    e.g. because ``quantization_config`` was removed from config.json or its ``quant_method`` changed: transformers
    would then load freshly initialised float weights and report the packed tensors as unexpected (garbage logits).
    ``quant_method`` is the method of the quantizer that is loading (None: none), ``declared_method`` the one that
    config.json names (for the message)."""
    if quant_method == "vim":
        return
    for file in files or []:
        if not str(file).endswith(".safetensors") or not os.path.isfile(file):
            continue
        header, metadata = read_safetensors_header(file)
        stamp = metadata.get(METADATA_FORMAT_KEY)
        quantized = [k for k in header if is_quantized_tensor_name(k)]
        if stamp is None and not quantized:
            continue
        what = (f"optimum-vim storage format v{stamp}, recipe {metadata.get(METADATA_RECIPE_KEY, '?')}" if stamp
                else f"no format stamp, but {len(quantized)} quantized buffers such as {quantized[0]!r}")
        declared = declared_method or quant_method
        found = "has no quantization_config" if declared is None else f"says quant_method={declared!r}"
        raise CheckpointFormatError(
            f"{Path(file).parent} is a quantized optimum-vim checkpoint ({what}), but its config.json {found}, so it "
            "would load as a float Vim with random weights. A quantized folder loads only with the "
            "quantization_config (quant_method 'vim' and its per-layer 'layers') that optimum-vim's save_pretrained "
            "wrote into config.json: restore config.json from the original folder or Hub repo and call "
            "from_pretrained(folder) after `import optimum_vim`, or quantize the float model again."
        )


def check_quantized_checkpoint(
    files, expected: dict[str, tuple[tuple[int, ...], str]], format_version: int, recipe: str | None = None,
    prefix: str = "vim",
) -> None:
    """Verifies that ``files`` (safetensors shards) carry every quantized tensor with the expected shape and dtype,
    and the format and recipe stamps written at save time. ``expected`` names are those of the model being loaded;
    a checkpoint saved from the other Vim class (with or without the ``prefix.`` of the backbone) matches too."""
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
        stamped_recipe = metadata.get(METADATA_RECIPE_KEY)
        if recipe is not None and stamped_recipe is not None and stamped_recipe != str(recipe):
            raise CheckpointFormatError(
                f"{file} was quantized with recipe {stamped_recipe!r} but its config.json says recipe={recipe!r}; "
                "config.json was edited or belongs to another checkpoint: restore the original config.json"
            )
        found.update(header)
    plain = {k.removeprefix(prefix + "."): v for k, v in found.items()}
    found = {name: found.get(name) or plain.get(name.removeprefix(prefix + ".")) for name in expected}
    missing = sorted(k for k, v in found.items() if v is None)
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


def canonicalize_safetensors_headers(folder: str | os.PathLike) -> None:
    """Rewrites the header of every ``*.safetensors`` file in ``folder`` with its ``__metadata__`` keys sorted.

    safetensors serialises the metadata from a hash map, so the same tensors saved twice can differ in their bytes
    (key order); content-addressed storage and the Hub's deduplication then see a new file every time. The header is
    rewritten in place with the same length (same keys and values, compact JSON, space padding) and the tensor data
    is not touched."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "r+b") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            raw = f.read(n)
            header = json.loads(raw)
            meta = header.pop("__metadata__", None)
            ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}) | header
            text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
            if len(text) > n:  # never larger (same content), but never corrupt a file either
                continue
            f.seek(8)
            f.write(text + b" " * (n - len(text)))


def atomic_save(save_fn, save_directory: str | os.PathLike) -> Path:
    """Runs ``save_fn(tmp_dir)`` into a sibling temporary folder and moves the files into ``save_directory`` only
    when it succeeded, so a failed save leaves no half-written checkpoint behind."""
    target = Path(save_directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        save_fn(tmp)
        target.mkdir(parents=True, exist_ok=True)
        for item in sorted(tmp.iterdir()):
            dest = target / item.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            os.replace(item, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
