"""Floating-point formats: names, conversions and the bfloat16 rounding that QLoRA computes in.

QLoRA stores weights in 4 bits but computes in bfloat16 (paper, section 3, "QLoRA": the storage data type is
NF4, the computation data type is BFloat16). The reference emulates that by rounding float32 values to the
nearest bfloat16 (round-to-nearest-even, as torch's ``.to(torch.bfloat16)`` does) and accumulating in float32.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

bfloat16 = np.dtype(ml_dtypes.bfloat16)

#: the float formats a weight may have, by the names torch and bitsandbytes' quant state use
FLOAT_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": bfloat16}


def dtype_name(dtype) -> str:
    """The name ("float32", "float16", "bfloat16") of a NumPy/ml_dtypes dtype, a torch dtype or a name."""
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
    else:
        name = str(dtype).removeprefix("torch.")
        if name not in FLOAT_DTYPES:
            try:
                name = np.dtype(dtype).name
            except TypeError:
                pass
    if name not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(FLOAT_DTYPES)}, got {dtype!r}")
    return name


def to_numpy_dtype(dtype) -> np.dtype:
    """The NumPy dtype for a float format given by name or dtype."""
    return FLOAT_DTYPES[dtype_name(dtype)]


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest bfloat16 (ties to even) and return them as float32.

    This is the one rounding step of QLoRA's bfloat16 compute: the value is representable in bfloat16,
    but kept in float32 so that products and sums accumulate in float32 like a tensor core does.
    """
    return np.asarray(x, dtype=np.float32).astype(bfloat16).astype(np.float32)


def round_to(x: np.ndarray, compute_dtype: str) -> np.ndarray:
    """Round to the compute dtype ("bfloat16", "float16" or "float32"), returning float32."""
    name = dtype_name(compute_dtype)
    x = np.asarray(x, dtype=np.float32)
    if name == "float32":
        return x
    return x.astype(FLOAT_DTYPES[name]).astype(np.float32)
