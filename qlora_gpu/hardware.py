"""What this machine's torch does where its CPU kernels decide the last bits, detected rather than assumed.

bfloat16 matrix products. The reference computes a bfloat16 product as QLoRA's recipe defines it: the bfloat16
inputs multiplied and summed in float32, the sum rounded once (docs/lora_backprop.md). torch's CPU kernels do the
same on CPUs without bfloat16 instructions (they widen to float32); where oneDNN uses the CPU's native bfloat16 dot
products (AVX512-BF16, AMX) the products are still exact and summed in float32, but in another order and grouping,
so a sum near a bfloat16 rounding boundary can round the other way — the derived bound still holds, bit-identity
does not. ``bf16_gemm_is_float32`` tells which, per shape (oneDNN's choice depends on the sizes).

``torch.linspace``. bitsandbytes builds its dynamic 8-bit map (double quantization, 8-bit optimizer states) with
it on the CPU, and torch's vectorised kernels (AVX2, AVX-512) round each value once where its scalar kernel (x86
without AVX2, ``ATEN_CPU_CAPABILITY=default``) rounds twice (``qlora_ref.codebooks.linspace_float32``).
``torch_linspace_rounding`` and ``dynamic_map_status`` tell which, and what it does to bitsandbytes' map.
"""

from __future__ import annotations

import functools

import bitsandbytes.functional as bnbf
import numpy as np
import torch

from qlora_ref.codebooks import dynamic_map, linspace_float32


def _order_sensitive(m: int, k: int, seed: int) -> torch.Tensor:
    """(m, k) rows each holding 1, 2⁻⁸ and 2⁻²⁴ in a random order of positions: summed left to right in float32
    they give 1 + 2⁻⁸ (each 2⁻²⁴ is a tie that rounds away), which rounds to bfloat16 1; summed in any grouping
    that first adds two of the 2⁻²⁴ the sum is above the tie and rounds to 1 + 2⁻⁷. Any other summation order than
    the float32 kernel's shows in the rounded result of some row."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.full((m, k), 2.0**-24)
    rows[:, 0], rows[:, 1] = 1.0, 2.0**-8
    perm = torch.argsort(torch.rand(m, k, generator=g), dim=1)
    return torch.gather(rows, 1, perm)


#: what ``bf16_gemm_status`` says of a shape whose bfloat16 product is not the reference's float32 arithmetic
OTHER_SUM = "another summation (native bf16 or oneDNN's blocking)"


@functools.cache
def bf16_gemm_is_float32(m: int, k: int, n: int) -> bool:
    """Whether torch's CPU ``mm`` of bfloat16 (m, k) @ (k, n) — operands contiguous or transposed — gives the bits
    of the float32 ``mm`` of the same values rounded once to bfloat16, on order-sensitive inputs
    (``_order_sensitive``) and on random ones: the same arithmetic as the widening path. False where the bfloat16
    kernel sums in another order or grouping: oneDNN's native bfloat16 dot products on AVX512-BF16/AMX CPUs, and
    (seen on such a CPU with oneDNN capped at AVX2 by ``ONEDNN_MAX_CPU_ISA``) its own blocking."""
    g = torch.Generator().manual_seed(k)
    cases = [(_order_sensitive(m, k, 0), torch.ones(k, n)),
             (torch.randn(m, k, generator=g), torch.randn(k, n, generator=g))]
    for a, b in cases:
        a, b = a.to(torch.bfloat16), b.to(torch.bfloat16)
        want = torch.mm(a.float(), b.float()).to(torch.bfloat16)
        for x, y in ((a, b), (a.t().contiguous().t(), b), (a, b.t().contiguous().t())):
            if not torch.equal(torch.mm(x, y), want):
                return False
    return True


def bf16_gemm_status(shapes=((64, 64, 64), (512, 576, 1536))) -> str:
    """One line for ``qlora doctor``: per probed shape, the reference's float32 arithmetic or another summation."""
    parts = [f"{m}x{k}x{n}: {'float32 (as the reference)' if bf16_gemm_is_float32(m, k, n) else OTHER_SUM}"
             for m, k, n in shapes]
    return "; ".join(parts)


#: grids on which torch.linspace's two roundings differ (12 and 363 of their values)
_LINSPACE_PROBES = ((0.1, 1.0, 65), (-3.0, 7.5, 1001))


@functools.cache
def torch_linspace_rounding() -> str:
    """How this machine's torch rounds a float32 ``torch.linspace`` on the CPU: ``"fused"`` (each value rounded
    once, ``linspace_float32(fused=True)``: the vectorised AVX2/AVX-512 kernels), ``"two roundings"``
    (``fused=False``: the scalar kernel) or ``"other"`` (neither: a new kernel to look at)."""
    torch_bits = [torch.linspace(*a, dtype=torch.float32).numpy().view(np.int32) for a in _LINSPACE_PROBES]
    for name, fused in (("fused", True), ("two roundings", False)):
        if all(np.array_equal(t, linspace_float32(*a, fused=fused).view(np.int32))
               for t, a in zip(torch_bits, _LINSPACE_PROBES, strict=True)):
            return name
    return "other"


def dynamic_map_status() -> str:
    """One line for ``qlora doctor``: whether bitsandbytes' dynamic 8-bit maps here are the reference's."""
    diffs = [bnbf.create_dynamic_map(signed=s).numpy().view(np.int32).astype(np.int64)
             - dynamic_map(s).view(np.int32) for s in (True, False)]
    if not any(d.any() for d in diffs):
        return f"the reference's, bit for bit (torch.linspace: {torch_linspace_rounding()})"
    signed, unsigned = (int((d != 0).sum()) for d in diffs)
    return (f"{signed} signed and {unsigned} unsigned entries of 256 differ from the reference's, by at most "
            f"{max(int(abs(d).max()) for d in diffs)} ulp (torch.linspace: {torch_linspace_rounding()}); qlora_gpu's "
            "double quantization and 8-bit optimizer states use bitsandbytes' map")
