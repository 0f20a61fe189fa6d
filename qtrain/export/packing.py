"""Bit packing of grid codes: n codes of b bits each into ⌈n·b/8⌉ bytes, and back.

Bit order is little-endian at both levels. The codes c_0, c_1, … (row-major order of the
weight tensor) are laid end to end as one bit stream, least significant bit of each code
first: stream bit s = i·b + j holds bit j of code c_i. Stream bit s is stored in byte s // 8
as bit s % 8 (value 2^(s % 8)). The last byte is zero-padded. Examples:

    b = 1, codes 1,0,1,1,0,0,0,0, 1   → stream 10110000 1        → bytes 0x0D, 0x01
    b = 2, codes 3,0,1,2              → stream 11 00 10 01       → byte  0x93
    b = 3, codes 5,7,6                → stream 101 111 011       → bytes 0xBD, 0x01

(stream bits written in storage order, each code's least significant bit first), so
byte-aligned widths (1, 2, 4, 8 bits) never straddle a byte. Everything is vectorised with
`numpy.unpackbits` / `numpy.packbits` (`bitorder="little"`): codes, viewed as little-endian
uint16, become an [n, b] bit matrix, whose flattened stream is packed eight bits per byte.
Memory is one byte per stream bit.
"""

from __future__ import annotations

import numpy as np
import torch

from qtrain.base.errors import UserError

MAX_CODE_BITS = 16
_CODE_DTYPE = np.dtype("<u2")  # holds every code of up to MAX_CODE_BITS bits


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that `count` codes of `bits` bits occupy once packed: ⌈count·bits/8⌉."""
    _check_bits(bits)
    if count < 0:
        raise UserError(f"the number of codes must be >= 0, got {count}")
    return (count * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) into a 1-D uint8 tensor of ⌈n·bits/8⌉ bytes."""
    _check_bits(bits)
    flat = codes.detach().reshape(-1).cpu().to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise UserError(
            f"codes must lie in [0, {2**bits - 1}] to be packed with {bits} bits, got values in "
            f"[{int(flat.min())}, {int(flat.max())}]"
        )
    as_bytes = flat.numpy().astype(_CODE_DTYPE).view(np.uint8).reshape(-1, _CODE_DTYPE.itemsize)
    planes = np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :bits]  # [n, bits]
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_codes`: the first `count` codes (int64) of a packed uint8 buffer.

    Raises ValueError when the buffer is not uint8, does not hold exactly ⌈count·bits/8⌉
    bytes, or has non-zero padding bits (signs of a truncated or corrupted buffer).
    """
    expected = packed_nbytes(count, bits)
    if packed.dtype != torch.uint8:
        raise UserError(f"a packed buffer must be uint8, got {packed.dtype}")
    if packed.numel() != expected:
        raise UserError(
            f"{count} codes of {bits} bits need {expected} bytes, the buffer has {packed.numel()}"
        )
    stream = np.unpackbits(packed.detach().reshape(-1).cpu().numpy(), bitorder="little")
    if stream[count * bits :].any():
        raise UserError("the padding bits after the last code are not zero")
    planes = np.zeros((count, 8 * _CODE_DTYPE.itemsize), dtype=np.uint8)
    planes[:, :bits] = stream[: count * bits].reshape(count, bits)
    codes = np.packbits(planes, axis=1, bitorder="little").view(_CODE_DTYPE).reshape(-1)
    return torch.from_numpy(codes.astype(np.int64))


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_CODE_BITS:
        raise UserError(f"code width must be an integer in [1, {MAX_CODE_BITS}], got {bits!r}")
