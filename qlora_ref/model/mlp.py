"""SwiGLU feed-forward (Shazeer 2020), as in Llama: down( silu(gate(x)) * up(x) ).

Backward, with a = silu(g) = g * sigmoid(g), h = a * u and dh the gradient arriving from ``down``:

    du = dh * a
    dg = dh * u * silu'(g),   silu'(g) = s + g * s * (1 - s) = s * (1 + g * (1 - s)),  s = sigmoid(g)
    dx = gate.backward(dg) + up.backward(du)
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit


class SwiGLU:
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
        dh = self.down_proj.backward(grad)
        du = dh * a
        # dg = dh * u * (s * (1 + g * (1 - s))), with one temporary: the same products and sums (IEEE addition
        # and multiplication commute), so the same bits
        t = 1 - s
        t *= g
        t += 1
        t *= s
        dg = dh * u
        dg *= t
        dx = self.gate_proj.backward(dg)
        dx += self.up_proj.backward(du)
        return dx

    def clear_cache(self) -> None:
        self._cache = None
