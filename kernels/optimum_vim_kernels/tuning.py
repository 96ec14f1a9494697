"""Measured launch configurations of the Triton kernels, per GPU model, keyed on bucketed problem size.

``benchmarks/gpu_kernels.py --tune`` times candidate configurations of ``gemm.quant_gemm`` and
``scan.selective_scan_q`` on Vim's real shapes and writes the winners to a JSON file; committed under
``optimum_vim_kernels/tuned/<device>.json`` (``<device>``: :func:`device_slug` of ``torch.cuda.get_device_name``) they
are read by the launchers on that GPU model. ``$OPTIMUM_VIM_TUNED_CONFIGS`` names another file to read instead (a
fresh ``--tune`` output, say). Without an entry the launchers keep their built-in heuristics; the interpreter never
reads a table.

File layout (every key a string)::

    {"device": "NVIDIA H100 80GB HBM3", "torch": "...", "triton": "...", "command": "...",
     "quant_gemm":       {VARIANT: {"NxK": {M_BUCKET: [BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages]}}},
     "selective_scan_q": {VARIANT: {"ExN": {BATCH_BUCKET: [BLOCK_E, num_warps]}}}}

``VARIANT`` names what changes the compiled kernel (:func:`gemm_variant`, :func:`scan_variant`); buckets are powers of
two (:func:`bucket`): the Vim token counts (197 per image at stride 16, 785 at stride 8) times the batch fall between
them, and the lookup takes the nearest tuned bucket of the same variant and shape. Tuned configurations never change
integer-activation results (integer accumulation is exact in any order); float-activation GEMMs change their fp32
summation order with ``BLOCK_K``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from pathlib import Path

ENV_VAR = "OPTIMUM_VIM_TUNED_CONFIGS"
TUNED_DIR = Path(__file__).resolve().parent / "tuned"
MAX_BUCKET = 1 << 20


def bucket(size: int) -> int:
    """The power of two at or above ``size`` (at least 1, at most ``MAX_BUCKET``)."""
    return min(MAX_BUCKET, 1 << max(0, int(size) - 1).bit_length())


def device_slug(name: str) -> str:
    """File-name form of a GPU name: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia_h100_80gb_hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def gemm_variant(*, bits: int, int_activations: bool, act_dtype_name: str, group_size: int | None,
                 vector_dim: int | None, requant: bool) -> str:
    """Key of a ``quant_gemm`` kernel variant, e.g. ``"i8-w4"``, ``"float16-w4-g128"``, ``"float16-vq8x4"``."""
    act = "i8" if int_activations else act_dtype_name
    weight = f"vq{bits}x{vector_dim}" if vector_dim else f"w{bits}"
    parts = [act, weight]
    if group_size and not vector_dim:
        parts.append(f"g{group_size}")
    if requant:
        parts.append("rq")
    return "-".join(parts)


def scan_variant(*, int_inputs: bool, state_quant: bool) -> str:
    """Key of a ``selective_scan_q`` variant: ``"float"`` / ``"int8"`` inputs, ``"-hq"`` with an 8-bit state."""
    return ("int8" if int_inputs else "float") + ("-hq" if state_quant else "")


def _table_path(device_name: str) -> Path | None:
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    path = TUNED_DIR / f"{device_slug(device_name)}.json"
    return path if path.is_file() else None


@functools.lru_cache(maxsize=8)
def _load(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        table = json.load(f)
    if not isinstance(table, dict):
        raise ValueError(f"{path}: a tuned-configuration file holds a JSON object")
    return table


def table_for(device_name: str) -> dict:
    """The tuned table of a GPU model (empty when none is committed and ``$OPTIMUM_VIM_TUNED_CONFIGS`` is unset)."""
    path = _table_path(device_name)
    if path is None:
        return {}
    if not path.is_file():
        raise FileNotFoundError(f"${ENV_VAR}={path} does not exist")
    return _load(str(path))


def lookup(table: dict, op: str, variant: str, shape: tuple[int, int], size: int) -> list[int] | None:
    """The tuned configuration of ``op`` / ``variant`` / ``shape`` at the bucket nearest ``bucket(size)`` (in
    log2 distance, the smaller bucket on a tie), or None."""
    entries = table.get(op, {}).get(variant, {}).get(f"{shape[0]}x{shape[1]}")
    if not entries:
        return None
    want = math.log2(bucket(size))
    best = min(entries, key=lambda b: (abs(math.log2(int(b)) - want), int(b)))
    return list(entries[best])


def cuda_table(device) -> dict:
    """The table of the CUDA ``device``'s GPU model (``{}`` off CUDA)."""
    import torch

    if getattr(device, "type", None) != "cuda":
        return {}
    return table_for(torch.cuda.get_device_name(device))


def cuda_lookup(device, op: str, variant: str, shape: tuple[int, int], size: int) -> tuple[int, ...] | None:
    """:func:`lookup` in the table of the CUDA ``device``'s GPU model (None off CUDA), memoised per device, table
    setting, key and bucket: a launch pays a dictionary lookup, not a file check."""
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cached_lookup(index, os.environ.get(ENV_VAR), op, variant, tuple(shape), bucket(size))


@functools.lru_cache(maxsize=4096)
def _cached_lookup(index: int, env: str | None, op: str, variant: str, shape: tuple[int, int], size: int):
    import torch

    found = lookup(table_for(torch.cuda.get_device_name(index)), op, variant, shape, size)
    return None if found is None else tuple(found)
