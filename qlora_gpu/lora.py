"""The QLoRA linear layer on PyTorch + bitsandbytes: ``qlora_ref.lora.QLoRALinear`` as a ``torch.nn.Module``.

The frozen weight is a bitsandbytes ``Params4bit``; the frozen path runs through ``bitsandbytes.matmul_4bit``;
the adapter ``lora_A`` (r, in) and ``lora_B`` (out, r) are ``nn.Parameter``\\ s with PEFT's names, shapes and
initialisation. Forward and backward are one custom autograd function that keeps, for the backward pass, only
the (dropped-out) input, the dropout mask, the adapter and ``H = x_d Aᵀ`` (N, r) — r/in of the input's memory,
kept rather than recomputed: a GEMM less per layer and step, when a step at batch 1 is dominated by the number of
operators launched — plus a reference to the 4-bit weight, which is dequantized again in backward and never
stored dequantized.

Inside a ``QLoRAModel`` a decoder block draws its LoRA layers' dropout masks, casts their adapters and decodes
their double-quantized scales for all of them at once (``qlora_gpu.model.stage_layer``, ``QLoRALinear.stage``,
``qlora_gpu.block_scales``), and layers reading one input drop it out together (``drop_together``,
``QLoRALinear.stage_dropped``): the same values, fewer operators.

The arithmetic is the reference's, operation for operation (docs/lora_backprop.md): with
``compute_dtype="bfloat16"`` every step is a bfloat16 torch operation (float32 accumulation, one rounding), so the
two backends differ only by the summation order inside matrix products. The rules — argument checks, scaling,
initialisation, the dropout factor — are imported from ``qlora_ref.lora``.

Two implementations of the same arithmetic, chosen by ``kernel``:

- ``"bnb"`` (default): bitsandbytes' unfused path — ``matmul_4bit`` forward, ``dequantize_4bit`` + GEMM backward,
  the whole weight dequantized into a transient (out, in) buffer for each product.
- ``"triton"``: ``qlora_gpu.triton_kernels``, which dequantize weight tiles in registers inside the matrix product
  and add the adapter's up-projection (forward) and input gradient (backward) in the kernels' epilogues
  (docs/fused_kernels.md). Only for 4-bit weights (nf4/fp4); needs CUDA, or Triton's CPU interpreter. **Opt-in**:
  checked against the ``"bnb"`` path (tests/test_triton_kernels.py, on CPU under the interpreter and on CUDA),
  but slower than it where measured (docs/fused_kernels.md).
  ``set_kernel(model, kernel)`` switches every layer of a model.
"""

from __future__ import annotations

import functools
import math

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import numpy as np
import torch
from torch import nn

from qlora_ref import lora as ref
from qlora_ref.checks import QUANT_TYPES_4BIT
from qlora_ref.quantize import Quantized4bit as RefQuantized4bit

from . import deferred_grads
from .quantize import Quantized4bit, cpu_dequantize_trusted, dequantize_packed, quantize_4bit

#: the implementations of the layer's arithmetic (see the module docstring); "bnb" is the default
KERNELS = ("bnb", "triton")
#: where a layer sharded under FSDP keeps what is left of its 4-bit weight's state (``qlora_gpu.fsdp``)
SHARDED_STATE = "_sharded_4bit"


def _mm(a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b, or alpha · (a @ b) applied by the product itself (``_exact_scale``: alpha a power of two); written
    into ``out`` if given (``qlora_gpu.deferred_grads``).

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
    return torch.addmm(_unused_input(a.dtype, a.device), a, b, beta=0, alpha=alpha, out=out)


@functools.lru_cache(maxsize=16)
def _unused_input(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``addmm``'s input where beta = 0 (ignored, NaN included): one per dtype and device, not one per call."""
    return torch.zeros((), dtype=dtype, device=device)


@functools.lru_cache(maxsize=64)
def _exact_scale(s: float) -> bool:
    """Whether s = ±2ᵏ. Multiplying a bfloat16 or float32 value by such s is exact (short of the subnormal range,
    |value · s| < 2⁻¹²⁶), so the LoRA scaling can ride inside another operation — the addition of the adapter's
    output to the frozen path's (``torch.add``'s alpha), the products of the backward pass (the GEMM's alpha) —
    instead of a multiplication of its own: the same bits, one kernel fewer per use (21 per LLaMA block and step).
    The paper's settings all are (alpha/r = 16/64, and 2 for alpha = 2r); any other s takes the separate
    multiplication, rounded as the reference rounds it."""
    return s != 0.0 and abs(math.frexp(s)[0]) == 0.5


def _add_scaled(base: torch.Tensor, p: torch.Tensor, s: float) -> torch.Tensor:
    """base + s · P with the reference's roundings: rnd(base + rnd(s · P)) (docs/lora_backprop.md)."""
    return torch.add(base, p, alpha=s) if _exact_scale(s) else base + p * s


def _add_adapter(base: torch.Tensor, p: torch.Tensor, s: float, out_dtype: torch.dtype | None) -> torch.Tensor:
    """The layer's output y = base + s · P in ``out_dtype`` (None: the compute dtype, ``_add_scaled``).

    A wider ``out_dtype`` (float32, where the layer writes into a float32 residual stream) is peft's arithmetic
    under autocast: bitsandbytes' ``Linear4bit`` returns its bfloat16 product widened to the input's float32
    and peft adds ``lora_B(lora_A(x)) * scaling`` (bfloat16) to it, so y = f32(base) + f32(rnd(s · P)), one
    float32 rounding. In the compute dtype instead, an update s · P smaller than half a bfloat16 step of the
    frozen output (2⁻⁹ of it) is rounded away, and with it the first optimizer steps' effect on the model
    (docs/training.md, "Precision of the residual stream")."""
    if out_dtype is None or out_dtype == base.dtype:
        return _add_scaled(base, p, s)
    if _exact_scale(s):  # rnd(s · P) = s · P exactly: s applied by the addition
        return base.to(out_dtype).add_(p, alpha=s)
    return base.to(out_dtype).add_(p * s)


def _widened(y: torch.Tensor, out_dtype: torch.dtype | None) -> torch.Tensor:
    """A frozen layer's (or an unused) output in ``out_dtype`` (None: as it is)."""
    return y if out_dtype is None else y.to(out_dtype)


@functools.lru_cache(maxsize=64)
def _keep_scale(p: float) -> float:
    """``qlora_ref.lora.dropout_scale`` as a Python float (exactly the float32 value: torch multiplies a bfloat16
    tensor by a Python scalar in float32 and rounds once), computed once per p: it runs on every forward call."""
    return float(ref.dropout_scale(p))


def _decoded(quant_state, absmax: torch.Tensor | None):
    """``quant_state`` with its double-quantized scales replaced by ``absmax``, the same scales already decoded to
    float32 (``qlora_gpu.block_scales``): bitsandbytes then uses them as a weight stored without double
    quantization, skipping the two kernels of its own decoding. ``quant_state`` itself when ``absmax`` is None."""
    if absmax is None:
        return quant_state
    return bnbf.QuantState(absmax=absmax, shape=quant_state.shape, code=quant_state.code,
                           blocksize=quant_state.blocksize, quant_type=quant_state.quant_type, dtype=quant_state.dtype)


def _dequantize(weight: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """The whole 4-bit weight in ``dtype`` — a transient copy, for the backward pass only.

    Straight from the bitsandbytes state (``qlora_gpu.quantize.dequantize_packed``): going through
    ``Quantized4bit`` would read the double-quantization offset on the host, which synchronises the GPU once
    per layer and per backward pass."""
    return dequantize_packed(weight, quant_state, dtype)


def _matmul_4bit(x: torch.Tensor, weight: torch.Tensor, quant_state, bias: torch.Tensor | None) -> torch.Tensor:
    """x Wᵀ + b for the 4-bit W: ``bitsandbytes.matmul_4bit`` (W dequantized into x's dtype, then one GEMM), or
    on the CPU, where bitsandbytes' dequantization kernel is wrong for W's shape, the same two steps with the
    contract's dequantization (``qlora_gpu.quantize.cpu_dequantize_trusted``)."""
    if x.device.type == "cpu" and not cpu_dequantize_trusted(tuple(quant_state.shape), quant_state.blocksize):
        return torch.nn.functional.linear(x, dequantize_packed(weight, quant_state, x.dtype), bias)
    return bnb.matmul_4bit(x, weight, quant_state=quant_state, bias=bias)


def draw_keep(shape, p: float, generator: torch.Generator, device) -> torch.Tensor:
    """The GPU backend's dropout rule: a boolean mask keeping each element with probability 1 − p, drawn by one
    ``bernoulli_`` on ``generator`` (one kernel, where ``rand(shape) >= p`` launches two). A decoder block draws
    all its LoRA layers' masks by one such call (``qlora_gpu.model.stage_layer``); a layer outside a block draws
    its own. (The reference draws from NumPy: the streams differ, docs/lora_backprop.md.)"""
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p, generator=generator)


def _dropped(t: torch.Tensor, keep: torch.Tensor | None, keep_scale: float) -> torch.Tensor:
    """t ⊙ M · 1/(1-p), rounded once: the reference's t · (M · scale). Through torch's dropout backward operator,
    which is exactly that — (t ⊙ M) · scale on the CPU, where t ⊙ M is exact (0 or t); one fused kernel on CUDA
    computing in float32 with the float32 scale — in one kernel where two multiplications would launch two."""
    return t if keep is None else torch.ops.aten.native_dropout_backward(t, keep, keep_scale)


def _in_compute_dtype(x, lora_a, lora_b, staged=None):
    """A and B in x's (the compute) dtype, cast inside the autograd function: no ``ToCopyBackward`` node per
    adapter tensor and forward pass (host time: two per layer, forward and recomputation); autograd widens the
    bfloat16 gradients the function returns to the float32 parameters' dtype, the same cast the node did.
    ``staged``: the same two casts made beforehand for a whole decoder layer (``stage_layer``), used as they are."""
    if staged is not None:
        return staged
    return lora_a.to(x.dtype), lora_b.to(x.dtype)


def _adapter_forward(x, keep, keep_scale, lora_a, xd=None):
    """x_d and H = x_d Aᵀ (N, r): what the adapter's forward needs and its backward keeps. ``xd``: x_d already
    computed, for several layers reading the same input at once (``drop_together``)."""
    xd = _dropped(x, keep, keep_scale) if xd is None else xd
    return xd, xd @ lora_a.t()


def _adapter_grads(ctx, grad_y, xd, lora_a, lora_b, h):
    """(∂L/∂H = s G B, ∂L/∂A, ∂L/∂B) from the saved x_d, A, B and H (docs/lora_backprop.md); None where
    ``ctx`` needs no gradient, and where the gradient was written into the flat optimizer's deferred buffer
    instead of going to autograd (``qlora_gpu.deferred_grads``: ``ctx.params`` are the layer's parameters).
    Shared by the unfused and the fused (Triton) functions."""
    need_a, need_b = ctx.needs_input_grad[1:3]
    dtype = grad_y.dtype
    out_a = deferred_grads.slot(ctx.params[0], dtype) if need_a else None
    out_b = deferred_grads.slot(ctx.params[1], dtype) if need_b else None
    s = ctx.scaling
    if _exact_scale(s):  # s G is exact: s applied by the two products instead of by a multiplication
        grad_b = _mm(grad_y.t(), h, s, out_b) if need_b else None
        gh = _mm(grad_y, lora_b, s)
    else:
        gs = grad_y * s  # ∂L/∂P for P = H Bᵀ
        grad_b = torch.mm(gs.t(), h, out=out_b) if need_b else None  # ∂L/∂B = s Gᵀ H
        gh = _mm(gs, lora_b)  # ∂L/∂H = s G B
    grad_a = torch.mm(gh.t(), xd, out=out_a) if need_a else None  # ∂L/∂A = (∂L/∂H)ᵀ x_d
    return gh, None if out_a is not None else grad_a, None if out_b is not None else grad_b


@torch.no_grad()
def drop_together(layers: list, x: torch.Tensor) -> None:
    """x ⊙ Mᵢ / (1 − p) for LoRA layers that all read the input ``x``, in one kernel (``x`` broadcast against
    their stacked masks) where each layer would launch its own, handed to each (``QLoRALinear.stage_dropped``).
    The same elementwise product as a layer's own, so the same bits. Only when every layer has a staged mask and
    the masks lie one after the other in one buffer, as ``qlora_gpu.model.stage_layer`` draws them (a view then
    stacks them); otherwise each layer computes its own."""
    keeps = [m.staged_mask() for m in layers]
    if len(layers) < 2 or any(k is None for k in keeps):
        return
    first, width = layers[0], layers[0].in_features
    rows = x.numel() // width if x.shape[-1] == width else 0
    step = rows * width
    stacked = rows > 0 and all(
        m.in_features == width and m.dropout == first.dropout and m.compute_dtype == first.compute_dtype
        and m.kernel == "bnb" and k.shape == (rows, width) and k.is_contiguous()
        and k.untyped_storage().data_ptr() == keeps[0].untyped_storage().data_ptr()
        and k.storage_offset() == keeps[0].storage_offset() + i * step
        for i, (m, k) in enumerate(zip(layers, keeps, strict=True)))
    if not stacked:
        return
    keep = keeps[0].as_strided((len(layers), rows, width), (step, width, 1))
    xc = x.reshape(-1, width).to(getattr(torch, first.compute_dtype))
    xd = _dropped(xc.expand(len(layers), rows, width), keep, _keep_scale(first.dropout))
    for m, d in zip(layers, xd.unbind(0), strict=True):
        m.stage_dropped(x, d)


class _QLoRALinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s · (x ⊙ keep·scale) Aᵀ Bᵀ; x (N, in) and the bias in the compute dtype, A and B in any
    (cast here; their gradients come back in the compute dtype and autograd widens them)."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, bias, keep, keep_scale, scaling, weight, quant_state, staged=None,
                scales=None, xd=None, output_unused=False, out_dtype=None):
        absmax, keep_absmax = scales or (None, False)
        ctx.compute_dtype = x.dtype
        if output_unused:  # only what backward saves is needed (qlora_gpu.model.LAST_LINEAR): y left unwritten
            out = quant_state.shape[0] if quant_state is not None else weight.shape[0]
            base = x.new_empty((x.shape[0], out), dtype=out_dtype or x.dtype)
        elif quant_state is not None:  # bitsandbytes' 4-bit matmul (dequantize into x's dtype, then GEMM)
            base = _matmul_4bit(x, weight, _decoded(quant_state, absmax), bias)
        else:  # an unquantized frozen weight (float32; rounded to the compute dtype here and again in backward)
            base = torch.nn.functional.linear(x, weight.to(x.dtype), bias)
        ctx.weight, ctx.quant_state, ctx.scaling, ctx.keep_scale = weight, quant_state, scaling, keep_scale
        absmax = absmax if keep_absmax else None  # saved, so checkpointing drops it and the recomputation's is used
        if lora_a is None:
            ctx.save_for_backward(absmax)
            return _widened(base, out_dtype)
        ctx.params = lora_a, lora_b
        lora_a, lora_b = _in_compute_dtype(x, lora_a, lora_b, staged)
        xd, h = _adapter_forward(x, keep, keep_scale, lora_a, xd)
        y = base if output_unused else _add_adapter(base, h @ lora_b.t(), scaling, out_dtype)
        # the input (dropped out), the adapter, the decoded scales: nothing (N, out)
        ctx.save_for_backward(absmax, xd, keep, lora_a, lora_b, h)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        weight, quant_state = ctx.weight, ctx.quant_state
        need_x = ctx.needs_input_grad[0]
        grad_y = grad_y.to(ctx.compute_dtype)  # a widened output's gradient: rounded once, as autocast's cast's
        grad_x = grad_a = grad_b = None
        absmax, *saved = ctx.saved_tensors  # read once: checkpointing's saved-tensor hooks allow a single unpack
        if need_x:  # the frozen path: ∂L/∂x = G W, dequantizing the weight again
            if quant_state is not None:
                w = _dequantize(weight, _decoded(quant_state, absmax), grad_y.dtype)
            else:
                w = weight.to(grad_y.dtype)
            grad_x = _mm(grad_y, w)
            del w
        if saved:
            xd, keep, lora_a, lora_b, h = saved
            gh, grad_a, grad_b = _adapter_grads(ctx, grad_y, xd, lora_a, lora_b, h)
            if need_x:  # ∂L/∂x_d = (∂L/∂H) A, through the mask
                grad_x = grad_x + _dropped(_mm(gh, lora_a), keep, ctx.keep_scale)
        return grad_x, grad_a, grad_b, None, None, None, None, None, None, None, None, None, None, None


class TritonQLoRAFunction(torch.autograd.Function):
    """``_QLoRALinearFunction`` with the frozen path (and the adapter's up-projection and input gradient) in the
    fused kernels of ``qlora_gpu.triton_kernels`` (kernels and launchers only; the autograd code is here). Same
    arguments, same saved tensors (x_d, the mask, A, B, H — the weight is held by the module and re-read in backward,
    its double-quantized scales decoded again: nothing (out, in) and no float scales kept alive between forward and
    backward). Options: ``dot_f32`` and ``block`` of the launchers; ``staged`` and ``out_dtype`` as there (a wider
    ``out_dtype``: the adapter's output is added outside the kernel, in that dtype)."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, bias, keep, keep_scale, scaling, weight, quant_state, dot_f32=None,
                block=None, staged=None, out_dtype=None):
        from .triton_kernels import fused_linear_forward, weight_from_bnb  # on first use: triton is optional

        w = weight_from_bnb(weight, quant_state)
        ctx.weight, ctx.quant_state, ctx.scaling, ctx.keep_scale = weight, quant_state, scaling, keep_scale
        ctx.dot_f32, ctx.block, ctx.compute_dtype = dot_f32, block, x.dtype
        if lora_a is None:
            return _widened(fused_linear_forward(x, w, bias, dot_f32=dot_f32, block=block), out_dtype)
        ctx.params = lora_a, lora_b  # the parameters (_adapter_grads)
        lora_a, lora_b = _in_compute_dtype(x, lora_a, lora_b, staged)
        xd, h = _adapter_forward(x, keep, keep_scale, lora_a)
        if out_dtype is None or out_dtype == x.dtype:
            y = fused_linear_forward(x, w, bias, h, lora_b, scaling, dot_f32=dot_f32, block=block)
        else:
            y = _add_adapter(fused_linear_forward(x, w, bias, dot_f32=dot_f32, block=block), h @ lora_b.t(),
                             scaling, out_dtype)
        ctx.save_for_backward(xd, keep, lora_a, lora_b, h)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        from .triton_kernels import fused_grad_input, weight_from_bnb

        need_x = ctx.needs_input_grad[0]
        grad_y = grad_y.to(ctx.compute_dtype).contiguous()
        grad_x = grad_a = grad_b = None
        saved = ctx.saved_tensors  # read once: checkpointing's saved-tensor hooks allow a single unpack
        gh = lora_a = keep = None
        if saved:
            xd, keep, lora_a, lora_b, h = saved
            gh, grad_a, grad_b = _adapter_grads(ctx, grad_y, xd, lora_a, lora_b, h)
        if need_x:  # ∂L/∂x = G W + ((∂L/∂H) A) ⊙ M/(1-p), in one kernel
            w = weight_from_bnb(ctx.weight, ctx.quant_state)
            grad_x = fused_grad_input(grad_y, w, gh, lora_a, keep, ctx.keep_scale, dot_f32=ctx.dot_f32,
                                      block=ctx.block)
        return grad_x, grad_a, grad_b, None, None, None, None, None, None, None, None, None, None


class QLoRALinear(nn.Module):
    """Frozen bitsandbytes 4-bit (or float32) weight + trainable LoRA adapter; see ``qlora_ref.lora``.

    ``forward(x, dropout_mask=None)`` takes x (..., in) of any float dtype, computes in ``compute_dtype`` and
    returns x's dtype — or ``out_dtype`` where set (e.g. ``"float32"`` for a layer writing into a float32 residual
    stream: the frozen product widened and the adapter's output added to it in that dtype, as peft adds it,
    ``_add_adapter``). ``r=None`` builds a frozen layer without adapter. ``kernel``: ``"bnb"`` (default, bitsandbytes'
    unfused path) or ``"triton"`` (the fused kernels of ``qlora_gpu.triton_kernels``: 4-bit weights only; opt-in
    until their gpu tests have passed on a GPU — module docstring); settable later through the ``kernel``
    attribute or ``set_kernel``.
    """

    def __init__(self, weight, r: int | None, alpha: float = 1.0, *, dropout: float = 0.0, bias=None,
                 compute_dtype: str = "bfloat16", use_rslora: bool = False, seed: int = 0, device=None,
                 kernel: str = "bnb", out_dtype: str | None = None):
        super().__init__()
        self.r, self.alpha, self.dropout = ref.check_lora_config(r, alpha, dropout)
        self.compute_dtype = ref.check_compute_dtype(compute_dtype)
        self.out_dtype = out_dtype
        if isinstance(weight, RefQuantized4bit):
            if not isinstance(weight, Quantized4bit):  # a NumPy state: through the shared state-dict format
                weight = Quantized4bit.from_state_dict(weight.state_dict())
            self.out_features, self.in_features = ref.check_weight_shape(weight.shape)
            weight = weight.to(device) if device is not None else weight
            self.weight = bnb.nn.Params4bit(
                weight.packed, requires_grad=False, quant_state=weight.to_bnb(), blocksize=weight.blocksize,
                compress_statistics=weight.double_quant, quant_type=weight.quant_type, bnb_quantized=True,
            )
        else:
            weight = _float_tensor(weight, "weight", device)
            self.out_features, self.in_features = ref.check_weight_shape(weight.shape)
            self.register_buffer("weight", weight.float())
        if bias is not None:
            bias = _float_tensor(bias, "bias", device)
            ref.check_bias_shape(tuple(bias.shape), self.out_features)
            bias = bias.float()
        self.register_buffer("bias", bias)
        self.use_rslora = bool(use_rslora)
        self.scaling = ref.lora_scaling(self.alpha, self.r, self.use_rslora)
        self.seed = seed
        if self.r is None:
            self.register_parameter("lora_A", None)
            self.register_parameter("lora_B", None)
        else:
            a, b = ref.init_lora_weights(self.in_features, self.out_features, self.r, seed)
            self.lora_A = nn.Parameter(torch.from_numpy(a).to(self.weight.device))
            self.lora_B = nn.Parameter(torch.from_numpy(b).to(self.weight.device))
        self._generators: dict[torch.device, torch.Generator] = {}
        self.kernel = kernel
        self._initialized = True

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_weight(cls, W, r: int | None, alpha: float = 1.0, dropout: float = 0.0, quant_type: str | None = "nf4",
                    blocksize: int = 64, double_quant: bool = True, bias=None, compute_dtype: str = "bfloat16",
                    seed: int = 0, *, use_rslora: bool = False, device=None, kernel: str = "bnb",
                    out_dtype: str | None = None) -> QLoRALinear:
        """Quantize ``W`` (out, in) with bitsandbytes (``quant_type=None`` keeps it float32), attach an adapter."""
        W = _float_tensor(W, "W", device)
        ref.check_weight_shape(W.shape)
        check_kernel(kernel, quant_type)  # before quantizing: a bad choice fails fast
        weight = W if quant_type is None else quantize_4bit(W, quant_type, blocksize, double_quant)
        return cls(weight, r, alpha, dropout=dropout, bias=bias, compute_dtype=compute_dtype, use_rslora=use_rslora,
                   seed=seed, device=device, kernel=kernel, out_dtype=out_dtype)

    @classmethod
    def from_quantized(cls, q, r: int | None, alpha: float = 1.0, dropout: float = 0.0, bias=None,
                       compute_dtype: str = "bfloat16", seed: int = 0, *, use_rslora: bool = False,
                       device=None, kernel: str = "bnb", out_dtype: str | None = None) -> QLoRALinear:
        """Use a quantized weight as stored (a ``Quantized4bit`` of either backend)."""
        if not isinstance(q, RefQuantized4bit):
            raise ValueError(f"q must be a Quantized4bit (qlora_ref or qlora_gpu), got {type(q).__name__}")
        return cls(q, r, alpha, dropout=dropout, bias=bias, compute_dtype=compute_dtype, use_rslora=use_rslora,
                   seed=seed, device=device, kernel=kernel, out_dtype=out_dtype)

    def add_adapter(self, r: int, alpha: float = 1.0, dropout: float = 0.0, *, use_rslora: bool = False,
                    seed: int = 0) -> None:
        """Attach a fresh adapter (initialised as the constructor would, on the weight's device) to a layer built
        without one (``r=None``); see ``qlora_ref.lora.QLoRALinear.add_adapter``."""
        if self.r is not None:
            raise ValueError(f"the layer already carries an adapter (r={self.r})")
        if r is None:
            raise ValueError("r must be a positive integer for add_adapter, got None")
        self.r, self.alpha, self.dropout = ref.check_lora_config(r, alpha, dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = ref.lora_scaling(self.alpha, self.r, self.use_rslora)
        self.seed = seed
        a, b = ref.init_lora_weights(self.in_features, self.out_features, self.r, seed)
        self.lora_A = nn.Parameter(torch.from_numpy(a).to(self.weight.device))
        self.lora_B = nn.Parameter(torch.from_numpy(b).to(self.weight.device))
        self._generators = {}

    def __setattr__(self, name, value):
        if name in ("lora_A", "lora_B") and self.__dict__.get("_initialized") and value is not None:
            ref.check_adapter_shape(name, tuple(value.shape), self.in_features, self.out_features, self.r)
        if name == "kernel":
            value = check_kernel(value, self.quant_type)
        if name == "out_dtype":
            value = check_out_dtype(value)
            self.__dict__["_out_torch_dtype"] = None if value is None else getattr(torch, value)
        super().__setattr__(name, value)

    @property
    def quantized(self) -> bool:
        return self.quant_type is not None

    @property
    def quant_type(self) -> str | None:
        """The 4-bit data type of the frozen weight ("nf4", "fp4"), None for a float32 weight."""
        stored = self.__dict__.get(SHARDED_STATE)
        if stored is not None:
            return stored.quant_type
        return self.weight.quant_type if isinstance(self.weight, bnb.nn.Params4bit) else None

    def frozen_weight(self) -> tuple[torch.Tensor, bnbf.QuantState | None]:
        """The frozen weight as bitsandbytes reads it and its ``QuantState`` (None for a float32 weight). Sharded
        under FSDP (``qlora_gpu.fsdp``) the 4-bit weight is a plain parameter in a float storage dtype, and its
        ``QuantState`` is rebuilt around the gathered tensors: only while FSDP has them gathered (in forward and
        backward)."""
        stored = self.__dict__.get(SHARDED_STATE)
        if stored is not None:
            return stored.unpack(self)
        return self.weight, (self.weight.quant_state if isinstance(self.weight, bnb.nn.Params4bit) else None)

    @property
    def dropout_active(self) -> bool:
        return self.training and self.r is not None and self.dropout > 0.0

    def extra_repr(self) -> str:
        kind = self.quant_type or "float32"
        return (f"in_features={self.in_features}, out_features={self.out_features}, weight={kind}, r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout}, bias={self.bias is not None}, "
                f"compute_dtype={self.compute_dtype!r}, kernel={self.kernel!r}"
                + (f", out_dtype={self.out_dtype!r}" if self.out_dtype is not None else ""))

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        ref.check_input_shape(tuple(x.shape), self.in_features)
        cdt = getattr(torch, self.compute_dtype)
        lead = x.shape[:-1]
        xc = x.reshape(-1, self.in_features).to(cdt)
        staged_keep, staged, scales = self.__dict__.pop("_staged", None) or (None, None, None)
        dropped = self.__dict__.pop("_staged_xd", None)
        keep = None
        if dropout_mask is not None:
            ref.check_dropout_mask(tuple(dropout_mask.shape), tuple(x.shape), self.dropout_active)
            keep = dropout_mask.reshape(-1, self.in_features).to(device=x.device, dtype=torch.bool)
        elif self.dropout_active:
            if staged_keep is not None and staged_keep.shape == xc.shape and staged_keep.device == x.device:
                keep = staged_keep
            else:
                keep = draw_keep(xc.shape, self.dropout, self._generator(x.device), x.device)
        if staged is not None and (staged[0].dtype != cdt or staged[0].device != x.device):
            staged = None
        keep_scale = _keep_scale(self.dropout)
        bias = None if self.bias is None else self.bias.to(cdt)
        weight, quant_state = self.frozen_weight()
        if scales is not None and (quant_state is None or scales[0].device != x.device):
            scales = None
        xd = None
        if dropped is not None and keep is staged_keep and dropped[0] is x and dropped[1] == x._version:
            xd = dropped[2] if dropped[2].dtype == cdt else None  # computed from this very input, with this mask
        a, b = self.lora_A, self.lora_B  # cast to the compute dtype inside the function (_in_compute_dtype)
        out_dtype = self.__dict__["_out_torch_dtype"]
        if self.kernel == "triton":
            y = TritonQLoRAFunction.apply(xc, a, b, bias, keep, keep_scale, self.scaling, weight, quant_state,
                                          None, None, staged, out_dtype)
        else:
            y = _QLoRALinearFunction.apply(xc, a, b, bias, keep, keep_scale, self.scaling, weight, quant_state,
                                           staged, scales, xd, self.__dict__.get("_output_unused", False), out_dtype)
        return (y if out_dtype is not None else y.to(x.dtype)).reshape(*lead, self.out_features)

    def stage(self, keep: torch.Tensor | None = None, adapter: tuple | None = None,
              scales: tuple | None = None) -> None:
        """What the enclosing decoder layer drew, cast or decoded for this layer's next forward call, in one
        operation for all its LoRA layers (``qlora_gpu.model.stage_layer``): ``keep``, the dropout mask (N, in)
        used instead of drawing one (an explicit ``dropout_mask`` still wins); ``adapter``, (A, B) already in the
        compute dtype; ``scales``, (absmax, keep for backward): this layer's double-quantized scales decoded to
        float32 (``qlora_gpu.block_scales``), and whether the backward pass uses them too — under gradient
        checkpointing, where the recomputation decodes them again — or decodes its own. Consumed by the next
        forward call, which ignores what does not fit its input (rows, device, dtype)."""
        # not through nn.Module.__setattr__: host time, 7 per block call
        self.__dict__["_staged"] = (keep, adapter, scales)

    def staged_mask(self) -> torch.Tensor | None:
        """The dropout mask ``stage`` left for the next forward call, if any."""
        return (self.__dict__.get("_staged") or (None,))[0]

    def stage_dropped(self, x: torch.Tensor, xd: torch.Tensor) -> None:
        """x_d = x ⊙ M / (1 − p) for the next forward call, computed with the staged mask M together with other
        layers reading the same input (``drop_together``); used only by a call whose input is
        ``x`` itself, unmodified, and that uses the staged mask."""
        self.__dict__["_staged_xd"] = (x, x._version, xd)

    def unstage(self) -> None:
        """Drop what ``stage`` and ``stage_dropped`` left and no forward call used."""
        self.__dict__.pop("_staged", None)
        self.__dict__.pop("_staged_xd", None)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    # ---------------------------------------------------------------- merging
    @torch.no_grad()
    def merge(self) -> torch.Tensor:
        """dequant(W) + s · B A in float32 (out, in); see ``qlora_ref.lora.QLoRALinear.merge``."""
        weight, quant_state = self.frozen_weight()
        w = _dequantize(weight, quant_state, torch.float32) if quant_state is not None else weight.clone()
        if self.r is not None:
            w += self.scaling * (self.lora_B.float() @ self.lora_A.float())
        return w


def check_kernel(kernel, quant_type: str | None) -> str:
    """``kernel`` is one of ``KERNELS``; ``"triton"`` only with a 4-bit (nf4/fp4) weight (``quant_type``)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "triton" and quant_type not in QUANT_TYPES_4BIT:
        raise ValueError(f"kernel='triton' needs a 4-bit weight (quant_type 'nf4' or 'fp4'), got quant_type "
                         f"{quant_type!r}; use kernel='bnb' for a float32 base weight")
    return kernel


def check_out_dtype(out_dtype) -> str | None:
    """``out_dtype`` of a ``QLoRALinear``: None (the input's dtype) or a float dtype's name."""
    if out_dtype is None:
        return None
    name = str(out_dtype).removeprefix("torch.")
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"out_dtype must be None (the input's dtype), 'float32', 'bfloat16' or 'float16', "
                         f"got {out_dtype!r}")
    return name


def set_kernel(model: nn.Module, kernel: str) -> int:
    """Set ``kernel`` (one of ``KERNELS``) on every ``QLoRALinear`` in ``model`` (itself included); returns how many
    layers were set. All layers are checked first, so a ValueError (``"triton"`` with a float32 base weight)
    leaves the model unchanged."""
    layers = [m for m in model.modules() if isinstance(m, QLoRALinear)]
    for m in layers:
        check_kernel(kernel, m.quant_type)
    for m in layers:
        m.kernel = kernel
    return len(layers)


def _float_tensor(a, name: str, device=None) -> torch.Tensor:
    """``a`` (tensor or NumPy array) as a float torch tensor on ``device`` (default: where it is)."""
    if isinstance(a, np.ndarray):
        if a.dtype.kind != "f" and a.dtype.name != "bfloat16":
            raise ValueError(f"{name} must be a float array, got dtype {a.dtype}")
        a = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    if not isinstance(a, torch.Tensor) or not a.is_floating_point():
        raise ValueError(f"{name} must be a float torch.Tensor or NumPy array, got {getattr(a, 'dtype', type(a))}")
    return a.to(device) if device is not None else a


__all__ = ["KERNELS", "QLoRALinear", "draw_keep", "drop_together", "set_kernel"]
