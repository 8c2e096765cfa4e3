"""Adapters in PEFT's format, both ways; merging into a 16-bit Hugging Face folder; ``quantize_hf_folder``.

Oracles: peft (``PeftModel.from_pretrained`` on the transformers model, ``get_peft_model`` + ``save_pretrained``)
and transformers (loading the merged and the 4-bit folders). The reference runs in float32 here (``quant=None``
or float32 compute), so agreement is to float32 round-off: 1e-4 of the logits' scale leaves a wide margin over
the ~1e-6 observed, yet is far below the effect of the adapters (asserted separately).
"""

from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import torch
from safetensors.numpy import load_file
from test_train import nudge_weights, write_tiny_model

from qlora_ref.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BASE_FINGERPRINT_KEY,
    load_adapter,
    read_adapter_files,
    read_adapter_lora_config,
    save_adapter,
)
from qlora_ref.export import merge_and_export, quantize_hf_folder
from qlora_ref.files import model_fingerprint
from qlora_ref.model import LoraConfig, QuantConfig, load_model

TOL = 1e-4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    f = tmp_path_factory.mktemp("adapters") / "model"
    write_tiny_model(f, seed=3)
    return f


def randomize_adapters(model, seed=0, scale=0.2):
    rng = np.random.default_rng(seed)
    for v in model.lora_parameters().values():
        v[...] = (rng.standard_normal(v.shape) * scale).astype(np.float32)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.float().numpy()


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(b).max())


IDS = np.random.default_rng(0).integers(0, 259, (2, 11))


def test_our_adapter_file_is_pefts_format_and_peft_loads_it(folder, tmp_path):
    import transformers

    lora = LoraConfig(r=4, alpha=8.0, dropout=0.0)
    ref = load_model(folder, quant=None, lora=lora)
    randomize_adapters(ref)
    save_adapter(ref, tmp_path / "ad", base_model_name_or_path=str(folder))
    cfg = json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["task_type"] == "CAUSAL_LM"
    keys = set(load_file(tmp_path / "ad" / ADAPTER_WEIGHTS))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys and len(keys) == 2 * 7 * 2

    base = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    without = hf_logits(base, IDS)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "ad").eval()
    ours = ref.eval().forward(IDS)
    assert rel_err(hf_logits(peft_model, IDS), ours) < TOL
    assert rel_err(without, ours) > 100 * TOL  # the adapters matter, so agreement means something


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_loads_into_both_backends(folder, tmp_path, use_rslora):
    import transformers

    from qlora_gpu.lora import QLoRALinear as GpuLinear
    from qlora_gpu.model import QLoRAModel

    base = transformers.AutoModelForCausalLM.from_pretrained(folder)
    pcfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                           init_lora_weights=False, task_type="CAUSAL_LM",  # random B: a non-trivial adapter
                           use_rslora=use_rslora)  # rsLoRA: s = 6/√3 where LoRA's is 6/3
    pm = peft.get_peft_model(base, pcfg).eval()
    pm.save_pretrained(tmp_path / "peft_ad")
    expected = hf_logits(pm, IDS)

    lora = read_adapter_lora_config(tmp_path / "peft_ad")
    assert (lora.r, lora.alpha, lora.target_modules, lora.use_rslora) == (3, 6.0, ("q_proj", "v_proj", "down_proj"),
                                                                          use_rslora)
    peft_scaling = pm.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]
    assert lora.scaling == pytest.approx(peft_scaling, rel=1e-15)
    ref = load_model(folder, quant=None, lora=lora)
    ref.load_adapter(tmp_path / "peft_ad")
    assert {lin.scaling for b in ref.layers for lin in b.linears().values() if lin.r} == {lora.scaling}
    assert rel_err(ref.eval().forward(IDS), expected) < TOL
    ref.save_adapter(tmp_path / "again_ref")
    a, b = read_adapter_files(tmp_path / "peft_ad")[0], read_adapter_files(tmp_path / "again_ref")[0]
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    gpu = QLoRAModel.from_pretrained(folder, quant=None, lora=lora)
    gpu.load_adapter(tmp_path / "peft_ad")
    assert {m.scaling for m in gpu.modules() if isinstance(m, GpuLinear) and m.r} == {lora.scaling}
    with torch.no_grad():
        assert rel_err(gpu.eval()(IDS).numpy(), expected) < TOL
    # and back out of the GPU backend: the same tensors PEFT wrote
    gpu.save_adapter(tmp_path / "again")
    a, b = read_adapter_files(tmp_path / "peft_ad")[0], read_adapter_files(tmp_path / "again")[0]
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # the re-saved adapter_config.json decides the scale PEFT applies: rsLoRA must survive the round trip, or
    # PEFT silently runs the adapters √3 too weak
    for again in ("again_ref", "again"):
        assert read_adapter_lora_config(tmp_path / again) == lora
        fresh = transformers.AutoModelForCausalLM.from_pretrained(folder)
        reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / again).eval()
        assert rel_err(hf_logits(reloaded, IDS), expected) < TOL, again


def test_adapters_move_between_backends_on_a_4bit_model(folder, tmp_path):
    from qlora_gpu.model import QLoRAModel

    # without double quantization both backends' NF4 weights are bit-identical (see the merge test)
    lora, quant = LoraConfig(r=4, alpha=16.0), QuantConfig(compute_dtype="float32", double_quant=False)
    ref = load_model(folder, quant=quant, lora=lora)
    randomize_adapters(ref, seed=1)
    save_adapter(ref, tmp_path / "ad")
    gpu = QLoRAModel.from_pretrained(folder, quant=quant, lora=lora)
    gpu.load_adapter(tmp_path / "ad")
    with torch.no_grad():
        assert rel_err(gpu.eval()(IDS).numpy(), ref.eval().forward(IDS)) < TOL


@pytest.mark.parametrize("saved", [LoraConfig(r=4, alpha=16.0), LoraConfig(r=4, alpha=8.0, use_rslora=True)],
                         ids=["alpha", "rslora"])
def test_an_adapter_of_another_scaling_is_refused(folder, tmp_path, saved):
    """Same r, so every shape matches and only the scale differs (2x; √4 = 2x for rsLoRA): nothing but this check
    stops the adapter running at the wrong strength, on either backend."""
    from qlora_gpu.model import QLoRAModel

    ref = load_model(folder, quant=None, lora=saved, tokenizer=False)
    randomize_adapters(ref)
    save_adapter(ref, tmp_path / "ad")
    plain = LoraConfig(r=4, alpha=8.0)
    assert plain.scaling != saved.scaling
    theirs = r"alpha/sqrt\(r\) = 8.0/sqrt\(4\) = 4" if saved.use_rslora else r"alpha/r = 16.0/4 = 4"
    match = rf"adapter scaling {theirs} differs from the model's alpha/r = 8.0/4 = 2;"
    for model in (load_model(folder, quant=None, lora=plain, tokenizer=False),
                  QLoRAModel.from_pretrained(folder, quant=None, lora=plain)):
        with pytest.raises(ValueError, match=match):
            load_adapter(model, tmp_path / "ad")


def test_model_fingerprint_is_of_the_weights_not_the_path(folder, tmp_path, monkeypatch):
    """Two copies of a model share a fingerprint; a flipped bit in its weights or another model does not; a hub id
    has none. Above 64 MiB a file is sampled: shown on a small file with the sizes shrunk, a byte inside a sampled
    window counts and one between windows does not (the documented limit)."""
    import shutil

    import qlora_ref.files as files

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "README.md").write_text("not part of the model")
    assert model_fingerprint(copy) is not None and model_fingerprint(copy) == model_fingerprint(folder)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert model_fingerprint(copy) != model_fingerprint(folder)
    assert model_fingerprint(tmp_path / "nowhere") is None and model_fingerprint("org/some-model") is None
    # a sharded folder: its index's shards count, another safetensors file beside them (an adapter saved there,
    # a consolidated copy) does not, as the loaders do not read it
    sharded = tmp_path / "sharded"
    shutil.copytree(folder, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00001.safetensors")
    names = load_file(str(sharded / "model-00001-of-00001.safetensors"))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "model-00001-of-00001.safetensors" for k in names}}))
    first = model_fingerprint(sharded)
    (sharded / "consolidated.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    assert model_fingerprint(sharded) == first != model_fingerprint(folder)

    monkeypatch.setattr(files, "_WHOLE", 0)
    monkeypatch.setattr(files, "_HEAD", 16)
    monkeypatch.setattr(files, "_SAMPLE", 8)
    monkeypatch.setattr(files, "_STRIDE", 64)
    big = tmp_path / "m.gguf"

    def with_byte_set(i):
        data = bytearray(1000)
        data[i] = 1
        big.write_bytes(bytes(data))
        return model_fingerprint(big)

    big.write_bytes(bytes(1000))
    zeros = model_fingerprint(big)
    assert all(with_byte_set(i) != zeros for i in (3, 16 + 64, 16 + 64 + 7, 999))  # head, a window, the last one
    assert with_byte_set(16 + 64 + 8) == zeros


def test_an_adapter_on_other_base_weights_warns(folder, tmp_path):
    """The adapter file records its base model's fingerprint (in safetensors metadata, which peft ignores):
    loading it onto a copy of that model is silent, onto other weights of the same shapes it warns, on both
    backends; it still loads, as peft's would."""
    import shutil
    import warnings

    from safetensors import safe_open

    import qlora_gpu

    ref = load_model(folder, quant=None, lora=LoraConfig(r=4, alpha=8.0, dropout=0.0))
    randomize_adapters(ref)
    save_adapter(ref, tmp_path / "ad")
    with safe_open(str(tmp_path / "ad" / ADAPTER_WEIGHTS), framework="numpy") as f:
        assert f.metadata()[BASE_FINGERPRINT_KEY] == model_fingerprint(folder)
    copy, other = tmp_path / "copy", tmp_path / "other"
    shutil.copytree(folder, copy)
    shutil.copytree(folder, other)
    nudge_weights(other)
    for load in (load_model, qlora_gpu.load_model):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            load(copy, adapter=tmp_path / "ad")
        with pytest.warns(UserWarning, match=r"ad: the adapter was trained on other base model weights \(\S+; "
                                             r"fingerprint \w+\) than \S+other holds"):
            load(other, adapter=tmp_path / "ad")


@pytest.mark.parametrize("change,match", [
    (lambda d: d.update(use_dora=True), "use_dora=True is not supported"),
    (lambda d: d.update(peft_type="PREFIX_TUNING"), "peft_type must be 'LORA'"),
    (lambda d: d.update(r=8), r"lora_A ranks \[4\] do not match r=8"),
    (lambda d: d.update(modules_to_save=["lm_head"]), "modules_to_save"),
    (lambda d: d.pop("lora_alpha"), "missing 'lora_alpha'"),
])
def test_bad_adapter_configs_are_refused_clearly(folder, tmp_path, change, match):
    ref = load_model(folder, quant=None, lora=LoraConfig(r=4, alpha=8.0), tokenizer=False)
    save_adapter(ref, tmp_path)
    cfg = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    change(cfg)
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        load_adapter(ref, tmp_path)


def test_bad_adapter_files_are_refused_clearly(folder, tmp_path):
    from safetensors.numpy import save_file

    ref = load_model(folder, quant=None, lora=LoraConfig(r=4, alpha=8.0), tokenizer=False)
    with pytest.raises(ValueError, match="adapter folder does not exist"):
        load_adapter(ref, tmp_path / "nowhere")
    save_adapter(ref, tmp_path)
    good = load_file(tmp_path / ADAPTER_WEIGHTS)
    a_key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def write(d):
        save_file(d, tmp_path / ADAPTER_WEIGHTS)

    write({k: v for k, v in good.items() if k != a_key.replace("lora_A", "lora_B")})
    with pytest.raises(ValueError, match="has no matching"):
        load_adapter(ref, tmp_path)
    write({**good, "base_model.model.lm_head.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match="is not a LoRA weight"):
        load_adapter(ref, tmp_path)
    write({**good, a_key: np.zeros((4, 7), np.float32)})
    with pytest.raises(ValueError, match="shape"):
        load_adapter(ref, tmp_path)
    other = load_model(folder, quant=None, lora=LoraConfig(r=4, alpha=8.0, target_modules=("q_proj",)),
                       tokenizer=False)
    write(good)
    with pytest.raises(ValueError, match="layers this model lacks or does not adapt"):
        load_adapter(other, tmp_path)
    (tmp_path / ADAPTER_WEIGHTS).write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_adapter(ref, tmp_path)
    (tmp_path / ADAPTER_CONFIG).unlink()
    with pytest.raises(ValueError, match="no adapter_config.json"):
        load_adapter(ref, tmp_path)


def test_a_bit_flipped_in_an_adapter_file_is_caught(folder, tmp_path):
    """The weights file keeps its tensors' SHA-256: one float32 weight moved by one ulp (the lowest byte of the
    first tensor's data, past the header) fails the load, naming the file; a file without the digest (peft's,
    or ours re-saved by peft) loads as before."""
    import struct

    ref = load_model(folder, quant=None, lora=LoraConfig(r=4, alpha=8.0), tokenizer=False)
    randomize_adapters(ref)
    save_adapter(ref, tmp_path)
    path = tmp_path / ADAPTER_WEIGHTS
    data = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]
    data[start] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{ADAPTER_WEIGHTS}: its tensors changed since they were written"):
        load_adapter(ref, tmp_path)
    from safetensors.numpy import save_file

    save_file(load_file(path), path, metadata={"format": "pt"})  # the same bytes, without our metadata
    load_adapter(ref, tmp_path)


def test_merge_into_a_16bit_hf_folder(folder, tmp_path):
    """W + (alpha/r) B A on the dequantized NF4 weight, exported as a Hugging Face folder: in float32,
    transformers' logits equal the adapted 4-bit model's to round-off; in bfloat16 (the default) every tensor is
    exactly the float32 export rounded once to bfloat16, and transformers loads it."""
    import transformers

    from qlora_gpu.model import QLoRAModel

    # double_quant=False: bitsandbytes' CPU double quantization picks a few absmax codes off the exact nearest
    # (docs/divergences.md), so only without it are the two backends' dequantized weights bit-identical
    lora, quant = LoraConfig(r=4, alpha=16.0), QuantConfig(compute_dtype="float32", double_quant=False)
    ref = load_model(folder, quant=quant, lora=lora)
    randomize_adapters(ref, seed=2)
    merge_and_export(ref, tmp_path / "f32", dtype="float32")
    merge_and_export(ref, tmp_path / "bf16")  # default: bfloat16
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in (tmp_path / "bf16").iterdir()}
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "f32", dtype=torch.float32).eval()
    assert rel_err(hf_logits(hf, IDS), ref.eval().forward(IDS)) < TOL
    f32, bf16 = load_file(tmp_path / "f32" / "model.safetensors"), load_file(tmp_path / "bf16" / "model.safetensors")
    assert f32.keys() == bf16.keys() and all(bf16[k].dtype.name == "bfloat16" for k in bf16)
    for k in f32:
        np.testing.assert_array_equal(bf16[k], f32[k].astype(bf16[k].dtype))
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert hf16.dtype == torch.bfloat16 and hf16.config.vocab_size == 259
    # the GPU backend merges to the same tensors (without double quantization its NF4 weights are bit-identical)
    gpu = QLoRAModel.from_pretrained(folder, quant=quant, lora=lora)
    gpu.load_lora_parameters(ref.lora_parameters())
    gpu.merge_and_export(tmp_path / "gpu", dtype="float32")
    g = load_file(tmp_path / "gpu" / "model.safetensors")
    assert g.keys() == f32.keys()
    for k in f32:
        assert rel_err(g[k], f32[k]) <= 1e-6, k  # B @ A in float32: summation order only


def test_quantize_hf_folder_loads_in_transformers_and_the_reference(folder, tmp_path):
    import transformers

    from qlora_ref.quantize import Quantized4bit, dequantize_4bit, quantize_4bit

    info = quantize_hf_folder(folder, tmp_path / "q4")
    assert info["bytes_out"] < info["bytes_in"] / 2
    cfg = json.loads((tmp_path / "q4" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["bnb_4bit_quant_type"] == "nf4"
    tensors = load_file(tmp_path / "q4" / "model.safetensors")
    original = load_file(folder / "model.safetensors")
    name = "model.layers.1.mlp.up_proj."
    q = Quantized4bit.from_state_dict({k: v for k, v in tensors.items() if k.startswith(name)}, name)
    expected = quantize_4bit(original[name + "weight"], "nf4", 64, True)
    assert np.array_equal(q.packed, expected.packed)

    import bitsandbytes as bnb

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q4")
    layer = hf.model.layers[1].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float().numpy()
    np.testing.assert_array_equal(w, dequantize_4bit(expected, "float32"))

    stored = load_model(tmp_path / "q4", quant=QuantConfig(compute_dtype="float32"), tokenizer=False)
    fresh = load_model(folder, quant=QuantConfig(compute_dtype="float32"), tokenizer=False)
    np.testing.assert_array_equal(stored.forward(IDS), fresh.forward(IDS))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_hf_folder(tmp_path / "q4", tmp_path / "q4b")


@pytest.mark.parametrize("backend", ["ref", "gpu"])
@pytest.mark.parametrize("arch, extra", [("qwen2", "q_proj.bias"), ("qwen3", "q_norm.weight")])
def test_merging_a_model_keeps_its_biases_and_norms(tmp_path, backend, arch, extra):
    """Qwen2's q/k/v biases, Qwen3's query/key norms: transformers loads a merged folder that lacks them with zero
    biases or unit norms and only a log line, so the names are checked exactly (a merge changes values, never
    names) and the logits to the file's float32 round-off TOL (biases are 0.2-scale, norm weights 1 ± 0.2)."""
    import transformers

    from qlora_gpu.model import QLoRAModel

    original = tmp_path / arch
    write_tiny_model(original, arch=arch, seed=4)
    names = set(load_file(original / "model.safetensors"))
    assert any(k.endswith(extra) for k in names)
    lora, quant = LoraConfig(r=4, alpha=16.0), QuantConfig(compute_dtype="float32", double_quant=False)
    ref = load_model(original, quant=quant, lora=lora)
    randomize_adapters(ref, seed=5)
    if backend == "ref":
        merge_and_export(ref, tmp_path / "merged", dtype="float32")
    else:
        gpu = QLoRAModel.from_pretrained(original, quant=quant, lora=lora)
        gpu.load_lora_parameters(ref.lora_parameters())
        gpu.merge_and_export(tmp_path / "merged", dtype="float32")
    assert set(load_file(tmp_path / "merged" / "model.safetensors")) == names
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert rel_err(hf_logits(hf, IDS), ref.eval().forward(IDS)) < TOL


def test_the_gpu_merge_scales_rank_stabilized_adapters_as_the_reference(folder, tmp_path):
    """rsLoRA (s = alpha / sqrt(r) = 8 here, not alpha / r = 4): the GPU backend's ``merge_and_export`` writes the
    reference's merged tensors, and the merged folder computes the adapted model's logits."""
    import transformers

    from qlora_gpu.model import QLoRAModel

    lora = LoraConfig(r=4, alpha=16.0, use_rslora=True)
    ref = load_model(folder, quant=None, lora=lora)
    randomize_adapters(ref, seed=2)
    merge_and_export(ref, tmp_path / "ref", dtype="float32")
    gpu = QLoRAModel.from_pretrained(folder, quant=None, lora=lora)
    gpu.load_lora_parameters(ref.lora_parameters())
    gpu.merge_and_export(tmp_path / "gpu", dtype="float32")
    r, g = load_file(tmp_path / "ref" / "model.safetensors"), load_file(tmp_path / "gpu" / "model.safetensors")
    assert g.keys() == r.keys()
    for k in r:
        assert rel_err(g[k], r[k]) <= 1e-6, k  # B @ A in float32: summation order only
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gpu", dtype=torch.float32).eval()
    assert rel_err(hf_logits(hf, IDS), ref.eval().forward(IDS)) < TOL
