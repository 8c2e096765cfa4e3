"""Chunked cross entropy: the LM head and the loss a chunk of positions at a time, in the reference (hand-written
backward, checked against torch autograd and finite differences) and in qlora_gpu (an autograd function that
recomputes each chunk's logits in backward, checked against autograd through the unchunked loss and torch's
gradcheck), equal to the unchunked loss and gradients within float32 rounding; the logits never exist whole.

Bounds (float32): chunked and unchunked compute the same products and sums in another order, so the loss agrees
to 2e-6 relative (a few ulps of a sum of N terms, N < 100 here) and the gradients to 1e-5 relative to their largest
entry (the bound of tests/test_loss.py against torch). bfloat16 (qlora_gpu): within one bfloat16 rounding of the
logits' gradient and of the result, and rarely (test_gpu_chunked_equals_unchunked_bfloat16).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from model_helpers import check_finite_differences, max_rel_err

from qlora_gpu.chunked_loss import ChunkedLMHeadLoss, chunked_nll_sum
from qlora_ref.loss import (
    IGNORE_INDEX,
    causal_lm_loss,
    causal_lm_loss_backward,
    chunked_lm_head_loss,
    chunked_lm_head_loss_backward,
)

tt = torch.from_numpy


def case(seed, B=2, T=9, d=16, V=50, ignore_frac=0.3, dtype=np.float32):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((B, T, d)).astype(dtype)
    weight = (rng.standard_normal((V, d)) / np.sqrt(d) * 3).astype(dtype)
    labels = rng.integers(0, V, size=(B, T)).astype(np.int64)
    labels[rng.random((B, T)) < ignore_frac] = IGNORE_INDEX
    labels[:, 1] = rng.integers(0, V, size=B)  # at least one counted target per row
    return hidden, weight, labels


def unchunked(hidden, weight, labels, num_items=None):
    """The reference's loss on the full logits, and its gradient carried to the hidden states (logits = h W^T)."""
    loss, ctx = causal_lm_loss(np.matmul(hidden, weight.T), labels, num_items)
    return loss, np.matmul(causal_lm_loss_backward(ctx), weight)


# ------------------------------------------------------------------------------------------------ reference
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 3), T=st.integers(2, 12), chunk=st.integers(1, 40),
       ignore_frac=st.floats(0, 0.9))
def test_reference_chunked_equals_unchunked(seed, B, T, chunk, ignore_frac):
    hidden, weight, labels = case(seed, B, T, ignore_frac=ignore_frac)
    loss, ctx = chunked_lm_head_loss(hidden, weight, labels, chunk)
    grad = chunked_lm_head_loss_backward(ctx)
    ref_loss, ref_grad = unchunked(hidden, weight, labels)
    assert loss == pytest.approx(ref_loss, rel=2e-6, abs=1e-7)
    assert grad.shape == hidden.shape and grad.dtype == np.float32
    assert max_rel_err(grad, ref_grad) <= 1e-5
    assert not grad[:, -1].any()  # the last position of a row has no target: no logits, no gradient


def test_reference_chunked_vs_torch_autograd():
    hidden, weight, labels = case(1, B=3, T=11, V=70)
    n = int((labels[:, 1:] != IGNORE_INDEX).sum()) + 4  # gradient accumulation's denominator
    loss, ctx = chunked_lm_head_loss(hidden, weight, labels, 5, num_items_in_batch=n)
    grad = chunked_lm_head_loss_backward(ctx, grad_loss=0.5)
    h = tt(hidden).requires_grad_()
    logits = F.linear(h, tt(weight))
    t_loss = F.cross_entropy(logits[:, :-1].reshape(-1, 70), tt(labels)[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                             reduction="sum") / n
    (0.5 * t_loss).backward()
    assert loss == pytest.approx(t_loss.item(), rel=2e-6)
    assert max_rel_err(grad, h.grad.numpy()) <= 1e-5


def test_reference_chunked_finite_differences():
    """float64 hidden states keep the loss in float64: central differences agree to 1e-6 relative."""
    hidden, weight, labels = case(2, T=6, d=8, V=13, dtype=np.float64)
    rng = np.random.default_rng(0)
    _, ctx = chunked_lm_head_loss(hidden, weight, labels, 4)
    grad = chunked_lm_head_loss_backward(ctx)
    assert grad.dtype == np.float64
    check_finite_differences(lambda h: chunked_lm_head_loss(h, weight, labels, 4)[0], hidden, 1.0, grad, rng)


def test_reference_no_target_and_bad_inputs():
    hidden, weight, labels = case(3)
    loss, ctx = chunked_lm_head_loss(hidden, weight, np.full_like(labels, IGNORE_INDEX), 4)
    assert loss == 0.0 and not chunked_lm_head_loss_backward(ctx).any()
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        chunked_lm_head_loss(hidden, weight, labels, 0)
    with pytest.raises(ValueError, match="weight must be"):
        chunked_lm_head_loss(hidden, weight[:, :3], labels, 4)
    with pytest.raises(ValueError, match=r"labels must be -100 or in \[0, 50\)"):
        chunked_lm_head_loss(hidden, weight, np.full_like(labels, 50), 4)
    with pytest.raises(ValueError, match="labels shape"):
        chunked_lm_head_loss(hidden, weight, labels[:, :3], 4)


def test_reference_chunked_never_holds_the_logits():
    """Peak NumPy allocation of the chunked loss, forward and backward, against the (positions x vocabulary) float32
    logits it replaces: the chunk's logits and their softmax, 2 x 64 x V x 4 bytes, against 1,024 x V x 4."""
    import tracemalloc

    hidden, weight, labels = case(4, B=2, T=512, d=32, V=4000, ignore_frac=0.0)
    logits_bytes = hidden.shape[0] * hidden.shape[1] * weight.shape[0] * 4
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        _, ctx = chunked_lm_head_loss(hidden, weight, labels, 64)
        chunked_lm_head_loss_backward(ctx)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 0.2 * logits_bytes, (peak, logits_bytes)


# ------------------------------------------------------------------------------------------------ qlora_gpu
def torch_unchunked(hidden, weight, labels):
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("chunk", [1, 4, 7, 1000])
def test_gpu_chunked_equals_unchunked_float32(chunk):
    hidden, weight, labels = (tt(a) for a in case(5, B=2, T=10, V=60))
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ours, n = chunked_nll_sum(h1, w1, labels, chunk)
    ours.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    theirs = torch_unchunked(h2, w2, labels)
    theirs.backward()
    assert n == int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert ours.item() == pytest.approx(theirs.item(), rel=2e-6)
    assert max_rel_err(h1.grad, h2.grad) <= 1e-5
    assert max_rel_err(w1.grad, w2.grad) <= 1e-5  # a trainable LM head gets its gradient too


@pytest.mark.parametrize("scale", [1.0, 1.0 / 3.0])
def test_gpu_chunked_equals_unchunked_bfloat16(scale):
    """16-bit hidden states and a trainable 16-bit LM head: the chunk's logits in bfloat16, widened, as the unchunked
    path. The two compute the same bfloat16 logits, softmax them by different float32 formulas (a few float32 ulps
    apart), round the logits' gradient G to bfloat16 and multiply it back in float32 before a last bfloat16
    rounding. So an element differs only where a float32 difference crosses a bfloat16 rounding boundary: at most
    one bfloat16 step of the result (2^-7 of it) plus one step of every G entry it sums, 2^-7 Σ|G||W| (with the
    float32 order, 2K 2^-24 Σ|G||W|); and it differs rarely — the chance of a crossing is a few 2^-24 / 2^-8 per
    rounding, about 0.5 % of the elements here with V = 80 entries of G each, so at most 5 % may differ. A forgotten
    widening (the softmax through a bfloat16 rounding) stayed under a 2^-8-of-the-largest bound and moved 24 %.
    ``scale``: the upstream gradient — training backpropagates nll / n (``GpuTrainer.forward_backward``), and 1/3 is
    no power of two, so a chunk rounding G to bfloat16 before scaling it (two roundings, where the unchunked path
    rounds once) moved 28 % of the hidden gradient's elements; 1 cannot show that."""
    hidden, weight, labels = case(6, B=2, T=12, d=64, V=80)
    hidden, weight, labels = tt(hidden).bfloat16(), tt(weight).bfloat16(), tt(labels)
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    w1, w2 = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    ours, _ = chunked_nll_sum(h1, w1, labels, 5)
    (ours * scale).backward()
    theirs = torch_unchunked(h2, w2, labels)
    (theirs * scale).backward()
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(theirs.item(), rel=2e-6)
    assert h1.grad.dtype == torch.bfloat16 and w1.grad.dtype == torch.bfloat16
    # |G| of the unchunked loss (softmax minus one-hot on counted positions), for the bound
    logits = F.linear(hidden, weight).float()[:, :-1]
    counted = (labels[:, 1:] != IGNORE_INDEX).unsqueeze(-1)
    g = scale * (logits.softmax(-1) - F.one_hot(labels[:, 1:].clamp(min=0), logits.shape[-1])) * counted
    h_prev = hidden.float()[:, :-1]
    sums = {"hidden": (h1.grad[:, :-1], h2.grad[:, :-1], g.abs() @ weight.float().abs(), logits.shape[-1]),
            "weight": (w1.grad, w2.grad, torch.einsum("btv,btd->vd", g.abs(), h_prev.abs()), g.shape[0] * g.shape[1])}
    for name, (got, want, m, k) in sums.items():
        got, want = got.float(), want.float()
        bound = 2**-7 * want.abs() + (2**-7 + 2 * k * 2**-24) * m
        assert torch.all((got - want).abs() <= bound), name
        assert (got != want).float().mean() <= 0.05, name
    assert torch.equal(h1.grad[:, -1], h2.grad[:, -1])  # the last position predicts nothing: zero in both


def test_gpu_chunked_gradcheck():
    """torch's gradcheck (finite differences in float64) on the autograd function, hidden states and LM head."""
    hidden, weight, labels = case(7, B=1, T=7, d=6, V=9, ignore_frac=0.0, dtype=np.float64)
    targets = tt(labels)[0, 1:]
    h = tt(hidden)[0, :-1].clone().requires_grad_()
    w = tt(weight).clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ChunkedLMHeadLoss.apply(a, b, targets, 4), (h, w))


def test_gpu_chunked_refuses_a_bad_chunk():
    hidden, weight, labels = (tt(a) for a in case(8))
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
            chunked_nll_sum(hidden, weight, labels, bad)
    # a NumPy integer is an integer, as the reference takes it
    assert torch.equal(chunked_nll_sum(hidden, weight, labels, np.int64(3))[0],
                       chunked_nll_sum(hidden, weight, labels, 3)[0])


def test_reference_and_gpu_chunked_agree():
    hidden, weight, labels = case(9, B=3, T=8, V=40)
    ref_loss, ctx = chunked_lm_head_loss(hidden, weight, labels, 6)
    ref_grad = chunked_lm_head_loss_backward(ctx)
    h = tt(hidden).requires_grad_()
    nll, n = chunked_nll_sum(h, tt(weight), tt(labels), 6)
    (nll / n).backward()
    assert (nll / n).item() == pytest.approx(ref_loss, rel=2e-6)
    assert max_rel_err(h.grad.numpy(), ref_grad) <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (device memory is what the chunks save)")
def test_gpu_chunked_peak_memory_on_cuda():
    """Forward and backward of 8,192 positions x a 32,000-token vocabulary: the unchunked path holds float32
    logits and their gradient (2 x 1.05 GB); chunks of 1,024 hold 2 x 131 MB at a time."""
    torch.manual_seed(0)
    hidden = torch.randn(1, 8192, 512, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(32000, 512, device="cuda", dtype=torch.bfloat16) / 512 ** 0.5
    labels = torch.randint(0, 32000, (1, 8192), device="cuda")
    peaks = {}
    for name in ("unchunked", "chunked"):
        h = hidden.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = torch_unchunked(h, weight, labels) if name == "unchunked" else chunked_nll_sum(h, weight, labels,
                                                                                              1024)[0]
        loss.backward()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
    assert peaks["chunked"] < 0.25 * peaks["unchunked"], peaks
