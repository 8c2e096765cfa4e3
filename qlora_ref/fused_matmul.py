"""Dequantize-and-multiply, fused tile by tile: the storage/compute split of QLoRA made visible.

QLoRA stores the frozen weight in 4 bits and computes in bfloat16 (paper, section 3, eq. 5): every forward and
every backward pass dequantizes the weight again. The plain way (``naive_*`` below, the definition) builds the
whole dequantized matrix and multiplies::

    W = round(code[nibble] · absmax[block])          (out, in) float32: 4 bytes per weight, all at once
    y = x @ W.T

The fused kernels never hold more than one tile of W: they dequantize ``tile`` rows (forward) or ``tile``
columns (backward) into a small buffer, multiply that tile with BLAS, and move on. The result is the same
matrix product: the forward tile over the output rows gives each output element the whole reduction in one
BLAS call; the backward tiles over the input columns for the same reason, so neither accumulates partial sums
across tiles. Peak memory falls from ``4 · out · in`` bytes to ``4 · tile · in`` (forward) and
``4 · out · tile`` (backward) — on a GPU the same idea is bitsandbytes' fused 4-bit kernels, which dequantize
into registers.

All buffers are allocated here in Python, so ``tracemalloc`` sees every byte (the kernels allocate nothing:
``tests/test_lora_ref.py`` checks Numba's allocation counter). ``bench/lora_layer.py`` measures the peaks.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .kernels import _bf16_bits
from .quantize import Quantized4bit, dequantize_4bit

#: default number of bytes of one dequantized tile (rows for the forward, columns for the backward)
TILE_BYTES = 16 << 20


@njit(inline="always")
def _round_bf16(v):
    # the float32 value of v rounded to bfloat16 (nearest even): the same rounding as qlora_ref.kernels
    return np.uint32(np.uint32(_bf16_bits(v)) << np.uint32(16)).view(np.float32)


@njit(inline="always")
def _dequantize_span(packed, absmax, code, blocksize, start, stop, to_bf16, out, o):
    # out[o + k] = W_flat[start + k] for start + k < stop: code[nibble] * absmax[block] in float32 (eq. 2),
    # optionally rounded to bfloat16; one block (one absmax) at a time
    i = start
    while i < stop:
        b = i // blocksize
        end = min(stop, (b + 1) * blocksize)
        a = absmax[b]
        for j in range(i, end):
            byte = np.int64(packed[j >> 1])
            nibble = (byte >> 4) if (j & 1) == 0 else (byte & 15)  # the first element sits in the high nibble
            v = code[nibble] * a
            out[o + j - start] = _round_bf16(v) if to_bf16 else v
        i = end


@njit(cache=True)
def _dequantize_rows(packed, absmax, code, blocksize, n_in, r0, r1, to_bf16, tile):
    # tile[(r - r0) * n_in + c] = W[r, c] for rows r0 <= r < r1: contiguous in the flattened weight
    _dequantize_span(packed, absmax, code, blocksize, r0 * n_in, r1 * n_in, to_bf16, tile, 0)


@njit(cache=True)
def _dequantize_cols(packed, absmax, code, blocksize, n_out, n_in, c0, c1, to_bf16, tile):
    # tile[r * (c1 - c0) + j] = W[r, c0 + j] for all rows r: an (out, c1 - c0) row-major slab
    w = c1 - c0
    for r in range(n_out):
        _dequantize_span(packed, absmax, code, blocksize, r * n_in + c0, r * n_in + c1, to_bf16, tile, r * w)


@njit(cache=True)
def _fused_x_wt(x, packed, absmax, code, blocksize, n_out, tile_rows, to_bf16, buf, y_t):
    # y_t (out, N) = W @ x.T, one tile of W's rows at a time
    n_in = x.shape[1]
    for r0 in range(0, n_out, tile_rows):
        r1 = min(n_out, r0 + tile_rows)
        tile = buf[: (r1 - r0) * n_in]
        _dequantize_rows(packed, absmax, code, blocksize, n_in, r0, r1, to_bf16, tile)
        np.dot(tile.reshape(r1 - r0, n_in), x.T, y_t[r0:r1])


@njit(cache=True)
def _fused_g_w(g, packed, absmax, code, blocksize, n_in, tile_cols, to_bf16, buf, gx_t):
    # gx_t (in, N) = W.T @ g.T, one tile of W's columns at a time
    n_out = g.shape[1]
    for c0 in range(0, n_in, tile_cols):
        c1 = min(n_in, c0 + tile_cols)
        tile = buf[: n_out * (c1 - c0)]
        _dequantize_cols(packed, absmax, code, blocksize, n_out, n_in, c0, c1, to_bf16, tile)
        np.dot(tile.reshape(n_out, c1 - c0).T, g.T, gx_t[c0:c1])


def _check_weight(q: Quantized4bit) -> tuple[int, int]:
    if len(q.shape) != 2:
        raise ValueError(f"the quantized weight must be 2-D (out_features, in_features), got shape {q.shape}")
    return q.shape


def _rounds_to_bf16(compute_dtype: str) -> bool:
    if compute_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"compute_dtype must be 'float32' or 'bfloat16', got {compute_dtype!r}")
    return compute_dtype == "bfloat16"


def _tile(n_other: int, n_total: int, tile: int | None) -> int:
    """Rows (or columns) per tile: ``tile`` if given, else as many as fit in ``TILE_BYTES``."""
    if tile is None:
        tile = max(1, TILE_BYTES // (4 * max(1, n_other)))
    if isinstance(tile, bool) or not isinstance(tile, int | np.integer) or tile < 1:
        raise ValueError(f"tile must be a positive integer, got {tile!r}")
    return int(min(tile, n_total))


def _kernel_args(q: Quantized4bit):
    return (
        np.ascontiguousarray(q.packed.reshape(-1)),
        np.ascontiguousarray(q.absmax_float32(), dtype=np.float32),
        np.ascontiguousarray(q.code, dtype=np.float32),
        int(q.blocksize),
    )


def fused_x_wt(x: np.ndarray, q: Quantized4bit, compute_dtype: str = "bfloat16", tile: int | None = None) -> np.ndarray:
    """``x @ W.T`` for x (N, in) float32 and the 4-bit weight W (out, in) rounded to ``compute_dtype``, float32
    accumulation; W is dequantized ``tile`` rows at a time. Returns (N, out) float32 (a transposed view)."""
    n_out, n_in = _check_weight(q)
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows = _tile(n_in, n_out, tile)
    buf = np.empty(rows * n_in, np.float32)
    y_t = np.empty((n_out, x.shape[0]), np.float32)
    _fused_x_wt(x, *_kernel_args(q), n_out, rows, _rounds_to_bf16(compute_dtype), buf, y_t)
    return y_t.T


def fused_g_w(g: np.ndarray, q: Quantized4bit, compute_dtype: str = "bfloat16", tile: int | None = None) -> np.ndarray:
    """``g @ W`` for g (N, out) float32 (the backward of ``x @ W.T`` with respect to x); W is dequantized ``tile``
    columns at a time. Returns (N, in) float32 (a transposed view)."""
    n_out, n_in = _check_weight(q)
    g = np.ascontiguousarray(g, dtype=np.float32)
    cols = _tile(n_out, n_in, tile)
    buf = np.empty(n_out * cols, np.float32)
    gx_t = np.empty((n_in, g.shape[0]), np.float32)
    _fused_g_w(g, *_kernel_args(q), n_in, cols, _rounds_to_bf16(compute_dtype), buf, gx_t)
    return gx_t.T


def dequantized_weight(q: Quantized4bit, compute_dtype: str = "bfloat16") -> np.ndarray:
    """The whole weight, dequantized and rounded once to ``compute_dtype``, as float32 (out, in)."""
    _check_weight(q)
    _rounds_to_bf16(compute_dtype)
    return dequantize_4bit(q, compute_dtype).astype(np.float32, copy=False)


def naive_x_wt(x: np.ndarray, q: Quantized4bit, compute_dtype: str = "bfloat16") -> np.ndarray:
    """The definition of ``fused_x_wt``: dequantize all of W, then one matrix product."""
    return np.asarray(x, dtype=np.float32) @ dequantized_weight(q, compute_dtype).T


def naive_g_w(g: np.ndarray, q: Quantized4bit, compute_dtype: str = "bfloat16") -> np.ndarray:
    """The definition of ``fused_g_w``: dequantize all of W, then one matrix product."""
    return np.asarray(g, dtype=np.float32) @ dequantized_weight(q, compute_dtype)


__all__ = ["fused_x_wt", "fused_g_w", "naive_x_wt", "naive_g_w", "dequantized_weight", "TILE_BYTES"]
