"""Causal self-attention with grouped-query heads (GQA), rotary positions and a KV cache.

Shapes: x (B, T, d). H query heads share Hkv key/value heads in groups of G = H / Hkv (query head h reads
key/value head h // G, as transformers' ``repeat_kv`` arranges them). Queries are kept as (B, Hkv, G, T, D)
so that each group multiplies its shared keys without copying them G times.

Forward, per head:  S = Q K^T / sqrt(D) + M (M = -inf above the diagonal),  P = softmax(S),  O = P V.
Backward, with dO the gradient of O (derivation in docs/transformer.md):

    dV = P^T dO                    (summed over the G query heads that share the value head)
    dP = dO V^T
    dS = P * (dP - rowsum(dP * P))  (softmax backward)
    dQ = dS K / sqrt(D),  dK = dS^T Q / sqrt(D)   (dK summed over the group, like dV)

then the rotations are undone (``apply_rope_backward``) and the q/k/v projections' backward sum into dx.

Qwen3 normalizes each head's query and key (an RMSNorm over the head's D values, one weight vector for all heads)
between the projection and the rotation; its backward (``RMSNorm.backward``) runs between the two in reverse.

Packed sequences (``position_ids``, (B, T), restarting at 0 with every example; ``qlora_ref.data.collate_packed``):
each token is rotated by its position inside its own example, and no example attends to another — M is
block-diagonal causal (``packed_causal_mask``). The scores of a row are computed one example at a time
(``example_spans``): the blocks of M off the diagonal are all -inf, so their P and dS are 0 and computing them
would change nothing (``tests/test_packing.py`` checks the result against the whole row under
``packed_causal_mask``). That keeps the cost of a row of n examples at the sum of their squared lengths, not the
row's squared length, as FlashAttention's variable-length kernel does (``qlora_gpu.packing``).
"""

from __future__ import annotations

import numpy as np

from .rmsnorm import RMSNorm
from .rope import RotaryEmbedding, apply_rope, apply_rope_backward


class KVCache:
    """Keys and values (after rotation) of the positions seen so far, one entry per layer."""

    def __init__(self, num_layers: int):
        self.keys: list[np.ndarray | None] = [None] * num_layers
        self.values: list[np.ndarray | None] = [None] * num_layers

    def length(self, layer: int = 0) -> int:
        """How many positions a layer has cached (the position of its next token)."""
        return 0 if self.keys[layer] is None else self.keys[layer].shape[2]

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add (B, Hkv, T, D) keys/values of new positions; return all cached ones."""
        if self.keys[layer] is not None:
            k = np.concatenate([self.keys[layer], k], axis=2)
            v = np.concatenate([self.values[layer], v], axis=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


def causal_mask(t: int, s: int, past: int, sliding_window: int | None = None) -> np.ndarray:
    """Additive (t, s) mask: query i (at position past + i) sees keys j <= past + i (and, with a sliding
    window, only the last ``sliding_window`` of them)."""
    q_pos = past + np.arange(t)[:, None]
    k_pos = np.arange(s)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= q_pos - k_pos < sliding_window
    return np.where(allowed, np.float32(0.0), np.float32(-np.inf))


def segment_ids(position_ids: np.ndarray) -> np.ndarray:
    """(B, T) index of the example each token belongs to, from 0 in every row: a new example begins wherever a
    position does not follow the one before by one (transformers' ``find_packed_sequence_indices``)."""
    position_ids = np.asarray(position_ids)
    starts = np.zeros(position_ids.shape, dtype=np.int64)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return np.cumsum(starts, axis=1)


def packed_causal_mask(position_ids: np.ndarray, sliding_window: int | None = None) -> np.ndarray:
    """Additive (B, 1, 1, T, T) mask of packed rows: query i sees key j <= i of the same example only (and, with a
    sliding window, only the last ``sliding_window`` of them) — block-diagonal causal."""
    seg = segment_ids(position_ids)
    t = seg.shape[1]
    allowed = (seg[:, :, None] == seg[:, None, :]) & (np.arange(t)[None, None, :] <= np.arange(t)[None, :, None])
    if sliding_window is not None:
        allowed &= np.arange(t)[None, :, None] - np.arange(t)[None, None, :] < sliding_window
    return np.where(allowed, np.float32(0.0), np.float32(-np.inf))[:, None, None]


def example_spans(position_ids: np.ndarray) -> list[tuple[int, int, int]]:
    """``(row, start, stop)`` of every example of packed rows (the padding at the end of a row is one too), in
    order: the diagonal blocks of ``packed_causal_mask``."""
    seg = segment_ids(position_ids)
    spans = []
    for b, row in enumerate(seg):
        cuts = np.flatnonzero(np.diff(row)) + 1
        edges = [0, *cuts.tolist(), len(row)]
        spans += [(b, s, e) for s, e in zip(edges[:-1], edges[1:], strict=True)]
    return spans


def softmax(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Softmax over the last axis (max subtracted first, so exp never overflows; -inf entries become 0).
    ``out`` may be ``x`` itself (in place)."""
    e = np.subtract(x, np.max(x, axis=-1, keepdims=True), out=out)
    np.exp(e, out=e)
    e /= np.sum(e, axis=-1, keepdims=True)
    return e


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, scale: float, groups: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """``O = softmax(Q K^T scale + M) V`` for rotated q (B, Hkv, G*T, D), a group's queries stacked, and k, v
    (B, Hkv, S, D); ``mask`` broadcasts to (B, Hkv, G, T, S). Returns O (B, Hkv, G*T, D) and P."""
    B, Hkv, GT, _ = q.shape
    scores = np.matmul(q, np.ascontiguousarray(k.swapaxes(-1, -2)))  # (B, Hkv, G*T, S)
    scores *= np.float32(scale)
    scores.reshape(B, Hkv, groups, GT // groups, k.shape[2])[...] += mask
    probs = softmax(scores, out=scores)  # in place: the same values, one (G*T, S) buffer per head
    return np.matmul(probs, v), probs


def attend_backward(d_out: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, probs: np.ndarray,
                    scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dQ, dK, dV of :func:`attend` from dO (B, Hkv, G*T, D) (derivation in docs/transformer.md)."""
    # stacking the G query heads of a group along the rows makes the sums over the group part of the matmuls
    dv = np.matmul(probs.swapaxes(-1, -2), d_out)  # (B, Hkv, S, D)
    dp = np.matmul(d_out, np.ascontiguousarray(v.swapaxes(-1, -2)))  # (B, Hkv, G*T, S)
    ds = dp  # reuse the buffer: dS = P * (dP - rowsum(dP * P)) * scale
    ds -= np.sum(dp * probs, axis=-1, keepdims=True)
    ds *= probs
    ds *= np.float32(scale)
    return np.matmul(ds, k), np.matmul(ds.swapaxes(-1, -2), q), dv


class Attention:
    """Multi-head causal attention; q/k/v/o are linear layers with ``forward``/``backward`` (``QLoRALinear``).
    Derivation of the backward: docs/transformer.md#causal-grouped-query-attention."""

    def __init__(self, q_proj, k_proj, v_proj, o_proj, num_heads: int, num_kv_heads: int, head_dim: int,
                 rope: RotaryEmbedding, layer_idx: int = 0, sliding_window: int | None = None,
                 qk_norms: tuple[RMSNorm, RMSNorm] | None = None):
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.q_norm, self.k_norm = qk_norms if qk_norms is not None else (None, None)  # Qwen3
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.groups = num_heads // num_kv_heads
        self.scale = head_dim ** -0.5
        self.rope = rope
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self._cache = None

    def linears(self) -> dict:
        return {"q_proj": self.q_proj, "k_proj": self.k_proj, "v_proj": self.v_proj, "o_proj": self.o_proj}

    def forward(self, x: np.ndarray, kv_cache: KVCache | None = None, position_ids: np.ndarray | None = None
                ) -> np.ndarray:
        """``position_ids`` (B, T): packed rows (training only), see the module docstring."""
        B, T, _ = x.shape
        Hkv, G, D = self.num_kv_heads, self.groups, self.head_dim
        if position_ids is not None and kv_cache is not None:
            raise ValueError("position_ids (packed sequences) are for training; generation with a KV cache takes none")
        past = 0 if kv_cache is None else kv_cache.length(self.layer_idx)
        # (T, D) tables, or with position_ids (B, 1, 1, T, D): one per row, broadcast over heads and groups
        cos, sin = self.rope.cos_sin(np.arange(past, past + T) if position_ids is None else position_ids[:, None, None])

        # (B, T, H*D) -> (B, Hkv, G, T, D) for queries, (B, Hkv, T, D) for keys and values
        q = self.q_proj.forward(x).reshape(B, T, Hkv, G, D).transpose(0, 2, 3, 1, 4)
        k = self.k_proj.forward(x).reshape(B, T, Hkv, D).transpose(0, 2, 1, 3)
        v = self.v_proj.forward(x).reshape(B, T, Hkv, D).transpose(0, 2, 1, 3)
        if self.q_norm is not None:
            q, k = self.q_norm.forward(q), self.k_norm.forward(k)
        q = apply_rope(q, cos, sin).reshape(B, Hkv, G * T, D)  # a group's queries stacked: one matmul per kv head
        k = apply_rope(k[:, :, None], cos, sin)[:, :, 0]  # as one group of queries, so that both tables broadcast
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer_idx, k, v)
        S_len = k.shape[2]

        spans = None if position_ids is None else example_spans(position_ids)
        if spans is None:
            out, probs = attend(q, k, v, causal_mask(T, S_len, past, self.sliding_window), self.scale, G)
        else:  # one example at a time: the diagonal blocks of packed_causal_mask
            out, probs = np.empty(q.shape, q.dtype), []  # C order: _queries writes through a reshaped view
            for b, s, e in spans:
                o, p = attend(self._queries(q, b, s, e), k[b:b + 1, :, s:e], v[b:b + 1, :, s:e],
                              causal_mask(e - s, e - s, 0, self.sliding_window), self.scale, G)
                self._queries(out, b, s, e, o)
                probs.append(p)
        out = out.reshape(B, Hkv, G, T, D).transpose(0, 3, 1, 2, 4).reshape(B, T, Hkv * G * D)
        if kv_cache is None:  # training: keep what backward needs
            self._cache = (q, k, v, probs, spans, cos, sin)
        return self.o_proj.forward(out)

    def _queries(self, q: np.ndarray, b: int, s: int, e: int, value: np.ndarray | None = None) -> np.ndarray:
        """Tokens s:e of row b of stacked queries q (B, Hkv, G*T, D), as (1, Hkv, G*(e-s), D) for :func:`attend`
        (a copy); with ``value``, write it there instead."""
        B, Hkv, GT, D = q.shape
        rows = q.reshape(B, Hkv, self.groups, GT // self.groups, D)[b, :, :, s:e]
        if value is not None:
            assert np.shares_memory(rows, q), "writing needs a C-ordered q (a reshape that is a view)"
            rows[...] = value.reshape(rows.shape)
        return rows.reshape(1, Hkv, self.groups * (e - s), D)

    def backward(self, grad: np.ndarray) -> np.ndarray:
        q, k, v, probs, spans, cos, sin = self._cache
        B, Hkv, GT, D = q.shape
        G, T = self.groups, GT // self.groups
        d_out = self.o_proj.backward(grad).reshape(B, T, Hkv, G, D).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, GT, D)

        if spans is None:
            dq, dk, dv = attend_backward(d_out, q, k, v, probs, self.scale)
        else:  # packed: example by example, as in forward
            dq, dk, dv = np.empty(q.shape, q.dtype), np.empty(k.shape, k.dtype), np.empty(v.shape, v.dtype)
            for (b, s, e), p in zip(spans, probs, strict=True):
                dq_ex, dk[b:b + 1, :, s:e], dv[b:b + 1, :, s:e] = attend_backward(
                    self._queries(d_out, b, s, e), self._queries(q, b, s, e), k[b:b + 1, :, s:e],
                    v[b:b + 1, :, s:e], p, self.scale)
                self._queries(dq, b, s, e, dq_ex)

        dq = apply_rope_backward(dq.reshape(B, Hkv, G, T, D), cos, sin)
        dk = apply_rope_backward(dk[:, :, None], cos, sin)[:, :, 0]
        if self.q_norm is not None:
            dq, dk = self.q_norm.backward(dq), self.k_norm.backward(dk)
        dq = dq.transpose(0, 3, 1, 2, 4).reshape(B, T, Hkv * G * D)
        dk = dk.transpose(0, 2, 1, 3).reshape(B, T, Hkv * D)
        dv = dv.transpose(0, 2, 1, 3).reshape(B, T, Hkv * D)
        dx = self.q_proj.backward(dq)  # a new array: the other two paths are added in place, in the same order
        dx += self.k_proj.backward(dk)
        dx += self.v_proj.backward(dv)
        return dx

    def clear_cache(self) -> None:
        self._cache = None
        if self.q_norm is not None:
            self.q_norm.clear_cache()
            self.k_norm.clear_cache()
