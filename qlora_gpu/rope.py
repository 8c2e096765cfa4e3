"""Rotary position embedding in fewer kernels, bit for bit transformers' (``use_fused_rope``).

A batch-1 training step is host-bound: its time goes with the number of kernels launched (about 40 µs each on an
H200). transformers' ``apply_rotary_pos_emb`` computes ``q * cos + rotate_half(q) * sin``: per tensor (q and k) 5
kernels forward (mul, neg, cat, mul, add) and 9 backward through autograd (two muls, the neg, two
``slice_backward`` of a zeros fill and a copy each, two accumulating adds). With ``sin_signed = cat(-sin1, sin2)``
(the halves of ``sin``; built once per model forward, for all layers) the same values are
``x * cos + swap(x) * sin_signed``, where ``swap`` exchanges the halves of the last dimension: 4 kernels forward
and 4 backward per tensor (tests/test_rope.py counts them)."""

from __future__ import annotations

import functools
import inspect
import sys

import torch
from torch import nn

#: the attribute of the ``sin`` tensor that a marked rotary embedding returns: its ``sin_signed``
_MARK = "_qlora_sin_signed"


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


def _dispatcher(original, extra: tuple[str, ...], default_unsqueeze: int):
    """A drop-in ``apply_rotary_pos_emb``: ours when ``sin`` carries the mark of a model set up by
    ``use_fused_rope`` (and no gradient is asked of cos or sin), transformers' ``original`` otherwise. ``extra``:
    the original's parameters after ``sin`` (``unsqueeze_dim``, and in older versions a ``position_ids`` that
    must be None)."""

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        sin_signed = getattr(sin, _MARK, None)
        if sin_signed is None or cos.requires_grad or sin.requires_grad:
            return original(q, k, cos, sin, *args, **kwargs)
        unsqueeze_dim = default_unsqueeze
        if args or kwargs:
            bound = dict(zip(extra, args, strict=False))
            if len(args) > len(extra) or bound.keys() & kwargs.keys() or not kwargs.keys() <= set(extra):
                return original(q, k, cos, sin, *args, **kwargs)
            bound.update(kwargs)
            if bound.get("position_ids") is not None:
                return original(q, k, cos, sin, *args, **kwargs)
            unsqueeze_dim = bound.get("unsqueeze_dim", default_unsqueeze)
        return rope(q, k, cos, sin_signed, unsqueeze_dim)

    apply_rotary_pos_emb._qlora_original = original
    return apply_rotary_pos_emb


def _patch_module(module) -> bool:
    """Route ``module.apply_rotary_pos_emb`` through ``_dispatcher``, once; False (nothing changed) unless its
    signature and its values are those of the standard ``q * cos + rotate_half(q) * sin``."""
    fn = getattr(module, "apply_rotary_pos_emb", None)
    if getattr(fn, "_qlora_original", None) is not None:
        return True
    if not callable(fn) or not callable(getattr(module, "rotate_half", None)):
        return False
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    names = tuple(p.name for p in params)
    if names[:4] != ("q", "k", "cos", "sin") or names[4:] not in (("unsqueeze_dim",),
                                                                  ("position_ids", "unsqueeze_dim")):
        return False
    if any(p.kind is not p.POSITIONAL_OR_KEYWORD for p in params) or params[-1].default not in (1, 2) or (
            len(params) == 6 and params[4].default is not None):
        return False
    if not _probe(fn):
        return False
    module.apply_rotary_pos_emb = _dispatcher(fn, names[4:], params[-1].default)
    return True


def _probe(fn) -> bool:
    """Whether ``fn`` gives our values on a small float64 case (GQA, both head layouts)."""
    g = torch.Generator().manual_seed(0)
    cos, sin = torch.randn(2, 2, 3, 8, dtype=torch.float64, generator=g)
    try:
        with torch.no_grad():
            for dim, shape_q, shape_k in ((1, (2, 4, 3, 8), (2, 2, 3, 8)), (2, (2, 3, 4, 8), (2, 3, 2, 8))):
                q = torch.randn(shape_q, dtype=torch.float64, generator=g)
                k = torch.randn(shape_k, dtype=torch.float64, generator=g)
                theirs = fn(q, k, cos, sin, unsqueeze_dim=dim)
                ours = rope(q, k, cos, signed_sin(sin), dim)
                if not all(torch.equal(a, b) for a, b in zip(theirs, ours, strict=True)):
                    return False
    except Exception:  # noqa: BLE001 - any surprise means: not the standard form, leave it alone
        return False
    return True


def _marked_rotary(forward, *args, **kwargs):
    """The rotary embedding's ``forward``, its ``sin`` marked with ``signed_sin(sin)`` (once per model forward;
    every layer's attention, and a checkpointed layer's recomputation, gets these same tensor objects)."""
    out = forward(*args, **kwargs)
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], torch.Tensor):
        setattr(out[1], _MARK, signed_sin(out[1]))
    return out


def use_fused_rope(hf: nn.Module) -> bool:
    """Route the rotary embedding of a transformers model's attention through ``rope``: the modeling modules of its
    attention layers get ``_dispatcher`` as their ``apply_rotary_pos_emb`` (transformers calls it as a module
    global, so it cannot be swapped per model), and this model's rotary embedding marks the ``sin`` it returns
    (an instance ``forward``) — other models in the process, whose ``sin`` is unmarked, still run transformers'
    function. Idempotent. False, and nothing of this model changed, when its modeling code is not the standard
    rotate-half form (checked on its signature and on values)."""
    rotary = getattr(getattr(hf, "model", hf), "rotary_emb", None)
    modules = {sys.modules.get(type(m).__module__) for m in hf.modules() if type(m).__name__.endswith("Attention")}
    if rotary is None or not modules or None in modules:
        return False
    if not all([_patch_module(module) for module in modules]):
        return False
    if not (isinstance(rotary.forward, functools.partial) and rotary.forward.func is _marked_rotary):
        rotary.forward = functools.partial(_marked_rotary, rotary.forward)
    return True
