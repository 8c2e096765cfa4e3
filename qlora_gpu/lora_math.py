"""The arithmetic of the QLoRA linear layer (docs/lora_backprop.md), in the pieces that both of its autograd
functions use: the plain one (``qlora_gpu.lora.QLoRALinearFunction``) and the fast path's
(``qlora_gpu.fast.layer``). With ``compute_dtype="bfloat16"`` every step is a bfloat16 torch operation (float32
accumulation, one rounding), the reference's (``qlora_ref.lora``) operation for operation."""

from __future__ import annotations

import functools
import math

import bitsandbytes as bnb
import torch

from qlora_ref import lora as ref

from .product_check import bnb_product_trusted
from .quantize import cpu_dequantize_trusted, dequantize_packed


def mm(a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b, or alpha · (a @ b) applied by the product itself (``exact_scale``: alpha a power of two); written
    into ``out`` if given (``qlora_gpu.fast.deferred_grads``).

    torch's CPU bfloat16 GEMM without native bfloat16 instructions takes a very slow path when both operands are
    row-major (measured: minutes for 512×4096 @ 4096×4096, against about a second otherwise); giving the smaller
    operand column-major layout selects the fast kernel. Same float32-accumulated product."""
    if a.device.type == "cpu" and a.dtype == torch.bfloat16 and a.is_contiguous() and b.is_contiguous():
        if a.numel() <= b.numel():
            a = a.t().contiguous().t()
        else:
            b = b.t().contiguous().t()
    if alpha == 1.0:
        return torch.mm(a, b, out=out)
    return torch.addmm(unused_input(a.dtype, a.device), a, b, beta=0, alpha=alpha, out=out)


@functools.lru_cache(maxsize=16)
def unused_input(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``addmm``'s input where beta = 0 (ignored, NaN included): one per dtype and device, not one per call."""
    return torch.zeros((), dtype=dtype, device=device)


@functools.lru_cache(maxsize=64)
def exact_scale(s: float) -> bool:
    """Whether s = ±2ᵏ. Multiplying a bfloat16 or float32 value by such s is exact (short of the subnormal range,
    |value · s| < 2⁻¹²⁶), so the LoRA scaling can ride inside another operation — the addition of the adapter's
    output to the frozen path's (``torch.add``'s alpha), the products of the backward pass (the GEMM's alpha) —
    instead of a multiplication of its own: the same bits, one kernel fewer per use (21 per LLaMA block and step).
    The paper's settings all are (alpha/r = 16/64, and 2 for alpha = 2r); any other s takes the separate
    multiplication, rounded as the reference rounds it."""
    return s != 0.0 and abs(math.frexp(s)[0]) == 0.5


def add_scaled(base: torch.Tensor, p: torch.Tensor, s: float) -> torch.Tensor:
    """base + s · P with the reference's roundings: rnd(base + rnd(s · P)) (docs/lora_backprop.md)."""
    return torch.add(base, p, alpha=s) if exact_scale(s) else base + p * s


def add_adapter(base: torch.Tensor, p: torch.Tensor, s: float, out_dtype: torch.dtype | None) -> torch.Tensor:
    """The layer's output y = base + s · P in ``out_dtype`` (None: the compute dtype, ``add_scaled``).

    A wider ``out_dtype`` (float32, where the layer writes into a float32 residual stream) is peft's arithmetic
    under autocast: bitsandbytes' ``Linear4bit`` returns its bfloat16 product widened to the input's float32
    and peft adds ``lora_B(lora_A(x)) * scaling`` (bfloat16) to it, so y = f32(base) + f32(rnd(s · P)), one
    float32 rounding. In the compute dtype instead, an update s · P smaller than half a bfloat16 step of the
    frozen output (2⁻⁹ of it) is rounded away, and with it the first optimizer steps' effect on the model
    (docs/training.md, "Precision of the residual stream")."""
    if out_dtype is None or out_dtype == base.dtype:
        return add_scaled(base, p, s)
    if exact_scale(s):  # rnd(s · P) = s · P exactly: s applied by the addition
        return base.to(out_dtype).add_(p, alpha=s)
    return base.to(out_dtype).add_(p * s)


def widened(y: torch.Tensor, out_dtype: torch.dtype | None) -> torch.Tensor:
    """A frozen layer's (or an unused) output in ``out_dtype`` (None: as it is)."""
    return y if out_dtype is None else y.to(out_dtype)


@functools.lru_cache(maxsize=64)
def keep_scale(p: float) -> float:
    """``qlora_ref.lora.dropout_scale`` as a Python float (exactly the float32 value: torch multiplies a bfloat16
    tensor by a Python scalar in float32 and rounds once), computed once per p: it runs on every forward call."""
    return float(ref.dropout_scale(p))


def frozen_product(x: torch.Tensor, weight: torch.Tensor, quant_state, bias: torch.Tensor | None) -> torch.Tensor:
    """x Wᵀ + b for the frozen W: for a 4-bit W ``bitsandbytes.matmul_4bit`` (W dequantized into x's dtype, then
    one GEMM; for few rows on CUDA bitsandbytes' fused kernel), or the same two steps here — with the contract's
    dequantization on the CPU where bitsandbytes' kernel is wrong for W's shape
    (``qlora_gpu.quantize.cpu_dequantize_trusted``), with bitsandbytes' dequantization where its product failed
    its probe on this device and dtype (``qlora_gpu.product_check``); an unquantized (float32) W is rounded to
    x's dtype, here and again in backward."""
    if quant_state is None:
        return torch.nn.functional.linear(x, weight.to(x.dtype), bias)
    if (x.device.type == "cpu" and not cpu_dequantize_trusted(tuple(quant_state.shape), quant_state.blocksize)) \
            or not bnb_product_trusted(x.device, x.dtype):
        return torch.nn.functional.linear(x, dequantize_packed(weight, quant_state, x.dtype), bias)
    return bnb.matmul_4bit(x, weight, quant_state=quant_state, bias=bias)


def frozen_weight_as(weight: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """The whole frozen W in ``dtype`` — for a 4-bit W a transient copy, for the backward pass only, straight from
    the bitsandbytes state (``qlora_gpu.quantize.dequantize_packed``: going through ``Quantized4bit`` would read
    the double-quantization offset on the host, which synchronises the GPU once per layer and backward pass)."""
    return weight.to(dtype) if quant_state is None else dequantize_packed(weight, quant_state, dtype)


def draw_keep(shape, p: float, generator: torch.Generator, device) -> torch.Tensor:
    """The GPU backend's dropout rule: a boolean mask keeping each element with probability 1 − p, drawn by one
    ``bernoulli_`` on ``generator`` (one kernel, where ``rand(shape) >= p`` launches two). A decoder block draws
    all its LoRA layers' masks by one such call (``qlora_gpu.model.draw_block_masks``); a layer outside a block
    draws its own. (The reference draws from NumPy: the streams differ, docs/lora_backprop.md.)"""
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p, generator=generator)


def dropped(t: torch.Tensor, keep: torch.Tensor | None, scale: float) -> torch.Tensor:
    """t ⊙ M · 1/(1-p), rounded once: the reference's t · (M · scale). Through torch's dropout backward operator,
    which is exactly that — (t ⊙ M) · scale on the CPU, where t ⊙ M is exact (0 or t); one fused kernel on CUDA
    computing in float32 with the float32 scale — in one kernel where two multiplications would launch two."""
    return t if keep is None else torch.ops.aten.native_dropout_backward(t, keep, scale)


def adapter_forward(x, keep, scale, lora_a, xd=None):
    """x_d and H = x_d Aᵀ (N, r): what the adapter's forward needs and its backward keeps. ``xd``: x_d already
    computed (``qlora_gpu.fast``: several layers reading the same input drop it out at once)."""
    xd = dropped(x, keep, scale) if xd is None else xd
    return xd, xd @ lora_a.t()


def adapter_grads(grad_y, xd, lora_a, lora_b, h, s: float, need_a: bool, need_b: bool, out_a=None, out_b=None):
    """(∂L/∂H = s G B, ∂L/∂A, ∂L/∂B) from the saved x_d, A, B and H (docs/lora_backprop.md); None where no
    gradient is needed. ``out_a``/``out_b``: where to write ∂L/∂A and ∂L/∂B (``qlora_gpu.fast.deferred_grads``)."""
    if exact_scale(s):  # s G is exact: s applied by the two products instead of by a multiplication
        grad_b = mm(grad_y.t(), h, s, out_b) if need_b else None
        gh = mm(grad_y, lora_b, s)
    else:
        gs = grad_y * s  # ∂L/∂P for P = H Bᵀ
        grad_b = torch.mm(gs.t(), h, out=out_b) if need_b else None  # ∂L/∂B = s Gᵀ H
        gh = mm(gs, lora_b)  # ∂L/∂H = s G B
    grad_a = torch.mm(gh.t(), xd, out=out_a) if need_a else None  # ∂L/∂A = (∂L/∂H)ᵀ x_d
    return gh, grad_a, grad_b
