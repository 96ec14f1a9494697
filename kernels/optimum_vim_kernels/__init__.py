"""Triton low-bit kernels for optimum-vim's quantized Vision Mamba modules.

Depends only on torch and triton and never imports optimum_vim. Importing this package does not import Triton:
``reference`` (pure PyTorch twins of every kernel) and ``format`` (the packed storage format) work everywhere;
the Triton launchers live in ``gemm``, ``scan`` and ``outlier`` and are imported on first use.
"""

from __future__ import annotations

import functools
import importlib.util

__all__ = ["triton_available"]


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when Triton is importable (GPU, or CPU with ``TRITON_INTERPRET=1``)."""
    return importlib.util.find_spec("triton") is not None
