"""Dequantize-and-multiply, fused tile by tile: the storage/compute split of QLoRA made visible.

QLoRA stores the frozen weight in 4 bits and computes in bfloat16 (paper, section 3, eq. 5): every forward and
every backward pass dequantizes the weight again. The plain way (``naive_*`` below, the definition) builds the
whole dequantized matrix and multiplies::

    W = round(code[nibble] · absmax[block])          (out, in) float32: 4 bytes per weight, all at once
    y = x @ W.T

The fused kernels never hold more than one tile of W: they dequantize ``tile`` rows (forward) or ``tile``
columns (backward) into a small buffer, multiply that tile with NumPy's BLAS, and move on. The forward tiles the
output rows and the backward the input columns, so every output element gets its whole reduction from one BLAS
call and nothing is accumulated across tiles. Peak memory falls from ``4 · out · in`` bytes to ``4 · tile · in``
(forward) and ``4 · out · tile`` (backward). On a GPU, bitsandbytes' training path does not do this: it dequantizes
the whole weight into a temporary buffer (only its batch-1 inference kernel works in registers); ``qlora_gpu``'s
``kernel="triton"`` is the fused analogue (docs/lora_backprop.md).

What "the same" means. The tile holds exactly the values ``dequantized_weight`` holds (``code[nibble] ·
absmax[block]`` in float32, rounded once to bfloat16 by ``dtypes.bf16_bits``: bit for bit). The product is a
float32 matrix product whose summation order is BLAS's: when one tile covers the whole weight (every weight up to
``TILE_BYTES`` of float32, so every layer of SmolLM2 and of a 4096 × 1024 projection), ``fused_x_wt`` makes the very
call ``naive_x_wt`` makes (``x @ Wᵀ``) and the results are bit-identical; with smaller tiles BLAS may block the
sums differently, and the two agree within the float32 bound ``2 K 2⁻²⁴ Σ|terms|`` (``tests/test_lora_ref.py``,
``tests/test_fast_paths.py``).

The dequantization reads a 16-entry table per quantization block — the block's ``code · absmax`` values, already
rounded — so each weight costs one table lookup (about 0.4 ns on one core). All buffers are allocated here in
Python, so ``tracemalloc`` sees every byte (the kernel allocates nothing: ``tests/test_lora_ref.py`` checks Numba's
allocation counter). ``bench/lora_layer.py`` measures the peaks.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .dtypes import bf16_round
from .quantize import Quantized4bit, dequantize_4bit

#: default number of bytes of one dequantized tile (rows for the forward, columns for the backward)
TILE_BYTES = 16 << 20


@njit(inline="always")
def _block_table(code, a, to_bf16, table):
    # a quantization block's 16 values code[c] · absmax (float32, eq. 2), rounded to bfloat16 if asked
    for c in range(code.size):
        v = code[c] * a
        table[c] = bf16_round(v) if to_bf16 else v


@njit(inline="always")
def _unpack_bytes(packed, p0, n_bytes, table, out, o0):
    # whole bytes packed[p0 : p0 + n_bytes] into out[o0:]: the first element of a byte sits in its high nibble
    for k in range(n_bytes):
        byte = packed[p0 + k]
        out[o0 + 2 * k] = table[byte >> 4]
        out[o0 + 2 * k + 1] = table[byte & 15]


@njit(inline="always")
def _dequantize_span(packed, absmax, code, blocksize, start, stop, to_bf16, table, out, o):
    # out[o + k] = W_flat[start + k] for start + k < stop, one quantization block at a time, through its table
    i = start
    while i < stop:
        b = i // blocksize
        end = min(stop, (b + 1) * blocksize)
        _block_table(code, absmax[b], to_bf16, table)
        if i & 1:  # a span that starts in the low nibble of a byte
            out[o + i - start] = table[packed[i >> 1] & 15]
            i += 1
        pairs = (end - i) >> 1
        _unpack_bytes(packed, i >> 1, pairs, table, out, o + i - start)
        i += 2 * pairs
        if i < end:  # a span (or block) that ends in the high nibble of a byte
            out[o + i - start] = table[packed[i >> 1] >> 4]
            i += 1


@njit(inline="always")
def _dequantize_run(packed, absmax, code, blocksize, start, stop, to_bf16, table, out, o):
    # _dequantize_span, with a shorter loop for the usual case: whole blocks of an even size (every block starts on a
    # byte, no nibble at either end), about a quarter faster
    if blocksize % 2 != 0 or start % blocksize != 0 or stop % blocksize != 0:
        _dequantize_span(packed, absmax, code, blocksize, start, stop, to_bf16, table, out, o)
        return
    half = blocksize >> 1
    b0 = start // blocksize
    for b in range(b0, stop // blocksize):
        _block_table(code, absmax[b], to_bf16, table)
        _unpack_bytes(packed, b * half, half, table, out, o + (b - b0) * blocksize)


@njit(cache=True)
def _dequantize_tile(packed, absmax, code, blocksize, n_in, r0, r1, c0, c1, to_bf16, table, tile):
    # tile (flat) [(r - r0) * (c1 - c0) + (c - c0)] = W[r, c] for r0 <= r < r1, c0 <= c < c1. Serial on purpose:
    # a Numba parallel region between BLAS calls leaves OpenMP threads spinning on the cores BLAS needs next
    # (docs/lora_backprop.md, "fast path")
    width = c1 - c0
    if width == n_in:  # whole rows: one contiguous run of W
        _dequantize_run(packed, absmax, code, blocksize, r0 * n_in, r1 * n_in, to_bf16, table, tile, 0)
        return
    for r in range(r0, r1):
        _dequantize_run(packed, absmax, code, blocksize, r * n_in + c0, r * n_in + c1, to_bf16, table, tile,
                        (r - r0) * width)


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


@njit(cache=True)
def _double_quant_absmax(codes, code2, absmax2, blocksize2, offset, out):
    # out[b] = code2[codes[b]] · absmax2[b // blocksize2] + offset, in float32: Quantized4bit.absmax_float32
    for b in range(codes.size):
        out[b] = code2[codes[b]] * absmax2[b // blocksize2] + offset


def _absmax(q: Quantized4bit) -> np.ndarray:
    """``q.absmax_float32()`` (bit for bit, ``tests/test_fast_paths.py``), in one pass: it runs on every call."""
    s = q.state2
    if s is None:
        return np.ascontiguousarray(q.absmax, dtype=np.float32)
    out = np.empty(s.codes.size, np.float32)
    _double_quant_absmax(np.ascontiguousarray(s.codes.reshape(-1)), np.ascontiguousarray(s.code, dtype=np.float32),
                         np.ascontiguousarray(s.absmax, dtype=np.float32), int(s.blocksize), np.float32(q.offset), out)
    return out


def _kernel_args(q: Quantized4bit):
    return (
        np.ascontiguousarray(q.packed.reshape(-1)),
        _absmax(q),
        np.ascontiguousarray(q.code, dtype=np.float32),
        int(q.blocksize),
    )


def _tile_buffers(q: Quantized4bit, compute_dtype: str, tile_elements: int) -> tuple:
    """What the dequantization of one tile needs: the weight's arrays, the bfloat16 flag, the lookup table and
    the tile's buffer."""
    return _kernel_args(q), _rounds_to_bf16(compute_dtype), np.empty(16, np.float32), \
        np.empty(tile_elements, np.float32)


def fused_x_wt(x: np.ndarray, q: Quantized4bit, compute_dtype: str = "bfloat16", tile: int | None = None) -> np.ndarray:
    """``x @ W.T`` for x (N, in) float32 and the 4-bit weight W (out, in) rounded to ``compute_dtype``, float32
    accumulation; W is dequantized ``tile`` rows at a time. Returns (N, out) float32, C-contiguous."""
    n_out, n_in = _check_weight(q)
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows = _tile(n_in, n_out, tile)
    args, to_bf16, table, buf = _tile_buffers(q, compute_dtype, rows * n_in)
    y = np.empty((x.shape[0], n_out), np.float32)
    for r0 in range(0, n_out, rows):
        r1 = min(n_out, r0 + rows)
        w = buf[: (r1 - r0) * n_in]
        _dequantize_tile(*args, n_in, r0, r1, 0, n_in, to_bf16, table, w)
        np.matmul(x, w.reshape(r1 - r0, n_in).T, out=y[:, r0:r1])
    return y


def fused_g_w(g: np.ndarray, q: Quantized4bit, compute_dtype: str = "bfloat16", tile: int | None = None) -> np.ndarray:
    """``g @ W`` for g (N, out) float32 (the backward of ``x @ W.T`` with respect to x); W is dequantized ``tile``
    columns at a time. Returns (N, in) float32, C-contiguous."""
    n_out, n_in = _check_weight(q)
    g = np.ascontiguousarray(g, dtype=np.float32)
    cols = _tile(n_out, n_in, tile)
    args, to_bf16, table, buf = _tile_buffers(q, compute_dtype, n_out * cols)
    gx = np.empty((g.shape[0], n_in), np.float32)
    for c0 in range(0, n_in, cols):
        c1 = min(n_in, c0 + cols)
        w = buf[: n_out * (c1 - c0)]
        _dequantize_tile(*args, n_in, 0, n_out, c0, c1, to_bf16, table, w)
        np.matmul(g, w.reshape(n_out, c1 - c0), out=gx[:, c0:c1])
    return gx


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
