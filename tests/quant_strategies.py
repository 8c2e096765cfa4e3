"""Hypothesis strategies for tensors to quantize: shapes that do and do not divide the block size, the three float
dtypes, heavy tails, all-zero blocks and tiny magnitudes."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch
from hypothesis import strategies as st

DTYPES = ("float32", "float16", "bfloat16")
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

shapes = st.one_of(
    st.tuples(st.integers(1, 3000)),
    st.tuples(st.integers(1, 64), st.integers(1, 300)),
    st.tuples(st.integers(1, 4), st.integers(1, 16), st.integers(1, 70)),
)
distributions = st.sampled_from(["normal", "student_t", "zero_blocks", "tiny", "outliers", "uniform"])


@st.composite
def tensors(draw, dtypes=DTYPES):
    """(float32 array holding values exactly representable in ``dtype``, dtype name)."""
    shape = draw(shapes)
    dtype = draw(st.sampled_from(dtypes))
    kind = draw(distributions)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = int(np.prod(shape))
    if kind == "normal":
        x = rng.standard_normal(n) * draw(st.sampled_from([1e-2, 1.0, 40.0]))
    elif kind == "student_t":  # heavy tails, like real weight outliers
        x = rng.standard_t(2, n)
    elif kind == "zero_blocks":
        x = rng.standard_normal(n)
        x[rng.random(n) < 0.5] = 0.0
        x[: min(n, 64 * draw(st.integers(0, 3)))] = 0.0
    elif kind == "tiny":
        x = rng.standard_normal(n) * (1e-30 if dtype == "float32" else 1e-5)
    elif kind == "outliers":
        x = rng.standard_normal(n)
        x[rng.integers(0, n, size=max(1, n // 100))] *= 100.0
    else:
        x = rng.uniform(-1, 1, n)
    if dtype == "float16":
        x = np.clip(x, -6e4, 6e4)
    x = x.astype(np.float32).reshape(shape)
    return x.astype(NUMPY_DTYPES[dtype]).astype(np.float32), dtype


def as_numpy(x: np.ndarray, dtype: str) -> np.ndarray:
    return x.astype(NUMPY_DTYPES[dtype])


def as_torch(x: np.ndarray, dtype: str) -> torch.Tensor:
    return torch.from_numpy(x.copy()).to(getattr(torch, dtype))


def same_bits_or_both_zero(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical float32 values, except that +0 and -0 count as equal (bitsandbytes' C++ FP4 dequantize
    writes -0.0 for nibble 8 where its own table holds +0.0: docs/quantization.md)."""
    a = np.asarray(a, np.float32).reshape(-1)
    b = np.asarray(b, np.float32).reshape(-1)
    if a.shape != b.shape:
        return False
    nonzero = (a != 0) | (b != 0)
    same_nonzero = np.array_equal(a.view(np.int32)[nonzero], b.view(np.int32)[nonzero])
    return bool(same_nonzero and np.all(a[~nonzero] == b[~nonzero]))
