"""The reference transformer against transformers (logits) and transformers + peft (LoRA gradients)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_helpers import SMALL_CONFIGS, max_rel_err, small_hf_model

from qlora_ref.model import LoraConfig, QuantConfig, load_model
from qlora_ref.model.loading import CheckpointError
from qlora_ref.quantize import dequantize_4bit, quantize_4bit

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module", params=sorted(SMALL_CONFIGS))
def hf_checkpoint(request, tmp_path_factory):
    """(name, transformers model, folder it was saved to)."""
    model = small_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, path


def input_ids(vocab, shape=(2, 11), seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=shape)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def test_logits_equal_transformers_float32(hf_checkpoint):
    _, hf, path = hf_checkpoint
    ref = load_model(path)
    ids = input_ids(hf.config.vocab_size)
    logits = ref.forward(ids)
    assert logits.dtype == np.float32 and logits.shape == (*ids.shape, hf.config.vocab_size)
    assert max_rel_err(logits, hf_logits(hf, ids)) <= 1e-5


@pytest.mark.parametrize("name", ["qwen2-yarn", "qwen3"])
def test_the_gpu_backend_computes_the_reference_logits(name, tmp_path):
    """What these configs add runs in both backends: YaRN's attention factor on cos and sin (qlora_gpu through
    transformers' rotary embedding and its own fused rope), Qwen3's query/key norms (their weights placed by the
    streaming build and by ``from_pretrained``, through qlora_gpu's fused RMSNorm). Float32 weights: only the
    order of float32 sums differs."""
    import qlora_gpu
    from qlora_gpu.model import QLoRAModel

    small_hf_model(name).save_pretrained(tmp_path)
    ids = input_ids(SMALL_CONFIGS[name]["vocab_size"], shape=(1, 23), seed=2)
    ours = load_model(tmp_path, progress=False).forward(ids)
    for gpu in (qlora_gpu.load_model(tmp_path, device="cpu", progress=False),
                QLoRAModel.from_pretrained(tmp_path, quant=None, device="cpu")):
        with torch.no_grad():
            theirs = gpu(torch.from_numpy(ids)).float().numpy()
        assert max_rel_err(ours, theirs) <= 1e-5


def test_nf4_logits_equal_transformers_on_dequantized_weights(hf_checkpoint):
    """quant=QuantConfig(nf4, float32 compute): the same as transformers running the dequantized weights."""
    name, hf, path = hf_checkpoint
    quant = QuantConfig("nf4", blocksize=64, double_quant=True, compute_dtype="float32")
    ref = load_model(path, quant=quant)
    hf_q = small_hf_model(name)
    with torch.no_grad():
        for pname, p in hf_q.named_parameters():
            if pname.endswith(".weight") and pname.split(".")[-2] in LINEARS:
                q = quantize_4bit(p.numpy(), "nf4", 64, double_quant=True)
                p.copy_(torch.from_numpy(dequantize_4bit(q)))
    ids = input_ids(hf.config.vocab_size, seed=1)
    ours = ref.forward(ids)
    assert max_rel_err(ours, hf_logits(hf_q, ids)) <= 1e-5
    # and 4-bit storage really changed the model
    assert max_rel_err(ours, hf_logits(hf, ids)) > 1e-3


def peft_twin(hf, ref, r, alpha, targets):
    """A peft model over ``hf`` with the reference model's adapter weights copied in."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_model = get_peft_model(hf, PeftLoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                   target_modules=list(targets)))
    params = ref.lora_parameters()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                key = name.removeprefix("base_model.model.").replace(".default", "")
                p.copy_(torch.from_numpy(params[key]))
    return peft_model


def randomize_adapters(model, seed=0):
    rng = np.random.default_rng(seed)
    for arr in model.lora_parameters().values():
        arr[...] = rng.standard_normal(arr.shape).astype(np.float32) * 0.1


@pytest.mark.parametrize("targets", [LINEARS, ("q_proj", "v_proj", "down_proj")])
def test_lora_gradients_equal_peft(hf_checkpoint, targets):
    name, _, path = hf_checkpoint
    ref = load_model(path, lora=LoraConfig(r=4, alpha=8, target_modules=targets))
    randomize_adapters(ref)
    assert len(ref.lora_parameters()) == 2 * len(targets) * ref.config.num_hidden_layers
    peft_model = peft_twin(small_hf_model(name), ref, 4, 8, targets)

    ids = input_ids(ref.config.vocab_size, seed=2)
    grad_logits = np.random.default_rng(3).standard_normal((*ids.shape, ref.config.vocab_size)).astype(np.float32)
    logits = ref.forward(ids)
    ref.backward(grad_logits)

    out = peft_model(torch.from_numpy(ids)).logits
    (out * torch.from_numpy(grad_logits)).sum().backward()
    assert max_rel_err(logits, out.detach().numpy()) <= 1e-5
    ours = ref.lora_grads()
    theirs = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad.numpy()
              for n, p in peft_model.named_parameters() if "lora_" in n}
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert max_rel_err(ours[key], theirs[key]) <= 1e-4, key


def test_gradient_checkpointing_changes_no_gradient(hf_checkpoint):
    """With LoRA dropout on (random masks), checkpointed recomputation replays the same masks."""
    _, _, path = hf_checkpoint
    lora = LoraConfig(r=4, alpha=8, dropout=0.1, seed=7)
    plain = load_model(path, lora=lora)
    ckpt = load_model(path, lora=lora, gradient_checkpointing=True)
    for m in (plain, ckpt):
        randomize_adapters(m)
        m.train()
    ids = input_ids(plain.config.vocab_size, seed=4)
    g = np.random.default_rng(5).standard_normal((*ids.shape, plain.config.vocab_size)).astype(np.float32)
    for _ in range(2):  # twice: the random state moves on identically
        np.testing.assert_array_equal(plain.forward(ids), ckpt.forward(ids))
        plain.backward(g)
        ckpt.backward(g)
        a, b = plain.lora_grads(), ckpt.lora_grads()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_bf16_compute_close_to_float32(hf_checkpoint):
    """QLoRA's bfloat16 compute (NF4 weights) stays within bfloat16 precision of the float32 computation."""
    _, _, path = hf_checkpoint
    ids = input_ids(50, seed=6)
    f32_model = load_model(path, quant=QuantConfig(compute_dtype="float32"))
    f32 = f32_model.forward(ids)
    bf16 = load_model(path, quant=QuantConfig(compute_dtype="bfloat16")).forward(ids)
    err = max_rel_err(bf16, f32)
    # Bound, to first order: the two differ only in the bfloat16 roundings of the 4-bit linear layers (the same NF4
    # weights; norms, attention and the head in float32), each a relative error of at most u = 2⁻⁹ (8 significant
    # bits, round to nearest): the input and the output of q/k/v, o, gate/up and down, 8 along the path through each
    # decoder layer. Added up (the worst case, amplification through the norms of order one): 8·L·u of the
    # largest logit, 0.031 for 2 layers, 0.047 for 3. Measured: 1.8-2.5 u.
    n_layers = f32_model.config.num_hidden_layers
    assert 0 < err <= 8 * n_layers * 2.0**-9


def test_generation_with_kv_cache(hf_checkpoint):
    """Greedy decoding with the KV cache picks, at every step, the argmax of a full forward pass, and equals
    transformers' greedy generate; sampling is reproducible with a seed and respects top-p."""
    _, hf, path = hf_checkpoint
    ref = load_model(path).eval()
    prompt = [3, 14, 15, 9, 2, 6]
    out = ref.generate(prompt, max_new_tokens=8, eos_token_id=[])
    assert out[:len(prompt)] == prompt and len(out) == len(prompt) + 8  # prompt + new ids, as transformers
    full = ref.forward(np.asarray([out]))[0]
    out = out[len(prompt):]
    assert [int(np.argmax(full[len(prompt) - 1 + i])) for i in range(len(out))] == out
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    assert theirs[0, len(prompt):].tolist() == out

    streamed = []
    assert ref.generate(prompt, max_new_tokens=8, eos_token_id=[], stream=streamed.append) == prompt + out
    assert streamed == out  # the new tokens only

    a = ref.generate(prompt, max_new_tokens=6, temperature=0.8, top_p=0.9, seed=1, eos_token_id=[])
    b = ref.generate(prompt, max_new_tokens=6, temperature=0.8, top_p=0.9, seed=1, eos_token_id=[])
    assert a == b and len(a) == len(prompt) + 6

    # a model in training mode with LoRA dropout generates without dropout, and is left in training mode
    adapted = load_model(path, lora=LoraConfig(r=4, alpha=8, dropout=0.5))
    randomize_adapters(adapted)
    adapted.train()
    out = adapted.generate(prompt, max_new_tokens=5, eos_token_id=[])[len(prompt):]
    assert all(m.training for m in adapted.named_linears().values())
    full = adapted.eval().forward(np.asarray([prompt + out]))[0]
    assert [int(np.argmax(full[len(prompt) - 1 + i])) for i in range(len(out))] == out


def test_top_p_filter_keeps_the_nucleus():
    from qlora_ref.model.generate import next_token, top_p_filter

    probs = np.array([0.05, 0.5, 0.3, 0.15])
    np.testing.assert_allclose(top_p_filter(probs, 0.7), [0, 0.625, 0.375, 0])  # 0.5 < 0.7 needs the 0.3 too
    np.testing.assert_allclose(top_p_filter(probs, 0.5), [0, 1, 0, 0])
    rng = np.random.default_rng(0)
    draws = {next_token(np.log(probs), 1.0, 0.7, rng) for _ in range(200)}
    assert draws == {1, 2}
    assert next_token(np.log(probs), 0.0) == 1


def test_gradient_checkpointing_saves_activation_memory(tmp_path):
    """Peak memory allocated during forward + backward (tracemalloc sees NumPy's buffers): with checkpointing
    only each block's input is kept between the passes. docs/transformer.md has the SmolLM2 figure."""
    import tracemalloc

    from model_helpers import make_hf_model

    hf = make_hf_model("llama", vocab_size=64, hidden_size=64, intermediate_size=176, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=2)
    hf.save_pretrained(tmp_path)
    ids = input_ids(64, shape=(1, 128))
    grad = np.random.default_rng(0).standard_normal((1, 128, 64)).astype(np.float32)
    peaks = {}
    for ckpt in (False, True):
        model = load_model(tmp_path, lora=LoraConfig(r=4, alpha=8), gradient_checkpointing=ckpt)
        model.forward(ids)
        model.backward(grad)  # warm-up
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        model.forward(ids)
        model.backward(grad)
        peaks[ckpt] = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
    assert peaks[True] < 0.5 * peaks[False], peaks


@pytest.mark.parametrize("max_window_layers, window", [(0, 4), (2, None), (5, None)])
def test_qwen2_sliding_windows_in_every_layer_or_none_load(tmp_path, max_window_layers, window):
    """Qwen2 with use_sliding_window (refused as a whole before): transformers windows layer i when i >=
    max_window_layers. Every layer windowed (0) is the reference's one window, none (2 or more of 2 layers: Qwen2.5's
    released configs) is full attention; the logits equal transformers' either way, and the folder the reference
    writes back (to_hf_dict) reads in transformers as the same layers. A mixture is refused naming the layer."""
    import transformers
    from model_helpers import make_hf_model

    hf = make_hf_model("qwen2", vocab_size=71, hidden_size=32, intermediate_size=45, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                       max_window_layers=max_window_layers)
    hf.save_pretrained(tmp_path)
    ref = load_model(tmp_path)
    assert ref.config.sliding_window == window
    ids = input_ids(71)
    assert max_rel_err(ref.forward(ids), hf_logits(hf, ids)) <= 1e-5
    back = transformers.Qwen2Config(**ref.config.to_hf_dict())
    assert back.layer_types == hf.config.layer_types
    mixed = make_hf_model("qwen2", vocab_size=71, hidden_size=32, intermediate_size=45, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                          max_window_layers=1)
    mixed.save_pretrained(tmp_path / "mixed")
    with pytest.raises(CheckpointError, match=r"sliding-window attention in layers 1 and above only"):
        load_model(tmp_path / "mixed")


def test_a_swish_activation_is_silu(tmp_path):
    """transformers' ACT2FN maps hidden_act 'swish' to torch's SiLU: such a config loads (it was refused) and gives
    transformers' logits."""
    import json

    from model_helpers import small_hf_model

    hf = small_hf_model("llama-gqa")
    hf.config.hidden_act = "swish"
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["hidden_act"] == "swish"
    ids = input_ids(97)
    assert max_rel_err(load_model(tmp_path).forward(ids), hf_logits(hf, ids)) <= 1e-5


def test_mistral_sliding_window_logits(tmp_path):
    """Mistral: each query sees only the last ``sliding_window`` keys (window 4 < sequence 11)."""
    from model_helpers import make_hf_model

    hf = make_hf_model("mistral", vocab_size=71, hidden_size=32, intermediate_size=45, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    hf.save_pretrained(tmp_path)
    ref = load_model(tmp_path)
    assert ref.config.sliding_window == 4
    ids = input_ids(71)
    assert max_rel_err(ref.forward(ids), hf_logits(hf, ids)) <= 1e-5
    full = load_model(tmp_path)
    for layer in full.layers:
        layer.self_attn.sliding_window = None
    assert max_rel_err(full.forward(ids), hf_logits(hf, ids)) > 1e-3  # the window matters here
