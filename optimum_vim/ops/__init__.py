"""Stable op API of optimum-vim: every op here has a pure-PyTorch implementation that runs on any device."""

from .conv import causal_conv1d
from .norm import add_rms_norm, rms_norm
from .scan import selective_scan, selective_scan_torch

__all__ = ["add_rms_norm", "causal_conv1d", "rms_norm", "selective_scan", "selective_scan_torch"]
