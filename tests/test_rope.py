"""``qlora_gpu.rope``: transformers' rotary position embedding as one autograd Function with fewer operators
(host time at batch 1), the same bits forward and gradients equal under ``torch.equal`` (a zero's sign aside).
Checked against transformers' ``apply_rotary_pos_emb`` and autograd, against finite differences, in a whole tiny
model (loss and every LoRA gradient, with and without checkpointing), for a model not built by us in the same
process (transformers' function still runs), by exact operator counts, and on CUDA (marker ``gpu``) by kernel
counts."""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import sys
import types
from pathlib import Path

import pytest
import torch
import transformers
from model_helpers import count_calls, lora_step
from transformers.models.llama import modeling_llama

from qlora_gpu import patches, rope
from qlora_gpu.prepare import prepare_model
from qlora_ref.model.config import LoraConfig, ModelConfig

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from gpu_scale import count_op_kinds  # noqa: E402  (bench/gpu_scale.py: compute operators = non-view aten ops)

TINY = ModelConfig(model_type="llama", vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)
IDS = torch.arange(20)[None] * 7 % 101


def _original(module=modeling_llama):
    """transformers' own function, whether or not ``use_fused_rope`` has patched the module yet."""
    fn = module.apply_rotary_pos_emb
    return getattr(fn, "_qlora_original", fn)


def _inputs(seed, dtype, unsqueeze_dim, device="cpu", heads=(4, 2), seq=7, head_dim=16, cos_dtype=None):
    """q and k as the attention makes them (views of the projections' outputs, heads and positions transposed
    for unsqueeze_dim 1), GQA (k has fewer heads), cos/sin of a real rotary embedding, output gradients."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device) * 3

    q, k = (randn(2, seq, h, head_dim).to(dtype) for h in heads)
    if unsqueeze_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    angle = torch.arange(seq, device=device)[:, None] * (1e4 ** -torch.arange(0, 1, 2 / head_dim, device=device))
    angle = torch.cat((angle, angle), dim=-1).expand(2, seq, head_dim) + randn(2, 1, 1)
    cos, sin = (f(angle).to(cos_dtype or dtype) for f in (torch.cos, torch.sin))
    out_dtype = torch.promote_types(dtype, cos.dtype)
    return q, k, cos, sin, randn(*q.shape).to(out_dtype), randn(*k.shape).to(out_dtype)


def _run(fn, q, k, cos, sin, gq, gk, unsqueeze_dim):
    outs = fn(q, k, cos, sin, unsqueeze_dim)
    grads = torch.autograd.grad(outs, (q, k), (gq, gk))
    return [o.detach() for o in outs], list(grads)


def _theirs(q, k, cos, sin, unsqueeze_dim):
    return _original()(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


def _ours(q, k, cos, sin, unsqueeze_dim):
    return rope.rope(q, k, cos, rope.signed_sin(sin), unsqueeze_dim)


@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize("dtype,cos_dtype", [(torch.bfloat16, None), (torch.float32, None),
                                             (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_values_and_gradients_are_transformers_bit_for_bit(seed, dtype, cos_dtype, unsqueeze_dim):
    """Forward outputs identical bits; input gradients equal under torch.equal (autograd adds exact zeros). The
    float32-cos case promotes the products: each gradient term is rounded to bfloat16 before the sum, as
    autograd's mul backward rounds it."""
    q, k, cos, sin, gq, gk = _inputs(seed, dtype, unsqueeze_dim, cos_dtype=cos_dtype)
    (o0, g0), (o1, g1) = (_run(fn, q, k, cos, sin, gq, gk, unsqueeze_dim) for fn in (_theirs, _ours))
    for a, b in zip(o0 + g0, o1 + g1, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    for a, b in zip(o0, o1, strict=True):  # forward: the same bits, signs of zeros too
        assert torch.equal(a.view(torch.int16 if a.dtype == torch.bfloat16 else torch.int32),
                           b.view(torch.int16 if b.dtype == torch.bfloat16 else torch.int32))


def test_a_tensor_that_needs_no_gradient_gets_none():
    """k frozen: its gradient is neither computed (4 operators for q alone) nor returned."""
    q, k, cos, sin, gq, gk = _inputs(0, torch.float32, 1)
    k = k.detach()
    qo, ko = _ours(q, k, cos, sin, 1)
    ops = collections.Counter()
    _, n, (gq_ours,) = count_op_kinds(lambda: torch.autograd.grad((qo, ko), (q,), (gq, gk)), ops)
    (gq_theirs,) = torch.autograd.grad((_theirs(q, k, cos, sin, 1)[0],), (q,), (gq,))
    assert torch.equal(gq_ours, gq_theirs) and n == 4, ops


def test_the_gradient_is_the_derivative():
    q, k, cos, sin, _, _ = _inputs(0, torch.float64, 1, heads=(3, 1), seq=5, head_dim=8)
    fn = functools.partial(rope.rope, cos=cos, sin_signed=rope.signed_sin(sin))
    assert torch.autograd.gradcheck(fn, (q, k))
    assert torch.autograd.gradgradcheck(fn, (q, k))


def test_operator_counts():
    """Compute operators (non-view aten operators, bench/gpu_scale.py's count), forward and backward, for q and k
    of the model's layout. transformers' per tensor: forward mul (x*cos), neg, cat (rotate_half), mul, add = 5;
    backward mul (g*cos), mul (g*sin), neg (of the cat's first half), slice_backward twice (rotate_half's two
    slices; zeros + copy each on CUDA), add twice (accumulating the three gradients of x) = 7. Ours per tensor:
    forward mul, cat (the halves swapped), mul, add = 4; backward mul, mul, cat, add = 4. signed_sin (neg, cat)
    runs once per model forward, for all layers."""
    q, k, cos, sin, gq, gk = _inputs(0, torch.bfloat16, 1)
    counts = {}
    sin_signed = rope.signed_sin(sin)
    for name, fn in (("theirs", _theirs), ("ours", lambda q, k, cos, _, dim: rope.rope(q, k, cos, sin_signed, dim))):
        fwd, bwd = collections.Counter(), collections.Counter()
        outs = count_op_kinds(lambda fn=fn: fn(q, k, cos, sin, 1), fwd)[2]
        count_op_kinds(lambda outs=outs: torch.autograd.grad(outs, (q, k), (gq, gk)), bwd)
        counts[name] = fwd, bwd
    assert counts["theirs"] == ({"aten.mul.Tensor": 4, "aten.neg.default": 2, "aten.cat.default": 2,
                                 "aten.add.Tensor": 2},
                                {"aten.mul.Tensor": 4, "aten.neg.default": 2, "aten.slice_backward.default": 4,
                                 "aten.add.Tensor": 4})
    assert counts["ours"] == ({"aten.mul.Tensor": 4, "aten.cat.default": 2, "aten.add.Tensor": 2},
                              {"aten.mul.Tensor": 4, "aten.cat.default": 2, "aten.add.Tensor": 2})
    sig = collections.Counter()
    count_op_kinds(lambda: rope.signed_sin(sin), sig)
    assert sig == {"aten.neg.default": 1, "aten.cat.default": 1}


# ----------------------------------------------------------------------------------------------- in a model
def _spy(monkeypatch):
    """Counts the calls of our Function."""
    return count_calls(monkeypatch, rope._Rope, "apply", "ours")


def _build(model_type, checkpointing, attn):
    cfg = dataclasses.replace(TINY, model_type=model_type, qkv_bias=model_type == "qwen2")
    m = prepare_model(cfg, lora=LoraConfig(r=4, dropout=0.1), device="cpu", dtype="bfloat16", progress=False,
                      tokenizer=False, gradient_checkpointing=checkpointing, attn_implementation=attn, seed=5)
    g = torch.Generator().manual_seed(1)  # LoRA B is zero at init: random adapters make every gradient count
    m.load_lora_parameters({k: torch.randn(p.shape, generator=g) * 0.1 for k, p in m.lora_parameters().items()})
    return m


def _step(m):
    return lora_step(m, IDS)[1:]


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_model_loss_and_lora_gradients_are_unchanged_bit_for_bit(model_type, attn, checkpointing,
                                                                     monkeypatch):
    """The same model twice (same seeds: same weights and dropout masks), once with its rotary embedding unmarked
    (transformers' function runs): loss and every LoRA gradient identical. Under checkpointing the recomputation
    gets the same marked ``sin`` object, so ours runs again there."""
    calls = _spy(monkeypatch)
    ours = _build(model_type, checkpointing, attn)
    module = sys.modules[type(ours.hf.model.layers[0].self_attn).__module__]
    assert module.apply_rotary_pos_emb._qlora_original is not None
    calls.clear()  # the first install probes the module's function with ours
    loss1, grads1 = _step(ours)
    assert calls["ours"] == TINY.num_hidden_layers * (2 if checkpointing else 1)

    theirs = _build(model_type, checkpointing, attn)
    del theirs.hf.model.rotary_emb.forward  # the class's forward again: sin unmarked
    calls.clear()
    loss2, grads2 = _step(theirs)
    assert calls["ours"] == 0
    assert torch.equal(loss1, loss2)
    assert grads1.keys() == grads2.keys() and len(grads1) == 14 * TINY.num_hidden_layers
    for key in grads1:
        assert grads1[key].abs().sum() > 0, key
        assert torch.equal(grads1[key], grads2[key]), key


def test_a_model_not_built_by_us_runs_transformers_function(monkeypatch):
    """After install (the llama module's global is our dispatcher), a plain transformers model in the same process
    does not reach our Function: its sin is unmarked, so the dispatcher calls transformers' function."""
    assert patches.use_fused_rope(_build("llama", False, "eager").hf)
    dispatcher = modeling_llama.apply_rotary_pos_emb
    assert dispatcher._qlora_original is not None
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    plain = transformers.LlamaForCausalLM(cfg).eval()

    def logits():
        out = plain(input_ids=IDS, use_cache=False).logits
        out.sum().backward()
        return out.detach()

    calls = _spy(monkeypatch)
    seen = collections.Counter()

    def counted(*args, **kwargs):
        seen["dispatcher"] += 1
        return dispatcher(*args, **kwargs)

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", counted)
    y1 = logits()
    assert seen["dispatcher"] == cfg.num_hidden_layers and calls["ours"] == 0
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", dispatcher._qlora_original)
    assert torch.equal(y1, logits())


def test_install_is_idempotent_and_marks_only_this_models_sin():
    m = _build("llama", False, "eager")
    rotary = m.hf.model.rotary_emb
    first, patched = rotary.forward, modeling_llama.apply_rotary_pos_emb
    assert patches.use_fused_rope(m.hf) and patches.use_fused_rope(m.hf)
    assert rotary.forward is first and modeling_llama.apply_rotary_pos_emb is patched
    assert not hasattr(patched._qlora_original, "_qlora_original")
    assert inspect.signature(patched) == inspect.signature(patched._qlora_original)
    x = torch.zeros(1, 3, 64, dtype=torch.bfloat16)
    cos, sin = rotary(x, torch.arange(3)[None])
    assert torch.equal(getattr(sin, patches._MARK), rope.signed_sin(sin))
    other = type(rotary)(config=m.hf.config)  # the same class, not this model's instance: unmarked
    assert not hasattr(other(x, torch.arange(3)[None])[1], patches._MARK)


def _fake_model(monkeypatch, apply_rotary_pos_emb, rotate_half=modeling_llama.rotate_half):
    """A transformers-like model whose attention class lives in a fake modeling module."""
    module = types.ModuleType("fake_modeling")
    module.apply_rotary_pos_emb, module.rotate_half = apply_rotary_pos_emb, rotate_half
    monkeypatch.setitem(sys.modules, module.__name__, module)
    attention = type("FakeAttention", (torch.nn.Module,), {"__module__": module.__name__})
    hf = torch.nn.Module()
    hf.model = torch.nn.Module()
    hf.model.rotary_emb = modeling_llama.LlamaRotaryEmbedding(transformers.LlamaConfig(head_dim=8))
    hf.model.attn = attention()
    return hf, module


def _interleaved(q, k, cos, sin, unsqueeze_dim=1):  # GPT-J's pairs, not halves: same signature, other values
    def rot(x):
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)

    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def _partial(q, k, cos, sin, unsqueeze_dim=1, rotary_dim=4):  # an extra parameter
    return modeling_llama.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)


@pytest.mark.parametrize("fn", [_interleaved, _partial])
def test_a_nonstandard_rope_is_left_alone(fn, monkeypatch):
    hf, module = _fake_model(monkeypatch, fn)
    forward = hf.model.rotary_emb.forward
    assert not patches.use_fused_rope(hf)
    assert module.apply_rotary_pos_emb is fn and hf.model.rotary_emb.forward == forward


def test_the_older_signature_with_position_ids(monkeypatch):
    """transformers before 4.46 or so: ``(q, k, cos, sin, position_ids=None, unsqueeze_dim=1)``, position_ids
    unused. Ours for position_ids None; given position_ids (older code indexed cos with them), theirs."""
    def legacy(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        return _original()(q, k, cos, sin, unsqueeze_dim)

    hf, module = _fake_model(monkeypatch, legacy)
    assert patches.use_fused_rope(hf)
    calls = _spy(monkeypatch)
    q, k, cos, sin, gq, gk = _inputs(0, torch.bfloat16, 2)
    setattr(sin, patches._MARK, rope.signed_sin(sin))
    want = legacy(q, k, cos, sin, None, 2)
    for args, kwargs in (((None, 2), {}), ((None,), {"unsqueeze_dim": 2}), ((), {"unsqueeze_dim": 2})):
        got = module.apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    assert calls["ours"] == 3
    module.apply_rotary_pos_emb(q, k, cos, sin, torch.arange(7), 2)
    assert calls["ours"] == 3


def test_a_gradient_asked_of_cos_or_sin_goes_to_transformers(monkeypatch):
    """Ours gives cos and sin no gradient; a model that wants one (learned positions) gets transformers' code."""
    assert patches.use_fused_rope(_build("llama", False, "eager").hf)
    calls = _spy(monkeypatch)
    q, k, cos, sin, gq, gk = _inputs(0, torch.float32, 1)
    for leaf in (cos, sin):
        marked = sin.detach().clone().requires_grad_(leaf is sin)
        setattr(marked, patches._MARK, rope.signed_sin(marked.detach()))
        c = cos.detach().requires_grad_(leaf is cos)
        grad = torch.autograd.grad(modeling_llama.apply_rotary_pos_emb(q, k, c, marked), (c if leaf is cos else
                                                                                          marked,), (gq, gk))[0]
        want = torch.autograd.grad(_original()(q, k, c, marked), (c if leaf is cos else marked,), (gq, gk))[0]
        assert torch.equal(grad, want)
    assert calls["ours"] == 0


@pytest.mark.gpu
def test_on_cuda_the_same_bits_in_fewer_kernels():
    """The same arithmetic (elementwise mul and add) on CUDA: identical outputs, gradients equal. Kernels for q and
    k: ours 8 forward and 8 backward (cat reads the strided halves in one kernel); transformers' 10 forward, and
    backward 18 (each slice_backward is a zeros fill and a copy)."""
    from torch.profiler import ProfilerActivity, profile

    q, k, cos, sin, gq, gk = _inputs(0, torch.bfloat16, 1, device="cuda", heads=(32, 8), seq=512, head_dim=128)
    (o0, g0), (o1, g1) = (_run(fn, q, k, cos, sin, gq, gk, 1) for fn in (_theirs, _ours))
    for a, b in zip(o0 + g0, o1 + g1, strict=True):
        assert torch.equal(a, b)
    sin_signed = rope.signed_sin(sin)

    def kernels(fn):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out = fn()
            torch.cuda.synchronize()
        return out, sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())

    counts = {}
    for name, fn in (("ours", lambda: rope.rope(q, k, cos, sin_signed, 1)),
                     ("theirs", lambda: _original()(q, k, cos, sin))):
        outs, forward = kernels(fn)
        counts[name] = forward, kernels(lambda outs=outs: torch.autograd.grad(outs, (q, k), (gq, gk)))[1]
    assert counts["ours"][0] <= 8 and counts["ours"][1] <= 8, counts
    assert counts["theirs"][0] >= 10 and counts["theirs"][1] >= 14, counts
