"""Bit packing: exact layout (the docstring's examples), sizes, round trips, bad buffers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qtrain.export.packing import MAX_CODE_BITS, pack_codes, packed_nbytes, unpack_codes


@pytest.mark.parametrize(
    ("codes", "bits", "expected"),
    [
        ([1, 0, 1, 1, 0, 0, 0, 0, 1], 1, [0x0D, 0x01]),
        ([3, 0, 1, 2], 2, [0x93]),
        ([5, 7, 6], 3, [0xBD, 0x01]),
        ([0xABC], 12, [0xBC, 0x0A]),
    ],
)
def test_layout_matches_the_documented_examples(codes, bits, expected):
    packed = pack_codes(torch.tensor(codes), bits)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == expected


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8, 13, 16])
def test_layout_is_the_little_endian_bit_stream(bits):
    """Independent reference: numpy.packbits of the LSB-first bits of every code."""
    codes = torch.randint(0, 2**bits, (77,), generator=torch.Generator().manual_seed(bits))
    stream = [(int(c) >> j) & 1 for c in codes for j in range(bits)]
    reference = np.packbits(np.array(stream, dtype=np.uint8), bitorder="little")
    assert pack_codes(codes, bits).numpy().tobytes() == reference.tobytes()


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(1, MAX_CODE_BITS),
    count=st.integers(0, 200),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_and_exact_size(bits, count, seed):
    codes = torch.randint(0, 2**bits, (count,), generator=torch.Generator().manual_seed(seed))
    packed = pack_codes(codes, bits)
    assert packed.numel() == packed_nbytes(count, bits) == -(-count * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, count), codes)


def test_tensors_are_flattened_in_row_major_order():
    codes = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    assert pack_codes(codes, 1).tolist() == [0b0000_0011]
    assert pack_codes(codes.t(), 1).tolist() == [0b0000_0101]  # rows (1,0), (1,0), (0,0), (0,0)


def test_one_bit_per_binary_weight_is_one_thirty_second_of_float32():
    codes = torch.randint(0, 2, (64, 64, 3, 3), generator=torch.Generator().manual_seed(0))
    float_bytes = codes.numel() * 4
    assert pack_codes(codes, 1).numel() * 32 == float_bytes


@pytest.mark.parametrize("bad", [[-1], [2]])
def test_codes_outside_the_width_are_rejected(bad):
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 1\]"):
        pack_codes(torch.tensor(bad), 1)


@pytest.mark.parametrize("bits", [0, 17, 2.0, True])
def test_invalid_widths_are_rejected(bits):
    with pytest.raises(ValueError, match="code width"):
        pack_codes(torch.tensor([0]), bits)


def test_wrong_buffer_size_is_rejected():
    packed = pack_codes(torch.tensor([1, 2, 3, 0, 1]), 2)  # 10 bits → 2 bytes
    with pytest.raises(ValueError, match="need 2 bytes, the buffer has 1"):
        unpack_codes(packed[:1], 2, 5)
    with pytest.raises(ValueError, match="need 2 bytes, the buffer has 3"):
        unpack_codes(torch.cat([packed, packed[:1]]), 2, 5)


def test_nonzero_padding_is_rejected():
    packed = pack_codes(torch.tensor([1, 2, 3, 0, 1]), 2).clone()
    packed[-1] |= 0x80  # a bit past the last code
    with pytest.raises(ValueError, match="padding bits"):
        unpack_codes(packed, 2, 5)


def test_non_uint8_buffer_is_rejected():
    with pytest.raises(ValueError, match="must be uint8"):
        unpack_codes(torch.zeros(1, dtype=torch.int8), 1, 8)
