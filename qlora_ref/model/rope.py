"""Rotary position embeddings (Su et al. 2021) in the Hugging Face layout ("rotate half").

Each head vector x of size D is split into halves (x1, x2); position p rotates the pair (x1[i], x2[i]) by the
angle p * inv_freq[i]:

    y = x * cos + rotate_half(x) * sin,       rotate_half(x) = concat(-x2, x1)
    cos = cos(concat(p * inv_freq, p * inv_freq)), likewise sin

Backward: the rotation is orthogonal, so the gradient is rotated back by -p * inv_freq. rotate_half is the
linear map R with R^T = -R, hence dx = g * cos + R^T (g * sin) = g * cos - rotate_half(g * sin).

inv_freq[i] = 1 / theta^(2i / D); the Llama 3 scaling (``rope_type="llama3"``) divides the low frequencies by
``factor``, keeps the high ones and interpolates between; ``"linear"`` divides all of them by ``factor``. YaRN
(``"yarn"``, Peng et al. 2023, "YaRN: Efficient Context Window Extension", section 3.2 "NTK-by-parts" and eq. 21)
does the same by dimension rather than wavelength — dimensions that turn more than ``beta_fast`` times over the
original context are kept, those turning fewer than ``beta_slow`` times are divided by ``factor``, a linear ramp
between — and scales cos and sin by an attention factor (0.1 ln(factor) + 1 unless given), which multiplies
every attention logit q·k by its square. These follow transformers' ``modeling_rope_utils`` and are computed in
float32 as it does.
"""

from __future__ import annotations

import math

import numpy as np


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """The D/2 inverse frequencies, float32, with the configured scaling applied."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    powers = np.power(np.float32(theta), exponents).astype(np.float32)  # theta^(2i/D)
    inv_freq = (np.float32(1.0) / powers).astype(np.float32)
    rope_type = None if scaling is None else scaling.get("rope_type", "default")
    if rope_type in (None, "default"):
        return inv_freq
    factor = np.float32(scaling["factor"])
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type == "llama3":
        low_freq_factor = float(scaling["low_freq_factor"])
        high_freq_factor = float(scaling["high_freq_factor"])
        old_context = float(scaling["original_max_position_embeddings"])
        low_freq_wavelen = old_context / low_freq_factor
        high_freq_wavelen = old_context / high_freq_factor
        wavelen = np.float32(2 * math.pi) / inv_freq
        # long wavelengths (low frequencies) are slowed down by `factor`, short ones kept
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
        # in between, a smooth interpolation of the two
        smooth = ((old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)).astype(np.float32)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    if rope_type == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling, powers)
    raise ValueError(f"unknown rope_type {rope_type!r}")


def _yarn_inv_freq(head_dim: int, theta: float, scaling: dict, powers: np.ndarray) -> np.ndarray:
    """YaRN's "NTK-by-parts" frequencies (Peng et al. 2023, section 3.2): dimension d turns
    r(d) = L / (2 pi theta^(2d/D)) times over the original context L; solving r(d) = beta for d gives the ramp's
    ends, rounded outwards (``truncate``, transformers' default). Below the ramp (fast dimensions) inv_freq is
    kept, above it divided by ``factor``."""
    factor = float(scaling["factor"])
    context = float(scaling["original_max_position_embeddings"])
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dim_turning(turns):  # the d with r(d) = turns
        return head_dim * math.log(context / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_turning(beta_fast), dim_turning(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    keep = (np.float32(1) - ramp.astype(np.float32)).astype(np.float32)
    # transformers builds both from the float32 powers theta^(2d/D): 1/x kept, 1/(factor x) interpolated
    interpolated = (np.float32(1) / (np.float32(factor) * powers)).astype(np.float32)
    return (interpolated * (np.float32(1) - keep) + (np.float32(1) / powers) * keep).astype(np.float32)


def rope_attention_factor(scaling: dict | None) -> float:
    """The factor cos and sin are multiplied by: 1, except under YaRN (Peng et al. 2023, eq. 21):
    ``attention_factor`` if given, else 0.1 ln(factor) + 1 — or, with DeepSeek's ``mscale`` and ``mscale_all_dim``,
    the ratio of (0.1 m ln(factor) + 1) for the two — as transformers computes it (1 for factor <= 1)."""
    if scaling is None or scaling.get("rope_type") != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = float(scaling["factor"])

    def mscale(m=1.0):
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return float(mscale(scaling["mscale"]) / mscale(scaling["mscale_all_dim"]))
    return mscale()


#: Meta's Llama 3.1-3.3 scaling beside its factor (8 or 32); llama.cpp's converter assumes the same values when it
#: writes the scaling into a GGUF file as per-frequency factors (``rope_freqs.weight``), and stores none of them
LLAMA3_ROPE_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def llama3_scaling_from_rope_freqs(rope_freqs: np.ndarray, head_dim: int, theta: float) -> dict | None:
    """The ``rope_scaling`` of a GGUF file's ``rope_freqs.weight`` — llama.cpp divides each inverse frequency by
    its factor, so the factors are ``inv_freq / inv_freq_scaled`` — when they are Llama 3's scaling with Meta's
    values (``LLAMA3_ROPE_DEFAULTS``, the factor their largest); None when they are anything else."""
    factors = np.asarray(rope_freqs, dtype=np.float64).reshape(-1)
    if factors.shape != (head_dim // 2,) or not np.all(np.isfinite(factors)) or factors.min() <= 0:
        return None
    scaling = {"rope_type": "llama3", "factor": float(factors.max()), **LLAMA3_ROPE_DEFAULTS}
    expected = rope_inv_freq(head_dim, theta).astype(np.float64) / rope_inv_freq(head_dim, theta, scaling)
    return scaling if np.allclose(factors, expected, rtol=1e-5, atol=0) else None


class RotaryEmbedding:
    """Cosine and sine tables for given positions; ``apply``/``backward`` rotate head vectors."""

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict | None = None):
        self.head_dim = head_dim
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling)
        self.attention_factor = rope_attention_factor(scaling)

    def cos_sin(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin of shape positions.shape + (head_dim,), float32, times the attention factor (1 but for YaRN)."""
        freqs = np.asarray(positions, dtype=np.float32)[..., None] * self.inv_freq
        emb = np.concatenate([freqs, freqs], axis=-1)
        cos, sin = np.cos(emb), np.sin(emb)
        if self.attention_factor != 1.0:  # float32 products, as transformers' ``emb.cos() * attention_scaling``
            cos, sin = cos * np.float32(self.attention_factor), sin * np.float32(self.attention_factor)
        return cos, sin


def rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate x (..., T, D) by the angles whose cos/sin (T, D) are given: ``x * cos + rotate_half(x) * sin``.

    Computed half by half without building ``rotate_half(x)``: x1·cos1 + (−x2)·sin1 is x1·cos1 − x2·sin1 and the
    second half x2·cos2 + x1·sin2, the same float32 operations (negation is exact), so the same bits
    (``tests/test_fast_paths.py``)."""
    half = x.shape[-1] // 2
    out = x * cos
    t = x[..., half:] * sin[..., :half]
    out[..., :half] -= t
    np.multiply(x[..., :half], sin[..., half:], out=t)
    out[..., half:] += t
    return out


def apply_rope_backward(grad: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """The gradient with respect to the input of ``apply_rope``: rotate back, ``grad * cos −
    rotate_half(grad * sin)``, half by half as in ``apply_rope`` (g1·cos1 + g2·sin2, g2·cos2 − g1·sin1)."""
    half = grad.shape[-1] // 2
    out = grad * cos
    t = grad[..., half:] * sin[..., half:]
    out[..., :half] += t
    np.multiply(grad[..., :half], sin[..., :half], out=t)
    out[..., half:] -= t
    return out
