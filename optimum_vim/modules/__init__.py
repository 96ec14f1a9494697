"""Inference-time quantized modules: named persistent buffers only; forward calls :mod:`optimum_vim.ops`."""

from .activation import QActivation
from .base import QMODULE_TYPES, QModule, build_qmodule, load_qmodule_tensors, register_qmodule
from .conv import QConv1d, QOutput
from .linear import QLinear
from .scan import QSelectiveScan

__all__ = [
    "QMODULE_TYPES",
    "QActivation",
    "QConv1d",
    "QLinear",
    "QModule",
    "QOutput",
    "QSelectiveScan",
    "build_qmodule",
    "load_qmodule_tensors",
    "register_qmodule",
]
