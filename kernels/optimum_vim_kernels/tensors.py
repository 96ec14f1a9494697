"""Small tensor helpers shared by the kernels and the quantized modules (imports nothing but torch)."""

from __future__ import annotations

import torch


def tensor_version(t: torch.Tensor) -> int:
    """``t``'s in-place write counter (-1 for inference tensors, which keep none): caches keyed on it see writes."""
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter; they cannot be written outside inference mode
        return -1


__all__ = ["tensor_version"]
