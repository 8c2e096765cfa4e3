"""The LoRA dropout keep-mask: M = (U >= p) with U uniform on [0, 1), P(keep) = 1 - p (the paper's LoRA dropout,
Appendix A.1 and B.2: 0.1 up to 13B, 0.05 above).

The definition draws U as NumPy's ``Generator.random(shape, dtype=float32)`` and compares. That call makes each
float from one 32-bit word of the generator, ``U = (w >> 8) · 2⁻²⁴`` (numpy's ``next_float``), and PCG64 serves the
32-bit words as the low then the high half of each 64-bit output. So ``U >= p`` is ``(w >> 8) >= ⌈p · 2²⁴⌉`` on
integers (U is a multiple of 2⁻²⁴, and p · 2²⁴ is exact in float64), and the words can be taken 64 bits at a time
from ``bit_generator.random_raw`` — the same mask and the same generator state afterwards, in half the time
(the float path calls the generator once per element).

That rests on numpy's internals (the float construction, the order of the halves), so ``draw_keep`` takes the
fast path only where it has been checked, in this process, to give what the definition gives, and otherwise
draws by the definition; ``tests/test_dropout.py`` checks the two against each other.
"""

from __future__ import annotations

import math
import sys

import numpy as np
from numba import njit


def keep_mask_definition(rng: np.random.Generator, shape, p: float) -> np.ndarray:
    """M = (U >= p), U ~ ``rng.random(shape, float32)``: the definition of the keep-mask, boolean of ``shape``."""
    return rng.random(shape, dtype=np.float32) >= np.float32(p)


@njit(cache=True)
def _keep_from_words(words, threshold, out):
    for i in range(words.size):
        out[i] = (words[i] >> np.uint32(8)) >= threshold


def _threshold(p: float) -> np.uint32:
    """⌈p · 2²⁴⌉, with p first rounded to float32 as the definition compares against ``float32(p)``."""
    return np.uint32(math.ceil(float(np.float32(p)) * 2.0**24))


def _draw_from_words(rng: np.random.Generator, shape, p: float) -> np.ndarray:
    bits = rng.bit_generator
    n = math.prod(shape)
    words = bits.random_raw(n // 2).view(np.uint32)  # little-endian: the low half of each output first
    keep = np.empty(n, np.bool_)
    _keep_from_words(words, _threshold(p), keep)
    if n:  # the float path leaves the last high half in the (unused) uinteger field: the same state, field for field
        state = bits.state
        state["uinteger"] = int(words[-1])
        bits.state = state
    return keep.reshape(shape)


def _usable(rng: np.random.Generator, n: int) -> bool:
    """The word path applies: PCG64, an even count, no half-word buffered, little-endian, and checked here."""
    bits = rng.bit_generator
    if type(bits) is not np.random.PCG64 or n % 2 or sys.byteorder != "little":
        return False
    state = bits.state
    return "uinteger" in state and state.get("has_uint32", 1) == 0 and _word_path_agrees()


_AGREES: bool | None = None


def _word_path_agrees() -> bool:
    """Once per process: the word path against the definition on a fixed generator (masks and states)."""
    global _AGREES
    if _AGREES is None:
        ok = True
        try:
            for seed, shape, p in ((0, (6, 10), 0.1), (1, (3, 2, 64), 0.5), (2, (1, 4096), 0.05)):
                a, b = np.random.default_rng(seed), np.random.default_rng(seed)
                a.random(3, dtype=np.float32)  # a buffered half, spent: both paths start from has_uint32 = 0
                b.random(3, dtype=np.float32)
                a.random(1, dtype=np.float32)
                b.random(1, dtype=np.float32)
                ok &= bool(np.array_equal(keep_mask_definition(a, shape, p), _draw_from_words(b, shape, p)))
                ok &= a.bit_generator.state == b.bit_generator.state
        except (KeyError, TypeError, ValueError):  # a numpy whose generator state has another form
            ok = False
        _AGREES = ok
    return _AGREES


def draw_keep(rng: np.random.Generator, shape, p: float) -> np.ndarray:
    """The keep-mask of ``keep_mask_definition`` — the same bits, the same generator state after — drawn from the
    generator's 64-bit words where that has been checked to hold (module docstring)."""
    shape = tuple(int(s) for s in shape)
    if _usable(rng, math.prod(shape)):
        return _draw_from_words(rng, shape, p)
    return keep_mask_definition(rng, shape, p)
