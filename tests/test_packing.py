"""Packed batches: first-fit-decreasing packing, position ids restarting per example, labels masked at example
boundaries, attention kept inside each example (the reference's block-diagonal causal mask with its hand-written
backward; qlora_gpu's variable-length attention without a dense mask) — a packed batch gives the loss and the
LoRA gradients of the same examples unpacked, in both backends and against transformers + peft.

Bounds: the model tests run float32 weights and activations (QuantConfig compute float32, or no quantization);
packed and unpacked rows differ in the order of float32 sums only (BLAS blocking of longer rows, the softmax's
sum over more masked zeros), so they agree to a few float32 ulps of the result: relative 1e-5 on logits and loss,
1e-4 on LoRA gradients (the peft test's bound, tests/test_model_hf.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from model_helpers import check_finite_differences, max_rel_err, small_hf_model
from test_model_layers import make_attention, torch_attention

from qlora_ref.data import (
    IGNORE_INDEX,
    ByteTokenizer,
    build_dataset,
    collate,
    collate_packed,
    iterate_packed_batches,
    pack_examples,
    packed_batch_indices,
    record_to_example,
)
from qlora_ref.loss import causal_lm_loss, causal_lm_loss_backward, count_targets
from qlora_ref.model import LoraConfig, load_model
from qlora_ref.model.attention import example_spans, packed_causal_mask, segment_ids

tt = torch.from_numpy


# ------------------------------------------------------------------------------------------------ packing algorithm
def test_first_fit_decreasing_by_hand():
    # sorted: 5(#0) 4(#1) 3(#2) 3(#3) 2(#4) 2(#5) 1(#6); room 7: 5 -> A(2), 4 -> B(3), 3 -> B(0), 3 -> C(4),
    # 2 -> A(0), 2 -> C(2), 1 -> C(1)
    assert pack_examples([5, 4, 3, 3, 2, 2, 1], 7) == [[0, 4], [1, 2], [3, 5, 6]]
    assert pack_examples([2, 3, 1, 3], 3) == [[1], [3], [0, 2]]  # ties: the lower index first
    assert pack_examples([], 8) == []
    with pytest.raises(ValueError, match="does not fit a pack of max_length=4"):
        pack_examples([3, 5], 4)


@given(st.lists(st.integers(1, 40), max_size=60), st.integers(40, 100))
def test_packs_hold_every_example_once_within_max_length(lengths, max_length):
    packs = pack_examples(lengths, max_length)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    fills = [sum(lengths[i] for i in p) for p in packs]
    assert all(f <= max_length for f in fills)
    # first fit: a later pack's items would have fitted an earlier pack at most half full, so at most one is
    assert sum(2 * f <= max_length for f in fills) <= 1
    assert pack_examples(lengths, max_length) == packs


TOK = ByteTokenizer()


def _dataset(n=30, seed=0, max_length=600, train_on_source=False):
    """Alpaca-formatted examples of 140 to 200 byte tokens (the prompt's preamble is most of it): 3 or 4 a pack.
    ``train_on_source``: the prompt's tokens are targets too (the paper's ablation), so an example's first label is
    a token, which packing alone must mask."""
    rng = np.random.default_rng(seed)
    examples = [record_to_example({"input": "q" * int(rng.integers(1, 40)), "output": "a" * int(rng.integers(1, 20))},
                                  f"x:{i}") for i in range(n)]
    data = build_dataset(examples, TOK, max_length=max_length, train_on_source=train_on_source)
    assert len(data) == n
    return data


@pytest.mark.parametrize("train_on_source", [False, True])
@pytest.mark.parametrize("pack_length", [None, 1500])
def test_packed_batches_restart_positions_and_mask_the_first_label(pack_length, train_on_source):
    data = _dataset(train_on_source=train_on_source)
    seen = []
    for batch in iterate_packed_batches(data, batch_size=2, seed=1, pack_length=pack_length):
        ids, labels, pos, mask = batch["input_ids"], batch["labels"], batch["position_ids"], batch["attention_mask"]
        assert pos.dtype == np.int64 and pos.shape == ids.shape == labels.shape == mask.shape
        assert ids.shape[1] <= (pack_length or data.max_length)
        for row in range(ids.shape[0]):
            starts = np.flatnonzero(pos[row] == 0)
            n_real = int(mask[row].sum())
            assert mask[row, :n_real].all() and not mask[row, n_real:].any()
            bounds = [s for s in starts if s < n_real] + [n_real]
            for s, e in zip(bounds[:-1], bounds[1:], strict=True):
                example = tuple(ids[row, s:e])
                seen.append(example)
                assert (pos[row, s:e] == np.arange(e - s)).all()
                assert labels[row, s] == IGNORE_INDEX  # never predicted from the example before
            assert (labels[row, n_real:] == IGNORE_INDEX).all()
    assert sorted(seen) == sorted(tuple(x) for x in data.input_ids)  # every example exactly once
    rows = len(list(iterate_packed_batches(data, batch_size=1, pack_length=pack_length)))
    assert len(seen) >= (7 if pack_length else 3) * rows  # several examples a row (140-200 tokens each)


def test_packed_demo_keeps_the_token_slots_and_the_evaluation():
    """``qlora demo --packing``: one row of 4 x 128 tokens per micro-batch (the padded demo's slots), and the same
    held-out pairs evaluated (evaluation is unpacked: micro-batches of one pair, four times as many)."""
    from qlora_ref.demo import demo_config

    plain, packed = demo_config(40, "/tmp/x"), demo_config(40, "/tmp/x", packing=True)
    assert packed.packing and not plain.packing
    assert packed.pack_length * packed.micro_batch_size == plain.max_length * plain.micro_batch_size
    assert packed.eval_batches * packed.micro_batch_size == plain.eval_batches * plain.micro_batch_size
    assert packed.replace(packing=False, pack_length=None, micro_batch_size=plain.micro_batch_size,
                          eval_batches=plain.eval_batches) == plain  # nothing else differs


def test_pack_length_is_checked():
    from qlora_ref.train.config import TrainConfig

    assert TrainConfig(packing=True, max_length=128, pack_length=512).pack_length == 512
    with pytest.raises(ValueError, match="pack_length=512 needs packing=True"):
        TrainConfig(max_length=128, pack_length=512)
    with pytest.raises(ValueError, match="pack_length must be an integer >= max_length=128"):
        TrainConfig(packing=True, max_length=128, pack_length=100)


@pytest.mark.parametrize("train_on_source", [False, True])
def test_packed_batch_has_the_targets_and_tokens_of_the_unpacked_examples(train_on_source):
    """A packed batch has exactly the targets of the same examples unpadded: with the prompt trained on too, one
    more target per example after a pack's first would be its last token predicting the next example's first."""
    data = _dataset(n=12, train_on_source=train_on_source)
    packs = pack_examples(data.lengths, data.max_length)
    packed = collate_packed([[data.input_ids[i] for i in p] for p in packs],
                            [[data.labels[i] for i in p] for p in packs], data.pad_token_id)
    plain = collate(data.input_ids, data.labels, data.pad_token_id)
    assert count_targets(packed["labels"]) == count_targets(plain["labels"])
    assert packed["attention_mask"].sum() == plain["attention_mask"].sum() == data.lengths.sum()
    # fewer rows, less padding
    assert packed["input_ids"].size < plain["input_ids"].size


def test_packed_order_is_deterministic_per_seed_and_epoch():
    data = _dataset(n=60)
    a = packed_batch_indices(data, 2, seed=3, epoch=0)
    assert packed_batch_indices(data, 2, seed=3, epoch=0) == a
    assert packed_batch_indices(data, 2, seed=3, epoch=1) != a
    assert sorted(i for b in a for p in b for i in p) == list(range(len(data)))


def test_segment_ids_are_transformers_packed_sequence_indices():
    from transformers.masking_utils import find_packed_sequence_indices

    pos = np.array([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 0, 1, 0, 1]])
    np.testing.assert_array_equal(segment_ids(pos), find_packed_sequence_indices(tt(pos)).numpy())
    np.testing.assert_array_equal(segment_ids(pos)[0], [0, 0, 0, 1, 1, 2, 2, 2, 2, 3])


def test_packed_mask_is_block_diagonal_causal():
    allowed = packed_causal_mask(np.array([[0, 1, 2, 0, 1]]))[0, 0, 0] == 0
    expected = np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(allowed, expected)
    windowed = packed_causal_mask(np.array([[0, 1, 2, 3]]), sliding_window=2)[0, 0, 0] == 0
    np.testing.assert_array_equal(windowed, np.tril(np.ones((4, 4), bool)) & ~np.tril(np.ones((4, 4), bool), -2))


# ------------------------------------------------------------------------------------------------ reference attention
POSITIONS = np.array([[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 0, 1]])


@pytest.mark.parametrize("kv_heads", [2, 6, 1])
def test_packed_attention_vs_autograd(kv_heads):
    rng = np.random.default_rng(11)
    attn = make_attention(rng, kv_heads=kv_heads, bias=True, dtype=np.float32)
    x = rng.standard_normal((2, 7, 12)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    y = attn.forward(x, position_ids=POSITIONS)
    dx = attn.backward(g)
    tx = tt(x).requires_grad_()
    ty = torch_attention(attn, tx, POSITIONS)
    ty.backward(tt(g))
    assert max_rel_err(y, ty.detach().numpy()) <= 1e-5
    assert max_rel_err(dx, tx.grad.numpy()) <= 1e-5
    for m in attn.linears().values():  # the projections' weight gradients too (DenseLinear keeps them)
        assert m.grads, "backward reached every projection"


def test_packed_attention_finite_differences():
    rng = np.random.default_rng(12)
    attn = make_attention(rng, bias=True)
    x = rng.standard_normal((2, 7, 12))
    g = rng.standard_normal(x.shape)
    attn.forward(x, position_ids=POSITIONS)
    dx = attn.backward(g)
    check_finite_differences(lambda z: attn.forward(z, position_ids=POSITIONS), x, g, dx, rng)


def test_packed_attention_equals_each_example_alone():
    """Each example of a packed row gives exactly what it gives alone (its own positions from 0) — nothing leaks."""
    rng = np.random.default_rng(13)
    attn = make_attention(rng, bias=True, window=2)
    x = rng.standard_normal((1, 7, 12))
    packed = attn.forward(x, position_ids=POSITIONS[:1])
    for s, e in ((0, 3), (3, 7)):
        np.testing.assert_allclose(packed[:, s:e], attn.forward(x[:, s:e]), rtol=1e-12, atol=1e-12)


def test_packed_attention_by_example_is_the_whole_row_under_the_block_diagonal_mask(monkeypatch):
    """The reference computes a packed row's scores example by example (the diagonal blocks of
    ``packed_causal_mask``); computing the whole row under the mask instead gives the same output and input
    gradient: the blocks off the diagonal have P = 0 and dS = 0 (float64, to rounding)."""
    import qlora_ref.model.attention as attention

    rng = np.random.default_rng(14)
    attn = make_attention(rng, kv_heads=2, bias=True, window=3)
    x = rng.standard_normal((2, 7, 12))
    g = rng.standard_normal(x.shape)
    assert not np.allclose(attn.forward(x), attn.forward(x, position_ids=POSITIONS)), "the packing matters here"
    y, dx = attn.forward(x, position_ids=POSITIONS), attn.backward(g)
    rows = iter(packed_causal_mask(POSITIONS, sliding_window=3)[:, 0, 0])  # row b's (T, T) mask, in row order
    monkeypatch.setattr(attention, "example_spans", lambda pos: [(b, 0, pos.shape[1]) for b in range(len(pos))])
    monkeypatch.setattr(attention, "causal_mask", lambda t, s, past, window: next(rows))
    y_row, dx_row = attn.forward(x, position_ids=POSITIONS), attn.backward(g)
    np.testing.assert_allclose(y, y_row, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, dx_row, rtol=1e-12, atol=1e-12)


def test_example_spans_are_the_diagonal_blocks():
    pos = np.array([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert example_spans(pos) == [(0, 0, 3), (0, 3, 5), (0, 5, 6), (1, 0, 6)]
    allowed = packed_causal_mask(pos)[:, 0, 0] == 0
    for b, s, e in example_spans(pos):  # nothing outside the blocks is allowed
        allowed[b, s:e, s:e] = False
    assert not allowed.any()


def test_packed_attention_refuses_a_kv_cache():
    from qlora_ref.model.attention import KVCache

    attn = make_attention(np.random.default_rng(0), dtype=np.float32)
    with pytest.raises(ValueError, match="position_ids"):
        attn.forward(np.zeros((1, 7, 12), np.float32), KVCache(1), position_ids=POSITIONS[:1])


# ------------------------------------------------------------------------------------------------ whole models
EXAMPLE_LENGTHS = (5, 7, 3, 6, 4)
ROWS = ([0, 1, 2], [3, 4])  # two packed rows of 15 and 10 tokens


def examples(vocab, seed=0):
    rng = np.random.default_rng(seed)
    ids = [rng.integers(0, vocab, n) for n in EXAMPLE_LENGTHS]
    labels = []
    for x in ids:  # a prompt of two tokens carries no loss, as the data pipeline labels it
        y = x.copy()
        y[:2] = IGNORE_INDEX
        labels.append(y)
    return ids, labels


def packed_and_plain(vocab, seed=0):
    ids, labels = examples(vocab, seed)
    packed = collate_packed([[ids[i] for i in r] for r in ROWS], [[labels[i] for i in r] for r in ROWS], 0)
    plain = collate(ids, labels, 0)
    return packed, plain


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf = small_hf_model("llama-gqa")
    path = tmp_path_factory.mktemp("packing")
    hf.save_pretrained(path)
    return hf, path


def randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    for _, arr in sorted(model.lora_parameters().items()):
        value = rng.standard_normal(tuple(arr.shape)).astype(np.float32) * 0.1
        if isinstance(arr, np.ndarray):
            arr[...] = value
        else:
            with torch.no_grad():
                arr.copy_(tt(value))


def ref_loss_and_grads(model, batch, num_items):
    logits = model.forward(batch["input_ids"], position_ids=batch.get("position_ids"))
    loss, ctx = causal_lm_loss(logits, batch["labels"], num_items)
    model.zero_grad()
    model.backward(causal_lm_loss_backward(ctx))
    return loss, {k: v.copy() for k, v in model.lora_grads().items()}, logits


def real_logits(logits, batch, rows):
    """The logits of each example, in example order, from a packed or a padded batch."""
    out = []
    if "position_ids" not in batch:
        return [logits[i, :n] for i, n in enumerate(EXAMPLE_LENGTHS)]
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            out.append(logits[r, start:start + EXAMPLE_LENGTHS[i]])
            start += EXAMPLE_LENGTHS[i]
    order = [i for members in rows for i in members]
    return [out[order.index(i)] for i in range(len(EXAMPLE_LENGTHS))]


def test_reference_packed_equals_unpacked_and_transformers(checkpoint):
    hf, path = checkpoint
    lora = LoraConfig(r=4, alpha=8)
    model = load_model(path, lora=lora)
    randomize(model)
    packed, plain = packed_and_plain(hf.config.vocab_size)
    n = count_targets(plain["labels"])
    assert count_targets(packed["labels"]) == n
    loss_p, grads_p, logits_p = ref_loss_and_grads(model, packed, n)
    loss_u, grads_u, logits_u = ref_loss_and_grads(model, plain, n)
    assert abs(loss_p - loss_u) <= 1e-5 * abs(loss_u)
    for a, b in zip(real_logits(logits_p, packed, ROWS), real_logits(logits_u, plain, ROWS), strict=True):
        assert max_rel_err(a, b) <= 1e-5
    for key in grads_u:
        assert max_rel_err(grads_p[key], grads_u[key]) <= 1e-4, key

    # transformers keeps packed examples apart from position_ids alone (no attention mask, no cache)
    from test_model_hf import peft_twin

    peft_model = peft_twin(small_hf_model("llama-gqa"), model, 4, 8, lora.target_modules)
    out = peft_model(input_ids=tt(packed["input_ids"]), position_ids=tt(packed["position_ids"]), use_cache=False,
                     labels=tt(packed["labels"]))
    assert max_rel_err(logits_p, out.logits.detach().numpy()) <= 1e-5
    assert abs(out.loss.item() - loss_p) <= 1e-5 * loss_p  # transformers' mean over the same targets
    out.loss.backward()
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            key = name.removeprefix("base_model.model.").replace(".default", "")
            assert max_rel_err(grads_p[key], p.grad.numpy()) <= 1e-4, key


def test_no_attention_crosses_an_example_boundary(checkpoint):
    """Changing every token of the first example of a row leaves the other examples' logits bit for bit."""
    _, path = checkpoint
    model = load_model(path)
    packed, _ = packed_and_plain(97)
    changed = dict(packed, input_ids=packed["input_ids"].copy())
    changed["input_ids"][0, :EXAMPLE_LENGTHS[0]] = (changed["input_ids"][0, :EXAMPLE_LENGTHS[0]] + 1) % 97
    a = model.forward(packed["input_ids"], position_ids=packed["position_ids"])
    b = model.forward(changed["input_ids"], position_ids=changed["position_ids"])
    np.testing.assert_array_equal(a[0, EXAMPLE_LENGTHS[0]:], b[0, EXAMPLE_LENGTHS[0]:])
    assert not np.array_equal(a[0, :EXAMPLE_LENGTHS[0]], b[0, :EXAMPLE_LENGTHS[0]])


@pytest.mark.parametrize("leak", ["all-ones attention mask", "use_cache (the default)"])
def test_transformers_lets_packed_examples_attend_across_with_a_mask_or_a_cache(checkpoint, leak):
    """The documented pitfall (docs/long_context.md): transformers 5.25 detects packing from position_ids only with
    attention_mask=None and no cache; an all-ones mask, or the cache use_cache creates, and the second example of
    a row attends to the first — its logits move by O(1). Ours never take the mask for a packed batch."""
    hf, path = checkpoint
    packed, _ = packed_and_plain(hf.config.vocab_size)
    kwargs = dict(input_ids=tt(packed["input_ids"]), position_ids=tt(packed["position_ids"]))
    kwargs.update(attention_mask=tt(packed["attention_mask"]), use_cache=False) if leak.startswith("all") else None
    with torch.no_grad():
        theirs = hf(**kwargs).logits.numpy()
    ours = load_model(path).forward(packed["input_ids"], position_ids=packed["position_ids"])
    first = EXAMPLE_LENGTHS[0]
    assert max_rel_err(theirs[0, :first], ours[0, :first]) <= 1e-5  # the first example sees nothing before it
    assert max_rel_err(theirs[0, first:], ours[0, first:]) > 0.1  # the next ones see the first


# ------------------------------------------------------------------------------------------------ qlora_gpu
def gpu_model(path, attn_implementation):
    from qlora_gpu.model import QLoRAModel

    return QLoRAModel.from_pretrained(path, quant=None, lora=LoraConfig(r=4, alpha=8), device="cpu",
                                      attn_implementation=attn_implementation, tokenizer=False)


def gpu_loss_and_grads(model, batch, num_items):
    import torch.nn.functional as F

    model.zero_grad(set_to_none=True)
    logits = model(batch["input_ids"], batch["attention_mask"], batch.get("position_ids"))
    labels = tt(batch["labels"])
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum") / num_items
    loss.backward()
    return loss.item(), {k: g.numpy().copy() for k, g in model.lora_grads().items()}, logits.detach().numpy()


@pytest.mark.parametrize("impl", ["qlora_varlen", "eager", "sdpa"])
def test_gpu_packed_equals_unpacked_and_the_reference(checkpoint, impl):
    """qlora_gpu: the packed batch through variable-length attention (no mask; or transformers' dense packed mask
    with eager / sdpa) gives the unpacked loss and LoRA gradients, and the reference's."""
    hf, path = checkpoint
    packed, plain = packed_and_plain(hf.config.vocab_size)
    n = count_targets(plain["labels"])
    model = gpu_model(path, impl)
    randomize(model)
    loss_p, grads_p, logits_p = gpu_loss_and_grads(model, packed, n)
    unpacked = gpu_model(path, "eager")
    randomize(unpacked)
    loss_u, grads_u, logits_u = gpu_loss_and_grads(unpacked, plain, n)
    assert abs(loss_p - loss_u) <= 1e-5 * loss_u
    for a, b in zip(real_logits(logits_p, packed, ROWS), real_logits(logits_u, plain, ROWS), strict=True):
        assert max_rel_err(a, b) <= 1e-5
    ref = load_model(path, lora=LoraConfig(r=4, alpha=8))
    randomize(ref)
    loss_r, grads_r, _ = ref_loss_and_grads(ref, packed, n)
    assert abs(loss_p - loss_r) <= 1e-5 * loss_r
    for key in grads_u:
        assert max_rel_err(grads_p[key], grads_u[key]) <= 1e-4, key
        assert max_rel_err(grads_p[key], grads_r[key]) <= 1e-4, key


def test_gpu_varlen_attention_builds_no_dense_mask(checkpoint, monkeypatch):
    """With VARLEN attention transformers is asked for no mask and passes none: every attention call gets
    attention_mask=None, and no (T, T) tensor is made by the mask functions."""
    import transformers.masking_utils as mu

    from qlora_gpu import packing

    _, path = checkpoint
    model = gpu_model(path, packing.VARLEN)
    packed, _ = packed_and_plain(97)
    masks, calls = [], []
    real = packing.varlen_attention_forward

    def spy(module, q, k, v, attention_mask, **kw):
        masks.append(attention_mask)
        return real(module, q, k, v, attention_mask, **kw)

    monkeypatch.setattr(packing, "varlen_attention_forward", spy)
    packing.register()  # the spy under the registered name
    for name in ("sdpa_mask", "eager_mask"):
        monkeypatch.setattr(mu, name, lambda *a, _n=name, **k: calls.append(_n))
    try:
        model(packed["input_ids"], packed["attention_mask"], packed["position_ids"])
    finally:
        monkeypatch.undo()
        packing.register()
    assert len(masks) == model.config.num_hidden_layers and all(m is None for m in masks)
    assert calls == []


def test_gpu_no_attention_crosses_an_example_boundary(checkpoint):
    _, path = checkpoint
    model = gpu_model(path, "qlora_varlen").eval()
    packed, _ = packed_and_plain(97)
    changed = packed["input_ids"].copy()
    first = EXAMPLE_LENGTHS[0]
    changed[0, :first] = (changed[0, :first] + 1) % 97
    with torch.no_grad():
        a = model(packed["input_ids"], position_ids=packed["position_ids"])
        b = model(changed, position_ids=packed["position_ids"])
    assert torch.equal(a[0, first:], b[0, first:])
    assert not torch.equal(a[0, :first], b[0, :first])


def test_cu_seqlens_cut_the_flattened_batch_at_every_example():
    from qlora_gpu.packing import cu_seqlens

    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 0, 1, 2]])
    assert cu_seqlens(pos).tolist() == [0, 3, 5, 8, 13, 16]
    assert cu_seqlens(torch.arange(4)[None].expand(2, 4)).tolist() == [0, 4, 8]


@pytest.mark.parametrize("arch, window", [
    ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),  # layer 0 full, layer 1 windowed
    ("mistral", dict(sliding_window=4)),  # every layer windowed, the window on the config only
])
def test_varlen_attention_keeps_each_layers_own_window(arch, window):
    """One example longer than the window: VARLEN attention gives the logits of transformers' eager attention,
    which windows only the layers whose attention has a window (a full-attention layer of Qwen2 must not take the
    config's)."""
    from model_helpers import make_hf_model

    from qlora_gpu.patches import use_varlen_attention

    hf = make_hf_model(arch, vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, **window).eval()
    ids = torch.randint(0, 61, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = hf(input_ids=ids, use_cache=False).logits
        assert use_varlen_attention(hf)
        varlen = hf(input_ids=ids, position_ids=torch.arange(10)[None], use_cache=False).logits
    torch.testing.assert_close(varlen, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (FlashAttention's variable-length kernel)")
def test_varlen_kernel_equals_per_example_sdpa_on_cuda():
    """On CUDA in bfloat16 the variable-length kernel (one launch) and one SDPA call per example agree within
    bfloat16 rounding of the output (2^-8 relative), forward and backward."""
    from qlora_gpu import packing

    if packing._varlen_kernel() is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn")
    g = torch.Generator(device="cuda").manual_seed(0)
    b, h, hkv, t, d = 2, 8, 2, 96, 64
    pos = torch.cat([torch.arange(40), torch.arange(56)]).expand(b, t).cuda()
    q = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    k = torch.randn(b, hkv, t, d, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    v = torch.randn(b, hkv, t, d, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)

    class Module:
        config = None

    out, _ = packing.varlen_attention_forward(Module(), q, k, v, None, scaling=d ** -0.5, position_ids=pos)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    flat = [x.detach().transpose(1, 2).reshape(b * t, x.shape[1], d).requires_grad_() for x in (q, k, v)]
    ref = packing._per_example(*flat, packing.cu_seqlens(pos).tolist(), d ** -0.5, 0.0, None)
    ref_grads = torch.autograd.grad(ref.float().square().sum(), flat)
    assert max_rel_err(out.float().cpu().reshape(b * t, h, d), ref.float().cpu()) <= 2 ** -7
    for a, r in zip(grads, ref_grads, strict=True):
        assert max_rel_err(a.float().transpose(1, 2).reshape(r.shape).cpu(), r.float().cpu()) <= 2 ** -6


def _fake_varlen(mode: str):
    """A stand-in for torch's variable-length kernel on the CPU (``_varlen_kernel()``'s tuple): correct, or with
    one of the faults the CUDA probe must catch."""
    import torch.nn.functional as F

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, enable_gqa=False, scale=None):
        bounds = [0, len(q)] if mode == "across examples" else cu_q.tolist()
        outs = []
        for s, e in zip(bounds[:-1], bounds[1:], strict=True):
            qs, ks, vs = (x[s:e].transpose(0, 1)[None] for x in (q, k, v))
            causal = is_causal and mode != "not causal"
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale,
                                                       enable_gqa=enable_gqa)[0].transpose(0, 1))
        return torch.cat(outs)

    return varlen_attn, {"is_causal": True}, True, True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_varlen_kernel_probe_catches_attention_across_examples_or_to_later_tokens(dtype):
    """``varlen_kernel_trusted`` runs this probe on CUDA before a packed batch uses torch's prototype kernel; here
    on the CPU with stand-ins: the correct one passes, the two ways of leaking attention fail."""
    from qlora_gpu import packing

    cpu = torch.device("cpu")
    assert packing.probe_varlen_kernel(_fake_varlen("correct"), cpu, dtype)
    assert not packing.probe_varlen_kernel(_fake_varlen("not causal"), cpu, dtype)
    assert not packing.probe_varlen_kernel(_fake_varlen("across examples"), cpu, dtype)
    broken = (lambda *a, **k: 1 / 0, {"is_causal": True}, True, True)
    assert not packing.probe_varlen_kernel(broken, cpu, dtype)


def test_a_varlen_kernel_that_fails_its_probe_is_not_used_and_said(monkeypatch):
    from qlora_gpu import packing

    monkeypatch.setattr(packing, "_varlen_kernel", lambda: _fake_varlen("across examples"))
    packing.varlen_kernel_trusted.cache_clear()
    try:
        with pytest.warns(UserWarning, match="variable-length attention kernel failed its check on cpu in bfloat16"):
            assert not packing.varlen_kernel_trusted(torch.device("cpu"), torch.bfloat16)
        monkeypatch.setattr(packing, "_varlen_kernel", lambda: _fake_varlen("correct"))
        assert packing.varlen_kernel_trusted(torch.device("cpu"), torch.float16)
    finally:
        packing.varlen_kernel_trusted.cache_clear()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (FlashAttention's variable-length kernel)")
def test_on_cuda_the_varlen_kernel_passes_its_probe():
    from qlora_gpu import packing

    if packing._varlen_kernel() is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn")
    for dtype in (torch.bfloat16, torch.float16):
        assert packing.probe_varlen_kernel(packing._varlen_kernel(), torch.device("cuda"), dtype)


def test_gpu_varlen_model_still_generates_like_eager(checkpoint):
    """A model switched to VARLEN attention for packed training generates as before: the prompt pass is one
    example, the cached steps go to transformers' SDPA."""
    _, path = checkpoint
    prompt = [3, 14, 15, 9, 2, 6]
    outs = [gpu_model(path, impl).generate(prompt, max_new_tokens=6, eos_token_id=[]) for impl in
            ("qlora_varlen", "eager")]
    assert outs[0] == outs[1] and len(outs[0]) == len(prompt) + 6


# ------------------------------------------------------------------------------------------ the benchmark's arithmetic
def test_packing_benchmark_counts_slots_and_estimates_epochs():
    """bench/packing_throughput.py: a batch's slots from the lengths alone equal the collated batch's; the epoch
    ratio is (batches x mean step time) of the baseline over the packed mode's."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import packing_throughput as pt

    data = _dataset(n=30, max_length=200)
    for mode in pt.MODES:
        batches = pt.epoch_batches(data, mode, seed=2)
        assert sorted(i for b in batches for i in (b if mode not in pt.PACKED else [j for p in b for j in p])) \
            == list(range(len(data)))  # every example once an epoch
        for b in batches[:3]:
            assert pt.slots(data, mode, b) == pt.collate(data, mode, b)["input_ids"].size
    epochs = {m: {"batches": n, "tokens": 1000, "slots": 2000} for m, n in
              zip(pt.MODES, (10, 10, 10, 5, 4), strict=True)}
    times = {"max_length": [2.0, 2.0], "random": [1.0, 2.0], "grouped": [1.0, 1.0], "packed": [2.0, 2.0],
             "packed_row": [3.0, 1.0]}
    rounds = [{m: {"tokens": 100, "slots": 200, "step_seconds": [t[r]]} for m, t in times.items()} for r in range(2)]
    s = pt.summarize(rounds, epochs)
    assert s["packed_row_over_max_length"]["epoch"] == pytest.approx((10 * 2.0) / (4 * 2.0))
    assert s["packed_over_random"]["epoch"] == pytest.approx((10 * 1.5) / (5 * 2.0))
    assert s["packed_row_over_grouped"]["epoch_per_round"]["min"] == pytest.approx(10 * 1.0 / (4 * 3.0))
    assert s["grouped"]["epoch_tokens_per_s"] == pytest.approx(1000 / 10.0)
    # the pooled ratio's bootstrap interval over the sampled steps: packed_row's two steps (3 s, 1 s) resample to
    # a mean of 1, 2 or 3 s, max_length's are both 2 s, so the epoch ratio 10·2 / (4·mean) is 5, 2.5 or 1.67
    assert pt.pooled_interval(rounds, epochs, "packed_row", "max_length") == pytest.approx((10 * 2 / 12, 5.0))
    assert "| packed_row / max_length | **2.50×** | 1.67–5.00 |" in pt.markdown({
        "command": "x", "examples": 30, "max_length": 200, "backend": "ref", "rounds_run": 2, "steps": 1,
        "load_average": [[0, 0, 0], [0, 0, 0]], "stamp": {}, "modes": list(pt.MODES), "epochs": epochs,
        "summary": s, "rounds": rounds})


def test_segment_ids_start_an_example_wherever_positions_break_not_only_at_zero():
    """An example begins wherever a position does not follow the one before by one (transformers'
    find_packed_sequence_indices), also when it does not restart at 0 (a row or example cut from the middle of a
    longer text): 3 4 5 | 0 1 | 7 8 9 | 2 3."""
    from transformers.masking_utils import find_packed_sequence_indices

    pos = np.array([[3, 4, 5, 0, 1, 7, 8, 9, 2, 3]])
    np.testing.assert_array_equal(segment_ids(pos)[0], [0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    np.testing.assert_array_equal(segment_ids(pos), find_packed_sequence_indices(tt(pos)).numpy())
    assert [(s, e) for _, s, e in example_spans(pos)] == [(0, 3), (3, 5), (5, 8), (8, 10)]


def test_cu_seqlens_cut_wherever_a_position_does_not_follow_by_one():
    """The reference's rule (``qlora_ref.model.attention.segment_ids``, transformers' find_packed_sequence_indices),
    not "a position 0 starts an example": an example may begin at a position other than 0 (a continued document)
    and then starts wherever its first position does not follow the one before by one."""
    from qlora_gpu.packing import cu_seqlens
    from qlora_ref.model.attention import segment_ids

    pos = torch.tensor([[0, 1, 2, 5, 6, 7, 2, 3], [3, 4, 0, 1, 2, 3, 9, 10]])
    # row 0: 5 does not follow 2, 2 does not follow 7; row 1 (from 8): 0 does not follow 4, 9 does not follow 3
    assert cu_seqlens(pos).tolist() == [0, 3, 6, 8, 10, 14, 16]
    seg = segment_ids(pos.numpy())
    starts = np.ones(seg.shape, bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    assert cu_seqlens(pos).tolist()[:-1] == np.flatnonzero(starts.reshape(-1)).tolist()
