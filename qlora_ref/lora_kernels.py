"""Numba kernels of ``QLoRALinear``'s fast path: the elementwise steps of the layer, fused.

The definition (``QLoRALinear._forward_definition`` / ``_backward_definition`` in ``lora.py``) writes every step as a
NumPy expression followed by a rounding to the compute dtype, ``rnd(·)``; each step makes a temporary array and
every rounding two more (ml_dtypes' bfloat16 and back). Each kernel here does several of those steps in one pass,
element by element, with the *same* float32 operations in the same order and the same rounding
(``dtypes.bf16_round``), so it produces the same bits; ``tests/test_fast_paths.py`` checks every kernel against its
NumPy expression, and the whole layer against the definition. Matrix products stay NumPy's (the same BLAS calls as
the definition), so they are not here.

Numba compiles these without ``fastmath`` (no reassociation, no fused multiply-add contraction) and keeps float32
arithmetic in float32, which is what makes "the same operations" hold. They are serial on purpose: between BLAS
calls a Numba/OpenMP parallel region leaves threads spinning on the cores that BLAS needs next (measured in
docs/lora_backprop.md).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .dtypes import bf16_round


@njit(inline="always")
def _rnd(v, to_bf16):
    return bf16_round(v) if to_bf16 else v


@njit(cache=True)
def frozen_output(xw, bias_c, has_bias, to_bf16):
    """In place: ``xw = rnd(xw + bias_c)`` (``rnd(xw)`` without bias) — the frozen path ``bf16(x_c W_cᵀ + b_c)``."""
    n, m = xw.shape
    for i in range(n):
        for j in range(m):
            v = xw[i, j] + bias_c[j] if has_bias else xw[i, j]
            xw[i, j] = _rnd(v, to_bf16)


@njit(cache=True)
def dropout_input(xc, keep, scale, to_bf16, out):
    """``out = rnd(xc · (keep · scale))``: the kept inputs times 1/(1-p), the dropped ones times 0 (so −x·0 = −0,
    and an infinite input gives NaN, exactly as the NumPy expression does)."""
    n, m = xc.shape
    zero = np.float32(0.0)
    for i in range(n):
        for j in range(m):
            out[i, j] = _rnd(xc[i, j] * (scale if keep[i, j] else zero), to_bf16)


@njit(cache=True)
def adapter_output(xw, bias_c, has_bias, p, s, to_bf16):
    """In place: ``xw = rnd(rnd(xw + b_c) + rnd(rnd(p) · s))`` — y = base + L with base the frozen path, p = H B_cᵀ."""
    n, m = xw.shape
    for i in range(n):
        for j in range(m):
            v = xw[i, j] + bias_c[j] if has_bias else xw[i, j]
            base = _rnd(v, to_bf16)
            lora = _rnd(_rnd(p[i, j], to_bf16) * s, to_bf16)
            xw[i, j] = _rnd(base + lora, to_bf16)


@njit(cache=True)
def scaled(g, s, to_bf16, out):
    """``out = rnd(g · s)``."""
    n, m = g.shape
    for i in range(n):
        for j in range(m):
            out[i, j] = _rnd(g[i, j] * s, to_bf16)


@njit(cache=True)
def input_grad(gw, gxd, keep, has_keep, scale, to_bf16):
    """In place: ``gw = rnd(rnd(gw) + t)`` with ``t = rnd(gxd)``, and through the dropout mask
    ``t = rnd(rnd(gxd) · (keep · scale))`` — ∂L/∂x = G W + (∂L/∂H A) ⊙ M / (1-p), each term rounded."""
    n, m = gw.shape
    zero = np.float32(0.0)
    for i in range(n):
        for j in range(m):
            t = _rnd(gxd[i, j], to_bf16)
            if has_keep:
                t = _rnd(t * (scale if keep[i, j] else zero), to_bf16)
            gw[i, j] = _rnd(_rnd(gw[i, j], to_bf16) + t, to_bf16)


__all__ = ["adapter_output", "dropout_input", "frozen_output", "input_grad", "scaled"]
