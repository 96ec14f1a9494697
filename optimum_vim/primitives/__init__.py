"""Pure tensor math shared by modules, recipes and kernels' references: quantization and bit packing."""

from .packing import pack_codes, pack_signed, packed_row_bytes, unpack_codes, unpack_signed
from .quant import (
    affine_params,
    dequantize,
    fake_quantize,
    int_range,
    quantize,
    quantize_int8,
    round_ste,
    symmetric_scale,
)

__all__ = [
    "affine_params",
    "dequantize",
    "fake_quantize",
    "int_range",
    "pack_codes",
    "pack_signed",
    "packed_row_bytes",
    "quantize",
    "quantize_int8",
    "round_ste",
    "symmetric_scale",
    "unpack_codes",
    "unpack_signed",
]
