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


def _check(logits: np.ndarray, labels: np.ndarray) -> None:
    if logits.ndim != 3:
        raise ValueError(f"logits must be [batch, time, vocab], got shape {logits.shape}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels shape {labels.shape} does not match logits' [batch, time] {logits.shape[:2]}")
    counted = labels[labels != IGNORE_INDEX]
    if counted.size and (counted.min() < 0 or counted.max() >= logits.shape[2]):
        raise ValueError(
            f"labels must be -100 or in [0, {logits.shape[2]}), got values in [{counted.min()}, {counted.max()}]"
        )


def causal_lm_loss(
    logits: np.ndarray, labels: np.ndarray, num_items_in_batch: int | None = None
) -> tuple[float, LossContext]:
    """Mean next-token cross entropy over counted targets; returns ``(loss, ctx)`` for :func:`causal_lm_loss_backward`.

    ``logits`` is ``[B, T, V]`` (float32, or bfloat16/float16: computed in float32), ``labels`` ``[B, T]`` int
    with ``-100`` where no loss is taken. ``num_items_in_batch``: divide the summed loss by this instead of the
    number of counted targets (transformers' gradient-accumulation convention).
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    _check(logits, labels)
    B, T, V = logits.shape
    # shift: position t predicts the label at t + 1; the last position predicts nothing
    shifted = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    shifted[:, :-1] = labels[:, 1:]
    flat_labels = shifted.reshape(-1)
    rows = np.flatnonzero(flat_labels != IGNORE_INDEX)
    targets = flat_labels[rows]
    n = rows.size
    denominator = float(n if num_items_in_batch is None else num_items_in_batch)

    z = logits.reshape(B * T, V)[rows].astype(np.float32)  # [N, V], only the counted rows
    zmax = z.max(axis=1, keepdims=True) if n else np.zeros((0, 1), np.float32)
    e = np.exp(z - zmax)
    s = e.sum(axis=1, keepdims=True)
    logsumexp = np.log(s) + zmax  # [N, 1]
    nll = logsumexp[:, 0] - z[np.arange(n), targets]
    loss = float(nll.sum(dtype=np.float64) / denominator) if n else 0.0
    probs = e / s
    ctx = LossContext((B, T, V), logits.dtype, rows, targets, probs, denominator)
    return loss, ctx


def causal_lm_loss_backward(ctx: LossContext, grad_loss: float = 1.0) -> np.ndarray:
    """Gradient of the loss with respect to the logits, ``[B, T, V]`` in the logits' dtype."""
    B, T, V = ctx.shape
    grad = np.zeros((B * T, V), dtype=np.float32)
    n = ctx.rows.size
    if n:
        g = ctx.probs.copy()
        g[np.arange(n), ctx.targets] -= 1.0
        g *= np.float32(grad_loss / ctx.denominator)
        grad[ctx.rows] = g
    return grad.reshape(B, T, V).astype(ctx.dtype, copy=False)


def count_targets(labels: np.ndarray) -> int:
    """Number of counted targets in a batch (``labels[:, 1:] != -100``): the ``num_items_in_batch`` of a micro-batch."""
    labels = np.asarray(labels)
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


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
