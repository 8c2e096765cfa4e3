"""RMSNorm in fewer kernels with transformers' roundings (installed by ``qlora_gpu.patches.use_fused_rms_norm``)."""

from __future__ import annotations

import torch
from torch import nn


def rms_norm(norm: nn.Module, hidden: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """A Llama/Mistral/Qwen2 RMSNorm with a float32 weight, returning the residual stream's dtype (the paper keeps
    norms in float32, section 3) or ``out_dtype``: x / rms(x) computed in float32 and rounded to x's dtype, times
    the float32 weight, rounded again — the rounding steps of transformers' ``LlamaRMSNorm.forward`` followed by the
    cast to the stream's dtype (or to ``out_dtype``: with a float32 stream and bfloat16 compute, the cast the next
    layers' bfloat16 matrix products make of transformers' float32 output, ``qlora_gpu.model.set_residual_dtype``).
    The normalization is torch's ``aten._fused_rms_norm``: one kernel forward and one
    backward on CUDA where transformers' code launches seven and about nine (on the CPU it is those same
    operators, and the result is bit-identical to transformers'; on CUDA its reduction order may move the
    normalized value by one bfloat16 step, rarely, docs/benchmarks.md)."""
    normed = torch.ops.aten._fused_rms_norm(hidden, [hidden.shape[-1]], None, norm.variance_epsilon)[0]
    if norm.weight.requires_grad:  # a trainable norm: autograd's product, which also gives the weight's gradient
        return (norm.weight * normed).to(out_dtype or hidden.dtype)
    return _WeightedCast.apply(norm.weight, normed, out_dtype)


class _WeightedCast(torch.autograd.Function):
    """(w ⊙ n) in n's dtype (or ``out_dtype``) for a frozen float32 w: ``torch.mul`` into a tensor of that dtype
    computes the float32 product and rounds it once more on the store — the roundings of ``(w * n).to(dtype)`` in
    one kernel where that launches two, and in backward ``g ⊙ w`` likewise in one (into n's dtype) where autograd
    launches three (widen g, multiply, round to n's dtype)."""

    @staticmethod
    def forward(ctx, weight, normed, out_dtype=None):
        ctx.weight = weight  # frozen and kept by its module: held directly, not as a saved tensor
        ctx.normed_dtype = normed.dtype
        return torch.mul(weight, normed, out=torch.empty_like(normed, dtype=out_dtype or normed.dtype))

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph: the same product, differentiable (out= is not)
            return None, (grad * ctx.weight).to(ctx.normed_dtype), None
        return None, torch.mul(grad, ctx.weight, out=torch.empty_like(grad, dtype=ctx.normed_dtype)), None
