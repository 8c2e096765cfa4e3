"""Rotary position embedding in fewer kernels, bit for bit transformers' (installed in a model by
``qlora_gpu.patches.use_fused_rope``).

A batch-1 training step is host-bound: its time goes with the number of kernels launched (each costs tens of
microseconds of host time, docs/benchmarks.md). transformers' ``apply_rotary_pos_emb`` computes ``q * cos +
rotate_half(q) * sin``: per tensor (q and k) 5 kernels forward (mul, neg, cat, mul, add) and 9 backward through autograd
(two muls, the neg, two ``slice_backward`` of a zeros fill and a copy each, two accumulating adds). With ``sin_signed =
cat(-sin1, sin2)`` (the halves of ``sin``; built once per model forward, for all layers) the same values are ``x * cos +
swap(x) * sin_signed``, where ``swap`` exchanges the halves of the last dimension: 4 kernels forward and 4 backward per
tensor (tests/test_rope.py counts them)."""

from __future__ import annotations

import torch


def _swap(x: torch.Tensor) -> torch.Tensor:
    """The halves of the last dimension exchanged. One cat of two slices rather than ``torch.roll``: both are one
    operator, but CUDA's roll first copies a non-contiguous input (q and k are transposed views), and its cat reads
    strided inputs in its single kernel."""
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], x[..., :half]), dim=-1)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``cat(-sin1, sin2)``: ``rotate_half(x) * sin == swap(x) * signed_sin(sin)`` exactly, since
    ``(-a) * b == a * (-b)`` in IEEE arithmetic (signs of zeros included)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


class _Rope(torch.autograd.Function):
    """``x * cos + swap(x) * sin_signed`` for q and k in one autograd node (one apply, one node: host time);
    cos and sin_signed broadcast over the heads, so k may have fewer heads than q (GQA).

    Backward: swap is a permutation and its own inverse, so the input gradient is
    ``(g * cos) + swap(g * sin_signed)``, each product rounded to x's dtype first as autograd's ``mul`` backward
    rounds it. Autograd's gradient is the same sum with the second term split in two zero-padded halves
    (``slice_backward``) added one after the other; adding an exact zero changes nothing but possibly the sign of
    a zero result, so the two gradients are equal under ``torch.equal`` (which has -0.0 == 0.0)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin_signed):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(cos, sin_signed)
        ctx.dtypes = q.dtype, k.dtype
        return tuple(x * cos + _swap(x) * sin_signed for x in (q, k))

    @staticmethod
    def backward(ctx, gq, gk):
        cos, sin_signed = ctx.saved_tensors
        grads = [None, None]
        for i, (g, dtype) in enumerate(zip((gq, gk), ctx.dtypes, strict=True)):
            if g is not None and ctx.needs_input_grad[i]:
                grads[i] = (g * cos).to(dtype) + _swap((g * sin_signed).to(dtype))
        return grads[0], grads[1], None, None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, unsqueeze_dim: int = 1):
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)`` with ``sin_signed = signed_sin(sin)``:
    the same bits forward, and input gradients equal under ``torch.equal``. No gradient flows to cos or sin."""
    return _Rope.apply(q, k, cos.unsqueeze(unsqueeze_dim), sin_signed.unsqueeze(unsqueeze_dim))
