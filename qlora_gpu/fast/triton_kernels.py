r"""Triton kernels for the QLoRA linear layer: the 4-bit weight dequantized in registers, inside the matrix product.

The layer (paper, section 3, eq. 5-6; docs/lora_backprop.md), x (N, in), W (out, in) stored in 4 bits::

    y    = x · dequant(W)ᵀ + b + s · (x_d Aᵀ) Bᵀ                x_d = x ⊙ M · 1/(1-p)
    ∂L/∂x = G · dequant(W) + ((s G B) A) ⊙ M · 1/(1-p)          G = ∂L/∂y

bitsandbytes' unfused path (``bnb.matmul_4bit`` forward, ``dequantize_4bit`` + GEMM backward) runs each product
with W in two steps: a kernel dequantizes the whole weight into a bfloat16 (out, in) buffer in global memory, then
cuBLAS reads that buffer back. The buffer costs 2 bytes per weight written and 2 read, against the 0.5 byte per
weight of the 4-bit codes (+ 4/blocksize for the scales): for a 4096 × 4096 layer 32 MiB written and 32 MiB read
where 8 MiB of codes would do, twice per training step (forward, and again backward), plus a transient 32 MiB
allocation. At 512 tokens a 4096 × 4096 bfloat16 product is ~17 GFLOP against 64 MiB of buffer traffic: on a
current data-centre GPU the buffer costs about as much time as the product itself. (bitsandbytes' forward may pick
its own fused kernel instead, by a per-architecture heuristic; docs/fused_kernels.md.)

Two kernels remove it. Each program owns one output tile and walks the reduction dimension; for every step it
loads the packed bytes of a weight tile, unpacks the nibbles, looks the codes up in the 16-entry codebook,
multiplies by the block's absmax (float32, the bitsandbytes arithmetic: ``float32(code[nibble] · absmax[block])``,
rounded once to the compute dtype) and feeds the tile to ``tl.dot`` — the dequantized weight only ever lives in
registers/shared memory:

- ``fused_linear_forward``: y = x Wᵀ + b (+ s · H Bᵀ in the epilogue, H = x_d Aᵀ (N, r) computed beforehand by
  torch: it is r/out of the base product, and fusing it would recompute it once per output tile). Adding the
  adapter in the epilogue saves the (N, out) intermediates P = H Bᵀ and s·P and the sum base + L: three (N, out)
  tensors written and read again in the unfused path — 4 MiB each at 512 tokens × 4096 in bfloat16.
- ``fused_grad_input``: ∂L/∂x = G W (+ ((s G B) A) ⊙ M/(1-p) in the epilogue, s G B (N, r) computed beforehand).
  Same saving of the dequantized buffer, plus the (N, in) adapter term and the masked copy of it.

The small adapter products (H, ∂L/∂A = (s G B)ᵀ x_d, ∂L/∂B = (s G)ᵀ H) stay torch GEMMs: they are r/out of the work
and read x_d and G once each, which no fusion improves.

Rounding. In ``compute_dtype="bfloat16"`` the kernels round where the unfused torch graph rounds (a bfloat16 tensor
per step: base = bf16(x Wᵀ + b), P = bf16(H Bᵀ), L = bf16(s P), y = bf16(base + L); backward alike, see
docs/lora_backprop.md), with float32 accumulation inside ``tl.dot`` — so fused and unfused differ only by the
summation order, the difference bounded in tests/lora_helpers.py. Epilogue roundings use an integer
round-to-nearest-even (``_round_bf16``), exact on every backend including Triton's CPU interpreter, whose
``.to(tl.bfloat16)`` does not round to nearest. ``dot_f32=True`` feeds float32 operands holding the bfloat16
values to ``tl.dot`` (products of bfloat16 numbers are exact in float32: the same result as a bfloat16 tensor-core
dot up to the summation order); that is the interpreter's mode (its bfloat16 ``tl.dot`` is wrong) and a fallback.
``compute_dtype="float32"`` uses IEEE float32 dots (no TF32).

Tested against the unfused bitsandbytes path (tests/test_triton_kernels.py) on CPU under ``TRITON_INTERPRET=1``
(float32, and bfloat16 with ``dot_f32``) and on CUDA (native bfloat16 included). Slower than the unfused path where
measured (docs/fused_kernels.md), hence ``QLoRALinear(kernel="triton")`` is opt-in.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl
from packaging.version import Version

from qlora_ref.checks import QUANT_TYPES_4BIT

from ..quantize import decode_absmax

#: True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1`` set before this module was imported)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's CPU interpreter of this version cannot run the kernels with this NumPy, or None. Triton before
    3.7 (3.6.0 is torch 2.11's pin) turns a scalar kernel argument into a one-element array and calls ``int`` on
    it in ``range(0, K, BLOCK_K)``; NumPy 2.4 refuses that conversion ("only 0-dimensional arrays ...")."""
    if Version(triton_version).release < (3, 7) and Version(numpy_version).release >= (2, 4):
        return (f"Triton's CPU interpreter {triton_version} cannot run under NumPy {numpy_version} (it converts "
                "one-element arrays to int, which NumPy 2.4 refuses): pip install 'triton>=3.7' or 'numpy<2.4'")
    return None


# --------------------------------------------------------------------------------------------------------------
# Device functions
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _round_bf16(v):
    """float32 → nearest bfloat16 (ties to even), kept in float32: integer arithmetic on the bit pattern, exact on
    GPUs and in the interpreter alike (finite values; ±inf stay; a NaN stays a NaN)."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    bits = (bits >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot(acc, a, b, BF16: tl.constexpr, DOT_F32: tl.constexpr):
    """acc + a · b, float32 accumulation. Operands hold values of the compute dtype: bfloat16 tensor-core
    operands (``BF16`` and not ``DOT_F32``), else float32 operands and an IEEE float32 dot (no TF32) — float32
    compute, or bfloat16 values held in float32, the interpreter's mode."""
    if BF16 and not DOT_F32:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    else:
        out = acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return out


@triton.jit
def _dequant_tile(packed_ptr, absmax_ptr, code_ptr, rows, cols, in_features, numel, log2_blocksize):
    """W[rows, cols] in float32 (any 2-D broadcast of row and column indices), zero outside the weight.

    bitsandbytes' layout (qlora_ref/blockwise.py): the weight flattened row-major, element i in byte i // 2, the
    even element in the high nibble; block i // blocksize scaled by absmax[i // blocksize]; value
    float32(code[nibble] · absmax). The block size is a power of two (32 … 4096): the block index is a shift."""
    idx = rows * in_features + cols
    valid = (rows >= 0) & (cols < in_features) & (idx < numel)
    byte = tl.load(packed_ptr + (idx >> 1), mask=valid, other=0).to(tl.int32)
    nibble = (byte >> (4 - 4 * (idx & 1))) & 0xF
    value = tl.load(code_ptr + nibble)
    scale = tl.load(absmax_ptr + (idx >> log2_blocksize), mask=valid, other=0.0)
    return value * scale


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _forward_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, bias_ptr, h_ptr, b_ptr, y_ptr,
    M, N, K, R, numel, log2_blocksize, scaling,
    stride_xm, stride_hm, stride_bn, stride_ym,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, BF16: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y[m, n] = Σ_k x[m, k] W[n, k] + b[n] + s · Σ_r H[m, r] B[n, r]; one (BLOCK_M, BLOCK_N) tile per program."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        # Wᵀ tile (BLOCK_K, BLOCK_N); rows past N are masked by -1 (treated as outside the weight)
        rows = tl.where(n_ok, offs_n, -1)
        w = _dequant_tile(packed_ptr, absmax_ptr, code_ptr, rows[None, :], offs_k[:, None], K, numel, log2_blocksize)
        if BF16 and DOT_F32:
            w = _round_bf16(w)  # (a tensor-core dot rounds its operand to bfloat16 itself)
        acc = _dot(acc, x, w, BF16, DOT_F32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if BF16:
        acc = _round_bf16(acc)  # base = bf16(x Wᵀ + b): one rounding after the bias, as F.linear
    if HAS_LORA:
        p = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < R
            h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :],
                        other=0.0)
            bt = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None], mask=r_ok[:, None] & n_ok[None, :],
                         other=0.0)
            p = _dot(p, h, bt, BF16, DOT_F32)
        if BF16:
            acc = _round_bf16(acc + _round_bf16(_round_bf16(p) * scaling))  # y = bf16(base + bf16(s · bf16(P)))
        else:
            acc = acc + p * scaling
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _grad_input_kernel(
    g_ptr, packed_ptr, absmax_ptr, code_ptr, gh_ptr, a_ptr, keep_ptr, out_ptr,
    M, N, K, R, numel, log2_blocksize, keep_scale,
    stride_gm, stride_ghm, stride_ar, stride_keepm, stride_om,
    HAS_LORA: tl.constexpr, HAS_MASK: tl.constexpr, BF16: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """∂x[m, k] = Σ_n G[m, n] W[n, k] + (Σ_r GH[m, r] A[r, k]) · M[m, k] · keep_scale; a (BLOCK_M, BLOCK_K) tile
    of ∂L/∂x per program, the reduction over out_features (N) in steps of BLOCK_N."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    k_ok = offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :], mask=m_ok[:, None] & n_ok[None, :],
                    other=0.0)
        rows = tl.where(n_ok, offs_n, -1)
        w = _dequant_tile(packed_ptr, absmax_ptr, code_ptr, rows[:, None], offs_k[None, :], K, numel, log2_blocksize)
        if BF16 and DOT_F32:
            w = _round_bf16(w)
        acc = _dot(acc, g, w, BF16, DOT_F32)
    if BF16:
        acc = _round_bf16(acc)  # g_x = bf16(G W)
    if HAS_LORA:
        q = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < R
            gh = tl.load(gh_ptr + offs_m[:, None] * stride_ghm + offs_r[None, :],
                         mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :],
                        other=0.0)
            q = _dot(q, gh, a, BF16, DOT_F32)
        if BF16:
            q = _round_bf16(q)  # g_xd = bf16((∂L/∂H) A)
        if HAS_MASK:
            keep = tl.load(keep_ptr + offs_m[:, None] * stride_keepm + offs_k[None, :],
                           mask=m_ok[:, None] & k_ok[None, :], other=0)
            q = q * tl.where(keep != 0, keep_scale, 0.0)
            if BF16:
                q = _round_bf16(q)  # bf16(g_xd · M · f32(1/(1-p)))
        acc = acc + q
        if BF16:
            acc = _round_bf16(acc)  # ∂x = bf16(g_x + g_xd)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_k[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & k_ok[None, :])


# --------------------------------------------------------------------------------------------------------------
# The 4-bit weight as the kernels read it
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Weight4bit:
    """A bitsandbytes 4-bit weight in the form the kernels read: ``packed`` (flat uint8, two codes per byte, high
    nibble first), ``absmax`` (float32, one per block of ``blocksize`` flat elements — double quantization already
    decoded), ``code`` (the 16 float32 code values), and the (out, in) shape."""

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    out_features: int
    in_features: int
    blocksize: int

    def __post_init__(self):
        if self.blocksize <= 0 or self.blocksize & (self.blocksize - 1):
            raise ValueError(f"blocksize must be a power of two, got {self.blocksize}")

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def log2_blocksize(self) -> int:
        return self.blocksize.bit_length() - 1


def weight_from_bnb(weight: torch.Tensor, quant_state) -> Weight4bit:
    """``Weight4bit`` view of a bitsandbytes ``Params4bit`` (or packed tensor) and its ``QuantState``."""
    if quant_state.quant_type not in QUANT_TYPES_4BIT:
        raise ValueError(f"quant_state.quant_type must be one of {QUANT_TYPES_4BIT}, got {quant_state.quant_type!r}")
    out_f, in_f = (int(s) for s in quant_state.shape)
    packed = weight.data.view(torch.uint8).reshape(-1)
    if packed.numel() != (out_f * in_f + 1) // 2:
        raise ValueError(f"weight holds {packed.numel()} bytes; a ({out_f}, {in_f}) 4-bit weight needs "
                         f"{(out_f * in_f + 1) // 2}")
    if out_f * in_f >= 2**31:
        raise ValueError(f"weights of 2**31 or more elements are not supported (int32 indexing), got {out_f}x{in_f}")
    return Weight4bit(packed, decode_absmax(quant_state), quant_state.code.float().contiguous(), out_f, in_f,
                      int(quant_state.blocksize))


# --------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------


def _config(m: int, n_out: int, k_red: int, r: int, block: tuple[int, int, int] | None, f32_dot: bool):
    """(BLOCK_M, output tile, reduction step, BLOCK_R, num_warps, num_stages). A fixed heuristic, no autotuning,
    and few distinct configurations (each is a compilation): 128 × 128 output tiles and steps of 64 for bfloat16
    operands (64 rows for at most 64 tokens), 64 × 64 tiles, steps of 32 and 2 stages for float32 operands (twice
    the bytes per tile in shared memory). ``block`` overrides the three tile sizes."""
    if block is not None:
        bm, bo, bk = block
        for b in block:
            if b < 16 or b & (b - 1):
                raise ValueError(f"block sizes must be powers of two >= 16 (tl.dot), got {block}")
    elif f32_dot:
        bm, bo, bk = (32 if m <= 32 else 64), 64, 32
    else:
        bm, bo, bk = (64 if m <= 64 else 128), 128, 64
    br = 16 if r <= 16 else 64
    warps = 8 if bm * bo >= 128 * 128 else 4
    return bm, bo, bk, br, warps, (2 if f32_dot else 3)


def _check_operand(t: torch.Tensor, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype} (the compute dtype), got {t.dtype}")
    return t.contiguous()


def _check_device(*tensors: torch.Tensor) -> None:
    dev = tensors[0].device
    if dev.type != "cuda" and not INTERPRET:
        raise ValueError("the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before importing "
                         f"qlora_gpu.fast.triton_kernels, for Triton's CPU interpreter); got tensors on {dev}")
    if dev.type != "cuda" and (problem := interpreter_problem(triton.__version__, np.__version__)):
        raise RuntimeError(problem)
    for t in tensors:
        if t is not None and t.device != dev:
            raise ValueError(f"all operands must be on one device; got {dev} and {t.device}")


def _on_device(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current CUDA device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _compute_flags(dtype: torch.dtype, dot_f32: bool | None) -> tuple[bool, bool]:
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the compute dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    bf16 = dtype == torch.bfloat16
    return bf16, (INTERPRET if dot_f32 is None else bool(dot_f32))


def fused_linear_forward(x: torch.Tensor, w: Weight4bit, bias: torch.Tensor | None = None,
                         h: torch.Tensor | None = None, lora_b: torch.Tensor | None = None, scaling: float = 0.0, *,
                         dot_f32: bool | None = None, block: tuple[int, int, int] | None = None) -> torch.Tensor:
    """y = x · dequant(W)ᵀ + b + s · h · Bᵀ in x's dtype (float32 or bfloat16), x (N, in), h (N, r), B (out, r).

    ``dot_f32``: feed float32 operands to ``tl.dot`` (default: only under the interpreter). ``block``: (BLOCK_M,
    BLOCK_N, BLOCK_K) tile sizes, powers of two ≥ 16."""
    _check_device(x, w.packed, w.absmax, w.code)
    bf16, dot32 = _compute_flags(x.dtype, dot_f32)
    n_tok = x.shape[0]
    x = _check_operand(x, "x", (n_tok, w.in_features), x.dtype)
    has_lora = h is not None
    r = 0
    if has_lora:
        r = h.shape[1]
        h = _check_operand(h, "h", (n_tok, r), x.dtype)
        lora_b = _check_operand(lora_b, "lora_b", (w.out_features, r), x.dtype)
    if bias is not None:
        bias = _check_operand(bias, "bias", (w.out_features,), x.dtype)
    y = torch.empty((n_tok, w.out_features), dtype=x.dtype, device=x.device)
    if n_tok == 0:
        return y
    bm, bn, bk, br, warps, stages = _config(n_tok, w.out_features, w.in_features, r, block, dot32 or not bf16)
    grid = (triton.cdiv(n_tok, bm), triton.cdiv(w.out_features, bn))
    with _on_device(x):
        _forward_kernel[grid](
            x, w.packed, w.absmax, w.code, bias if bias is not None else x, h if has_lora else x,
            lora_b if has_lora else x, y,
            n_tok, w.out_features, w.in_features, r, w.numel, w.log2_blocksize, float(scaling),
            x.stride(0), h.stride(0) if has_lora else 0, lora_b.stride(0) if has_lora else 0, y.stride(0),
            HAS_BIAS=bias is not None, HAS_LORA=has_lora, BF16=bf16, DOT_F32=dot32,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, num_warps=warps, num_stages=stages,
        )
    return y


def fused_grad_input(g: torch.Tensor, w: Weight4bit, gh: torch.Tensor | None = None,
                     lora_a: torch.Tensor | None = None, keep: torch.Tensor | None = None, keep_scale: float = 1.0, *,
                     dot_f32: bool | None = None, block: tuple[int, int, int] | None = None) -> torch.Tensor:
    """∂L/∂x = G · dequant(W) + ((gh · A) ⊙ keep · keep_scale) in G's dtype; G (N, out), gh = s G B (N, r),
    A (r, in), keep a boolean (N, in) dropout mask or None. ``block``: (BLOCK_M, BLOCK_N, BLOCK_K), BLOCK_N the
    reduction step over out_features and BLOCK_K the output tile over in_features."""
    _check_device(g, w.packed, w.absmax, w.code)
    bf16, dot32 = _compute_flags(g.dtype, dot_f32)
    n_tok = g.shape[0]
    g = _check_operand(g, "g", (n_tok, w.out_features), g.dtype)
    has_lora = gh is not None
    r = 0
    if has_lora:
        r = gh.shape[1]
        gh = _check_operand(gh, "gh", (n_tok, r), g.dtype)
        lora_a = _check_operand(lora_a, "lora_a", (r, w.in_features), g.dtype)
    has_mask = has_lora and keep is not None
    if has_mask:
        keep = _check_operand(keep, "keep", (n_tok, w.in_features), torch.bool).view(torch.uint8)
    out = torch.empty((n_tok, w.in_features), dtype=g.dtype, device=g.device)
    if n_tok == 0:
        return out
    tiles = None if block is None else (block[0], block[2], block[1])  # (M, output tile over in, reduction)
    bm, bk, bn, br, warps, stages = _config(n_tok, w.in_features, w.out_features, r, tiles, dot32 or not bf16)
    grid = (triton.cdiv(n_tok, bm), triton.cdiv(w.in_features, bk))
    with _on_device(g):
        _grad_input_kernel[grid](
            g, w.packed, w.absmax, w.code, gh if has_lora else g, lora_a if has_lora else g,
            keep if has_mask else g, out,
            n_tok, w.out_features, w.in_features, r, w.numel, w.log2_blocksize, float(keep_scale),
            g.stride(0), gh.stride(0) if has_lora else 0, lora_a.stride(0) if has_lora else 0,
            keep.stride(0) if has_mask else 0, out.stride(0),
            HAS_LORA=has_lora, HAS_MASK=has_mask, BF16=bf16, DOT_F32=dot32,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, num_warps=warps, num_stages=stages,
        )
    return out


__all__ = [
    "INTERPRET",
    "Weight4bit",
    "decode_absmax",
    "fused_grad_input",
    "fused_linear_forward",
    "weight_from_bnb",
]
