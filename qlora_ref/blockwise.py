"""Blockwise absmax quantization, written plainly (paper, section 2 "Block-wise k-bit Quantization", eq. 1-2).

These NumPy functions are the readable definition. ``qlora_ref.kernels`` holds Numba versions of the same
arithmetic for speed, and the tests prove the two equal bit for bit.

Quantizing a tensor X to k bits with codebook Q:

    c   = absmax(X_block)                 one float32 constant per block of B values          (eq. 1)
    X_q = round_to_nearest_code(X / c)    the index of the nearest value of Q                 (eq. 1)
    X   ≈ Q[X_q] · c                      dequantization                                      (eq. 2)

The paper writes eq. 1 for Int8 with the constant as a multiplier, c = 127 / absmax(X), X_Int8 = round(c · X),
and eq. 2 divides, X = X_Int8 / c. Here, as in bitsandbytes and in section 3's memory arithmetic, the stored
constant is the absmax itself, the codebook Q is normalised to [-1, 1], and dequantization multiplies.

Blocks keep an outlier from ruining the precision of the whole tensor: it only widens its own block's range.
The exact float32 arithmetic below follows bitsandbytes (0.50) so that both produce identical bytes.
"""

from __future__ import annotations

import numpy as np

#: smallest absmax the 4-bit kernel uses as a divisor, so an all-zero block divides by something finite
TINY = np.float32(1e-38)


def blockwise_absmax_scale(x: np.ndarray, blocksize: int, tiny: np.float32 | None = TINY
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Split flat float32 ``x`` into blocks, return (x scaled into [-1, 1], per-block absmax) — eq. 1.

    With ``tiny`` (bitsandbytes' ``quantize_4bit``): full blocks are scaled by multiplying with the float32
    reciprocal of max(absmax, tiny) (one rounding for 1/c, one for the product); a shorter final block is divided
    by max(absmax, tiny). The stored absmax of a full all-zero block is 0 (it dequantizes to exact zeros), while a
    short final block stores at least ``tiny``. These details are bitsandbytes' and are kept for bit-identical
    output; a consequence is that a block whose absmax lies below 1e-38 (subnormal) is scaled short of [-1, 1].

    With ``tiny=None`` (the 8-bit kernel: the dynamic map of double quantization and 8-bit optimizer states): the
    same arithmetic wherever a block's absmax is at least 1e-38, but the true absmax is stored and used — a block
    below 1e-38, whose float32 reciprocal would overflow, is divided by it, and an all-zero block (absmax 0, full or
    short) scales to zeros.
    """
    n = x.size
    full = n - n % blocksize
    blocks = x[:full].reshape(-1, blocksize)
    absmax = np.abs(blocks).max(axis=1) if full else np.zeros(0, np.float32)
    reciprocal = np.float32(1.0) / np.maximum(absmax, TINY if tiny is None else tiny)
    scaled = blocks * reciprocal[:, None]
    if tiny is None and (small := absmax < TINY).any():
        scaled[small] = np.divide(blocks[small], absmax[small, None], out=np.zeros_like(blocks[small]),
                                  where=absmax[small, None] > 0)
    scaled = np.clip(scaled, -1.0, 1.0).reshape(-1)
    if full < n:
        tail = x[full:]
        tail_absmax = np.abs(tail).max() if tiny is None else np.maximum(np.abs(tail).max(), tiny)
        tail_scaled = tail / tail_absmax if tail_absmax > 0 else np.zeros_like(tail)
        absmax = np.append(absmax, tail_absmax)
        scaled = np.concatenate([scaled, np.clip(tail_scaled, -1.0, 1.0)])
    return scaled.astype(np.float32, copy=False), absmax.astype(np.float32, copy=False)


def code_midpoints(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(midpoints between neighbouring code values in ascending order, the code index of each sorted value).

    Rounding to the nearest code is a search among the midpoints. For FP4 and Int4, whose nibble order is not
    value order, ``order`` maps the position back to the nibble. The sort is stable, so of FP4's two zeros +0
    (nibble 0) sorts before -0 (nibble 8).
    """
    order = np.argsort(code, kind="stable")
    ascending = code[order]
    midpoints = ((ascending[:-1] + ascending[1:]) / np.float32(2)).astype(np.float32)
    return midpoints, order.astype(np.uint8)


def nearest_code(scaled: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Index of the nearest code value for each scaled value (uint8); a value exactly on a midpoint takes the
    lower code (the rounding of eq. 1, as bitsandbytes does it)."""
    midpoints, order = code_midpoints(code)
    position = np.searchsorted(midpoints, scaled, side="left")  # number of midpoints strictly below the value
    return order[position]


def pack_nibbles(codes: np.ndarray, pad_code: int) -> np.ndarray:
    """Two 4-bit codes per byte, the first element in the high nibble; an odd count is padded with
    ``pad_code`` (the code of 0.0). Shape ((n + 1) // 2, 1), bitsandbytes' storage layout."""
    if codes.size % 2:
        codes = np.append(codes, np.uint8(pad_code))
    codes = codes.astype(np.uint8)
    return ((codes[0::2] << 4) | codes[1::2]).reshape(-1, 1)


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` 4-bit codes stored in ``packed`` (inverse of ``pack_nibbles``)."""
    flat = packed.reshape(-1)
    codes = np.empty(flat.size * 2, dtype=np.uint8)
    codes[0::2] = flat >> 4
    codes[1::2] = flat & 0x0F
    return codes[:n]


def dequantize_codes(codes: np.ndarray, absmax: np.ndarray, code: np.ndarray, blocksize: int) -> np.ndarray:
    """Q[X_q] · c in float32 (eq. 2): each code's value times its block's absmax, one float32 rounding."""
    scale = np.repeat(absmax.astype(np.float32), blocksize)[: codes.size]
    return code[codes] * scale


def quantize_codes(x: np.ndarray, code: np.ndarray, blocksize: int, tiny: np.float32 | None = TINY
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(one code index per element, per-block absmax) for flat float32 ``x`` — eq. 1 end to end; ``tiny``: see
    :func:`blockwise_absmax_scale` (the default is the 4-bit kernel's, None the 8-bit one's)."""
    scaled, absmax = blockwise_absmax_scale(x, blocksize, tiny)
    return nearest_code(scaled, code), absmax
