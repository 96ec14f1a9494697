"""Inference-time quantized modules: named persistent buffers only (declared by their typed specs, ``spec``); forward
calls :mod:`optimum_vim.ops`; ``dequantize()`` gives the float module back."""

from .activation import QActivation
from .base import QMODULE_TYPES, QModule, build_qmodule, load_qmodule_tensors, register_qmodule
from .conv import QConv1d, QOutput
from .linear import QLinear
from .scan import QSelectiveScan
from .spec import (
    ActivationSpec,
    BufferSpec,
    Conv1dSpec,
    ConvWeightSpec,
    IntWeightSpec,
    LinearSpec,
    ModuleSpec,
    OutputSpec,
    ScanSpec,
    StateSpec,
    VQWeightSpec,
    spec_from_dict,
)

__all__ = [
    "QMODULE_TYPES",
    "ActivationSpec",
    "BufferSpec",
    "Conv1dSpec",
    "ConvWeightSpec",
    "IntWeightSpec",
    "LinearSpec",
    "ModuleSpec",
    "OutputSpec",
    "QActivation",
    "QConv1d",
    "QLinear",
    "QModule",
    "QOutput",
    "QSelectiveScan",
    "ScanSpec",
    "StateSpec",
    "VQWeightSpec",
    "build_qmodule",
    "load_qmodule_tensors",
    "register_qmodule",
    "spec_from_dict",
]
