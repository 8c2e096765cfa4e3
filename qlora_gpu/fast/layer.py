"""A ``QLoRALinear``'s forward call on the fast path: the plain layer's values (``qlora_gpu.lora``) in fewer
kernels and less host time, using what its decoder block prepared for the whole block (``qlora_gpu.fast.staging``).

``FastQLoRAFunction`` is ``qlora_gpu.lora.QLoRALinearFunction`` with, where given:

- the adapter already cast to the compute dtype for the whole block (one operator where seven layers launch 14);
- the double-quantized scales already decoded for the whole block (``qlora_gpu.fast.block_scales``);
- x_d = x ⊙ M/(1-p) already computed together with the layers reading the same input (``drop_together``);
- ``output_unused``: in the recomputation under checkpointing, the block's last linear computes only what its
  backward pass saves, its output NaN (``qlora_gpu.fast.staging.LAST_LINEAR``);
- the adapters' gradients written into the flat optimizer's deferred buffer (``qlora_gpu.fast.deferred_grads``).

``TritonQLoRAFunction`` runs the frozen path (and the adapter's up-projection and input gradient) in the fused
kernels of ``qlora_gpu.fast.triton_kernels`` (``kernel="triton"``).

Every one of these computes the same operations on the same values as the plain function, so the results are the
same bits (tests/test_fast_switch.py, tests/test_stage_layer.py, tests/test_block_scales.py,
tests/test_deferred_grads.py).
"""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import torch

from ..lora_math import (
    adapter_forward,
    adapter_grads,
    add_adapter,
    dropped,
    frozen_product,
    frozen_weight_as,
    keep_scale,
    mm,
    widened,
)
from . import deferred_grads

#: where a layer keeps what its block staged for its next forward call: (adapter in the compute dtype, scales)
STAGED = "_qlora_fast_staged"
#: where a layer keeps x_d computed with its neighbours for its next forward call: (x, x's version, mask, x_d)
STAGED_INPUT = "_qlora_fast_staged_input"
#: set on a block's last linear while its output is unused (the recomputation under checkpointing)
OUTPUT_UNUSED = "_qlora_output_unused"


def stage(layer, adapter: tuple | None = None, scales: tuple | None = None) -> None:
    """What the enclosing decoder block cast or decoded for ``layer``'s next forward call, in one operation for all
    its LoRA layers (``qlora_gpu.fast.staging.stage_layer``): ``adapter``, (A, B) already in the compute dtype;
    ``scales``, (absmax, keep for backward): this layer's double-quantized scales decoded to float32
    (``qlora_gpu.fast.block_scales``), and whether the backward pass uses them too — under gradient
    checkpointing, where the recomputation decodes them again — or decodes its own. Consumed by the next forward
    call, which ignores what does not fit its input (device, dtype)."""
    layer.__dict__[STAGED] = (adapter, scales)  # not through nn.Module.__setattr__: host time, 7 per block call


def stage_dropped(layer, x: torch.Tensor, keep: torch.Tensor, xd: torch.Tensor) -> None:
    """x_d = x ⊙ M / (1 − p) for ``layer``'s next forward call, computed with the staged mask ``keep`` together
    with other layers reading the same input (``qlora_gpu.fast.staging.drop_together``); used only by a call whose
    input is ``x`` itself, unmodified, and that uses that mask."""
    layer.__dict__[STAGED_INPUT] = (x, x._version, keep, xd)


def unstage(layer) -> None:
    """Drop what ``stage`` and ``stage_dropped`` left and no forward call used."""
    layer.__dict__.pop(STAGED, None)
    layer.__dict__.pop(STAGED_INPUT, None)


def decoded(quant_state, absmax: torch.Tensor | None):
    """``quant_state`` with its double-quantized scales replaced by ``absmax``, the same scales already decoded to
    float32 (``qlora_gpu.fast.block_scales``): bitsandbytes then uses them as a weight stored without double
    quantization, skipping the two kernels of its own decoding. ``quant_state`` itself when ``absmax`` is None."""
    if absmax is None:
        return quant_state
    return bnbf.QuantState(absmax=absmax, shape=quant_state.shape, code=quant_state.code,
                           blocksize=quant_state.blocksize, quant_type=quant_state.quant_type, dtype=quant_state.dtype)


def in_compute_dtype(x, lora_a, lora_b, staged=None):
    """A and B in x's (the compute) dtype, cast inside the autograd function (no ``ToCopyBackward`` node per
    adapter tensor and forward pass); ``staged``: the same two casts made beforehand for a whole decoder block."""
    if staged is not None:
        return staged
    return lora_a.to(x.dtype), lora_b.to(x.dtype)


def deferred_adapter_grads(ctx, grad_y, xd, lora_a, lora_b, h):
    """``qlora_gpu.lora_math.adapter_grads`` with ∂L/∂A and ∂L/∂B written into the flat optimizer's deferred
    buffer where it allows (``qlora_gpu.fast.deferred_grads``: ``ctx.params`` are the layer's parameters); None
    for a gradient written there (autograd gets nothing for it)."""
    need_a, need_b = ctx.needs_input_grad[1:3]
    dtype = grad_y.dtype
    out_a = deferred_grads.slot(ctx.params[0], dtype) if need_a else None
    out_b = deferred_grads.slot(ctx.params[1], dtype) if need_b else None
    gh, grad_a, grad_b = adapter_grads(grad_y, xd, lora_a, lora_b, h, ctx.scaling, need_a, need_b, out_a, out_b)
    return gh, None if out_a is not None else grad_a, None if out_b is not None else grad_b


class FastQLoRAFunction(torch.autograd.Function):
    """``qlora_gpu.lora.QLoRALinearFunction`` with what the block staged (module docstring): x (N, in) and the
    bias in the compute dtype, A and B in any (cast here unless ``staged``)."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, bias, keep, scale, scaling, weight, quant_state, staged=None,
                scales=None, xd=None, output_unused=False, out_dtype=None):
        absmax, keep_absmax = scales or (None, False)
        ctx.compute_dtype = x.dtype
        if output_unused:  # only what backward saves is needed (qlora_gpu.fast.staging.LAST_LINEAR): y not computed
            out = quant_state.shape[0] if quant_state is not None else weight.shape[0]
            # NaN, not uninitialised memory: should transformers or torch's checkpoint ever read this output, the
            # loss turns NaN instead of silently taking garbage (one fill kernel, where the product is a GEMM)
            base = x.new_full((x.shape[0], out), float("nan"), dtype=out_dtype or x.dtype)
        else:
            base = frozen_product(x, weight, decoded(quant_state, absmax), bias)
        ctx.weight, ctx.quant_state, ctx.scaling, ctx.keep_scale = weight, quant_state, scaling, scale
        absmax = absmax if keep_absmax else None  # saved, so checkpointing drops it and the recomputation's is used
        if lora_a is None:
            ctx.save_for_backward(absmax)
            return widened(base, out_dtype)
        ctx.params = lora_a, lora_b
        lora_a, lora_b = in_compute_dtype(x, lora_a, lora_b, staged)
        xd, h = adapter_forward(x, keep, scale, lora_a, xd)
        y = base if output_unused else add_adapter(base, h @ lora_b.t(), scaling, out_dtype)
        ctx.save_for_backward(absmax, xd, keep, lora_a, lora_b, h)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        need_x = ctx.needs_input_grad[0]
        grad_y = grad_y.to(ctx.compute_dtype)
        grad_x = grad_a = grad_b = None
        absmax, *saved = ctx.saved_tensors  # read once: checkpointing's saved-tensor hooks allow a single unpack
        if need_x:  # the frozen path: ∂L/∂x = G W, dequantizing the weight again
            w = frozen_weight_as(ctx.weight, decoded(ctx.quant_state, absmax), grad_y.dtype)
            grad_x = mm(grad_y, w)
            del w
        if saved:
            xd, keep, lora_a, lora_b, h = saved
            gh, grad_a, grad_b = deferred_adapter_grads(ctx, grad_y, xd, lora_a, lora_b, h)
            if need_x:  # ∂L/∂x_d = (∂L/∂H) A, through the mask
                grad_x = grad_x + dropped(mm(gh, lora_a), keep, ctx.keep_scale)
        return grad_x, grad_a, grad_b, None, None, None, None, None, None, None, None, None, None, None


class TritonQLoRAFunction(torch.autograd.Function):
    """``FastQLoRAFunction`` with the frozen path (and the adapter's up-projection and input gradient) in the
    fused kernels of ``qlora_gpu.fast.triton_kernels`` (kernels and launchers only; the autograd code is here).
    Same saved tensors (x_d, the mask, A, B, H — the weight is held by the module and re-read in backward, its
    double-quantized scales decoded again: nothing (out, in) and no float scales kept alive between forward and
    backward). Options: ``dot_f32`` and ``block`` of the launchers; ``staged`` and ``out_dtype`` as there (a wider
    ``out_dtype``: the adapter's output is added outside the kernel, in that dtype)."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, bias, keep, scale, scaling, weight, quant_state, dot_f32=None,
                block=None, staged=None, out_dtype=None):
        from .triton_kernels import fused_linear_forward, weight_from_bnb  # on first use: triton is optional

        w = weight_from_bnb(weight, quant_state)
        ctx.weight, ctx.quant_state, ctx.scaling, ctx.keep_scale = weight, quant_state, scaling, scale
        ctx.dot_f32, ctx.block, ctx.compute_dtype = dot_f32, block, x.dtype
        if lora_a is None:
            return widened(fused_linear_forward(x, w, bias, dot_f32=dot_f32, block=block), out_dtype)
        ctx.params = lora_a, lora_b  # the parameters (deferred_adapter_grads)
        lora_a, lora_b = in_compute_dtype(x, lora_a, lora_b, staged)
        xd, h = adapter_forward(x, keep, scale, lora_a)
        if out_dtype is None or out_dtype == x.dtype:
            y = fused_linear_forward(x, w, bias, h, lora_b, scaling, dot_f32=dot_f32, block=block)
        else:
            y = add_adapter(fused_linear_forward(x, w, bias, dot_f32=dot_f32, block=block), h @ lora_b.t(),
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
            gh, grad_a, grad_b = deferred_adapter_grads(ctx, grad_y, xd, lora_a, lora_b, h)
        if need_x:  # ∂L/∂x = G W + ((∂L/∂H) A) ⊙ M/(1-p), in one kernel
            w = weight_from_bnb(ctx.weight, ctx.quant_state)
            grad_x = fused_grad_input(grad_y, w, gh, lora_a, keep, ctx.keep_scale, dot_f32=ctx.dot_f32,
                                      block=ctx.block)
        return grad_x, grad_a, grad_b, None, None, None, None, None, None, None, None, None, None


def forward(layer, x: torch.Tensor, xc: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``layer`` (a ``qlora_gpu.lora.QLoRALinear``) applied to ``xc`` = x (N, in) in the compute dtype with the
    dropout mask ``keep`` it chose (given, drawn by its block, or its own), through what its block staged; returns
    y (N, out) in the layer's output dtype (or the compute dtype: the layer casts it)."""
    cdt = xc.dtype
    staged, scales = layer.__dict__.pop(STAGED, None) or (None, None)
    shared = layer.__dict__.pop(STAGED_INPUT, None)
    if staged is not None and (staged[0].dtype != cdt or staged[0].device != xc.device):
        staged = None
    scale = keep_scale(layer.dropout)
    bias = None if layer.bias is None else layer.bias.to(cdt)
    weight, quant_state = layer.frozen_weight()
    if scales is not None and (quant_state is None or scales[0].device != xc.device):
        scales = None
    xd = None
    if shared is not None and keep is not None and shared[2] is keep and shared[0] is x and shared[1] == x._version:
        xd = shared[3] if shared[3].dtype == cdt else None  # computed from this very input, with this mask
    out_dtype = layer.out_torch_dtype
    if layer.kernel == "triton":
        return TritonQLoRAFunction.apply(xc, layer.lora_A, layer.lora_B, bias, keep, scale, layer.scaling, weight,
                                         quant_state, None, None, staged, out_dtype)
    return FastQLoRAFunction.apply(xc, layer.lora_A, layer.lora_B, bias, keep, scale, layer.scaling, weight,
                                   quant_state, staged, scales, xd, layer.__dict__.get(OUTPUT_UNUSED, False),
                                   out_dtype)
