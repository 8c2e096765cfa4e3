"""RMSNorm (Zhang & Sennrich 2019), as Llama computes it: in float32, y = w * (x / sqrt(mean(x^2) + eps)).

Backward (derivation in docs/transformer.md). With r = (mean(x^2) + eps)^(-1/2), x_hat = x r and the
upstream gradient g scaled by the weight, gw = g * w:

    dx = r * (gw - x_hat * mean(gw * x_hat))        (means over the last axis)
    dw = sum over all rows of g * x_hat

The weight is frozen in QLoRA, so dw is computed only with ``weight_grad=True`` (into ``grad_weight``: the layer
test checks it against torch); a QLoRA step skips its two passes over the activations.
"""

from __future__ import annotations

import numpy as np


class RMSNorm:
    """RMSNorm with a hand-written backward (docs/transformer.md#rmsnorm)."""

    def __init__(self, weight: np.ndarray, eps: float = 1e-6, weight_grad: bool = False):
        self.weight = np.ascontiguousarray(weight)
        self.eps = float(eps)
        self.weight_grad = bool(weight_grad)
        self.grad_weight = None
        self._x_hat = None
        self._r = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(self.eps))
        x_hat = x * r
        self._x_hat, self._r = x_hat, r
        return self.weight * x_hat

    def backward(self, grad: np.ndarray) -> np.ndarray:
        x_hat, r = self._x_hat, self._r
        gw = grad * self.weight
        if self.weight_grad:
            self.grad_weight = np.sum((grad * x_hat).reshape(-1, x_hat.shape[-1]), axis=0)
        return r * (gw - x_hat * np.mean(gw * x_hat, axis=-1, keepdims=True))

    def clear_cache(self) -> None:
        self._x_hat = self._r = None
