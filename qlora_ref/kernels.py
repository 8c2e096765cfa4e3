"""Numba versions of the blockwise 4-bit kernels in ``qlora_ref.blockwise``: the same float32 arithmetic, one
pass over memory, blocks in parallel. ``blockwise.py`` is the definition; the tests prove these equal to it bit for
bit, so a reader never needs to read this file to know what quantization does."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .blockwise import TINY, code_midpoints
from .dtypes import bf16_bits


@njit(inline="always")
def _code_position(v, midpoints):
    # count of midpoints strictly below v: a 4-step binary search over the 15 sorted midpoints, written without
    # branches (a comparison is 0 or 1) because data-dependent branches mispredict on random weights
    i = (v > midpoints[7]) * 8
    i += (v > midpoints[i + 3]) * 4
    i += (v > midpoints[i + 1]) * 2
    i += (v > midpoints[i]) * 1
    return i


@njit(parallel=True, cache=True)
def _quantize_4bit(x, blocksize, midpoints, order, pad_code, packed, absmax):
    n = x.size
    nblocks = absmax.size
    tiny = np.float32(TINY)
    for b in prange(nblocks):
        start = b * blocksize
        end = min(n, start + blocksize)
        m = np.float32(0.0)
        for i in range(start, end):
            m = max(m, abs(x[i]))
        full = end - start == blocksize
        recip = np.float32(1.0)
        if full:
            absmax[b] = m
            recip = np.float32(1.0) / max(m, tiny)
        else:
            m = max(m, tiny)
            absmax[b] = m
        for i in range(start, end, 2):  # blocksize is even, so a block starts on a byte boundary
            v = x[i] * recip if full else x[i] / m
            hi = order[_code_position(min(max(v, np.float32(-1.0)), np.float32(1.0)), midpoints)]
            if i + 1 < end:
                v = x[i + 1] * recip if full else x[i + 1] / m
                lo = order[_code_position(min(max(v, np.float32(-1.0)), np.float32(1.0)), midpoints)]
            else:
                lo = pad_code
            packed[i // 2] = (hi << 4) | lo


def quantize_4bit_codes(x: np.ndarray, code: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """Packed codes ((n+1)//2, 1) and absmax for flat float32 ``x`` — ``blockwise.quantize_codes`` followed by
    ``blockwise.pack_nibbles``, fused."""
    midpoints, order = code_midpoints(code)
    pad_code = order[np.searchsorted(midpoints, np.float32(0.0), side="left")]
    nblocks = -(-x.size // blocksize)
    packed = np.empty((x.size + 1) // 2, dtype=np.uint8)
    absmax = np.empty(nblocks, dtype=np.float32)
    _quantize_4bit(x, blocksize, midpoints, order, np.uint8(pad_code), packed, absmax)
    return packed.reshape(-1, 1), absmax


@njit(parallel=True, cache=True)
def _dequantize_4bit(packed, absmax, code, blocksize, n, out, to_bf16, out_bf16):
    nblocks = absmax.size
    for b in prange(nblocks):
        start = b * blocksize
        end = min(n, start + blocksize)
        a = absmax[b]
        for i in range(start, end, 2):
            byte = packed[i // 2]
            hi = code[byte >> 4] * a
            if to_bf16:
                out_bf16[i] = bf16_bits(hi)
            else:
                out[i] = hi
            if i + 1 < end:
                lo = code[byte & 15] * a
                if to_bf16:
                    out_bf16[i + 1] = bf16_bits(lo)
                else:
                    out[i + 1] = lo


def dequantize_4bit_values(
    packed: np.ndarray, absmax: np.ndarray, code: np.ndarray, blocksize: int, n: int, bfloat16: bool
) -> np.ndarray:
    """Flat float32 (or bfloat16 bits as uint16) values — ``blockwise.unpack_nibbles`` then
    ``blockwise.dequantize_codes`` (and the bfloat16 rounding), fused."""
    flat = packed.reshape(-1)
    absmax = np.ascontiguousarray(absmax, dtype=np.float32)
    code = np.ascontiguousarray(code, dtype=np.float32)
    if bfloat16:
        out_bf16 = np.empty(n, dtype=np.uint16)
        _dequantize_4bit(flat, absmax, code, blocksize, n, np.empty(0, np.float32), True, out_bf16)
        return out_bf16
    out = np.empty(n, dtype=np.float32)
    _dequantize_4bit(flat, absmax, code, blocksize, n, out, False, np.empty(0, np.uint16))
    return out
