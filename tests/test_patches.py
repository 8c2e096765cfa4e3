"""``qlora_gpu.patches``: each replacement of a transformers function is installed only where its target is the
function it was written against, and otherwise leaves transformers' own code in place with exactly one
``PatchFallbackWarning`` — and the model then computes what transformers' code computes.

Targets are varied by monkeypatching transformers' real llama module (its ``apply_rotary_pos_emb``, its
``LlamaRMSNorm.forward``) before a tiny model is built, and transformers' attention interface for the causal-SDPA
registration. Oracles, all compared under ``torch.equal`` (same seeds, weights and dropout masks; the replacements
are bit-identical forward with gradients equal under ``torch.equal`` where active, tests/test_rope.py and
tests/test_rms_norm.py, and a fallback changes nothing, so there is no rounding to allow for): for the rotary
embedding, the same model built with ``use_fused_rope`` switched off; for the RMSNorm, whose fallback keeps the
cast back to the bfloat16 stream (without it the model cannot run: its norm weights are float32), a model with
transformers' norm and weights that make it compute the variant's values.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from model_helpers import count_calls, lora_step
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama import modeling_llama

import qlora_gpu.model
from qlora_gpu import packing, patches, rope
from qlora_gpu.prepare import prepare_model
from qlora_gpu.rms_norm import rms_norm
from qlora_ref.model.config import LoraConfig, ModelConfig

TINY = ModelConfig(model_type="llama", vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)
IDS = torch.arange(20)[None] * 7 % 101


@pytest.fixture(autouse=True)
def fresh_patch_state(monkeypatch):
    """Each test starts with no patch recorded, nothing warned, no RMSNorm class probed, the causal-SDPA check not
    yet run (it is cached per process), and transformers' llama rotary function restored afterwards."""
    monkeypatch.setattr(patches, "_STATUS", {})
    monkeypatch.setattr(patches, "_WARNED", set())
    monkeypatch.setattr(patches, "_RMS_NORM_CHECKED", {})
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", modeling_llama.apply_rotary_pos_emb)
    patches.register_causal_sdpa.cache_clear()
    patches.register_varlen_attention.cache_clear()
    yield
    patches.register_causal_sdpa.cache_clear()
    patches.register_varlen_attention.cache_clear()
    packing.register()  # the real function under its name again, whatever a test registered


def _standard(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' ``apply_rotary_pos_emb`` as a plain function (its code up to 5.1x, before the kernels
    wrapper): q·cos + rotate_half(q)·sin."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rotate_half = modeling_llama.rotate_half
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class Func(torch.nn.Module):
    """What transformers 5.25 makes of the function (the ``kernels`` package's ``use_kernel_forward_from_hub``): an
    ``nn.Module`` instance whose ``forward(*args, **kwargs)`` calls it — no signature to read."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def _reversed(q, k, cos, sin, unsqueeze_dim=1):
    """The standard signature, other numbers: the rotation by −θ."""
    return _standard(q, k, cos, -sin, unsqueeze_dim)


def _extra_parameter(q, k, cos, sin, unsqueeze_dim=1, rotary_dim=None):
    """The standard values, a parameter list this version of qlora does not know."""
    return _standard(q, k, cos, sin, unsqueeze_dim)


def _build(monkeypatch, *, rope_patch=True):
    """A tiny NF4 QLoRA llama (bfloat16 stream, dropout, checkpointing: the recomputation runs the rotary function
    again) with random adapters; ``rope_patch`` False: built without the rotary replacement."""
    with monkeypatch.context() as m:
        if not rope_patch:
            m.setattr(qlora_gpu.model, "use_fused_rope", lambda hf: False)
        model = prepare_model(TINY, lora=LoraConfig(r=4, dropout=0.1), device="cpu", dtype="bfloat16",
                              progress=False, tokenizer=False, gradient_checkpointing=True, attn_implementation="sdpa",
                              seed=5)
    g = torch.Generator().manual_seed(1)  # LoRA B is zero at init: random adapters make every gradient count
    model.load_lora_parameters({k: torch.randn(p.shape, generator=g) * 0.1 for k, p in model.lora_parameters().items()})
    return model


def _step(model):
    """Loss and every LoRA gradient of one training step (dropout masks from the model's seeded generators)."""
    logits, loss, grads = lora_step(model, IDS)
    assert len(grads) == 14 * TINY.num_hidden_layers and all(g.abs().sum() > 0 for g in grads.values())
    return logits, loss, grads


def _assert_same_step(a, b):
    (logits_a, loss_a, grads_a), (logits_b, loss_b, grads_b) = a, b
    assert torch.equal(logits_a, logits_b) and torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for key in grads_a:
        assert torch.equal(grads_a[key], grads_b[key]), key


def _count_ours(monkeypatch):
    """Calls of qlora's rotary Function (one per layer per forward, and again in each checkpointed recompute)."""
    return count_calls(monkeypatch, rope._Rope, "apply", "n")


def _fallback_warnings(record):
    return [w for w in record if issubclass(w.category, patches.PatchFallbackWarning)]


# ----------------------------------------------------------------------------------------------- rotary embedding
@pytest.mark.parametrize("target", ["plain function", "kernels wrapper"])
def test_the_rope_replacement_installs_through_a_function_or_a_module_wrapper(target, monkeypatch):
    """transformers <= 5.1x has a plain function, 5.25 an ``nn.Module`` wrapper: either way the dispatcher takes
    its place, our Function runs in every layer (and in each recomputation), and logits, loss and every LoRA
    gradient are those of the same model built without the replacement, bit for bit."""
    fn = _standard if target == "plain function" else Func(_standard)
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", fn)
    calls = _count_ours(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", patches.PatchFallbackWarning)
        ours = _build(monkeypatch)
    assert patches._is_ours(modeling_llama.apply_rotary_pos_emb)
    assert modeling_llama.apply_rotary_pos_emb._qlora_original is fn
    assert patches.status()["rotary embedding"] == "active"
    calls["n"] = 0  # the install probes with our Function
    got = _step(ours)
    assert calls["n"] == 2 * TINY.num_hidden_layers  # forward, and the checkpointed recomputation

    theirs = _build(monkeypatch, rope_patch=False)
    assert "forward" not in vars(theirs.hf.model.rotary_emb)  # sin unmarked: the dispatcher calls fn
    calls["n"] = 0
    want = _step(theirs)
    assert calls["n"] == 0
    _assert_same_step(got, want)


@pytest.mark.parametrize("variant,why", [
    (_extra_parameter, "signature this version of qlora does not know"),
    (_reversed, "does not compute q·cos + rotate_half(q)·sin"),
    (Func(_reversed), "does not compute q·cos + rotate_half(q)·sin"),  # no signature to read: the probe decides
], ids=["extra-parameter", "other-numbers", "other-numbers-wrapped"])
def test_an_unexpected_rotary_function_is_left_in_place_with_one_warning(variant, why, monkeypatch):
    """Not installed; one PatchFallbackWarning across two model setups; ``status()`` says why; the models run the
    variant itself (our Function never) and train exactly as a model built without the replacement."""
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", variant)
    calls = _count_ours(monkeypatch)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first, second = _build(monkeypatch), _build(monkeypatch)
    (warning,) = _fallback_warnings(record)
    assert "rotary embedding not replaced" in str(warning.message) and why in str(warning.message)
    assert patches.status()["rotary embedding"].startswith("fallback: ") and why in patches.status()[
        "rotary embedding"]
    assert patches.status()["RMSNorm"] == "active"  # the other replacement is independent
    assert modeling_llama.apply_rotary_pos_emb is variant
    for model in (first, second):
        assert "forward" not in vars(model.hf.model.rotary_emb)  # this model's sin is not marked either

    calls["n"] = 0
    got = _step(first)
    assert calls["n"] == 0
    _assert_same_step(got, _step(_build(monkeypatch, rope_patch=False)))
    if variant is _extra_parameter:  # the same values as transformers' function: also the patched model's step
        monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", _standard)
        _assert_same_step(got, _step(_build(monkeypatch)))
    else:  # other numbers: the variant really is what runs
        monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", _standard)
        assert not torch.equal(got[1], _step(_build(monkeypatch))[1])


# ----------------------------------------------------------------------------------------------- RMSNorm
def _offset_forward(self, hidden_states):
    """LlamaRMSNorm's code with Gemma's (1 + weight) scale: the same attributes, other numbers — those of
    LlamaRMSNorm with the weight 1 + w (both products in float32)."""
    dtype = hidden_states.dtype
    h = hidden_states.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return (1.0 + self.weight) * h.to(dtype)


def _norms(model):
    return [mod for mod in model.hf.modules() if isinstance(mod, modeling_llama.LlamaRMSNorm)]


def _set_norm_weights(model, offset):
    """Random norm weights w (``prepare_model`` draws ones), plus ``offset``; the same w for every model."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for norm in _norms(model):
            norm.weight.copy_(offset + 0.3 * torch.randn(norm.weight.shape, generator=g))


def test_an_rms_norm_of_another_form_keeps_its_forward_with_one_warning(monkeypatch):
    """LlamaRMSNorm's forward replaced by a (1 + weight) variant: no norm is routed through ``rms_norm``, one
    warning across two model setups, ``status()`` says why; each norm runs the variant, its result cast back to the
    bfloat16 stream (the norm weights are float32, and transformers' forward then returns float32, which the next
    bfloat16 layer refuses). Oracle: the variant with weight w is LlamaRMSNorm with weight 1 + w, so the step equals
    that of a model built with transformers' norm (replacement active) and norm weights 1 + w — bit for bit, the
    replacement being transformers' arithmetic on the CPU (tests/test_rms_norm.py)."""
    with monkeypatch.context() as m:
        m.setattr(modeling_llama.LlamaRMSNorm, "forward", _offset_forward)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            first, _ = _build(monkeypatch), _build(monkeypatch)
        (warning,) = _fallback_warnings(record)
        assert "RMSNorm not replaced" in str(warning.message)
        assert "LlamaRMSNorm.forward is not" in str(warning.message)
        assert patches.status()["RMSNorm"].startswith("fallback: LlamaRMSNorm.forward is not")
        assert patches.status()["rotary embedding"] == "active"
        norms = _norms(first)
        assert len(norms) == 2 * TINY.num_hidden_layers + 1
        assert all(mod.forward.func is patches._own_forward_in_stream_dtype for mod in norms)
        # installing again (the verdict cached): still a fallback, not "active"
        assert not patches.use_fused_rms_norm(torch.nn.Sequential(modeling_llama.LlamaRMSNorm(64)))
        _set_norm_weights(first, 0.0)
        got = _step(first)
        x = torch.randn(2, 3, 64).bfloat16()  # after the step: a block's first norm also draws its dropout masks
        assert torch.equal(norms[0](x), _offset_forward(norms[0], x).bfloat16())
    oracle = _build(monkeypatch)
    assert patches.status()["RMSNorm"] == "active"
    _set_norm_weights(oracle, 1.0)
    _assert_same_step(got, _step(oracle))


def test_the_norm_check_follows_a_forward_replaced_after_an_earlier_install(monkeypatch):
    """The probe's verdict is kept per class *and* forward: a forward swapped later (a hub kernel, a patch) is
    checked again rather than trusted on the strength of the class's earlier one."""
    assert patches.use_fused_rms_norm(torch.nn.Sequential(modeling_llama.LlamaRMSNorm(64)))
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _offset_forward)
    with pytest.warns(patches.PatchFallbackWarning, match="LlamaRMSNorm.forward is not"):
        assert not patches.use_fused_rms_norm(torch.nn.Sequential(modeling_llama.LlamaRMSNorm(64)))


def test_an_rms_norm_without_variance_epsilon_is_left_alone_not_skipped_in_silence():
    """Gemma's RMSNorm (``eps``, and a (1 + weight) scale): kept with its own forward, one warning, and a Llama
    norm next to it in the same model is still routed."""
    gemma, llama = GemmaRMSNorm(64, eps=1e-6), modeling_llama.LlamaRMSNorm(64)
    with torch.no_grad():
        gemma.weight.normal_(generator=torch.Generator().manual_seed(0))
    hf = torch.nn.Sequential(gemma, llama)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert not patches.use_fused_rms_norm(hf)
        assert not patches.use_fused_rms_norm(torch.nn.Sequential(GemmaRMSNorm(64)))
    (warning,) = _fallback_warnings(record)
    assert "GemmaRMSNorm has no variance_epsilon" in str(warning.message)
    assert patches.status()["RMSNorm"] == "fallback: GemmaRMSNorm has no variance_epsilon: not the form of " \
                                          "transformers' LlamaRMSNorm"
    assert gemma.forward.func is patches._own_forward_in_stream_dtype  # its own forward, in the stream's dtype
    assert llama.forward.func is rms_norm and llama.forward.args == (llama,)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    assert torch.equal(gemma(x), GemmaRMSNorm.forward(gemma, x)) and gemma(x).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------- causal SDPA
def test_causal_sdpa_falls_back_to_sdpa_where_the_attention_interface_moved(monkeypatch):
    """transformers' SDPA module not importable (an API that moved): "sdpa", one warning across two checks."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with monkeypatch.context() as m:
            m.setitem(sys.modules, "transformers.integrations.sdpa_attention", None)
            assert patches.register_causal_sdpa() == "sdpa"
            patches.register_causal_sdpa.cache_clear()
            assert patches.register_causal_sdpa() == "sdpa"
    (warning,) = _fallback_warnings(record)
    assert "causal SDPA not replaced" in str(warning.message)
    assert patches.status()["causal SDPA"].startswith("fallback: transformers' attention interface could not be "
                                                      "used (ModuleNotFoundError")


def test_causal_sdpa_falls_back_where_its_self_check_fails(monkeypatch):
    """The registered function does not give causal SDPA's logits (here: it drops the causal mask), so the
    registration is not used; once the function is right again, it is (and the name maps to the right one)."""
    from transformers import AttentionInterface
    from transformers.integrations import sdpa_attention

    original = sdpa_attention.sdpa_attention_forward

    def not_causal(module, query, key, value, attention_mask, **kwargs):
        kwargs["is_causal"] = False
        return original(module, query, key, value, None, **kwargs)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with monkeypatch.context() as m:
            m.setattr(sdpa_attention, "sdpa_attention_forward", not_causal)
            assert patches.register_causal_sdpa() == "sdpa"
    (warning,) = _fallback_warnings(record)
    assert "does not give the causal SDPA's logits" in str(warning.message)
    assert patches.status()["causal SDPA"].startswith("fallback: SDPA under a registered name")
    patches.register_causal_sdpa.cache_clear()
    assert patches.register_causal_sdpa() == patches.CAUSAL_SDPA
    assert AttentionInterface._global_mapping[patches.CAUSAL_SDPA] is original
    assert patches.status()["causal SDPA"] == "active"


# ----------------------------------------------------------------------------------------------- packed attention
def _leaky_varlen(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """The variable-length attention as it would run if transformers stopped passing the position ids: causal
    over the whole row, so a packed example sees the ones before it."""
    return _VARLEN(module, query, key, value, attention_mask, **kwargs)


_VARLEN = packing.varlen_attention_forward


def _packed_logits(model, attn_implementation):
    ids = torch.arange(9)[None] * 5 % 32
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    model.config._attn_implementation = attn_implementation
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        model.config._attn_implementation = "eager"
        alone = torch.cat([model(input_ids=ids[:, :5], use_cache=False).logits,
                           model(input_ids=ids[:, 5:], use_cache=False).logits], dim=1)
    return packed, alone


def test_the_variable_length_attention_is_used_where_it_keeps_packed_examples_apart():
    model = patches._tiny_llama()
    assert patches.use_varlen_attention(model)
    assert model.config._attn_implementation == packing.VARLEN
    assert patches.status()["packed attention"] == "active"
    packed, alone = _packed_logits(model, packing.VARLEN)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-6)


def test_a_variable_length_attention_that_would_leak_is_not_used(monkeypatch):
    """Where the registered function does not keep the examples apart (here: it never sees the position ids),
    the model keeps transformers' attention, which does (from the position ids, with a dense mask); one warning."""
    monkeypatch.setattr(packing, "varlen_attention_forward", _leaky_varlen)
    leaky, alone = _packed_logits(patches._tiny_llama(), packing.register())
    assert not torch.allclose(leaky, alone, rtol=1e-3, atol=1e-3)  # the variant does leak
    model = patches._tiny_llama()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert not patches.use_varlen_attention(model)
        assert not patches.use_varlen_attention(patches._tiny_llama())
    (warning,) = _fallback_warnings(record)
    assert "packed attention not replaced" in str(warning.message)
    assert model.config._attn_implementation != packing.VARLEN
    packed, alone = _packed_logits(model, model.config._attn_implementation)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-6)


def test_packing_is_refused_where_no_attention_keeps_examples_apart(monkeypatch):
    monkeypatch.setattr(patches, "_keeps_examples_apart", lambda model, impl: False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", patches.PatchFallbackWarning)
        with pytest.raises(patches.PackingUnavailableError, match="train without packing"):
            patches.use_varlen_attention(patches._tiny_llama())


def test_the_self_checks_leave_the_callers_random_state_alone():
    before = torch.random.get_rng_state()
    patches._tiny_llama()
    assert torch.equal(torch.random.get_rng_state(), before)


# ----------------------------------------------------------------------------------------------- status
def test_status_after_a_normal_setup_says_active_for_each(monkeypatch):
    assert patches.status() == {}  # nothing installed yet in this (reset) process state
    with warnings.catch_warnings():
        warnings.simplefilter("error", patches.PatchFallbackWarning)
        _build(monkeypatch)
        assert patches.register_causal_sdpa() == patches.CAUSAL_SDPA
    assert patches.status() == {"RMSNorm": "active", "rotary embedding": "active", "causal SDPA": "active"}
    status = patches.status()
    status["RMSNorm"] = "changed"  # a copy: the record is not the caller's to change
    assert patches.status()["RMSNorm"] == "active"


def _input_dtype_forward(self, hidden_states):
    """LlamaRMSNorm computed in its input's dtype (no float32 upcast): transformers' values for a float32 input,
    others for a bfloat16 one."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight.to(hidden_states.dtype) * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def test_a_norm_that_differs_only_on_bfloat16_inputs_is_left_in_place(monkeypatch):
    """The probe checks both input dtypes the stream has: a forward equal to transformers' in float32, bit for bit,
    but computing a bfloat16 input in bfloat16 is not replaced (one warning, the fallback in ``status()``)."""
    norm = modeling_llama.LlamaRMSNorm(64)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=torch.Generator().manual_seed(0)))
        x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(1)) * 3
        assert torch.equal(_input_dtype_forward(norm, x), rms_norm(norm, x))  # float32: the same bits
        assert not torch.equal(_input_dtype_forward(norm, x.bfloat16()), rms_norm(norm, x.bfloat16()))
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _input_dtype_forward)
    with pytest.warns(patches.PatchFallbackWarning, match="LlamaRMSNorm.forward is not"):
        assert not patches.use_fused_rms_norm(torch.nn.Sequential(modeling_llama.LlamaRMSNorm(64)))
    assert patches.status()["RMSNorm"].startswith("fallback: LlamaRMSNorm.forward is not")


def test_the_self_checks_leave_a_random_state_of_the_callers_own_alone():
    """The same check from a state no self-check can have left behind: run after another test's ``_tiny_llama``,
    the global generator may already sit where ``manual_seed(0)`` plus the tiny model's init leaves it, and a
    check that reseeded without forking would then go unnoticed."""
    torch.manual_seed(12345)
    before = torch.random.get_rng_state()
    patches._tiny_llama()
    patches.register_causal_sdpa()
    patches.register_varlen_attention()
    assert torch.equal(torch.random.get_rng_state(), before)
