"""The 4-bit data types of QLoRA (paper, section 3) and the dynamic 8-bit type used for double quantization.

A *codebook* is the list of values a k-bit code can stand for, normalised to [-1, 1]. Quantization maps a
(scaled) value to the index of its nearest codebook entry; dequantization looks the value up again.

- NF4, NormalFloat (section 3, "4-bit NormalFloat Quantization"): pretrained weights are roughly N(0, σ), and
  after absmax scaling every block lives in [-1, 1]. Quantile quantization is information-theoretically optimal
  for such data: with the codes at quantiles, each bin holds the same probability mass (an idealisation:
  blockwise absmax scaling skews it, docs/quantization.md). NF4 uses the quantiles of N(0, 1), asymmetrically so
  that zero is represented exactly: the paper's 2^(k-1) negative and 2^(k-1) + 1 positive quantiles, each set
  with a zero, one zero removed — 2^(k-1) positive levels, 2^(k-1) - 1 negative ones and 0.
- FP4 (E2M1 and E3M0) and Int4: the baselines of the paper's Table 2.
- The dynamic 8-bit map (Dettmers 2016, "8-Bit Approximations for Parallelism in Deep Learning", ICLR; arXiv
  1511.04561): a sign, a run of zeros giving a decimal exponent, then a linear fraction. bitsandbytes' double
  quantization stores the 4-bit absmax constants with it, where the paper says "8-bit Floats" (FP8).
"""

from __future__ import annotations

from functools import cache

import numpy as np
from scipy.stats import norm

#: bitsandbytes' quantile offset δ₄ for 4 bits (``create_normal_map``; the paper states no δ): the 7-decimal literal
#: of ½((1 - 1/(2·15)) + (1 - 1/(2·16))) = 0.96770833…. The two are one float32 ulp apart, and that ulp changes 12
#: of the 16 NF4 values, so k = 4 uses the literal, not the formula (``normal_float_offset``)
NF4_OFFSET = 0.9677083

#: bitsandbytes' E2M1 FP4 table, indexed by nibble (sign bit, 2 exponent bits, 1 mantissa bit), before
#: normalisation. Nibble 8 is the sign bit with a zero magnitude: bitsandbytes' table holds +0.0 there too
#: (its source writes the integer ``-0``), so both zeros dequantize to +0.0.
_FP4_E2M1 = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]
#: symmetric Int4, indexed by nibble (7..0, 0..-7; two codes for zero). bitsandbytes' 4-bit storage has no Int4
#: (its ``create_linear_map(total_bits=4)`` is an 8-bit-map layout); this nibble order is the reference's own, and
#: only the set of values matters for Table 2
_INT4 = [7, 6, 5, 4, 3, 2, 1, 0, 0.0, -1, -2, -3, -4, -5, -6, -7]


def linspace_float32(start: float, stop: float, num: int, fused: bool = True) -> np.ndarray:
    """``num`` evenly spaced float32 values, rounded exactly as ``torch.linspace(..., dtype=torch.float32)``.

    The codebooks are defined by such grids, and the bitsandbytes tables were built with torch; reproducing its
    rounding (a float32 step, then start + step·i for the first half and stop - step·(num-1-i) for the second)
    gives bit-identical codebooks. torch's CPU kernels differ in one detail: the vectorised ones (AVX2, AVX-512)
    fuse the multiply-add, each value rounded once (``fused=True``, the reference's definition); the scalar
    kernel (x86 without AVX2, or ``ATEN_CPU_CAPABILITY=default``) rounds step·i to float32 first, then the sum
    (``fused=False``). ``qlora_gpu.hardware.torch_linspace_rounding`` says which one a machine's torch takes.
    """
    start32, stop32 = np.float32(start), np.float32(stop)
    if num < 2:  # torch: [] or [start]
        return np.full(num, start32)
    step32 = np.float32((stop32 - start32) / np.float32(num - 1))
    i = np.arange(num)
    if fused:  # in float64 step·i is exact, and for these grids the sum too: one rounding, the fused one
        step = np.float64(step32)
        first_half, second_half = start32 + step * i, stop32 - step * (num - 1 - i)
    else:
        first_half = start32 + step32 * i.astype(np.float32)
        second_half = stop32 - step32 * (num - 1 - i).astype(np.float32)
    return np.where(i < num // 2, first_half, second_half).astype(np.float32)


def normal_float_offset(bits: int) -> float:
    """The quantile offset δ for k-bit NormalFloat (bitsandbytes; not in the paper).

    N(0,1) has infinite quantiles at 0 and 1, so the outermost levels are taken at δ and 1 - δ: the average of
    the centres of the outermost bins of a 2^k - 1 and a 2^k grid, ½(1 - 1/(2(2^k - 1)) + 1 - 1/(2·2^k)).
    For k = 4 this returns bitsandbytes' literal 0.9677083, the formula's 0.96770833… truncated to 7 decimals:
    the two differ by one float32 ulp, and that ulp changes 12 of the 16 NF4 values, so only the literal gives
    bitsandbytes' table. The paper states no δ (section 3 gives eq. 4 and the two-range construction only). The
    formula for other k is this project's extension (neither the paper nor bitsandbytes defines NF-k for k ≠ 4).
    """
    if bits == 4:
        return NF4_OFFSET
    n = 2**bits
    return 0.5 * ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n)))


def normal_float_codebook(bits: int = 4) -> np.ndarray:
    """k-bit NormalFloat (NFk) codebook, k = 2..8, ascending float32 values in [-1, 1] (section 3).

    The paper's eq. 4, q_i = ½ (Q_X(i / (2^k + 1)) + Q_X((i + 1) / (2^k + 1))), is the symmetric estimate, which
    has no exact zero. Computed here instead is what bitsandbytes' table (= the paper's Appendix E values) holds,
    which the paper's two-range prose is consistent with but does not spell out: one quantile of N(0, 1) per
    level, no averaging, at evenly spaced probabilities from δ down to ½ —
    2^(k-1) positive levels and 2^(k-1) - 1 negative ones (the paper's 2^(k-1) + 1 and 2^(k-1) quantiles, each
    ending in Q_X(½) = 0), plus one exact 0 so that zero padding and zero weights quantize without error; then
    divided by the largest value so the codebook spans [-1, 1]. For k = 4 these are bitsandbytes' NF4 values bit
    for bit; k ≠ 4 is this project's extension.
    """
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")
    # a plain int: NumPy's own integers compute 2**bits in their width (np.int8(8) overflows) and would be
    # cache keys equal to the int
    return _normal_float_codebook(int(bits))


@cache
def _normal_float_codebook(bits: int) -> np.ndarray:
    """``normal_float_codebook``'s table for a plain ``int`` k (computed once per k)."""
    half = 2 ** (bits - 1)
    delta = normal_float_offset(bits)
    positive = norm.ppf(linspace_float32(delta, 0.5, half + 1)[:-1])  # half levels, largest first
    negative = -norm.ppf(linspace_float32(delta, 0.5, half)[:-1])  # half - 1 levels
    values = np.sort(np.concatenate([positive, [0.0], negative]).astype(np.float32))
    values = values / values.max()
    values.setflags(write=False)
    return values


@cache
def codebook(name: str) -> np.ndarray:
    """The 16 float32 values of a 4-bit data type, indexed by the 4-bit code (nibble).

    ``"nf4"`` (ascending, so nibble order is value order), ``"fp4"`` (bitsandbytes' E2M1 layout: the nibble is
    sign · exponent · mantissa, so value order differs from nibble order), ``"int4"`` (symmetric integers / 7),
    ``"fp4_e3m0"`` (FP4 with 3 exponent bits and no mantissa: ±{0, 2⁻⁶, …, 2⁰}, for Table 2).
    """
    if name == "nf4":
        return normal_float_codebook(4)
    if name == "fp4":
        table = np.array(_FP4_E2M1, dtype=np.float32)
    elif name == "int4":
        table = np.array(_INT4, dtype=np.float32)
    elif name == "fp4_e3m0":
        # sign bit + 3 exponent bits; exponent 0 is zero, the others are 2^(e-7) of the largest power
        magnitudes = [0.0] + [2.0 ** (e - 7) for e in range(1, 8)]
        table = np.array(magnitudes + [-m or 0.0 for m in magnitudes], dtype=np.float32)  # +0, not -0
    else:
        raise ValueError(f"quant_type must be one of 'nf4', 'fp4', 'int4', 'fp4_e3m0', got {name!r}")
    table = table / np.abs(table).max()
    table.setflags(write=False)
    return table


@cache
def dynamic_map(signed: bool = True, fused: bool = True) -> np.ndarray:
    """The dynamic 8-bit data type: 256 ascending float32 values in [-1, 1] (Dettmers 2016; bitsandbytes'
    double quantization, QLoRA section 3, quantizes the absmax constants with it where the paper says FP8).

    For each decimal exponent e = -6 .. 0 the code has 2^(e+6) (signed) linear fraction steps in [0.1, 1]
    times 10^e: small magnitudes get few, coarse levels and magnitudes near 1 many fine ones — relative
    precision rather than absolute. The signed map has 127 levels per sign, 0 and +1 (no -1).

    bitsandbytes builds it with ``torch.linspace`` on the CPU, so its last bits follow that CPU's kernel
    (``linspace_float32``): the default ``fused=True`` is its map on every x86 CPU with AVX2; ``fused=False`` is
    the map of torch's scalar kernel, 42 signed entries 1-2 ulp apart (docs/quantization.md).
    """
    exponent_bits, value_bits = 7, 7  # total 8 bits with the sign
    data: list[np.ndarray] = []
    for i in range(exponent_bits):
        steps = 2 ** (i + value_bits - exponent_bits) if signed else 2 ** (i + value_bits - exponent_bits + 1)
        boundaries = linspace_float32(0.1, 1.0, steps + 1, fused)
        means = (boundaries[:-1] + boundaries[1:]) / np.float32(2)  # fraction levels: centres of the bins
        scale = np.float32(10.0 ** (i - (exponent_bits - 1)))
        data.append(scale * means)
        if signed:
            data.append(-scale * means)
    data.append(np.array([0.0, 1.0], dtype=np.float32))
    values = np.sort(np.concatenate(data).astype(np.float32))
    assert values.size == 256  # signed: 2·(1 + 2 + … + 64) + 2; unsigned: (2 + 4 + … + 128) + 2
    values.setflags(write=False)
    return values
