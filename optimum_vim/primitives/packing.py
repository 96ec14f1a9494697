"""Bit packing (storage format v1). The implementation lives with the kernels that decode it."""

from optimum_vim_kernels.format import (  # noqa: F401 - re-exported
    SUPPORTED_CODE_BITS,
    pack_codes,
    pack_signed,
    packed_row_bytes,
    unpack_codes,
    unpack_signed,
)
