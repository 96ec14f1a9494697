"""Storage format v1: bit packing round trips (property tests) and the documented byte layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_vim.primitives import pack_codes, pack_signed, packed_row_bytes, unpack_codes, unpack_signed


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 5), cols=st.integers(1, 37), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_roundtrip(bits, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, packed_row_bytes(cols, bits))
    assert torch.equal(unpack_codes(packed, bits, cols), codes.to(torch.int32))


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), cols=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_signed_roundtrip_covers_full_range(bits, cols, seed):
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.randint(lo, hi + 1, (3, cols), generator=g)
    q[0, 0], q[-1, -1] = lo, hi  # the extremes survive
    assert torch.equal(unpack_signed(pack_signed(q, bits), bits, cols), q.to(torch.int32))


def test_documented_layout():
    # 4 bit: two codes per byte, low nibble first; signed values offset by 8
    assert pack_codes(torch.tensor([[1, 2, 15]]), 4).tolist() == [[0x21, 0x0F]]
    assert pack_signed(torch.tensor([[-8, 7]]), 4).tolist() == [[0xF0]]
    # 3 bit: a bit stream, codes straddle bytes
    assert pack_codes(torch.tensor([[7, 7, 7]]), 3).tolist() == [[0xFF, 0x01]]
    # 2 bit: four codes per byte
    assert pack_codes(torch.tensor([[1, 2, 3, 0, 1]]), 2).tolist() == [[0b00111001, 0b01]]
    # 1 bit is binary: -1 -> 0, +1 -> 1, eight per byte, first code in the lowest bit
    assert pack_signed(torch.tensor([[1, -1, -1, 1, 1, 1, -1, -1, 1]]), 1).tolist() == [[0b00111001, 0b1]]


@given(cols=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_binary_roundtrip(cols, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2, (3, cols), generator=g) * 2 - 1
    assert torch.equal(unpack_signed(pack_signed(q, 1), 1, cols), q.to(torch.int32))


def test_binary_refuses_zero():
    with pytest.raises(ValueError, match="-1 or \\+1"):
        pack_signed(torch.tensor([[0, 1]]), 1)


def test_packing_rejects_bad_input():
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="1..8"):
        pack_codes(torch.tensor([[1]]), 9)
    with pytest.raises(TypeError):
        pack_codes(torch.tensor([[1.0]]), 4)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_codes(torch.zeros(1, 3, dtype=torch.uint8), 4, 7)
