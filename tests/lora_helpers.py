"""Shared pieces of the QLoRA-layer tests: the agreement bound (docs/lora_backprop.md, "How close two backends
must be") and building the same layer in both backends.

The bound. Both backends round the same inputs the same way (x, W, A, B, b and ∂L/∂y to the compute dtype), then
run the same sequence of steps; each step is a matrix product accumulated in float32 over K terms and rounded
once, or an elementwise operation rounded once. Two implementations of a step can differ by the float32
accumulation order (each is within γ_K ≈ K·2⁻²⁴ of the exact sum of |terms|) and by the final rounding (each
within u·|result|, u = 2⁻⁸ for bfloat16, 2⁻²⁴ for float32); a difference already present in a step's input goes
through the step's linear map, whose absolute value is part of the magnitude below. So, to first order, for every
element z of an output or gradient::

    |z_1 − z_2| ≤ 2 · (d·u + K·2⁻²⁴) · M_z · (1 + u)^d

where d is the number of rounding steps on the longest path to z, K the sum of the reduction lengths along the
path, and M_z the same formula evaluated on absolute values (|x|·|W|ᵀ + |b| + s·|x_d|·|A|ᵀ·|B|ᵀ for y, ...).
The factor 2 is the two implementations; torch's CPU bfloat16 GEMM accumulates in float32 (tested below).
"""

from __future__ import annotations

import numpy as np

U = {"float32": 2.0**-24, "bfloat16": 2.0**-8}
U_ACC = 2.0**-24  # float32 accumulation inside matrix products


def magnitudes(x, w, b, a, bm, g, scaling, keep_scale):
    """M for y, ∂L/∂x, ∂L/∂A, ∂L/∂B (float64, 2-D: x (N, in), w (out, in), a (r, in), bm (out, r), g (N, out)).
    ``keep_scale`` is the dropout multiplier (N, in) or None; a, bm None for a layer without adapter."""
    x, w, g = (np.abs(np.asarray(t, np.float64)) for t in (x, w, g))
    m_y = x @ w.T + (0.0 if b is None else np.abs(np.asarray(b, np.float64)))
    m_gx = g @ w
    out = {"y": m_y, "x": m_gx}
    if a is not None:
        a, bm = np.abs(np.asarray(a, np.float64)), np.abs(np.asarray(bm, np.float64))
        ks = 1.0 if keep_scale is None else np.abs(np.asarray(keep_scale, np.float64))
        xd = x * ks
        h = xd @ a.T
        gh = abs(scaling) * (g @ bm)
        out["y"] = m_y + abs(scaling) * (h @ bm.T)
        out["x"] = m_gx + (gh @ a) * ks
        out["lora_A"] = gh.T @ xd
        out["lora_B"] = abs(scaling) * (g.T @ h)
    return out


def bound_constants(n_tokens: int, in_features: int, out_features: int, r: int | None) -> dict:
    """(d, K) per quantity: the rounding steps and the summed reduction lengths on the longest path."""
    r = r or 0
    return {
        # dropout, H = x_d Aᵀ, P = H Bᵀ, s·P, base + L (base: one product over in, one rounding)
        "y": (5, in_features + r + in_features),
        # G W; s·G, (s G) B, (..) A, mask, sum
        "x": (5, out_features + out_features + r),
        # s·G, (s G) B, (..)ᵀ x_d
        "lora_A": (3, out_features + n_tokens),
        # s·G, H = x_d Aᵀ, (s G)ᵀ H
        "lora_B": (3, in_features + n_tokens),
    }


def tolerance(name: str, m: np.ndarray, compute_dtype: str, n_tokens, in_features, out_features, r) -> np.ndarray:
    """Elementwise bound on the difference of two implementations (the formula in this module's docstring)."""
    d, k = bound_constants(n_tokens, in_features, out_features, r)[name]
    u = U[compute_dtype]
    return 2.0 * (d * u + k * U_ACC) * m * (1.0 + u) ** d


def assert_within_bound(name, got, expected, m, compute_dtype, n_tokens, in_features, out_features, r):
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    assert got.shape == expected.shape, (name, got.shape, expected.shape)
    tol = tolerance(name, m.reshape(got.shape), compute_dtype, n_tokens, in_features, out_features, r)
    err = np.abs(got - expected)
    bad = err > tol
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} of {bad.size} elements outside the bound; worst error {err.max():.3e}, "
        f"worst ratio error/bound {np.max(err / np.maximum(tol, 1e-300)):.3f}"
    )


# ------------------------------------------------------------------ bfloat16 rounding steps, checked bit for bit
def small_integer_layer_inputs(n_tokens: int, in_features: int, out_features: int, r: int, seed: int = 0):
    """W, x, ∂L/∂y, A, B with integer entries |v| <= 15 (4 significant bits) and a dropout keep-mask: every float32
    product and partial sum of a layer on them is an exact integer below 2**24, so its value does not depend on the
    summation order, and bit identity with :func:`bf16_stepwise_oracle` is provable on any CPU and BLAS."""
    rng = np.random.default_rng(seed)

    def ints(*shape):
        return rng.integers(-15, 16, shape).astype(np.float32)

    W, x, gy = ints(out_features, in_features), ints(n_tokens, in_features), ints(n_tokens, out_features)
    A, B = ints(r, in_features), ints(out_features, r)
    return W, x, gy, A, B, rng.random((n_tokens, in_features)) >= 0.5


def bf16(a: np.ndarray) -> np.ndarray:
    """Round to the nearest bfloat16 (ties to even) with torch's conversion — independent of ml_dtypes and of the
    Numba kernel that qlora_ref rounds with. ``a`` must be exact in float32 (checked), so one rounding happens."""
    import torch

    a32 = np.asarray(a).astype(np.float32)
    assert np.array_equal(a32, a), "the oracle's value is not exact in float32"
    return torch.from_numpy(a32).to(torch.bfloat16).to(torch.float64).numpy()


def exact_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b in float64 on integer-valued inputs whose every partial sum is an integer below 2**24 in magnitude, so
    the float32 product a layer computes is exact in any summation order and equals this one (checked)."""
    assert np.array_equal(a, np.round(a)) and np.array_equal(b, np.round(b))
    assert (np.abs(a) @ np.abs(b)).max() < 2.0**24
    return a.astype(np.float64) @ b.astype(np.float64)


def bf16_stepwise_oracle(x, W, A, B, gy, keep, s: float, drop: float, round_gh: bool = True):
    """The QLoRA layer in bfloat16 (eq. 5 and its backward, docs/lora_backprop.md), one explicit rounding after each
    step, in float64 on the inputs of :func:`small_integer_layer_inputs`: y, ∂L/∂x, ∂L/∂A, ∂L/∂B. The scaling s
    multiplies the rounded adapter product (forward) and the upstream gradient (backward); ∂L/∂H = (s G) B is
    rounded before its two uses unless ``round_gh`` is False (the mutant the tests show to differ)."""
    xd = bf16(x * keep * drop)
    h = bf16(exact_dot(xd, A.T))
    y = bf16(bf16(exact_dot(x, W.T)) + bf16(bf16(exact_dot(h, B.T)) * s))
    gs = bf16(gy * s)
    grad_b = bf16(exact_dot(gs.T, h))
    gh = exact_dot(gs, B)
    if round_gh:
        gh = bf16(gh)
    grad_a = bf16(exact_dot(gh.T, xd))
    gxd = bf16(bf16(exact_dot(gh, A)) * keep * drop)
    gx = bf16(bf16(exact_dot(gy, W)) + gxd)
    return y, gx, grad_a, grad_b
