"""4-bit NormalFloat quantization with double quantization: the storage data type of QLoRA (paper, section 3).

``quantize_4bit`` turns a float weight into packed 4-bit codes plus per-block constants; ``dequantize_4bit``
turns it back (QLoRA does so on the fly, layer by layer, in every forward and backward pass: eq. 5-6).
Double quantization (section 3, "Double Quantization") quantizes the float32 absmax constants themselves with
the dynamic 8-bit type in blocks of 256, after subtracting their mean so the signed map is used symmetrically:
constants then cost 8/64 + 32/(64·256) = 0.127 bits per parameter instead of 32/64 = 0.5.
"""

from __future__ import annotations

import numpy as np

from . import blockwise, kernels
from .checks import (
    BLOCKSIZES_8BIT,
    REFERENCE_QUANT_TYPES_4BIT,
    check_blocksize,
    check_bool,
    check_float_input,
    check_quant_type,
    double_quant_overflow_error,
)
from .codebooks import codebook, dynamic_map
from .dtypes import bfloat16, dtype_name, host_array, to_numpy_dtype
from .quant_state import Quantized4bit, Quantized8bit

#: block size of the second-level (double) quantization of the absmax constants (section 3)
DOUBLE_QUANT_BLOCKSIZE = 256


def _as_float32_input(x, name: str = "x") -> tuple[np.ndarray, str]:
    """Flat float32 copy of ``x`` (a view when it already is float32) and its dtype name, after the shared checks."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy.ndarray (float32, float16 or bfloat16), got {type(x).__name__}")
    try:
        name_of_dtype = dtype_name(x.dtype)
    except ValueError:
        check_float_input(name, str(x.dtype), x.size, True)  # raises, naming the dtype
    flat = np.ascontiguousarray(x.reshape(-1), dtype=np.float32)
    check_float_input(name, name_of_dtype, x.size, bool(np.isfinite(flat).all()))
    return flat, name_of_dtype


def quantize_blockwise_8bit(x: np.ndarray, blocksize: int = 256) -> Quantized8bit:
    """Blockwise absmax quantization with the signed dynamic 8-bit map (section 2, eq. 1, with the nearest code of
    the map in place of rounding to an integer; Dettmers 2016).

    Each value goes to the exactly nearest code (bitsandbytes' CPU kernel uses a lookup table that is off by a
    few steps for ~0.1 % of values: see docs/quantization.md).
    """
    flat, name = _as_float32_input(x)
    blocksize = check_blocksize(blocksize, BLOCKSIZES_8BIT)
    code = dynamic_map(signed=True)
    codes, absmax = blockwise.quantize_codes(flat, code, blocksize, tiny=None)  # the true absmax, as bitsandbytes
    return Quantized8bit(codes.reshape(x.shape), absmax, code, blocksize, tuple(x.shape), name)


def _numpy_state8(q) -> Quantized8bit:
    """``q`` as a NumPy ``Quantized8bit``: the GPU backend's (torch tensors inside) converted, anything else refused."""
    if not isinstance(q, Quantized8bit):
        raise ValueError(f"q must be a Quantized8bit (quantize_blockwise_8bit's result), got {type(q).__name__}")
    if isinstance(q.codes, np.ndarray):
        return q
    return Quantized8bit(host_array(q.codes), host_array(q.absmax), host_array(q.code), int(q.blocksize),
                         tuple(q.shape), q.dtype)


def dequantize_blockwise_8bit(q: Quantized8bit) -> np.ndarray:
    """code[q] · absmax per block, in float32 (eq. 2), shaped like the original. The GPU backend's state (torch
    tensors) is converted first."""
    q = _numpy_state8(q)
    flat = blockwise.dequantize_codes(q.codes.reshape(-1), q.absmax, q.code, q.blocksize)
    return flat.reshape(q.shape)


def double_quantize(absmax: np.ndarray) -> tuple[np.ndarray, float, Quantized8bit]:
    """Quantize the first-level constants c2^FP32 (section 3, "Double Quantization").

    The absmax values are all positive, so they are centred by their mean before the signed 8-bit map is applied.
    The offset is their mean summed and divided in float64, then rounded to float32: the correctly rounded mean
    except where float64's own rounding decides a float32 tie (possible only when the scales span more than about
    29 binary orders of magnitude, which real weights do not). bitsandbytes sums in float32, in torch's order.
    Returns (the uint8 codes c2^FP8 (the paper's name; bitsandbytes uses the dynamic map, not an FP8 format),
    the offset, the 8-bit state holding those codes and the second-level float32 constants c1).
    """
    offset = np.float32(absmax.astype(np.float64).mean())
    state2 = quantize_blockwise_8bit(absmax - offset, DOUBLE_QUANT_BLOCKSIZE)
    return state2.codes, float(offset), state2


def quantize_4bit(
    x: np.ndarray, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True, *, kernel: str = "numba"
) -> Quantized4bit:
    """Quantize ``x`` (any shape; float32, float16 or bfloat16) to 4 bits blockwise (eq. 1 of section 2 with the
    NF4 codebook of section 3).

    ``quant_type``: "nf4" (QLoRA's), "fp4" (bitsandbytes' E2M1), or for comparisons "int4" / "fp4_e3m0".
    ``double_quant``: quantize the absmax constants too (section 3). ``kernel``: "numba" (fast, the default) or
    "numpy" (the readable definition in ``qlora_ref.blockwise``); both give identical bytes.
    """
    flat, name = _as_float32_input(x)
    check_quant_type(quant_type, REFERENCE_QUANT_TYPES_4BIT)
    blocksize = check_blocksize(blocksize)
    double_quant = check_bool(double_quant, "double_quant")
    code = codebook(quant_type)
    if kernel == "numba":
        packed, absmax = kernels.quantize_4bit_codes(flat, code, blocksize)
    elif kernel == "numpy":
        codes, absmax = blockwise.quantize_codes(flat, code, blocksize)
        pad_code = blockwise.nearest_code(np.zeros(1, np.float32), code)[0]  # bitsandbytes pads with 0's code
        packed = blockwise.pack_nibbles(codes, pad_code)
    else:
        raise ValueError(f"kernel must be 'numba' or 'numpy', got {kernel!r}")
    q = Quantized4bit(packed, absmax, tuple(x.shape), name, blocksize, quant_type, np.array(code))
    if double_quant:
        q.absmax, q.offset, q.state2 = double_quantize(absmax)
        if not np.isfinite(q.absmax_float32()).all():
            raise double_quant_overflow_error(float(absmax.max()))
    return q


def dequantize_4bit(q: Quantized4bit, dtype=None, *, kernel: str = "numba") -> np.ndarray:
    """Back to floats (eq. 2): ``float32(code[nibble] · absmax[block])``, rounded once to ``dtype`` (default: the
    original dtype; bfloat16 rounds to nearest even), shaped like the original tensor. The GPU backend's state
    (``qlora_gpu.Quantized4bit``, torch tensors) is converted first, through its ``state_dict``."""
    if not isinstance(q, Quantized4bit):
        raise ValueError(f"q must be a Quantized4bit (quantize_4bit's result), got {type(q).__name__}")
    q.check()  # its fields may have been changed since it was made
    if not isinstance(q.packed, np.ndarray):
        q = Quantized4bit.from_state_dict({k: host_array(v) for k, v in q.state_dict().items()})
    out_name = q.dtype if dtype is None else dtype_name(dtype)
    absmax = q.absmax_float32()
    if kernel == "numba" and out_name in ("float32", "bfloat16"):
        values = kernels.dequantize_4bit_values(q.packed, absmax, q.code, q.blocksize, q.numel, out_name == "bfloat16")
        values = values.view(bfloat16) if out_name == "bfloat16" else values
    elif kernel in ("numba", "numpy"):
        values = blockwise.dequantize_codes(q.codes(), absmax, q.code, q.blocksize).astype(to_numpy_dtype(out_name))
    else:
        raise ValueError(f"kernel must be 'numba' or 'numpy', got {kernel!r}")
    return values.reshape(q.shape)
