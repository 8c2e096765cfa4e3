"""The LM head and the cross entropy in chunks, as one autograd function: the (positions x vocabulary) logits never
exist whole, in the forward pass or the backward pass.

The same algorithm as ``qlora_ref.loss.chunked_lm_head_loss`` (its docstring has the formulas): only the counted
positions (those with a next-token target) get logits, ``chunk_size`` of them at a time; the forward pass keeps
one float32 log-sum-exp per position, the backward pass computes each chunk's logits again and turns them into
that chunk's gradient of the hidden states. Autograd through ``lm_head(hidden).float()`` and ``cross_entropy``
would keep the float32 logits and their softmax for the backward pass: 2 x 4 bytes x positions x vocabulary,
67 GB each at 131,072 tokens of Llama-3's 128,256-token vocabulary.

Each chunk's arithmetic is the unchunked path's: logits ``F.linear(h, W)`` in the hidden states' dtype, widened to
float32; the gradient of the logits in float32, rounded to that dtype, times W. So the gradient equals the
unchunked one up to the order of the float32 sums (tests/test_chunked_loss.py).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from qlora_ref.loss import IGNORE_INDEX


def _wide(z: torch.Tensor) -> torch.Tensor:
    """Logits widened to float32, as ``logits.float()`` does (float64 stays: the finite-difference checks)."""
    return z.to(torch.promote_types(z.dtype, torch.float32))


class ChunkedLMHeadLoss(torch.autograd.Function):
    """Summed next-token negative log-likelihood of ``hidden`` [N, d] (the counted positions' final hidden states)
    under the LM head ``weight`` [V, d] for ``targets`` [N]; float32 scalar. Gradients for ``hidden`` and, if it
    is trainable, ``weight``. Float32 arithmetic for 16-bit and float32 inputs, float64 for float64."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int):
        n = hidden.shape[0]
        wide = torch.promote_types(hidden.dtype, torch.float32)
        logsumexp = torch.empty(n, dtype=wide, device=hidden.device)
        total = torch.zeros((), dtype=wide, device=hidden.device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            z = _wide(F.linear(hidden[start:end], weight))  # the only logits that exist: [chunk, V]
            lse = torch.logsumexp(z, dim=-1)
            logsumexp[start:end] = lse
            total += (lse - z.gather(1, targets[start:end, None])[:, 0]).sum()
        ctx.save_for_backward(hidden, weight, targets, logsumexp)
        ctx.chunk_size = chunk_size
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, targets, logsumexp = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=logsumexp.dtype, device=weight.device) if want_w else None
        n = hidden.shape[0]
        for start in range(0, n, ctx.chunk_size):
            end = min(start + ctx.chunk_size, n)
            h = hidden[start:end]
            z = F.linear(h, weight)
            g = torch.exp(_wide(z) - logsumexp[start:end, None])  # the softmax, from the kept log-sum-exp
            g[torch.arange(end - start, device=g.device), targets[start:end]] -= 1.0
            g = (g * grad_total).to(z.dtype)  # as autograd rounds the float32 gradient back to the logits' dtype
            if want_h:
                grad_h[start:end] = g @ weight
            if want_w:  # every chunk's share summed in float32: one rounding at the end, as autograd's one product
                grad_w.addmm_(_wide(g).t(), _wide(h))
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None


def chunked_nll_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int
                    ) -> tuple[torch.Tensor, int]:
    """(summed next-token cross entropy over the counted targets, their number) of the logits ``hidden @ weight.T``
    for ``labels`` [B, T] (-100: no loss; position t predicts the label at t + 1), computed in chunks of
    ``chunk_size`` counted positions (``ChunkedLMHeadLoss``)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    chunk_size = int(chunk_size)  # a NumPy integer too, as the reference takes it
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    targets = targets.reshape(-1)
    rows = torch.nonzero(targets != IGNORE_INDEX).reshape(-1)
    counted = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    return ChunkedLMHeadLoss.apply(counted, weight, targets.index_select(0, rows), chunk_size), int(rows.numel())


__all__ = ["ChunkedLMHeadLoss", "chunked_nll_sum"]
