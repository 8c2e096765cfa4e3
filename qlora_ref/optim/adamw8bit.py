"""AdamW with 8-bit states (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization").

Between steps the two Adam states are stored in 8 bits with blockwise dynamic quantization (blocks of 256
elements, one float32 absmax per block), which shrinks them from 8 to about 2.03 bytes per parameter:

- ``m`` (``state1``, signed) with the signed dynamic map,
- ``v`` (``state2``, never negative) with the *unsigned* dynamic map, which spends all 256 codes on [0, 1],

exactly the maps bitsandbytes' ``Adam8bit``/``AdamW8bit``/``PagedAdamW8bit`` use (``qmap1 =
create_dynamic_map(signed=True)``, ``qmap2 = create_dynamic_map(signed=False)``). A step is

    m, v  <- dequantize(state1, absmax1), dequantize(state2, absmax2)        float32
    AdamW step on (p, g, m, v)                                               exactly :func:`adamw_update`
    state1, absmax1 <- quantize(m);  state2, absmax2 <- quantize(v)          back to 8 bits

Parameters with fewer than ``min_8bit_size`` (4096, bitsandbytes' default) elements keep float32 states, as in
bitsandbytes (the savings would be nothing and the error largest there).

One deliberate difference, ``keep_v_positive`` (on by default): the dynamic map's smallest positive level is
3.25e-7 of the block's absmax, so exact-nearest rounding stores a smaller ``v`` as exactly 0. The next step then
sees ``v = (1 - beta2) g^2`` while ``m`` still carries momentum, and the update ``m / (sqrt(v) + eps)`` can be
tens of times too large — on a quadratic whose gradients shrink at different rates within a block this makes
8-bit Adam oscillate and diverge. bitsandbytes' CUDA kernel (``quantize_2D``) rounds such values to 0 too;
its CPU lookup table happens to round them up. The reference stores a positive ``v`` at least as the smallest
positive code, which can only make an update smaller. ``keep_v_positive=False`` gives the exact-nearest
(CUDA-like) behaviour.

The quantization is the project's quantization core (``qlora_ref.blockwise`` with
``qlora_ref.codebooks.dynamic_map``; for the signed map it is ``quantize_blockwise_8bit``), so values go to the
exactly nearest code. Where this differs from bitsandbytes 0.50 (checked on its CPU backend):

- bitsandbytes' CPU kernel finds codes through a lookup table that is not exact-nearest (its code's error
  exceeds the nearest one's by up to about 2^-15 of the block absmax: a small fraction of codes one or more steps
  off for Gaussian states, up to half of them where ``v`` spans many orders of magnitude and the map is finer than
  the table), so states — and through them parameters — differ slightly; the tests state the bound per step.
  Its CUDA kernel quantizes inside the fused update kernel; the maps, blocks and formula are the same.
- bitsandbytes' CUDA kernel nudges an ``m`` whose code would have the wrong sign (a tiny negative value
  rounded to the zero code) to the neighbouring negative code; the reference keeps the exactly nearest code.
- bitsandbytes updates ``m`` as ``m * beta1 + g * (1 - beta1)``, the reference as torch's lerp (one rounding
  apart); its CUDA kernel applies the weight decay after the Adam update instead of before (a difference of
  order lr^2 * weight_decay); its ``percentile_clipping`` and ``max_unorm`` options are not implemented here.
"""

from __future__ import annotations

import numpy as np

from .. import blockwise
from ..codebooks import dynamic_map
from .adamw import adamw_update
from .base import Optimizer, StateSpec
from .paged import PagedOptimizer

#: block size of the state quantization (bitsandbytes' blockwise 8-bit optimizers use 256)
STATE_BLOCKSIZE = 256
#: parameters smaller than this keep 32-bit states (bitsandbytes' ``min_8bit_size``)
MIN_8BIT_SIZE = 4096

_U8 = np.dtype(np.uint8)
_F32 = np.dtype(np.float32)


def _signed_map() -> np.ndarray:
    return dynamic_map(signed=True)


def _unsigned_map() -> np.ndarray:
    return dynamic_map(signed=False)


class AdamW8bit(Optimizer):
    """AdamW whose states live in 8 bits between steps (bitsandbytes' ``AdamW8bit``; the state keys are its
    names: ``state1``/``absmax1`` for m, ``state2``/``absmax2`` for v, and ``qmap1``/``qmap2`` in the state dict)."""

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, min_8bit_size: int = MIN_8BIT_SIZE,
                 keep_v_positive: bool = True, **kwargs):
        super().__init__(lr, betas, eps, weight_decay, **kwargs)
        self.min_8bit_size = int(min_8bit_size)
        #: store a positive v at least as the smallest positive code, never as 0 (see the module docstring)
        self.keep_v_positive = bool(keep_v_positive)

    def is_8bit(self, shape) -> bool:
        return int(np.prod(shape, dtype=np.int64)) >= self.min_8bit_size

    def state_layout(self, shape):
        if not self.is_8bit(shape):
            return {"state1": StateSpec(_F32), "state2": StateSpec(_F32)}
        return {
            "state1": StateSpec(_U8),
            "absmax1": StateSpec(_F32, STATE_BLOCKSIZE),
            "state2": StateSpec(_U8),
            "absmax2": StateSpec(_F32, STATE_BLOCKSIZE),
        }

    def update_chunk(self, param, grad, states, step):
        b1, b2 = self.betas
        if states["state1"].dtype == _F32:
            adamw_update(param, grad, states["state1"], states["state2"], step, self.lr, b1, b2, self.eps,
                         self.weight_decay)
            return
        codes1, codes2 = states["state1"].reshape(-1), states["state2"].reshape(-1)
        m = blockwise.dequantize_codes(codes1, states["absmax1"], _signed_map(), STATE_BLOCKSIZE)
        v = blockwise.dequantize_codes(codes2, states["absmax2"], _unsigned_map(), STATE_BLOCKSIZE)
        shape = param.shape
        adamw_update(param, grad, m.reshape(shape), v.reshape(shape), step, self.lr, b1, b2, self.eps,
                     self.weight_decay)
        codes1[:], states["absmax1"][:] = blockwise.quantize_codes(m, _signed_map(), STATE_BLOCKSIZE, tiny=None)
        codes2[:], states["absmax2"][:] = blockwise.quantize_codes(v, _unsigned_map(), STATE_BLOCKSIZE, tiny=None)
        if self.keep_v_positive:
            codes2[(codes2 == 0) & (v > 0)] = 1  # unsigned map: code 0 is 0.0, code 1 the smallest positive value

    def dequantized_states(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(m, v) of a parameter in float32, as the next step will see them."""
        state = self.state[name]
        s1, s2 = self._read_state(state, "state1"), self._read_state(state, "state2")
        if s1.dtype == _F32:
            return s1.copy(), s2.copy()
        a1, a2 = self._read_state(state, "absmax1"), self._read_state(state, "absmax2")
        m = blockwise.dequantize_codes(s1.reshape(-1), a1, _signed_map(), STATE_BLOCKSIZE)
        v = blockwise.dequantize_codes(s2.reshape(-1), a2, _unsigned_map(), STATE_BLOCKSIZE)
        return m.reshape(state["shape"]), v.reshape(state["shape"])

    def state_dict(self):
        out = super().state_dict()
        for name, state in self.state.items():
            if self.is_8bit(state["shape"]):
                out[f"{name}.qmap1"] = np.array(_signed_map())
                out[f"{name}.qmap2"] = np.array(_unsigned_map())
        return out

    def load_state_dict(self, state_dict):
        d = dict(state_dict)
        for key in [k for k in d if k.endswith((".qmap1", ".qmap2"))]:
            expected = _signed_map() if key.endswith("1") else _unsigned_map()
            if not np.array_equal(np.asarray(d.pop(key), dtype=np.float32), expected):
                raise ValueError(f"{key!r} is not the dynamic 8-bit map this optimizer decodes with")
        super().load_state_dict(d)


class PagedAdamW8bit(PagedOptimizer, AdamW8bit):
    """:class:`AdamW8bit` with its states in pages under a simulated device budget (bitsandbytes'
    ``PagedAdamW8bit``); bit-identical to :class:`AdamW8bit` whatever the budget."""
