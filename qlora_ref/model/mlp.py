"""SwiGLU feed-forward (Shazeer 2020), as in Llama: down( silu(gate(x)) * up(x) ).

Backward, with a = silu(g) = g * sigmoid(g), h = a * u and dh the gradient arriving from ``down``:

    du = dh * a
    dg = dh * u * silu'(g),   silu'(g) = s + g * s * (1 - s) = s * (1 + g * (1 - s)),  s = sigmoid(g)
    dx = gate.backward(dg) + up.backward(du)
"""

from __future__ import annotations

import numpy as np
from numba import njit
from scipy.special import expit

from ..dtypes import flat_float32


@njit(cache=True)
def _swiglu_grads(dh, g, u, s, a, dg, du):
    """du = dh * a and dg = (dh * u) * (s * (1 + g * (1 - s))) in one pass, float32: the same products and sums as
    the NumPy expression (IEEE addition and multiplication commute), so the same bits."""
    one = np.float32(1.0)
    for i in range(dh.size):
        du[i] = dh[i] * a[i]
        dg[i] = (dh[i] * u[i]) * (s[i] * (one + g[i] * (one - s[i])))


def swiglu_grads(dh: np.ndarray, g: np.ndarray, u: np.ndarray, s: np.ndarray, a: np.ndarray) -> tuple:
    """(dg, du) of the module docstring; one Numba pass for float32 arrays of one shape, else NumPy."""
    if flat_float32(dh, g, u, s, a):
        dg, du = np.empty_like(dh), np.empty_like(dh)
        _swiglu_grads(*(x.reshape(-1) for x in (dh, g, u, s, a)), dg.reshape(-1), du.reshape(-1))
        return dg, du
    return dh * u * (s * (1 + g * (1 - s))), dh * a


class SwiGLU:
    """The SwiGLU feed-forward with a hand-written backward (docs/transformer.md#swiglu)."""

    def __init__(self, gate_proj, up_proj, down_proj):
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self._cache = None

    def linears(self) -> dict:
        return {"gate_proj": self.gate_proj, "up_proj": self.up_proj, "down_proj": self.down_proj}

    def forward(self, x: np.ndarray) -> np.ndarray:
        g = self.gate_proj.forward(x)
        u = self.up_proj.forward(x)
        s = expit(g)
        a = g * s
        self._cache = (g, u, s, a)
        return self.down_proj.forward(a * u)

    def backward(self, grad: np.ndarray) -> np.ndarray:
        g, u, s, a = self._cache
        dg, du = swiglu_grads(self.down_proj.backward(grad), g, u, s, a)
        dx = self.gate_proj.backward(dg)
        dx += self.up_proj.backward(du)
        return dx

    def clear_cache(self) -> None:
        self._cache = None
