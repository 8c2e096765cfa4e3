"""Floating-point formats: names, conversions and the bfloat16 rounding that QLoRA computes in.

QLoRA stores weights in 4 bits but computes in bfloat16 (paper, section 3, "QLoRA": the storage data type is
NF4, the computation data type is BFloat16). The reference emulates that by rounding float32 values to the
nearest bfloat16 (round-to-nearest-even, as torch's ``.to(torch.bfloat16)`` does) and accumulating in float32.

``round_to_definition`` is the definition (a round trip through ml_dtypes' bfloat16).
``round_to`` computes the same values by integer arithmetic on the float32 bits in one (serial) Numba pass
(``bf16_bits``: add 0x7FFF plus the lowest kept bit, drop the low 16 bits), optionally in place;
``tests/test_fast_paths.py`` proves the two equal bit for bit, NaN, infinities, ties and subnormals included.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from numba import njit

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


def host_array(a) -> np.ndarray:
    """``a`` as a NumPy array: NumPy as it is; a torch tensor (the GPU backend's, on any device, trainable or not)
    detached and copied to the host (torch itself is not imported here)."""
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)


def to_numpy_dtype(dtype) -> np.dtype:
    """The NumPy dtype for a float format given by name or dtype."""
    return FLOAT_DTYPES[dtype_name(dtype)]


def flat_float32(*arrays) -> bool:
    """Whether every array is a C-contiguous float32 ndarray of the first one's shape: then a fused Numba pass over
    their flat views (``reshape(-1)``, no copies) applies; otherwise the callers compute their NumPy definition."""
    shape = arrays[0].shape if isinstance(arrays[0], np.ndarray) else None
    return all(isinstance(a, np.ndarray) and a.dtype == np.float32 and a.flags.c_contiguous and a.shape == shape
               for a in arrays)


def round_to_definition(x: np.ndarray, compute_dtype: str) -> np.ndarray:
    """The definition of ``round_to``: to float32, then a round trip through the compute dtype's NumPy/ml_dtypes
    type: for bfloat16 the nearest bfloat16 (ties to even), the one rounding step of QLoRA's bfloat16 compute, kept
    in float32 so that products and sums accumulate in float32 as a tensor core does. float32 returns ``x`` itself
    when it is already float32."""
    name = dtype_name(compute_dtype)
    x = np.asarray(x, dtype=np.float32)
    if name == "float32":
        return x
    return x.astype(FLOAT_DTYPES[name]).astype(np.float32)


@njit(inline="always")
def bf16_bits(v):
    """The bfloat16 bit pattern (uint16) nearest to float32 ``v``, ties to even; a NaN becomes the quiet NaN of
    its sign, as ml_dtypes (Eigen) does. The carry of the addition rounds up into the exponent, so a value past
    the largest bfloat16 becomes infinity and a subnormal rounds like any other value.

    Compiled into the kernels of ``fused_matmul``, ``lora_kernels`` and ``kernels``, whose Numba cache is keyed by
    their own files only: after editing this function, delete ``qlora_ref/__pycache__/*.nbi`` and ``*.nbc``."""
    bits = np.uint32(np.float32(v).view(np.uint32))
    if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16(((bits >> np.uint32(16)) & np.uint32(0x8000)) | np.uint32(0x7FC0))
    return np.uint16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(inline="always")
def bf16_round(v):
    """float32 ``v`` rounded to the nearest bfloat16, as float32 (the value ``round_to_definition`` gives)."""
    return np.uint32(np.uint32(bf16_bits(v)) << np.uint32(16)).view(np.float32)


@njit(cache=True)
def _round_bf16_flat(x, out):
    for i in range(x.size):
        out[i] = bf16_round(x[i])


def round_to(x: np.ndarray, compute_dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Round to the compute dtype ("bfloat16", "float16" or "float32"), returning float32.

    ``x`` is first converted to float32 (one rounding from float64), then rounded once to the compute dtype.
    ``out``: a C-contiguous float32 array of x's shape to write into (it may be ``x`` itself: in place); without
    it, bfloat16 and float16 return a new array and float32 returns ``x`` itself when it is already float32.
    """
    name = dtype_name(compute_dtype)
    x = np.asarray(x, dtype=np.float32)
    if out is not None and (out.dtype != np.float32 or out.shape != x.shape or not out.flags.c_contiguous):
        raise ValueError(f"out must be a C-contiguous float32 array of shape {x.shape}, got {out.dtype} "
                         f"{out.shape}")
    if name == "bfloat16":
        if out is None:
            out = np.empty(x.shape, np.float32)
        _round_bf16_flat(np.ascontiguousarray(x).reshape(-1), out.reshape(-1))
        return out
    if name == "float16":
        x = x.astype(np.float16).astype(np.float32)
    if out is None:
        return x
    if out is not x:
        np.copyto(out, x)
    return out
