"""AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization"), as ``torch.optim.AdamW`` computes it.

For each parameter ``p`` with gradient ``g``, at step ``t = 1, 2, ...``:

    p   <- p * (1 - lr * weight_decay)            decoupled weight decay (not added to the gradient)
    m   <- m + (1 - beta1) * (g - m)              = beta1 * m + (1 - beta1) * g   (torch's lerp)
    v   <- beta2 * v + (1 - beta2) * g * g
    p   <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

in float32, in the order of torch's single-tensor CPU implementation (``foreach=False``), with the bias
corrections computed in float64 like torch's Python scalars. NumPy rounds every operation once and exactly;
torch's CPU kernels fuse two of them (``lerp`` and ``addcmul`` use a fused multiply-add) and its vectorized
``sqrt`` is not always correctly rounded (about 1 value in 6 differs by one unit in the last place on AVX2),
so the two agree to float32 round-off, not bit for bit (tests/test_optim.py states the bound).

:func:`adamw_update` is the whole algorithm on arrays, in NumPy: the definition. :func:`adamw_update_fast` gives
the same bits in one Numba pass instead of about thirteen (the same float32 operations in the same order;
``tests/test_optim.py`` compares them bit for bit); :class:`AdamW` keeps the state per parameter and steps through
the fast one, and so does the paged AdamW (its pages are contiguous runs); the 8-bit optimizers call the definition.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ..dtypes import flat_float32
from .base import Optimizer, StateSpec

_F32 = np.float32


def lerp_(a: np.ndarray, b: np.ndarray, weight: float) -> None:
    """``a <- a + weight * (b - a)`` in place, with torch's two formulas (chosen by the weight's size)."""
    w = _F32(weight)
    if abs(weight) < 0.5:
        a += w * (b - a)
    else:
        a[...] = b - (b - a) * (_F32(1.0) - w)


def adamw_update(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step on float32 arrays of the same shape, all updated in place (``step`` counts from 1)."""
    if weight_decay != 0.0:
        param *= _F32(1.0 - lr * weight_decay)
    lerp_(exp_avg, grad, 1.0 - beta1)
    exp_avg_sq *= _F32(beta2)
    exp_avg_sq += (_F32(1.0 - beta2) * grad) * grad  # torch's addcmul: (value * g) * g
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    step_size = lr / bias_correction1
    denom = np.sqrt(exp_avg_sq) / _F32(math.sqrt(bias_correction2))
    denom += _F32(eps)
    param += (_F32(-step_size) * exp_avg) / denom  # torch's addcdiv: (value * m) / denom


# Numba's default error model checks every division for a zero divisor (to raise ZeroDivisionError), which keeps
# the loop from being vectorized; NumPy's (IEEE: x / 0 = ±inf or NaN) is what the definition does anyway.
@njit(cache=True, error_model="numpy")
def _adamw_pass(param, grad, exp_avg, exp_avg_sq, decay, decays, w1, small, beta2, c2, sqrt_bc2, eps, neg_step):
    one = np.float32(1.0)
    for i in range(param.size):
        p, g, m = param[i], grad[i], exp_avg[i]
        if decays:
            p = p * decay
        m = m + w1 * (g - m) if small else g - (g - m) * (one - w1)  # lerp_'s two formulas
        v = exp_avg_sq[i] * beta2 + (c2 * g) * g
        exp_avg[i], exp_avg_sq[i] = m, v
        param[i] = p + (neg_step * m) / (np.sqrt(v) / sqrt_bc2 + eps)


def adamw_update_fast(param, grad, exp_avg, exp_avg_sq, step: int, lr: float, beta1: float, beta2: float,
                      eps: float, weight_decay: float) -> None:
    """:func:`adamw_update`, the same bits, in one pass for C-contiguous float32 arrays of one shape (else the
    definition itself): every scalar is the float32 the definition multiplies by."""
    arrays = (param, grad, exp_avg, exp_avg_sq)
    if not flat_float32(*arrays):
        adamw_update(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay)
        return
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    _adamw_pass(*(a.reshape(-1) for a in arrays), _F32(1.0 - lr * weight_decay), weight_decay != 0.0,
                _F32(1.0 - beta1), abs(1.0 - beta1) < 0.5, _F32(beta2), _F32(1.0 - beta2),
                _F32(math.sqrt(bias_correction2)), _F32(eps), _F32(-(lr / bias_correction1)))


class AdamW(Optimizer):
    """AdamW with float32 states ``exp_avg`` (m) and ``exp_avg_sq`` (v): torch's names, torch's arithmetic.

    Defaults are torch's (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2). The QLoRA recipe uses
    lr 2e-4 (1e-4 above 13B), betas (0.9, 0.999) and weight decay 0.0 (the paper's scripts' default).
    """

    #: the names of m and v in the state (``PagedAdamW`` uses bitsandbytes' ``state1``, ``state2``)
    STATE_KEYS = ("exp_avg", "exp_avg_sq")

    def state_layout(self, shape):
        return {k: StateSpec(np.dtype(np.float32)) for k in self.STATE_KEYS}

    def update_chunk(self, param, grad, states, step):
        m, v = self.STATE_KEYS
        adamw_update_fast(param, grad, states[m], states[v], step, self.lr,
                          self.betas[0], self.betas[1], self.eps, self.weight_decay)
