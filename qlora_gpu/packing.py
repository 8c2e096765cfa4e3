"""Packed sequences on torch: attention kept inside each example through the position ids, with no dense mask.

A packed row holds several examples one after the other, their positions restarting at 0 with each
(``qlora_ref.data.collate_packed``); a new example begins wherever a position does not follow its predecessor by
one (``qlora_ref.model.attention.segment_ids``, transformers' ``find_packed_sequence_indices``). The reference
masks the (T, T) scores block-diagonal causal; here no (T, T) mask is built at all — ``varlen_attention_forward``
cuts the flattened batch at the examples' boundaries (``cu_seqlens``, the cumulative lengths FlashAttention's
variable-length kernel takes) and attends causally inside each piece:

- on CUDA in 16-bit, with torch's ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention's variable-length
  kernel: one launch for all the examples of the batch);
- otherwise (the CPU, float32, a sliding window, attention dropout) with one ``scaled_dot_product_attention`` call
  per example, ``is_causal=True`` (a sliding window adds a mask of that example's size only).

transformers 5.25 also keeps packed examples apart by itself — from ``position_ids``, but only when it is given
``attention_mask=None`` and no cache (``use_cache=False``): an all-ones attention mask, or the cache that
``use_cache`` (on by default) creates, and every example attends to the ones before it in the row
(tests/test_packing.py shows both; docs/long_context.md). It then builds a dense (B, 1, T, T) mask for eager and
SDPA attention. ``register`` registers this module's attention with transformers under the name ``VARLEN`` (which
has no mask function, so transformers passes no mask); ``qlora_gpu.patches.use_varlen_attention`` checks it on a
tiny packed batch and switches a model to it.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import torch
import torch.nn.functional as F

#: the name of ``varlen_attention_forward`` in transformers' ``AttentionInterface``
VARLEN = "qlora_varlen"


def cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor:
    """int32 (N + 1,) start offsets of the N examples of a packed (B, T) batch in its flattening to B * T tokens,
    and B * T at the end: every row starts an example, and so does every position that does not follow the one
    before by one (the rule of ``qlora_ref.model.attention.segment_ids``)."""
    b, t = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    idx = torch.nonzero(starts.reshape(-1)).reshape(-1)
    return torch.cat([idx, idx.new_tensor([b * t])]).to(torch.int32)


def _sliding_window(module) -> int | None:
    """The attention module's own window where it keeps one — None on the full-attention layers of a model that
    mixes the two (Qwen2's ``max_window_layers``, Gemma's ``layer_types``) — else its config's (Mistral)."""
    config = getattr(module, "config", None)
    if hasattr(module, "sliding_window"):
        window = module.sliding_window
    else:
        window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) is False:  # Qwen2 keeps a value unused
        return None
    return window


@functools.cache
def _varlen_kernel():
    """torch's FlashAttention variable-length function and how this torch version asks it for causal attention
    and grouped-query heads, or None (torch < 2.9; the signature changed between versions, so it is read, once per
    process: not at every attention call)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
        params = inspect.signature(varlen_attn).parameters
    except (ImportError, TypeError, ValueError):
        return None
    if "is_causal" in params:
        causal = {"is_causal": True}
    elif "window_size" in params:
        causal = {"window_size": (-1, 0)}
    else:
        return None
    return varlen_attn, causal, "enable_gqa" in params, "scale" in params


def _call_varlen(kernel, q, k, v, cu: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """``kernel`` (``_varlen_kernel()``'s tuple) on flattened (N, H, D) queries and (N, Hkv, D) keys/values, cut
    at ``cu``: causal attention inside each piece."""
    varlen_attn, causal, gqa, has_scale = kernel
    if not gqa and k.shape[1] != q.shape[1]:
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    extra = dict(causal, **({"enable_gqa": True} if gqa and k.shape[1] != q.shape[1] else {}))
    if has_scale:
        extra["scale"] = scaling
    max_len = int((cu[1:] - cu[:-1]).max())
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **extra)


def probe_varlen_kernel(kernel, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``kernel`` (``_varlen_kernel()``'s tuple) attends causally inside each example, and only there:
    three examples (lengths 5, 1, 7) with grouped-query heads, against one float32 SDPA call per example
    (``_per_example``). Each output row is a convex combination of value rows, so two correct kernels differ by a
    few roundings of the 16-bit output (within 4u·max|v|, u = 2⁻⁸ for bfloat16); attending across an example or
    to later tokens moves rows by O(|v|). From a generator of its own (the global streams are left as they were).
    Any exception counts as a failure."""
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(13, heads, 16, generator=g).to(device=device, dtype=dtype) for heads in (4, 2, 2))
    try:
        with torch.no_grad():
            theirs = _call_varlen(kernel, q, k, v, cu, 16 ** -0.5).float()
            ours = _per_example(q.float(), k.float(), v.float(), cu.tolist(), 16 ** -0.5, 0.0, None)
        u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
        return theirs.shape == ours.shape and bool(((theirs - ours).abs() <= 4 * u * v.float().abs().max()).all())
    except Exception:  # noqa: BLE001 - a kernel that cannot even run the probe is not trusted
        return False


@functools.cache
def varlen_kernel_trusted(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's variable-length kernel passed ``probe_varlen_kernel`` on ``device`` in ``dtype`` (probed once
    per process): a prototype API whose arguments have moved between torch versions, used only on CUDA, which the
    check of ``qlora_gpu.patches.register_varlen_attention`` (a tiny model on the CPU) never reaches. Where it
    fails, packed batches take one SDPA call per example: slower, the same attention (and a warning says so)."""
    kernel = _varlen_kernel()
    if kernel is None:
        return False
    if probe_varlen_kernel(kernel, device, dtype):
        return True
    warnings.warn(f"torch {torch.__version__}'s variable-length attention kernel failed its check on {device} in "
                  f"{str(dtype).removeprefix('torch.')} (attention across examples or to later tokens, or a call "
                  "that fails): packed batches take one SDPA call per example instead (slower, correct)",
                  stacklevel=2)
    return False


def varlen_kernel_status() -> str:
    """One line for ``qlora doctor``: whether packed batches on CUDA use torch's variable-length kernel."""
    if _varlen_kernel() is None:
        return f"none in torch {torch.__version__} (one SDPA call per example)"
    if not torch.cuda.is_available():
        return "present; checked on a CUDA device at first use (none here)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # said here instead
        ok = varlen_kernel_trusted(torch.device("cuda", torch.cuda.current_device()), torch.bfloat16)
    return "passed its check (bfloat16)" if ok else "failed its check: one SDPA call per example instead"


def _per_example(q, k, v, bounds: list[int], scaling: float | None, dropout: float, window: int | None):
    """(B*T, H, D) queries, (B*T, Hkv, D) keys/values: one causal SDPA call per example, concatenated."""
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (x[s:e].transpose(0, 1)[None] for x in (q, k, v))  # (1, heads, L, D)
        mask = None
        if window is not None and e - s > window:  # causal and within the window: this example's (L, L) only
            i = torch.arange(e - s, device=q.device)
            mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, dropout_p=dropout,
                                                   is_causal=mask is None, scale=scaling,
                                                   enable_gqa=gqa)[0].transpose(0, 1))
    return torch.cat(outs)


def varlen_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query (B, H, T, D), key/value (B, Hkv, S, D) -> ((B, T, H, D), None).
    Causal attention inside each example of a packed batch (see the module docstring). With a mask, a cache
    (S != T) or no positions, transformers' SDPA attention does the work instead."""
    b, h, t, d = query.shape
    if attention_mask is not None or position_ids is None or key.shape[2] != t:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    cu = cu_seqlens(position_ids.expand(b, t))
    q, k, v = (x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (query, key, value))
    window = _sliding_window(module)
    kernel = None
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and varlen_kernel_trusted(query.device,
                                                                                                query.dtype):
        kernel = _varlen_kernel()  # cached: the one the probe checked
    if kernel is not None and not kernel[3] and scaling is not None and scaling != d ** -0.5:
        kernel = None  # a version without ``scale`` applies 1/sqrt(D) only
    if kernel is not None and window is None and dropout == 0.0:
        out = _call_varlen(kernel, q, k, v, cu, scaling)
    else:
        out = _per_example(q, k, v, cu.tolist(), scaling, dropout, window)
    return out.reshape(b, t, h, d), None


def register() -> str:
    """Register ``varlen_attention_forward`` with transformers as ``VARLEN`` (idempotent); returns the name.
    Unchecked: models are switched to it by ``qlora_gpu.patches.use_varlen_attention``, which checks it first."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    return VARLEN


__all__ = ["VARLEN", "cu_seqlens", "register", "varlen_attention_forward"]
