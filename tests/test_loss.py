"""Causal-LM loss: forward vs transformers / torch, backward vs torch autograd and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qlora_ref.loss import IGNORE_INDEX, CausalLMLoss, causal_lm_loss, causal_lm_loss_backward, count_targets


def _case(seed, B, T, V, ignore_frac, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((B, T, V)) * scale).astype(np.float32)
    labels = rng.integers(0, V, size=(B, T)).astype(np.int64)
    labels[rng.random((B, T)) < ignore_frac] = IGNORE_INDEX
    labels[:, 2] = rng.integers(0, V, size=B)  # at least one counted target per row (T >= 3)
    return logits, labels


def _torch_loss(logits, labels, num_items_in_batch=None):
    t = torch.from_numpy(logits).requires_grad_(True)
    shift_logits = t[:, :-1].reshape(-1, t.shape[-1])
    shift_labels = torch.from_numpy(labels)[:, 1:].reshape(-1)
    if num_items_in_batch is None:
        loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)
    else:
        loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX,
                                                 reduction="sum") / num_items_in_batch
    loss.backward()
    return float(loss.detach()), t.grad.numpy()


@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 3), T=st.integers(3, 9), V=st.integers(2, 40),
       ignore_frac=st.floats(0, 0.9), scale=st.floats(0.01, 20))
def test_loss_and_gradient_match_torch_autograd(seed, B, T, V, ignore_frac, scale):
    logits, labels = _case(seed, B, T, V, ignore_frac, scale)
    loss, ctx = causal_lm_loss(logits, labels)
    grad = causal_lm_loss_backward(ctx)
    t_loss, t_grad = _torch_loss(logits, labels)
    assert loss == pytest.approx(t_loss, rel=2e-6, abs=1e-6)
    np.testing.assert_allclose(grad, t_grad, rtol=1e-5, atol=1e-7)
    assert grad.dtype == np.float32 and not grad[:, -1].any()  # the last position predicts nothing


def test_matches_transformers_for_causal_lm_loss():
    from transformers.loss import loss_utils
    logits, labels = _case(0, 2, 7, 11, 0.4)
    ours, _ = causal_lm_loss(logits, labels)
    theirs = loss_utils.ForCausalLMLoss(torch.from_numpy(logits), torch.from_numpy(labels), vocab_size=11)
    assert ours == pytest.approx(float(theirs), rel=1e-6)
    n = count_targets(labels) + 5  # gradient accumulation: divide by the tokens of the whole accumulated batch
    ours, ctx = causal_lm_loss(logits, labels, num_items_in_batch=n)
    theirs = loss_utils.ForCausalLMLoss(torch.from_numpy(logits), torch.from_numpy(labels), vocab_size=11,
                                        num_items_in_batch=torch.tensor(n))
    assert ours == pytest.approx(float(theirs), rel=1e-6)
    _, t_grad = _torch_loss(logits, labels, n)
    np.testing.assert_allclose(causal_lm_loss_backward(ctx), t_grad, rtol=1e-5, atol=1e-8)


def test_gradient_matches_finite_differences():
    """Central differences in float64 on a small case: the analytic gradient agrees to 1e-6 relative."""
    logits, labels = _case(1, 2, 5, 6, 0.3, scale=1.0)
    _, ctx = causal_lm_loss(logits, labels)
    grad = causal_lm_loss_backward(ctx).astype(np.float64)

    def f(z):
        z = z.astype(np.float64)
        shifted = labels[:, 1:].reshape(-1)
        zz = z[:, :-1].reshape(-1, z.shape[-1])
        keep = shifted != IGNORE_INDEX
        zz, y = zz[keep], shifted[keep]
        lse = np.log(np.exp(zz - zz.max(1, keepdims=True)).sum(1)) + zz.max(1)
        return float(np.mean(lse - zz[np.arange(len(y)), y]))

    h = 1e-5
    fd = np.zeros_like(grad)
    base = logits.astype(np.float64)
    for idx in np.ndindex(base.shape):
        plus, minus = base.copy(), base.copy()
        plus[idx] += h
        minus[idx] -= h
        fd[idx] = (f(plus) - f(minus)) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-7)


def test_grad_loss_scales_and_object_form():
    logits, labels = _case(2, 2, 6, 5, 0.2)
    f = CausalLMLoss()
    loss = f.forward(logits, labels)
    g = f.backward(grad_loss=0.5)
    _, ctx = causal_lm_loss(logits, labels)
    np.testing.assert_allclose(g, 0.5 * causal_lm_loss_backward(ctx), rtol=1e-6)
    assert loss > 0
    with pytest.raises(RuntimeError):
        f.backward()


@pytest.mark.parametrize("ignored", [0.0, 0.3])
def test_views_leave_logits_and_context_alone(ignored):
    """A batch of one with every target counted takes the softmax of a view of the logits and writes the gradient
    through a view (no (N, V) copies); neither may change the logits or the context, so that backward can run
    twice and give the same bits, and the (N, V) values equal the expression ``(softmax - onehot) / N``."""
    logits, labels = _case(5, 1, 7, 11, ignored)
    kept = logits.copy()
    _, ctx = causal_lm_loss(logits, labels)
    probs = ctx.probs.copy()
    first, second = causal_lm_loss_backward(ctx), causal_lm_loss_backward(ctx)
    assert (first == second).all() and (ctx.probs == probs).all() and (logits == kept).all()
    z = logits[0, :-1].astype(np.float32)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    expected = e / e.sum(axis=1, keepdims=True)
    target = labels[0, 1:]
    counted = target != IGNORE_INDEX
    expected[np.flatnonzero(counted), target[counted]] -= 1.0
    expected *= np.float32(1.0 / counted.sum())
    expected[~counted] = 0.0
    assert (first[0, :-1] == expected).all() and not first[0, -1].any()


def test_low_precision_logits_are_computed_in_float32():
    from qlora_ref.dtypes import bfloat16

    logits, labels = _case(3, 1, 5, 9, 0.0)
    lb = logits.astype(bfloat16)
    loss, ctx = causal_lm_loss(lb, labels)
    t = torch.from_numpy(lb.astype(np.float32))
    ref = torch.nn.functional.cross_entropy(t[0, :-1], torch.from_numpy(labels[0, 1:]))
    assert loss == pytest.approx(float(ref), rel=1e-6)
    assert causal_lm_loss_backward(ctx).dtype == bfloat16


def test_no_counted_target_gives_zero_loss_and_gradient():
    logits, _ = _case(4, 2, 4, 5, 0.0)
    labels = np.full((2, 4), IGNORE_INDEX)
    loss, ctx = causal_lm_loss(logits, labels)
    assert loss == 0.0 and not causal_lm_loss_backward(ctx).any()


def test_bad_inputs_are_refused():
    logits, labels = _case(5, 1, 4, 5, 0.0)
    with pytest.raises(ValueError, match="labels must be"):
        causal_lm_loss(logits, np.full((1, 4), 7))
    with pytest.raises(ValueError, match="shape"):
        causal_lm_loss(logits, labels[:, :3])
    with pytest.raises(ValueError, match="batch, time, vocab"):
        causal_lm_loss(logits[0], labels)


def test_one_ignore_index_and_one_target_count():
    """The data pipeline labels with the loss's ignore index (it once kept a copy), and the training loop counts
    targets as the loss does, for one batch or a stack of micro-batches."""
    from qlora_ref import data
    from qlora_ref.train.loop import n_targets

    assert data.IGNORE_INDEX is IGNORE_INDEX
    labels = np.array([[[5, IGNORE_INDEX, 7], [IGNORE_INDEX, IGNORE_INDEX, 2]],
                       [[1, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]])
    assert [count_targets(m) for m in labels] == [2, 2]  # the first position predicts nothing
    assert count_targets(labels) == 4 == sum(n_targets({"labels": m}) for m in labels)


def _oracle_summed_nll(z: np.ndarray, labels: np.ndarray) -> float:
    """Σ over counted targets of -log softmax(z)[target], float64, written out here (not from qlora_ref.loss):
    position t predicts labels[:, t + 1], positions whose next label is -100 (and every row's last) count for
    nothing."""
    z = z.astype(np.float64)[:, :-1].reshape(-1, z.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = y != IGNORE_INDEX
    z, y = z[keep], y[keep]
    m = z.max(axis=1)
    return float(np.sum(np.log(np.exp(z - m[:, None]).sum(axis=1)) + m - z[np.arange(len(y)), y]))


@pytest.mark.parametrize("grad_loss", [1.0, 0.375])
def test_num_items_gradient_matches_finite_differences_over_an_accumulation_step(grad_loss):
    """Gradient accumulation: two micro-batches with ignored labels (-100, some not at the end of a row, so the
    counted rows are not consecutive) and unequal target counts. Each micro-batch's loss is its *summed* nll divided
    by N, the counted targets of the whole step (``num_items_in_batch``), so the micro-batch losses add up to the
    step's mean loss. The backward of each (times ``grad_loss``) is checked element by element against float64
    central differences of the oracle L_b(z) = grad_loss · Σ_b nll(z) / N.

    Bound: the analytic gradient is (softmax - onehot) · grad_loss / N computed in float32 from float32 logits:
    exp, a sum over V = 6, a division and one scaling, each within a few ulps, so |error| <= (V + 4) · 2^-24 ·
    2 · |grad_loss| / N (|softmax - onehot| <= 1, doubled for the rounding of the logits' subtracted max).
    The central difference with h = 1e-4 on O(1) logits adds truncation h^2/6·|L'''| <= 1e-8 · |grad_loss| / N
    (|L'''| <= 1/N per counted row, the softmax's third derivative being bounded by 1) and round-off
    2^-52 · |L| / h ~ 1e-11; together under the atol below."""
    V = 6
    micro = [_case(10, 2, 6, V, 0.3, scale=1.0), _case(11, 1, 6, V, 0.6, scale=1.0)]
    micro[0][1][0, 3] = IGNORE_INDEX  # a gap inside a row: the counted rows of micro-batch 0 are not consecutive
    counts = [int(np.sum(lab[:, 1:] != IGNORE_INDEX)) for _, lab in micro]  # counted here, not with count_targets
    assert counts[0] != counts[1] and min(counts) > 0
    N = sum(counts)
    atol = (V + 4) * 2.0**-24 * 2 * grad_loss / N + 1e-8 * grad_loss / N + 1e-10
    h = 1e-4
    total = 0.0
    for logits, labels in micro:
        loss, ctx = causal_lm_loss(logits, labels, num_items_in_batch=N)
        oracle = _oracle_summed_nll(logits, labels) / N
        assert loss == pytest.approx(oracle, rel=1e-6)  # float32 nll summed in float64
        total += loss
        grad = causal_lm_loss_backward(ctx, grad_loss=grad_loss).astype(np.float64)
        base = logits.astype(np.float64)
        fd = np.zeros_like(base)
        for idx in np.ndindex(base.shape):
            plus, minus = base.copy(), base.copy()
            plus[idx] += h
            minus[idx] -= h
            fd[idx] = grad_loss * (_oracle_summed_nll(plus, labels) - _oracle_summed_nll(minus, labels)) / (2 * h * N)
        np.testing.assert_allclose(grad, fd, rtol=0, atol=atol)
        # positions that predict an ignored label, and every row's last position, get exactly no gradient
        ignored = np.ones(labels.shape, bool)
        ignored[:, :-1] = labels[:, 1:] == IGNORE_INDEX
        assert ignored[:, :-1].any() and not grad[ignored].any()
    # the micro-batch losses add up to the mean over the step's targets
    step_mean = sum(_oracle_summed_nll(lg, lb) for lg, lb in micro) / N
    assert total == pytest.approx(step_mean, rel=1e-6)
