"""Argument checks shared by both backends, so the reference and the GPU backend reject the same inputs with the
same messages. They take plain facts (shape, dtype name, a finiteness flag), never arrays of one library."""

from __future__ import annotations

import numbers

import numpy as np

from .dtypes import FLOAT_DTYPES

#: the 4-bit types of bitsandbytes' storage format: the one set both backends, the loaders and the memory calculator use
QUANT_TYPES_4BIT = ("nf4", "fp4")
#: 4-bit types the reference can quantize to (Table 2 comparisons); bitsandbytes' storage format holds nf4/fp4
REFERENCE_QUANT_TYPES_4BIT = ("nf4", "fp4", "int4", "fp4_e3m0")
BLOCKSIZES_4BIT = tuple(2**k for k in range(5, 13))  # 32 .. 4096
BLOCKSIZES_8BIT = tuple(2**k for k in range(6, 13))  # 64 .. 4096


def check_blocksize(blocksize, allowed: tuple[int, ...] = BLOCKSIZES_4BIT, name: str = "blocksize") -> int:
    """``blocksize`` as a Python int: any integer type (``np.int64`` from shape arithmetic too), never a bool or a
    float, one of ``allowed``."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral) or int(blocksize) not in allowed:
        raise ValueError(f"{name} must be a power of two from {allowed[0]} to {allowed[-1]}, got {blocksize!r}")
    return int(blocksize)


def check_bool(value, name: str) -> bool:
    """A flag that must be True or False (``np.bool_`` too): a string such as "no" is truthy and would silently mean
    yes."""
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_quant_type(quant_type, allowed: tuple[str, ...] = QUANT_TYPES_4BIT) -> str:
    if quant_type not in allowed:
        raise ValueError(f"quant_type must be one of {', '.join(map(repr, allowed))}, got {quant_type!r}")
    return quant_type


def check_float_input(name: str, dtype_name: str, size: int, all_finite: bool) -> None:
    """The tensor to quantize: a non-empty float32/float16/bfloat16 array of finite values."""
    if dtype_name not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got dtype {dtype_name}")
    if size == 0:
        raise ValueError(f"{name} is empty: there is nothing to quantize")
    if not all_finite:
        raise ValueError(
            f"{name} contains NaN or Inf: absmax scaling would turn its whole block into NaN "
            "(bitsandbytes does so silently); clean the weights first"
        )


def double_quant_overflow_error(largest: float) -> ValueError:
    """Double quantization rebuilds each block's scale in float32 as dyn8[code] · c1 + mean (eq. 6 with the mean);
    for weights within a few ulps of the float32 maximum that sum can round to inf, and the block would dequantize
    to inf and NaN. Both backends refuse with this error (``largest``: the largest |x|)."""
    return ValueError(f"x: double quantization overflows: a block scale rebuilt in float32 (8-bit code x second-level "
                      f"scale + mean) exceeds the float32 maximum 3.4e38 (the largest |x| is {largest:.3g}), so the "
                      "block would dequantize to inf and NaN. Quantize with double_quant=False, or scale x down")
