"""Exporting a fine-tuned model: its adapters merged into a 16-bit Hugging Face folder, and a Hugging Face folder
quantized into a bitsandbytes 4-bit folder (the adapters alone are written by ``qlora_ref.adapters``).

Merging (LoRA, Hu et al. 2021, section 4.1: "no additional inference latency"): each adapted weight becomes

    W' = W + (alpha / r) * B @ A

with ``W`` the dequantized base weight (the NF4 weight as the model computes with it), in float32, rounded once
to the export dtype (bfloat16 by default: the paper's 16-bit computation type).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .dtypes import dtype_name, to_numpy_dtype
from .files import atomic_save_safetensors, atomic_write_bytes, atomic_write_json
from .model.config import ModelConfig, QuantConfig
from .model.llama import expected_tensors, has_bias, linear_shapes
from .model.loading import CheckpointError, check_tensor, folder_tensors
from .paths import check_writable_dir
from .quantize import Quantized4bit, dequantize_4bit, quantize_4bit

#: the tokenizer's files in a Hugging Face folder, copied along with the weights
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "vocab.json", "merges.txt")


# ---------------------------------------------------------------------------------------------- merging
def merge_weights(base: Mapping[str, np.ndarray], adapter: Mapping[str, np.ndarray], scaling: float,
                  dtype="bfloat16") -> dict[str, np.ndarray]:
    """``W + scaling * B @ A`` for every adapted ``<layer>.weight`` of ``base`` (Hugging Face names, float
    arrays), computed in float32 and rounded once to ``dtype``; unadapted tensors are only cast."""
    out_dtype = to_numpy_dtype(dtype)
    out = {}
    adapted = set()
    for name, w in base.items():
        w = np.asarray(w, dtype=np.float32)
        layer = name[: -len(".weight")] if name.endswith(".weight") else None
        a_key = f"{layer}.lora_A.weight"
        if layer is not None and a_key in adapter:
            a = np.asarray(adapter[a_key], dtype=np.float32)
            b = np.asarray(adapter[f"{layer}.lora_B.weight"], dtype=np.float32)
            if (b.shape[0], a.shape[1]) != w.shape:
                raise ValueError(f"{layer}: adapter B @ A is {(b.shape[0], a.shape[1])}, weight is {w.shape}")
            w = w + np.float32(scaling) * (b @ a)
            adapted.add(a_key)
        out[name] = w.astype(out_dtype)
    unused = sorted(set(k for k in adapter if k.endswith(".lora_A.weight")) - adapted)
    if unused:
        raise ValueError(f"adapter tensors without a base weight to merge into: {unused[:4]}")
    return out


def base_float_weights(model) -> dict[str, np.ndarray]:
    """Every tensor of a reference ``LlamaModel`` under its Hugging Face name, float32, with the block linears
    dequantized exactly as the model computes with them (no adapters)."""
    cfg = model.config
    out = {"model.embed_tokens.weight": model.embed_tokens.weight, "model.norm.weight": model.norm.weight}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = model.lm_head_weight
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = layer.input_layernorm.weight
        out[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        for path, lin in layer.linears().items():
            w = lin.weight
            out[f"{p}{path}.weight"] = dequantize_4bit(w, "float32") if isinstance(w, Quantized4bit) else w
            if has_bias(cfg, path.split(".")[-1]):
                out[f"{p}{path}.bias"] = lin.bias
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def save_tokenizer(tokenizer, folder) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` (chat template, bos/eos) for a ``Tokenizer``."""
    folder = Path(folder)
    atomic_write_bytes(folder / "tokenizer.json", tokenizer.backend.to_str().encode())
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
           "add_bos_token": bool(tokenizer.add_bos_token)}
    if tokenizer.bos_token is not None:
        cfg["bos_token"] = tokenizer.bos_token
    if tokenizer.eos_token is not None:
        cfg["eos_token"] = tokenizer.eos_token
    if tokenizer.chat_template is not None:
        cfg["chat_template"] = tokenizer.chat_template
    atomic_write_json(folder / "tokenizer_config.json", cfg)


def export_hf_folder(folder, model_config, tensors: Mapping[str, np.ndarray], dtype="bfloat16", tokenizer=None,
                     tokenizer_source=None) -> Path:
    """A Hugging Face model folder: ``config.json`` (``model_config.to_hf_dict()`` + ``torch_dtype``),
    ``model.safetensors`` and the tokenizer (written from ``tokenizer``, or its files copied from
    ``tokenizer_source``, a folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model_config.to_hf_dict()
    cfg["torch_dtype"] = dtype_name(dtype)
    atomic_save_safetensors(dict(tensors), folder / "model.safetensors", metadata={"format": "pt"})
    atomic_write_json(folder / "config.json", cfg)
    copied = False
    if tokenizer_source is not None and Path(tokenizer_source).is_dir():
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_source) / name
            if src.is_file():
                shutil.copyfile(src, folder / name)
                copied = copied or name == "tokenizer.json"
    if not copied and tokenizer is not None:
        save_tokenizer(tokenizer, folder)
    return folder


def merge_and_export(model, folder, dtype="bfloat16", tokenizer_source=None) -> Path:
    """Merge a reference model's adapters into its (dequantized) weights and write a 16-bit Hugging Face folder
    that ``transformers.AutoModelForCausalLM.from_pretrained`` loads."""
    adapter = {k: np.asarray(v) for k, v in model.lora_parameters().items()}
    scaling = model.lora.scaling if (model.lora is not None and adapter) else 0.0
    merged = merge_weights(base_float_weights(model), adapter, scaling, dtype)
    return export_hf_folder(folder, model.config, merged, dtype, tokenizer=getattr(model, "tokenizer", None),
                            tokenizer_source=tokenizer_source)


# ---------------------------------------------------------------------------------------------- 4-bit export
def bnb_quantization_config(quant) -> dict:
    """The ``quantization_config`` transformers writes into config.json for a bitsandbytes 4-bit model."""
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": quant.quant_type,
        "bnb_4bit_use_double_quant": bool(quant.double_quant),
        "bnb_4bit_compute_dtype": quant.compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
    }


def quantize_hf_folder(in_dir, out_dir, quant=None, overwrite: bool = False) -> dict:
    """A Hugging Face folder -> a bitsandbytes 4-bit folder (paper, section 3: NF4 + double quantization).

    The seven linear layers of every block are quantized with ``qlora_ref.quantize_4bit`` and written under
    transformers' key names (``...q_proj.weight``, ``.weight.absmax``, ``.weight.quant_map``,
    ``.weight.nested_absmax``, ``.weight.nested_quant_map``, ``.weight.quant_state.bitsandbytes__nf4``);
    embeddings, norms and the LM head keep their dtype (transformers never quantizes the LM head). config.json
    gains ``quantization_config``, so ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it with
    bitsandbytes. Returns {"tensors", "bytes_in", "bytes_out"}.

    ``out_dir`` must be new or empty; with ``overwrite`` an existing folder is reused and every safetensors file
    and index already there is removed, so that no stale shard is loaded with the new weights.
    """
    quant = quant or QuantConfig()
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not (in_dir / "config.json").is_file():
        raise ValueError(f"{in_dir}: not a Hugging Face model folder (no config.json)")
    if out_dir.resolve() == in_dir.resolve():
        raise ValueError("OUT_DIR must differ from IN_DIR")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"{out_dir}: OUT_DIR exists and is not empty; choose a new folder or pass --overwrite "
                         "(which replaces its weights and removes every *.safetensors and index there)")
    check_writable_dir(out_dir, "OUT_DIR")
    raw = json.loads((in_dir / "config.json").read_text())
    if raw.get("quantization_config"):
        raise ValueError(f"{in_dir}: already quantized ({raw['quantization_config'].get('quant_method')})")
    try:
        config = ModelConfig.from_hf_dict(raw, str(in_dir / "config.json"))
        tensors = folder_tensors(in_dir)
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    expected = expected_tensors(config)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{in_dir}: missing tensors {missing[:3]}")
    linear_names = set(linear_shapes(config))
    out: dict[str, np.ndarray] = {}
    bytes_in = 0
    for name in expected:
        try:
            ref = check_tensor(tensors, name, expected[name], str(in_dir))
        except CheckpointError as e:
            raise ValueError(str(e)) from None
        array = np.asarray(ref.load())
        bytes_in += array.nbytes
        is_linear = name.endswith(".weight") and name.split(".")[-2] in linear_names
        if is_linear:
            q = quantize_4bit(np.ascontiguousarray(array), quant.quant_type, quant.blocksize, quant.double_quant)
            out.update({k: np.asarray(v) for k, v in q.state_dict(name[: -len("weight")]).items()})
        else:
            out[name] = np.ascontiguousarray(array)
    atomic_save_safetensors(out, out_dir / "model.safetensors", metadata={"format": "pt"})
    for stale in [out_dir / "model.safetensors.index.json", *out_dir.glob("*.safetensors")]:
        if stale.name != "model.safetensors" and stale.is_file():  # only with overwrite: the folder was empty
            stale.unlink()
    raw = dict(raw, quantization_config=bnb_quantization_config(quant))
    atomic_write_json(out_dir / "config.json", raw)
    for name in TOKENIZER_FILES:
        if (in_dir / name).is_file():
            shutil.copyfile(in_dir / name, out_dir / name)
        elif (out_dir / name).is_file():  # a stale one (overwrite): it would be read with the new model
            (out_dir / name).unlink()
    return {"tensors": len(expected), "bytes_in": bytes_in, "bytes_out": sum(v.nbytes for v in out.values())}
