"""Bit packing of integer codes into uint8 rows: storage format v1 of optimum-vim, decoded by every kernel.

Format: a tensor of b-bit codes ``q`` (any leading shape, last dim K) is stored row by row as a little-endian
bit stream: code ``k`` of a row occupies bits ``[k*b, (k+1)*b)`` of the row, bit ``i`` being bit ``i % 8`` of byte
``i // 8``. Each row is padded with zero bits to whole bytes, so the packed shape is ``(..., ceil(K*b/8))``.
For b in {1, 2, 4, 8} this is the usual "lowest bits first" layout (two int4 per byte, low nibble first).
Signed values are stored with an offset (``u = q + 2**(b-1)``), so every stored code is an unsigned integer.
One bit is binary, not a uniform grid: the values are -1 and +1, stored as ``u = (q + 1) / 2`` (0 -> -1, 1 -> +1).
"""

from __future__ import annotations

import torch

SUPPORTED_CODE_BITS = tuple(range(1, 9))


def packed_row_bytes(num_codes: int, bits: int) -> int:
    """Bytes per packed row of ``num_codes`` codes of ``bits`` bits."""
    return (num_codes * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_CODE_BITS:
        raise ValueError(f"packing supports 1..8 bits per code; got {bits}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs unsigned codes (integer tensor, values in ``[0, 2**bits)``) along the last dim into uint8.

    Returns shape ``(*codes.shape[:-1], packed_row_bytes(K, bits))``.
    """
    _check_bits(bits)
    if codes.is_floating_point():
        raise TypeError("pack_codes expects an integer tensor")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits: [{int(codes.min())}, {int(codes.max())}]")
    lead, k = codes.shape[:-1], codes.shape[-1]
    nbytes = packed_row_bytes(k, bits)
    if bits == 8:
        return codes.to(torch.uint8).reshape(*lead, nbytes).clone()
    c = codes.reshape(-1, k).to(torch.int64)
    # spread every code over its bits, then regroup the bit stream into bytes
    bit_idx = torch.arange(bits, device=c.device)
    stream = ((c.unsqueeze(-1) >> bit_idx) & 1).reshape(c.shape[0], k * bits)
    pad = nbytes * 8 - k * bits
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    weights = (1 << torch.arange(8, device=c.device)).to(torch.int64)
    packed = (stream.reshape(c.shape[0], nbytes, 8) * weights).sum(-1)
    return packed.to(torch.uint8).reshape(*lead, nbytes)


def unpack_codes(packed: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``(..., nbytes)`` -> int32 codes ``(..., num_codes)``."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8; got {packed.dtype}")
    nbytes = packed.shape[-1]
    if nbytes != packed_row_bytes(num_codes, bits):
        raise ValueError(f"{nbytes} bytes per row cannot hold exactly {num_codes} codes of {bits} bits")
    lead = packed.shape[:-1]
    if bits == 8:
        return packed.to(torch.int32).clone()
    p = packed.reshape(-1, nbytes).to(torch.int32)
    if 8 % bits == 0:  # codes never straddle bytes: shift-and-mask per slot
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, device=p.device, dtype=torch.int32) * bits
        codes = ((p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(p.shape[0], nbytes * per_byte)
        return codes[:, :num_codes].reshape(*lead, num_codes)
    bit_idx = torch.arange(8, device=p.device, dtype=torch.int32)
    stream = ((p.unsqueeze(-1) >> bit_idx) & 1).reshape(p.shape[0], nbytes * 8)[:, : num_codes * bits]
    weights = (1 << torch.arange(bits, device=p.device, dtype=torch.int32))
    codes = (stream.reshape(p.shape[0], num_codes, bits) * weights).sum(-1)
    return codes.to(torch.int32).reshape(*lead, num_codes)


def pack_signed(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs signed integers in ``[-2**(bits-1), 2**(bits-1) - 1]`` with the offset-binary convention
    (1 bit: values in {-1, +1}, see the module docstring)."""
    q = q.to(torch.int64)
    if bits == 1:
        if q.numel() and not bool(((q == 1) | (q == -1)).all()):
            raise ValueError("1-bit (binary) codes must be -1 or +1")
        return pack_codes((q + 1) >> 1, 1)
    return pack_codes(q + (1 << (bits - 1)), bits)


def unpack_signed(packed: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack_signed`; returns int32."""
    if bits == 1:
        return unpack_codes(packed, 1, num_codes) * 2 - 1
    return unpack_codes(packed, bits, num_codes) - (1 << (bits - 1))
