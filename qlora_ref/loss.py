"""Causal language-model loss: cross entropy of the next token, with ignored positions.

A causal LM predicts token ``t+1`` from tokens ``0..t``. Given logits ``[B, T, V]`` for a batch and the
``labels`` ``[B, T]`` (a copy of ``input_ids`` with ``-100`` on positions that carry no loss: the prompt when the
loss is on responses only, and the padding), the loss compares ``logits[:, t]`` with ``labels[:, t + 1]``:

    loss = - sum_{(b, t) counted} log softmax(logits[b, t])[labels[b, t + 1]] / N

where ``N`` is the number of counted targets (``labels[:, 1:] != -100``). This is what transformers'
``ForCausalLMLoss`` computes (shift, flatten, ``cross_entropy(..., ignore_index=-100, reduction="mean")``), and,
with ``num_items_in_batch``, its gradient-accumulation variant (a sum divided by the number of counted targets in
the whole accumulated batch, so micro-batches of different lengths weigh their tokens equally).

The backward pass is the classic softmax-cross-entropy gradient,

    d loss / d logits[b, t] = (softmax(logits[b, t]) - onehot(labels[b, t + 1])) / N   for counted (b, t)

and zero elsewhere (including the last position of every row, which has no next token).

Chunked (``chunked_lm_head_loss``): the LM head and the loss together, a chunk of counted positions at a time, so
that the (positions x vocabulary) logits never exist whole — at long context they are the largest tensor of a
step (131,072 tokens x 128,256 float32 logits = 67 GB, and the softmax as much again). The forward pass keeps
per position only its log-sum-exp; the backward pass computes each chunk's logits again from the hidden states,
its softmax as exp(logits - logsumexp), and the gradient of the hidden states

    d loss / d h[b, t] = (softmax(h[b, t] W^T) - onehot(labels[b, t + 1])) W / N

Positions without a target (the prompt, padding, each row's last) need no logits at all. Peak memory for the
loss falls from 2 x positions x vocabulary x 4 bytes to about 2 x chunk x vocabulary x 4 bytes
(``qlora_ref.memory.logits_bytes``), for one more LM-head product per chunk.

One deliberate difference: when no target is counted (``N == 0``) torch returns NaN (0/0); here the loss is 0 and
the gradient is zero, so that a batch without response tokens cannot poison a training run. The data pipeline
drops such examples and reports them, so this only matters for hand-made batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100


@dataclass
class LossContext:
    """What the backward pass needs: the softmax of the counted rows, their targets and where they came from."""

    shape: tuple[int, ...]  # the logits' shape [B, T, V]
    dtype: np.dtype  # the logits' dtype (the gradient has the same)
    rows: np.ndarray  # flat indices (b * T + t) of counted positions, int64
    targets: np.ndarray  # their target token ids, int64
    probs: np.ndarray  # softmax of logits at the counted positions, float32 [N, V]
    denominator: float  # N, or num_items_in_batch


def _check(logits: np.ndarray, labels: np.ndarray, what: str = "logits") -> None:
    """The shapes of ``logits`` [B, T, V] (or, ``what="hidden states"``, [B, T, d]) and ``labels`` [B, T]."""
    if logits.ndim != 3:
        raise ValueError(f"{what} must be [batch, time, {'vocab' if what == 'logits' else 'hidden'}], "
                         f"got shape {logits.shape}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels shape {labels.shape} does not match {what}' [batch, time] {logits.shape[:2]}")


def _check_targets(labels: np.ndarray, vocab: int) -> None:
    counted = labels[labels != IGNORE_INDEX]
    if counted.size and (counted.min() < 0 or counted.max() >= vocab):
        raise ValueError(f"labels must be -100 or in [0, {vocab}), got values in [{counted.min()}, {counted.max()}]")


def _targets(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flat indices b * T + t of the counted positions, their targets): position t predicts the label at t + 1,
    the last position of a row predicts nothing."""
    B, T = labels.shape
    shifted = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    shifted[:, :-1] = labels[:, 1:]
    flat_labels = shifted.reshape(-1)
    rows = np.flatnonzero(flat_labels != IGNORE_INDEX)
    return rows, flat_labels[rows]


def _softmax_parts(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(exp(z - max), its row sums, logsumexp) of float32 rows [N, V], the max subtracted so exp never overflows."""
    zmax = z.max(axis=1, keepdims=True) if len(z) else np.zeros((0, 1), np.float32)
    e = np.subtract(z, zmax)
    np.exp(e, out=e)  # in place: a (N, V) array is the largest of a step, each new one costs page faults
    s = e.sum(axis=1, keepdims=True)
    return e, s, np.log(s) + zmax


def _as_slice(rows: np.ndarray) -> slice | np.ndarray:
    """The flat positions ``rows`` as a slice when they are consecutive (every position of a batch of one but the
    last): indexing with it gives a view, not a copy of (N, V) values."""
    if rows.size and rows[-1] - rows[0] == rows.size - 1:
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows


def causal_lm_loss(
    logits: np.ndarray, labels: np.ndarray, num_items_in_batch: int | None = None
) -> tuple[float, LossContext]:
    """Mean next-token cross entropy over counted targets; returns ``(loss, ctx)`` for :func:`causal_lm_loss_backward`.

    Counted targets are the responses: the paper finetunes "only on the response" (section 5.1; ablations in
    Appendix B), and the data pipeline labels every other token ``-100``.

    ``logits`` is ``[B, T, V]`` (float32, or bfloat16/float16: computed in float32), ``labels`` ``[B, T]`` int
    with ``-100`` where no loss is taken. ``num_items_in_batch``: divide the summed loss by this instead of the
    number of counted targets (transformers' gradient-accumulation convention).
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    _check(logits, labels)
    _check_targets(labels, logits.shape[2])
    B, T, V = logits.shape
    rows, targets = _targets(labels)
    n = rows.size
    denominator = float(n if num_items_in_batch is None else num_items_in_batch)

    z = logits.reshape(B * T, V)[_as_slice(rows)].astype(np.float32, copy=False)  # [N, V], the counted rows
    e, s, logsumexp = _softmax_parts(z)  # logsumexp [N, 1]
    nll = logsumexp[:, 0] - z[np.arange(n), targets]
    loss = float(nll.sum(dtype=np.float64) / denominator) if n else 0.0
    probs = np.divide(e, s, out=e)
    ctx = LossContext((B, T, V), logits.dtype, rows, targets, probs, denominator)
    return loss, ctx


def causal_lm_loss_backward(ctx: LossContext, grad_loss: float = 1.0) -> np.ndarray:
    """Gradient of the loss with respect to the logits, ``[B, T, V]`` in the logits' dtype."""
    B, T, V = ctx.shape
    grad = np.zeros((B * T, V), dtype=np.float32)
    n = ctx.rows.size
    if n:
        rows = _as_slice(ctx.rows)
        g = grad[rows] if isinstance(rows, slice) else np.empty_like(ctx.probs)  # a view of grad where it can be
        np.copyto(g, ctx.probs)
        g[np.arange(n), ctx.targets] -= 1.0
        g *= np.float32(grad_loss / ctx.denominator)
        if not isinstance(rows, slice):
            grad[rows] = g
    return grad.reshape(B, T, V).astype(ctx.dtype, copy=False)


def count_targets(labels: np.ndarray) -> int:
    """Number of counted targets in a batch (``labels[..., 1:] != -100``; labels (B, T), or (micro-batches, B, T)):
    the ``num_items_in_batch`` of a micro-batch. The one count: the training loop and the benchmarks use it."""
    labels = np.asarray(labels)
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


class CausalLMLoss:
    """Object form: ``loss = f.forward(logits, labels)``, then ``grad_logits = f.backward()``."""

    def __init__(self) -> None:
        self._ctx: LossContext | None = None

    def forward(self, logits: np.ndarray, labels: np.ndarray, num_items_in_batch: int | None = None) -> float:
        loss, self._ctx = causal_lm_loss(logits, labels, num_items_in_batch)
        return loss

    def backward(self, grad_loss: float = 1.0) -> np.ndarray:
        if self._ctx is None:
            raise RuntimeError("backward() called before forward()")
        ctx, self._ctx = self._ctx, None
        return causal_lm_loss_backward(ctx, grad_loss)


# ------------------------------------------------------------------------------------------------ chunked
@dataclass
class ChunkedLossContext:
    """What the chunked backward pass needs: the hidden states and the LM head (references, not copies), the
    counted positions, their targets and log-sum-exps ([N]), the chunk size and the denominator."""

    hidden: np.ndarray  # [B, T, d]
    weight: np.ndarray  # [V, d]
    rows: np.ndarray
    targets: np.ndarray
    logsumexp: np.ndarray
    chunk_size: int
    denominator: float


def _float(hidden: np.ndarray) -> np.dtype:
    """The loss's dtype: float32, as the unchunked loss computes (float64 for float64 hidden states: the
    finite-difference checks)."""
    return np.promote_types(hidden.dtype, np.float32)


def _chunk_logits(hidden: np.ndarray, weight: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Logits [len(rows), V] of the given flat positions: their hidden states times the LM head."""
    h = hidden.reshape(-1, hidden.shape[-1])[rows]
    return np.matmul(h, weight.T).astype(_float(hidden), copy=False)


def chunked_lm_head_loss(hidden: np.ndarray, weight: np.ndarray, labels: np.ndarray, chunk_size: int,
                         num_items_in_batch: int | None = None) -> tuple[float, ChunkedLossContext]:
    """:func:`causal_lm_loss` of the logits ``hidden @ weight.T`` without ever holding them whole: ``chunk_size``
    counted positions at a time (see the module docstring). ``hidden`` [B, T, d] is the final norm's output
    (``LlamaModel.hidden_states``), ``weight`` [V, d] the LM head. Returns ``(loss, ctx)`` for
    :func:`chunked_lm_head_loss_backward`."""
    hidden, weight, labels = np.asarray(hidden), np.asarray(weight), np.asarray(labels)
    _check(hidden, labels, "hidden states")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight must be [vocab, {hidden.shape[2]}] (the LM head), got shape {weight.shape}")
    _check_targets(labels, weight.shape[0])
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    rows, targets = _targets(labels)
    n = rows.size
    denominator = float(n if num_items_in_batch is None else num_items_in_batch)
    logsumexp = np.zeros(n, dtype=_float(hidden))
    total = 0.0
    for start in range(0, n, chunk_size):
        part = slice(start, min(start + chunk_size, n))
        z = _chunk_logits(hidden, weight, rows[part])  # the only logits that exist: [chunk, V]
        _, _, lse = _softmax_parts(z)
        logsumexp[part] = lse[:, 0]
        total += float((lse[:, 0] - z[np.arange(len(z)), targets[part]]).sum(dtype=np.float64))
    loss = total / denominator if n else 0.0
    return loss, ChunkedLossContext(hidden, weight, rows, targets, logsumexp, chunk_size, denominator)


def chunked_lm_head_loss_backward(ctx: ChunkedLossContext, grad_loss: float = 1.0) -> np.ndarray:
    """Gradient of the loss with respect to the hidden states, [B, T, d] (float32): each chunk's logits computed
    again, softmax = exp(logits - logsumexp), minus the one-hot target, scaled, times the LM head."""
    B, T, d = ctx.hidden.shape
    grad = np.zeros((B * T, d), dtype=_float(ctx.hidden))
    n = ctx.rows.size
    for start in range(0, n, ctx.chunk_size):
        part = slice(start, min(start + ctx.chunk_size, n))
        g = np.exp(_chunk_logits(ctx.hidden, ctx.weight, ctx.rows[part]) - ctx.logsumexp[part, None])
        g[np.arange(len(g)), ctx.targets[part]] -= 1.0
        g *= g.dtype.type(grad_loss / ctx.denominator)
        grad[ctx.rows[part]] = np.matmul(g, ctx.weight)
    return grad.reshape(B, T, d)
