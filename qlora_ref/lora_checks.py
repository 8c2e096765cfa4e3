"""The QLoRA layer's argument rules (``qlora_ref.lora.QLoRALinear``), shared with ``qlora_gpu.QLoRALinear`` so that
both backends accept and refuse the same layers with the same words. Each takes plain facts — numbers, shapes,
names — never arrays, so that NumPy and torch callers pass the same things."""

from __future__ import annotations

import math
import warnings
from numbers import Real

import numpy as np

#: the computation data types: bfloat16 (QLoRA's, section 3) and float32 (exact)
COMPUTE_DTYPES = ("float32", "bfloat16")
#: the implementations of the frozen-weight products (``qlora_ref.lora``'s docstring); "fused" is the default
KERNELS = ("fused", "naive")


def check_lora_config(r, alpha, dropout) -> tuple[int | None, float, float]:
    """Validate (r, alpha, dropout). ``r=None`` means a frozen layer without adapter (alpha is then unused)."""
    if r is not None:
        if isinstance(r, bool) or not isinstance(r, int | np.integer) or r <= 0:
            raise ValueError(f"r (the LoRA rank) must be a positive integer, or None for a layer without adapter; "
                             f"got {r!r}")
        r = int(r)
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite positive number (the update is scaled by alpha / r), got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    return r, float(alpha), float(dropout)


def check_compute_dtype(compute_dtype) -> str:
    name = str(compute_dtype).removeprefix("torch.")
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype!r}")
    return name


def check_weight_shape(shape) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or min(shape) <= 0:
        raise ValueError(f"the base weight must be a non-empty 2-D (out_features, in_features) matrix, got shape "
                         f"{shape}")
    return shape


def check_bias_shape(shape, out_features: int) -> None:
    if tuple(shape) != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},) (out_features), got {tuple(shape)}")


def check_adapter_shape(name: str, shape, in_features: int, out_features: int, r: int | None) -> None:
    """``lora_A`` must be (r, in_features), ``lora_B`` (out_features, r); a layer with r=None has neither."""
    if r is None:
        raise ValueError(f"this layer has no adapter (r=None): cannot set {name}")
    expected = (r, in_features) if name == "lora_A" else (out_features, r)
    if tuple(shape) != expected:
        what = "(r, in_features)" if name == "lora_A" else "(out_features, r)"
        raise ValueError(f"{name} must have shape {what} = {expected}, got {tuple(shape)}")


def check_input_shape(shape, in_features: int) -> None:
    if len(shape) == 0 or shape[-1] != in_features:
        raise ValueError(f"input must have last dimension in_features={in_features}, got shape {tuple(shape)}")


def check_grad_shape(shape, expected) -> None:
    if tuple(shape) != tuple(expected):
        raise ValueError(f"grad_y must have the shape of the forward output {tuple(expected)}, got {tuple(shape)}")


def check_dropout_mask(mask_shape, x_shape, active: bool) -> None:
    if not active:
        raise ValueError("dropout_mask was given but dropout is inactive (dropout=0, no adapter, or eval mode)")
    if tuple(mask_shape) != tuple(x_shape):
        raise ValueError(f"dropout_mask must have the input's shape {tuple(x_shape)}, got {tuple(mask_shape)}")


#: the deprecation message of ``matmul=``, the old name of ``kernel=``
MATMUL_RENAMED = "QLoRALinear's matmul option is now named kernel (the same values: 'fused', 'naive')"


def check_kernel(kernel) -> str:
    """``kernel`` is one of ``KERNELS``."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return kernel


def renamed_kernel(kernel: str, matmul: str | None) -> str:
    """``kernel``, or the value given under its deprecated name ``matmul`` (with a ``DeprecationWarning``)."""
    if matmul is None:
        return kernel
    warnings.warn(MATMUL_RENAMED, DeprecationWarning, stacklevel=3)
    return matmul



def float_array(a, name: str) -> np.ndarray:
    """``a`` as a NumPy float array (float16, bfloat16, float32 or float64; not converted yet)."""
    try:
        arr = np.asarray(a)
    except Exception as e:  # e.g. a torch tensor that needs .numpy() on another device
        raise ValueError(f"{name} must be a NumPy float array, got {type(a).__name__}") from e
    if arr.dtype.kind != "f" and arr.dtype.name != "bfloat16":
        raise ValueError(f"{name} must be a float array, got dtype {arr.dtype}")
    return arr


__all__ = ["COMPUTE_DTYPES", "KERNELS", "MATMUL_RENAMED", "check_adapter_shape", "check_bias_shape",
           "check_compute_dtype", "check_dropout_mask", "check_grad_shape", "check_input_shape", "check_kernel",
           "check_lora_config", "check_weight_shape", "float_array", "renamed_kernel"]
