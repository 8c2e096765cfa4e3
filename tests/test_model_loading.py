"""Loading checkpoints: sharded Hugging Face folders, GGUF files (written here with gguf.GGUFWriter), bitsandbytes
4-bit state dicts, tokenizers and chat templates, and the errors for bad input."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from model_helpers import make_hf_model, max_rel_err, small_hf_model
from safetensors.numpy import save_file

from qlora_ref.model import CheckpointError, QuantConfig, load_model
from qlora_ref.model.loading import unpermute_qk
from qlora_ref.quantize import dequantize_4bit, quantize_4bit

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def ids_for(vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(2, 9))


@pytest.fixture(scope="module")
def llama():
    return small_hf_model("llama-gqa")


def state_dict_np(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def write_folder(path, config: dict, tensors: dict):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"))
    return path


# ----------------------------------------------------------------------------------------------- HF folders
def test_sharded_folder(llama, tmp_path):
    llama.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    ids = ids_for(llama.config.vocab_size)
    assert max_rel_err(load_model(tmp_path).forward(ids), hf_logits(llama, ids)) <= 1e-5


def test_bfloat16_checkpoint(tmp_path):
    small_hf_model("qwen2").to(torch.bfloat16).save_pretrained(tmp_path)
    twin = small_hf_model("qwen2")  # float32, with the parameters rounded to bfloat16 (its rope table stays exact)
    with torch.no_grad():
        for p in twin.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    ids = ids_for(twin.config.vocab_size)
    assert max_rel_err(load_model(tmp_path).forward(ids), hf_logits(twin, ids)) <= 1e-5


def test_missing_shard_names_the_file(llama, tmp_path):
    llama.save_pretrained(tmp_path, max_shard_size="20KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_model(tmp_path)


def test_unknown_or_missing_architecture(llama, tmp_path):
    config = llama.config.to_dict()
    config["model_type"] = "gpt_neox"
    write_folder(tmp_path / "a", config, {"x": np.zeros(1, np.float32)})
    with pytest.raises(CheckpointError, match=r"config\.json.*unknown architecture.*gpt_neox"):
        load_model(tmp_path / "a")
    del config["model_type"]
    write_folder(tmp_path / "b", config, {"x": np.zeros(1, np.float32)})
    with pytest.raises(CheckpointError, match=r"config\.json.*no model_type"):
        load_model(tmp_path / "b")


def test_a_folder_of_another_quantizer_is_refused_naming_it(llama, tmp_path):
    """A GPTQ folder (qweight/qzeros/scales) was refused as a "missing tensor ... q_proj.weight": the symptom, not
    the cause."""
    config = {**llama.config.to_dict(), "quantization_config": {"quant_method": "gptq", "bits": 4}}
    write_folder(tmp_path / "g", config, {"model.layers.0.self_attn.q_proj.qweight": np.zeros((2, 2), np.float32)})
    with pytest.raises(CheckpointError, match=r"config\.json: weights stored by quantization_config\.quant_method="
                                              r"'gptq' are not supported"):
        load_model(tmp_path / "g")


def test_a_mistral_config_without_sliding_window_takes_transformers_default():
    """transformers' MistralConfig gives 4096 when the key is missing; the reference gave None (full attention),
    which differs past 4096 tokens."""
    from transformers import MistralConfig

    from qlora_ref.model.config import ModelConfig

    d = {"model_type": "mistral", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
         "num_hidden_layers": 1, "num_attention_heads": 2}
    assert ModelConfig.from_hf_dict(d).sliding_window == MistralConfig(**d).sliding_window
    assert ModelConfig.from_hf_dict({**d, "sliding_window": None}).sliding_window is None


@pytest.mark.parametrize("missing", [lambda d: d.pop("num_key_value_heads"),
                                     lambda d: d.update(num_key_value_heads=None)], ids=["absent", "null"])
def test_a_config_without_num_key_value_heads_is_multi_head(tmp_path, missing):
    """Older Llama configs (transformers < 4.31) lack the key; transformers' LlamaConfig reads it as
    num_attention_heads (plain multi-head attention). Read as anything else (1, MQA), such a folder fails to load,
    and ``qlora memory`` on its config.json silently under-counts the K/V cache."""
    from transformers import LlamaConfig

    from qlora_ref.model.config import ModelConfig

    hf = make_hf_model("llama", vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=4)
    d = hf.config.to_dict()
    missing(d)
    assert ModelConfig.from_hf_dict(d).num_key_value_heads == LlamaConfig(**d).num_key_value_heads == 4
    hf.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(d))
    ids = ids_for(53)
    assert max_rel_err(load_model(tmp_path).forward(ids), hf_logits(hf, ids)) <= 1e-5


def test_shape_disagreeing_with_config_names_file_and_tensor(llama, tmp_path):
    config = llama.config.to_dict()
    config["intermediate_size"] += 1
    write_folder(tmp_path, config, state_dict_np(llama))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' "
                                              r"has shape \(67, 40\), but the config implies \(68, 40\)"):
        load_model(tmp_path)


def test_a_tensor_in_two_loose_safetensors_files_is_refused(llama, tmp_path):
    """Without an index, a second file holding the same names (a stale copy, another export) decided the weights
    by file name order, silently (logits 0.145 off)."""
    folder = write_folder(tmp_path / "m", llama.config.to_dict(), state_dict_np(llama))
    save_file({k: np.zeros_like(v) for k, v in state_dict_np(llama).items()}, str(folder / "old.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor '.*' is in both model\.safetensors and old\.safetensors"):
        load_model(folder)


def test_missing_tensor_names_it(llama, tmp_path):
    tensors = state_dict_np(llama)
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    write_folder(tmp_path, llama.config.to_dict(), tensors)
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.self_attn\.v_proj\.weight'"):
        load_model(tmp_path)
    tensors = state_dict_np(llama)
    del tensors["lm_head.weight"]
    write_folder(tmp_path, llama.config.to_dict(), tensors)
    with pytest.raises(CheckpointError, match=r"lm_head\.weight.*tie_word_embeddings=false"):
        load_model(tmp_path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")  # an adapter folder given where the model goes
    with pytest.raises(CheckpointError, match="it is a PEFT adapter folder, not a model"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")  # JSON, but not the object a config is
    with pytest.raises(CheckpointError, match=r"config\.json: expected a JSON object, got list"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{")  # not even text
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_model(tmp_path)


# ----------------------------------------------------------------------------------------------- bitsandbytes 4-bit
def bnb_folder(hf, path, quant_type="nf4", double_quant=True):
    """A pre-quantized checkpoint in the layout transformers writes for bitsandbytes Linear4bit weights."""
    tensors = state_dict_np(hf)
    for name in list(tensors):
        if name.endswith(".weight") and name.split(".")[-2] in LINEARS:
            q = quantize_4bit(tensors.pop(name), quant_type, 64, double_quant=double_quant)
            tensors.update({k: np.asarray(v) for k, v in q.state_dict(name[: -len("weight")]).items()})
    config = hf.config.to_dict()
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
                                     "bnb_4bit_compute_dtype": "float32"}
    return write_folder(path, config, tensors)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_bnb_4bit_checkpoint_used_as_stored(llama, tmp_path, quant_type, double_quant):
    path = bnb_folder(llama, tmp_path, quant_type, double_quant)
    model = load_model(path)
    twin = small_hf_model("llama-gqa")
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if name.endswith(".weight") and name.split(".")[-2] in LINEARS:
                q = quantize_4bit(p.numpy(), quant_type, 64, double_quant=double_quant)
                p.copy_(torch.from_numpy(dequantize_4bit(q)))
    ids = ids_for(llama.config.vocab_size, 1)
    assert max_rel_err(model.forward(ids), hf_logits(twin, ids)) <= 1e-5
    # a QuantConfig asking for another format does not re-quantize the stored codes
    other = load_model(path, quant=QuantConfig("int4", compute_dtype="float32"))
    np.testing.assert_allclose(other.forward(ids), model.forward(ids), rtol=1e-6, atol=1e-6)


def test_bnb_4bit_checkpoint_with_bad_quant_state(llama, tmp_path):
    path = bnb_folder(llama, tmp_path)
    from safetensors.numpy import load_file

    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.0.mlp.up_proj.weight.quant_map"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.up_proj\.weight'"):
        load_model(path)


def test_checkpoint_saved_by_transformers_bitsandbytes(tmp_path):
    """A folder written by transformers for a model loaded in 4 bits by bitsandbytes (NF4 + double quantization):
    the reference reads the stored codes and gives bitsandbytes' own logits. Every in_features is a multiple of
    64, away from bitsandbytes' CPU dequantization bug on ragged rows (docs/quantization.md)."""
    from model_helpers import make_hf_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    make_hf_model("llama", vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path / "fp32")
    bnb = AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp32", dtype=torch.float32, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
    bnb.save_pretrained(tmp_path / "bnb")
    model = load_model(tmp_path / "bnb")
    assert type(model.layers[0].self_attn.q_proj.weight).__name__ == "Quantized4bit"
    ids = ids_for(50, 2)
    # in training mode: in eval mode on an AVX512-BF16 CPU bitsandbytes' Linear4bit computes in bfloat16 whatever
    # the compute dtype (test_bitsandbytes_eval_on_an_avx512_bf16_cpu_computes_in_bfloat16 below); no layer here
    # draws dropout, so training mode changes nothing else
    assert max_rel_err(model.forward(ids), hf_logits(bnb.train(), ids)) <= 1e-5


def test_bitsandbytes_eval_on_an_avx512_bf16_cpu_computes_in_bfloat16():
    """bitsandbytes 0.50.2's ``Linear4bit.forward`` in eval mode without gradients, on a CPU with AVX512-BF16,
    repacks the weight for its CPU kernel — the block scales rounded to bfloat16 — and computes in bfloat16, the
    ``compute_dtype=float32`` asked for notwithstanding (docs/divergences.md). Elsewhere eval and training agree."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict({"weight": torch.randn(64, 128) * 0.05})
    layer = layer.to("cpu")  # quantizes
    x = torch.randn(4, 128)
    with torch.no_grad():
        train = layer.train()(x)
        evaluated = layer.eval()(x)
    rel = float((evaluated - train).abs().max() / train.abs().max())
    if has_avx512bf16():
        assert 1e-5 < rel < 2 * 2.0**-8 * 128  # a bfloat16 computation: far above float32, within bf16's bound
    else:
        assert rel <= 1e-6


# ----------------------------------------------------------------------------------------------- GGUF
def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Q and K (LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(48 * 5, dtype=np.float32).reshape(48, 5)
    for heads in (1, 2, 3, 6):
        np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(w, heads), heads), w)


BYTE_TOKENS = None


def tiny_vocab():
    """A byte-level BPE vocabulary: the 256 byte symbols, a few merges, and chat control tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_symbols = list(bytes_to_unicode().values())
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]
    tokens = byte_symbols + ["".join(m.split(" ")) for m in merges]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += specials
    types = [1] * (len(tokens) - len(specials)) + [3] * len(specials)
    return tokens, merges, types


CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")


def write_gguf(hf, path, arch="llama", dtype="F32", with_tokenizer=True, extra_meta=None, extra_tensors=None):
    """``hf`` as llama.cpp's converter writes it; ``extra_meta`` (key -> float or str) and ``extra_tensors``
    (GGUF name -> array) added as they are."""
    import gguf

    cfg = hf.config
    sd = state_dict_np(hf)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    for key, value in (extra_meta or {}).items():
        (writer.add_string if isinstance(value, str) else writer.add_float32)(key, value)
    if with_tokenizer:
        tokens, merges, types = tiny_vocab()
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_merges(merges)
        writer.add_token_types(types)
        writer.add_bos_token_id(tokens.index("<|im_start|>"))
        writer.add_eos_token_id(tokens.index("<|im_end|>"))
        writer.add_chat_template(CHAT_TEMPLATE)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    block = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
             "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.bias": "attn_output.bias",
             "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight"}
    if cfg.tie_word_embeddings:  # llama.cpp writes no output.weight for a tied head
        sd.pop("lm_head.weight", None)
    for name, w in sd.items():
        if name.startswith("model.layers."):
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{i}.{block[rest]}"
            if arch == "llama" and rest in ("self_attn.q_proj.weight", "self_attn.q_proj.bias"):
                w = llama_cpp_permute(w, cfg.num_attention_heads)
            elif arch == "llama" and rest in ("self_attn.k_proj.weight", "self_attn.k_proj.bias"):
                w = llama_cpp_permute(w, cfg.num_key_value_heads)
        else:
            gname = names[name]
        if dtype == "Q8_0" and w.ndim == 2 and w.shape[1] % 32 == 0:
            writer.add_tensor(gname, gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gname, w)
    for gname, w in (extra_tensors or {}).items():
        writer.add_tensor(gname, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2"])
def test_gguf_logits_equal_transformers(name, tmp_path):
    hf = small_hf_model(name)
    path = write_gguf(hf, tmp_path / "tiny.gguf", arch=hf.config.model_type, with_tokenizer=False)
    model = load_model(path)
    assert model.config.tie_word_embeddings == hf.config.tie_word_embeddings
    ids = ids_for(hf.config.vocab_size)
    assert max_rel_err(model.forward(ids), hf_logits(hf, ids)) <= 1e-5
    assert model.tokenizer is None


def llama_cpp_rope_freqs(inv_freq, factor, low=1.0, high=4.0, old_context=8192):
    """The factors llama.cpp's converter writes as ``rope_freqs.weight`` for a Llama 3.1+ model
    (``LlamaModel.generate_extra_tensors`` in convert_hf_to_gguf.py), written out here independently."""
    out = []
    for f in inv_freq:
        wavelen = 2 * np.pi / f
        if wavelen < old_context / high:
            out.append(1.0)
        elif wavelen > old_context / low:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


LLAMA3_GGUF = dict(vocab_size=61, hidden_size=64, intermediate_size=50, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, rope_theta=500000.0)


def test_gguf_llama3_rope_scaling_from_rope_freqs_equals_transformers(tmp_path):
    """llama.cpp writes Llama 3.1+'s rope scaling as a tensor of per-frequency factors and no metadata; it was
    skipped (plain rope, 9.4e-5 off at 16 tokens with Llama 3.2's settings, growing with length). Head dim 16 at
    theta 5e5 puts frequencies in all three of llama3's bands (kept, interpolated, divided)."""
    from model_helpers import make_hf_model

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    hf = make_hf_model("llama", rope_scaling=dict(scaling), max_position_embeddings=16384, **LLAMA3_GGUF)
    inv_freq = 1 / 500000.0 ** (np.arange(0, 16, 2) / 16)
    factors = llama_cpp_rope_freqs(inv_freq, 32.0)
    assert 1.0 in factors and 32.0 in factors and ((factors > 1) & (factors < 32)).any()
    path = write_gguf(hf, tmp_path / "l3.gguf", with_tokenizer=False, extra_tensors={"rope_freqs.weight": factors})
    model = load_model(path)
    assert model.config.rope_scaling == scaling
    ids = np.random.default_rng(0).integers(0, 61, size=(1, 300))  # plain rope: 1e-3 off here
    assert max_rel_err(model.forward(ids), hf_logits(hf, ids)) <= 1e-5


@pytest.mark.parametrize("case", ["rope_freqs_not_llama3", "yarn", "unknown_tensor", "k_bias_only"])
def test_gguf_features_the_reference_does_not_compute_are_refused(tmp_path, case):
    """Never run a model other than the file's: other per-frequency factors, a rope scaling type but linear, a
    tensor of no supported architecture (a mixture of experts' router here) — each named."""
    from model_helpers import make_hf_model

    hf = make_hf_model("llama", **LLAMA3_GGUF)
    extra_meta, extra_tensors, match = {}, {}, case
    if case == "rope_freqs_not_llama3":
        extra_tensors["rope_freqs.weight"], match = np.linspace(1, 3, 8, dtype=np.float32), "rope_freqs.weight"
    elif case == "yarn":
        extra_meta = {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}
    elif case == "unknown_tensor":
        extra_tensors["blk.0.ffn_gate_inp.weight"], match = np.ones((4, 64), np.float32), "blk.0.ffn_gate_inp.weight"
    else:  # a name the loader maps, but a bias this model (no q bias in block 0) has no place for: was dropped
        extra_tensors["blk.0.attn_k.bias"] = np.ones(32, np.float32)
        match = "model.layers.0.self_attn.k_proj.bias"
    path = write_gguf(hf, tmp_path / "m.gguf", with_tokenizer=False, extra_meta=extra_meta,
                      extra_tensors=extra_tensors)
    with pytest.raises(CheckpointError, match=rf"m\.gguf: .*{match}.*not supported"):
        load_model(path)


def test_gguf_llama_with_attention_biases_equals_transformers(tmp_path):
    """llama.cpp's llama architecture carries q/k/v/o biases when the model has them (the q/k ones permuted like
    the weights); they were dropped (logits 1.63 off, relative)."""
    from model_helpers import make_hf_model

    hf = make_hf_model("llama", attention_bias=True, **LLAMA3_GGUF)
    model = load_model(write_gguf(hf, tmp_path / "b.gguf", with_tokenizer=False))
    assert model.config.qkv_bias and model.config.o_bias
    ids = ids_for(61)
    assert max_rel_err(model.forward(ids), hf_logits(hf, ids)) <= 1e-5


def test_gguf_quantized_tensors_are_dequantized(tmp_path):
    import gguf

    hf = small_hf_model("llama-gqa")
    path = write_gguf(hf, tmp_path / "q8.gguf", dtype="Q8_0", with_tokenizer=False)
    model = load_model(tmp_path)  # a folder holding one .gguf
    twin = small_hf_model("llama-gqa")
    with torch.no_grad():
        for _, p in twin.named_parameters():
            if p.ndim == 2 and p.shape[1] % 32 == 0:
                q = gguf.quants.quantize(p.numpy(), gguf.GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)))
    ids = ids_for(hf.config.vocab_size)
    assert max_rel_err(model.forward(ids), hf_logits(twin, ids)) <= 1e-5
    assert path.exists()


def test_gguf_tokenizer_and_chat_template(tmp_path):
    tokens, _, _ = tiny_vocab()
    hf = small_hf_model("llama-gqa")
    hf.resize_token_embeddings(len(tokens))
    hf.config.vocab_size = len(tokens)
    model = load_model(write_gguf(hf, tmp_path / "tok.gguf"))
    tok = model.tokenizer
    ids = tok.encode("hello world")
    assert [tokens[i] for i in ids] == ["hello", "Ġworld"]
    assert tok.decode(ids) == "hello world"
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    chat_ids = tok.encode(text)
    assert chat_ids[0] == tokens.index("<|im_start|>") and tokens.index("<|im_end|>") in chat_ids
    assert tok.eos_token_id == tokens.index("<|im_end|>")
    # the same tokenizer as transformers builds from the GGUF file
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tok.gguf")
    assert theirs.encode("hello world", add_special_tokens=False) == ids
    assert theirs.encode(text, add_special_tokens=False) == chat_ids


#: the split rules of Llama 3's and Qwen2's tokenizer.json (pre_tokenizer: Split(Regex, isolated) + ByteLevel)
HF_SPLITS = {
    "llama-bpe": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "qwen2": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
}


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_gguf_tokenizers_split_as_llama3_and_qwen2_do(pre):
    """A GGUF names its split rule in tokenizer.ggml.pre; every rule but SmolLM's was read as GPT-2's, so Llama 3
    and Qwen2 files got other token ids (digit groups, ":\n", "DON'T", a tab before a word). A BPE trained here
    with the model's own pre-tokenizer, written as GGUF metadata and read back, must encode as the original."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    from qlora_ref.model.tokenizer import Tokenizer

    theirs = HFTokenizer(models.BPE())
    theirs.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(HF_SPLITS[pre]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    theirs.decoder = decoders.ByteLevel()
    texts = ["In 2024, 12345 people said:\n\n  I DON'T know.", "it's 1000000 dollars\n\n\n", " 2024 and 345\tok!"]
    theirs.train_from_iterator(texts * 30, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]))
    spec = json.loads(theirs.to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get)
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["merges"]]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.token_type": [3] + [1] * (len(tokens) - 1)}
    ours = Tokenizer.from_gguf_metadata(meta, "m.gguf")
    for text in texts:
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text).ids, text
    with pytest.raises(ValueError, match=r"m\.gguf: tokenizer\.ggml\.pre='falcon' is not supported"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": "falcon"}, "m.gguf")


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])  # Qwen3 loads from its folder only (its GGUF names untested)
def test_gguf_unknown_architecture(tmp_path, arch):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), np.float32))
    writer.add_tensor("position_embd.weight", np.zeros((4, 2), np.float32))  # GPT-2's own: the architecture named
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=rf"bad\.gguf: unknown architecture.*{arch}.*supported: \('llama', "
                                              r"'mistral', 'qwen2'\)"):
        load_model(tmp_path / "bad.gguf")


def test_gguf_shape_mismatch_names_file_and_tensor(tmp_path):
    hf = small_hf_model("llama-gqa")
    path = write_gguf(hf, tmp_path / "m.gguf", with_tokenizer=False)
    import gguf

    # rewrite with a wrong feed_forward_length
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["llama.feed_forward_length"].contents() == 67
    hf.config.intermediate_size = 66
    with pytest.raises(CheckpointError, match=r"m2\.gguf: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight'"):
        load_model(write_gguf(hf, tmp_path / "m2.gguf", with_tokenizer=False))


# ----------------------------------------------------------------------------------------------- HF tokenizer
def test_folder_tokenizer_and_chat_template(llama, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    tokens, merges, _ = tiny_vocab()
    backend = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split()) for m in merges]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    llama.save_pretrained(tmp_path)
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>", "bos_token": {"content": "<|im_start|>"}}))
    tok = load_model(tmp_path).tokenizer
    assert tok.eos_token_id == tokens.index("<|im_end|>")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n"
    assert load_model(tmp_path, tokenizer=False).tokenizer is None


# ----------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["llama-gqa", "llama-tied-llama3", "qwen2", "qwen2-yarn"])
def test_model_config_round_trips_through_hf_dict(name):
    from model_helpers import SMALL_CONFIGS

    from qlora_ref.model import ModelConfig

    hf = small_hf_model(name)
    config = ModelConfig.from_hf_dict(hf.config.to_dict())
    assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config
    expected = SMALL_CONFIGS[name]
    assert config.num_key_value_heads == expected["num_key_value_heads"]
    assert config.tie_word_embeddings == expected["tie_word_embeddings"]
    assert config.qkv_bias == (expected["arch"] == "qwen2")
    if "rope_scaling" in expected:  # as given (transformers 5 moves it into rope_parameters, with the theta)
        assert {k: config.rope_scaling[k] for k in expected["rope_scaling"]} == expected["rope_scaling"]
        assert config.rope_theta == expected["rope_theta"]


def test_config_validation():
    from qlora_ref.model import ConfigError, LoraConfig, ModelConfig

    with pytest.raises(ValueError, match="quant_type"):
        QuantConfig("nf3")
    with pytest.raises(ValueError, match="blocksize"):
        QuantConfig(blocksize=48)
    with pytest.raises(ValueError, match="compute_dtype"):
        QuantConfig(compute_dtype="float64")
    with pytest.raises(ValueError, match="r must be"):
        LoraConfig(r=-1)
    with pytest.raises(ValueError, match="dropout"):
        LoraConfig(dropout=1.0)
    with pytest.raises(ValueError, match=r"unknown \['lm_head'\]"):
        LoraConfig(target_modules=("q_proj", "lm_head"))
    assert LoraConfig(target_modules="all-linear").target_modules == LoraConfig().target_modules
    base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=3, head_dim=2)
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        ModelConfig(**base)
    with pytest.raises(ConfigError, match="hidden_act"):
        ModelConfig.from_hf_dict({"model_type": "llama", "hidden_act": "gelu"}, "x/config.json")
    with pytest.raises(ConfigError, match=r"x/config\.json: missing keys \['vocab_size'"):
        ModelConfig.from_hf_dict({"model_type": "llama"}, "x/config.json")
    mha = dict(base, num_key_value_heads=4)
    with pytest.raises(ConfigError, match=r"rope_scaling type 'yarn' needs \['factor'\]"):
        ModelConfig(**mha, rope_scaling={"rope_type": "yarn", "original_max_position_embeddings": 64})
    with pytest.raises(ConfigError, match="rope_scaling type must be one of .* got 'longrope'"):
        ModelConfig(**mha, rope_scaling={"rope_type": "longrope", "factor": 2.0})
    # YaRN without the context it extends: the config's own, as transformers' standardize_rope_params takes it
    d = dict(mha, max_position_embeddings=512, rope_scaling={"type": "yarn", "factor": 2.0})
    assert ModelConfig.from_hf_dict(d).rope_scaling == {"rope_type": "yarn", "factor": 2.0,
                                                        "original_max_position_embeddings": 512}


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2"])  # an untied and a tied head
def test_memory_calculator_reads_a_gguf_as_its_config(name, tmp_path):
    """``qlora memory --model file.gguf``: the shape from the GGUF's metadata (and its tensors: no output.weight
    means a tied head) is the shape of the same model's config.json, parameter count included."""
    from qlora_ref.memory import load_model_shape

    hf = small_hf_model(name)
    gguf_shape = load_model_shape(write_gguf(hf, tmp_path / "tiny.gguf", arch=hf.config.model_type,
                                             with_tokenizer=False))
    hf.config.save_pretrained(tmp_path / "folder")
    json_shape = load_model_shape(tmp_path / "folder")
    assert dataclasses.replace(gguf_shape, name="x") == dataclasses.replace(json_shape, name="x")
    assert gguf_shape.tie_word_embeddings == hf.config.tie_word_embeddings
    assert gguf_shape.n_params == sum(p.numel() for n, p in hf.named_parameters() if not n.endswith("bias"))


@pytest.mark.parametrize("name", ["llama-gqa", "qwen3"])
def test_memory_calculator_counts_every_weight_of_a_folder(name, tmp_path):
    """``qlora memory --model folder``: every weight transformers builds is counted (Qwen3's query/key norms too),
    biases aside (Qwen2's are left out by design: docs/memory.md)."""
    from qlora_ref.memory import load_model_shape

    hf = small_hf_model(name)
    hf.config.save_pretrained(tmp_path)
    shape = load_model_shape(tmp_path)
    assert shape.n_params == sum(p.numel() for n, p in hf.named_parameters() if not n.endswith("bias"))
    assert shape.config.qk_norm == (name == "qwen3")


@pytest.mark.parametrize("want", [True, False, None])
def test_load_honours_fast_for_a_gguf_file(tmp_path, want):
    """``qlora_gpu.prepare.load`` of a GGUF file (the reference loader's path) takes ``fast`` as a folder does:
    True and False decide, None is the device's default (off on the CPU: ``fast_by_default``)."""
    from qlora_gpu import fast
    from qlora_gpu.prepare import load
    from qlora_ref.model.config import LoraConfig

    path = write_gguf(small_hf_model("llama-gqa"), tmp_path / "tiny.gguf", with_tokenizer=False)
    m = load(path, quant=None, lora=LoraConfig(r=2, alpha=4.0), device="cpu", progress=False, tokenizer=False,
             fast=want)
    assert fast.is_enabled(m) is bool(want)


def test_from_reference_takes_the_references_loaded_adapters(tmp_path):
    """``QLoRAModel.from_reference`` copies the reference model's adapters, whatever they hold (here non-zero
    lora_A and lora_B, as after loading an adapter): the same tensors, and the reference's float32 logits."""
    from test_train import write_tiny_model

    from qlora_gpu.model import QLoRAModel
    from qlora_ref.model.config import LoraConfig

    write_tiny_model(tmp_path / "tiny")
    lora = LoraConfig(r=4, alpha=8.0)
    ref = load_model(tmp_path / "tiny", lora=lora, tokenizer=False, progress=False)
    rng = np.random.default_rng(0)
    ref.load_lora_parameters({k: (rng.standard_normal(np.shape(v)) * 0.1).astype(np.float32)
                              for k, v in ref.lora_parameters().items()})
    ref.eval()
    m = QLoRAModel.from_reference(ref, None, lora).eval()
    got = m.lora_state_numpy()
    for k, v in ref.lora_parameters().items():
        assert np.array_equal(got[k], np.asarray(v, dtype=np.float32)), k
    ids = np.arange(12)[None] * 5 % ref.config.vocab_size
    with torch.no_grad():
        assert max_rel_err(m(torch.as_tensor(ids)).numpy(), ref.forward(ids)) <= 1e-5
