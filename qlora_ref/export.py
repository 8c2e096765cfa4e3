"""Exporting a fine-tuned model: its adapters merged into a 16-bit Hugging Face folder (``qlora merge``), and a
Hugging Face folder quantized into a bitsandbytes 4-bit folder (``qlora quantize``; the adapters alone are written
by ``qlora_ref.adapters``).

Merging (LoRA, Hu et al. 2021, section 4.1: "no additional inference latency"): each adapted weight becomes

    W' = W + (alpha / r) * B @ A

with ``W`` the dequantized base weight (the NF4 weight as the model computes with it), in float32, rounded once
to the export dtype (bfloat16 by default: the paper's 16-bit computation type). ``W`` is the weight the adapter
was trained against (paper, eq. 5: the frozen 4-bit weight, dequantized); merging into the original 16-bit
weight instead adds the quantization error ``W_16 - dequant(W_NF4)``, which the adapter never saw
(docs/training.md, "Merging").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from .dtypes import dtype_name, to_numpy_dtype
from .files import atomic_save_safetensors, atomic_write_bytes, atomic_write_json, fsync_dir
from .model.config import ModelConfig, QuantConfig
from .model.llama import expected_tensors, has_bias, linear_shapes
from .model.loading import CheckpointError, check_tensor, folder_tensors, read_config_json
from .paths import check_writable_dir, new_run_dir
from .quantize import Quantized4bit, dequantize_4bit, quantize_4bit

#: the tokenizer's files in a Hugging Face folder, copied along with the weights
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "vocab.json", "merges.txt")


def _check_model_folder_target(out_dir, what: str, overwrite: bool, sources: Mapping[str, Path] | None) -> Path:
    """``check_new_model_folder``'s checks, before the folder is created."""
    out_dir = Path(out_dir)
    for name, source in (sources or {}).items():
        if Path(source).exists() and out_dir.resolve() == Path(source).resolve():
            raise ValueError(f"{what} must differ from {name} ({source})")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"{out_dir}: {what} exists and is not empty; choose a new folder or pass --overwrite "
                         "(which replaces its weights and removes every *.safetensors and index there)")
    if out_dir.is_dir() and (kept := _not_a_model_folder(out_dir)):
        raise ValueError(f"{out_dir}: {what} holds {kept}, which --overwrite would destroy (it removes every "
                         "*.safetensors there) and the model would not load beside; choose another folder")
    return out_dir


def _not_a_model_folder(folder: Path) -> str | None:
    """What makes ``folder`` something other than a model folder to overwrite: a PEFT adapter (its
    adapter_model.safetensors; transformers takes a folder with adapter_config.json for an adapter) or a
    ``qlora finetune`` run (its checkpoints); None if neither."""
    for name in ("adapter_config.json", "adapter_model.safetensors", "train_config.json"):
        if (folder / name).exists():
            return f"{name} (a PEFT adapter or a qlora finetune run)"
    if next(folder.glob("checkpoint-*"), None) is not None:
        return "checkpoint folders (a qlora finetune run)"
    return None


def check_new_model_folder(out_dir, what: str, overwrite: bool, sources: Mapping[str, Path] | None = None) -> Path:
    """``out_dir`` as the folder a model is written to, checked before any work: new or empty (or ``overwrite``),
    none of ``sources`` (option name -> path read from), and writable (created if missing)."""
    return check_writable_dir(_check_model_folder_target(out_dir, what, overwrite, sources), what)


@contextlib.contextmanager
def new_model_folder(out_dir, what: str, overwrite: bool, sources: Mapping[str, Path] | None = None):
    """``check_new_model_folder`` for a command that then loads and writes a model (``qlora merge``, ``qlora
    quantize``), undone if it fails before writing anything: the folders this call created are removed again
    (``qlora_ref.paths.new_run_dir``, as ``qlora finetune`` does), so a refused model leaves no empty folder."""
    with new_run_dir(_check_model_folder_target(out_dir, what, overwrite, sources), what) as folder:
        yield folder


# ---------------------------------------------------------------------------------------------- merging
#: the 16- and 32-bit types a merged folder is written in (``merge_adapter``'s ``dtype``)
MERGE_DTYPES = ("bfloat16", "float16", "float32")


def check_merge_dtype(dtype) -> str:
    """``dtype`` one of ``MERGE_DTYPES``, checked before any work."""
    if dtype not in MERGE_DTYPES:
        raise ValueError(f"dtype must be {', '.join(map(repr, MERGE_DTYPES[:-1]))} or {MERGE_DTYPES[-1]!r}, "
                         f"got {dtype!r}")
    return dtype


def merge_weights(base: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]], adapter: Mapping[str, np.ndarray],
                  scaling: float, dtype="bfloat16", progress: bool = False,
                  total: int | None = None) -> dict[str, np.ndarray]:
    """``W + scaling * B @ A`` for every adapted ``<layer>.weight`` of ``base`` (Hugging Face names, float
    arrays; a mapping or ``(name, array)`` pairs, taken one at a time), computed in float32 and rounded once to
    ``dtype``; unadapted tensors are only cast. ``progress``: a bar over the tensors (plain lines where stderr is
    not a terminal: ``qlora_ref.bars.progress_iter``), out of ``total`` (default: a mapping's length)."""
    out_dtype = to_numpy_dtype(dtype)
    out = {}
    adapted = set()
    items = base.items() if isinstance(base, Mapping) else base
    if progress:
        from .bars import progress_iter

        total = len(base) if total is None and isinstance(base, Mapping) else total
        items = progress_iter(items, total, desc="merge", unit="tensor")
    for name, w in items:
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


def base_float_weights(model) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor of a reference ``LlamaModel`` under its Hugging Face name, float32, with the block linears
    dequantized exactly as the model computes with them (no adapters): ``(name, array)`` pairs, made one at a time
    so that a merge never holds the whole model in float32."""
    cfg = model.config
    f32 = np.float32
    yield "model.embed_tokens.weight", np.asarray(model.embed_tokens.weight, f32)
    yield "model.norm.weight", np.asarray(model.norm.weight, f32)
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", np.asarray(model.lm_head_weight, f32)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", np.asarray(layer.input_layernorm.weight, f32)
        yield p + "post_attention_layernorm.weight", np.asarray(layer.post_attention_layernorm.weight, f32)
        if cfg.qk_norm:
            yield p + "self_attn.q_norm.weight", np.asarray(layer.self_attn.q_norm.weight, f32)
            yield p + "self_attn.k_norm.weight", np.asarray(layer.self_attn.k_norm.weight, f32)
        for path, lin in layer.linears().items():
            w = lin.weight
            yield f"{p}{path}.weight", (dequantize_4bit(w, "float32") if isinstance(w, Quantized4bit)
                                        else np.asarray(w, f32))
            if has_bias(cfg, path.split(".")[-1]):
                yield f"{p}{path}.bias", np.asarray(lin.bias, f32)


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

    def write_tokenizer() -> set[str]:
        written = _copy_tokenizer_files(Path(tokenizer_source), folder) if (
            tokenizer_source is not None and Path(tokenizer_source).is_dir()) else set()
        if "tokenizer.json" not in written and tokenizer is not None:
            save_tokenizer(tokenizer, folder)
            written |= {"tokenizer.json", "tokenizer_config.json"}
        return written

    _write_model_folder(folder, cfg, tensors, write_tokenizer)
    return folder


def _write_model_folder(folder: Path, hf_config: dict, tensors: Mapping[str, np.ndarray], write_tokenizer) -> None:
    """``model.safetensors``, the tokenizer's files (``write_tokenizer()``: their names) and ``config.json`` into
    ``folder``, what an earlier model left there removed (``_remove_stale_files``). config.json is removed first
    and written last, so that a write stopped midway (killed, a full disk) leaves a folder without one, which
    neither transformers nor this package loads: never new weights read under an old folder's config."""
    (folder / "config.json").unlink(missing_ok=True)
    fsync_dir(folder)
    atomic_save_safetensors(dict(tensors), folder / "model.safetensors", metadata={"format": "pt"})
    written = {"model.safetensors", "config.json"} | write_tokenizer()
    _remove_stale_files(folder, written)
    atomic_write_json(folder / "config.json", hf_config)


def _copy_tokenizer_files(source: Path, folder: Path) -> set[str]:
    """The tokenizer's files of the folder ``source`` copied (atomically) into ``folder``; their names."""
    copied = set()
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            atomic_write_bytes(folder / name, (source / name).read_bytes())
            copied.add(name)
    return copied


def _remove_stale_files(folder: Path, written: set[str]) -> None:
    """Remove what a model folder being rewritten (``--overwrite``) holds from before and this write did not
    replace: other safetensors shards and their index (transformers would read the index and load the old
    weights) and tokenizer files (they would be read with the new model's)."""
    stale = [folder / "model.safetensors.index.json", *folder.glob("*.safetensors"),
             *(folder / name for name in TOKENIZER_FILES)]
    for path in stale:
        if path.name not in written and path.is_file():
            path.unlink()


def merge_and_export(model, folder, dtype="bfloat16", tokenizer_source=None, progress: bool = False) -> Path:
    """Merge a reference model's adapters into its (dequantized) weights and write a 16-bit Hugging Face folder
    that ``transformers.AutoModelForCausalLM.from_pretrained`` loads."""
    adapter = {k: np.asarray(v) for k, v in model.lora_parameters().items()}
    scaling = model.lora.scaling if (model.lora is not None and adapter) else 0.0
    merged = merge_weights(base_float_weights(model), adapter, scaling, dtype, progress,
                           total=len(expected_tensors(model.config)))
    return export_hf_folder(folder, model.config, merged, dtype, tokenizer=getattr(model, "tokenizer", None),
                            tokenizer_source=tokenizer_source)


# ---------------------------------------------------------------------------------------------- qlora merge
def trained_quant_config(adapter_dir) -> tuple[QuantConfig | None, str]:
    """How the frozen weights were stored while the adapter in ``adapter_dir`` was trained — read from the
    ``train_config.json`` that ``qlora finetune`` writes beside it — and where that came from. Without one (an
    adapter made by peft) the paper's storage, NF4 + double quantization, is assumed and said."""
    from .train.config import TRAIN_CONFIG_FILE, adapter_recipe

    recipe = adapter_recipe(adapter_dir)
    if recipe is not None:
        return recipe.quant_config(), str(Path(adapter_dir) / TRAIN_CONFIG_FILE)
    return QuantConfig(), f"the paper's storage (no {TRAIN_CONFIG_FILE} in {adapter_dir})"


def describe_quant(quant: QuantConfig | None) -> str:
    """How a model's block linears are stored, in words (``qlora merge`` and ``qlora evaluate`` print it)."""
    if quant is None:
        return "the original (unquantized) weights"
    dq = ", double quantization" if quant.double_quant else ""
    return f"{quant.quant_type} weights (blocksize {quant.blocksize}{dq})"


def merge_adapter(adapter_dir, out_dir, model_path=None, *, quant="trained", dtype="bfloat16", backend="ref",
                  overwrite=False, progress=False) -> dict:
    """``qlora merge``: the base model with the PEFT adapter in ``adapter_dir`` merged in (``merge_and_export``:
    LoRA's section 4.1, into the weight of QLoRA's eq. 5), written to ``out_dir`` as a 16-bit Hugging Face folder.

    model_path: the base model (default: the adapter's ``base_model_name_or_path``, when that path exists here).
    quant: how the base is stored before merging; ``"trained"`` (default) as the adapter was trained
    (``trained_quant_config``), so the merged model computes what the adapted 4-bit model computed, up to the
    rounding to ``dtype``; ``None`` merges into the original weights. Every argument is checked before the model
    is loaded; ``progress``: a bar over the tensors. Returns what was done: ``model``, ``quant``,
    ``quant_source``, ``adapted`` (weights merged), ``tensors``, ``bytes``, ``folder``."""
    from safetensors import safe_open

    from .adapters import adapter_base_model, read_adapter_files
    from .backends import load_backend

    check_merge_dtype(dtype)
    adapter_dir = Path(adapter_dir)
    weights, _ = read_adapter_files(adapter_dir)
    model_path = Path(model_path) if model_path is not None else adapter_base_model(adapter_dir)
    if not model_path.exists():
        raise ValueError(f"{model_path}: no such model file or folder (--model)")
    source = "given"
    if quant == "trained":
        quant, source = trained_quant_config(adapter_dir)
    with new_model_folder(out_dir, "the output folder", overwrite,
                          sources={"the base model": model_path, "the adapter folder": adapter_dir}):
        model = load_backend(backend).load_model(model_path, quant=quant, adapter=adapter_dir, progress=progress)
        tokenizer_source = model_path if model_path.is_dir() else None
        if hasattr(model, "merge_and_export"):  # a backend's own (qlora_gpu's QLoRAModel)
            folder = model.merge_and_export(out_dir, dtype, tokenizer_source=tokenizer_source, progress=progress)
        else:
            folder = merge_and_export(model, out_dir, dtype, tokenizer_source=tokenizer_source, progress=progress)
    with safe_open(Path(folder) / "model.safetensors", framework="numpy") as f:
        n_tensors = len(list(f.keys()))
    return {"model": str(model_path), "quant": quant, "quant_source": source, "folder": Path(folder),
            "adapted": sum(k.endswith(".lora_A.weight") for k in weights), "tensors": n_tensors,
            "bytes": (Path(folder) / "model.safetensors").stat().st_size}


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
    if not in_dir.exists():
        raise ValueError(f"{in_dir}: no such folder")
    if not (in_dir / "config.json").is_file():
        raise ValueError(f"{in_dir}: not a Hugging Face model folder (no config.json)")
    with new_model_folder(out_dir, "OUT_DIR", overwrite, sources={"IN_DIR": in_dir}):
        return _quantize_into(in_dir, out_dir, quant)


def _quantize_into(in_dir: Path, out_dir: Path, quant: QuantConfig) -> dict:
    """``quantize_hf_folder``'s work, its folders checked."""
    raw = read_config_json(in_dir / "config.json")
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
    _write_model_folder(out_dir, dict(raw, quantization_config=bnb_quantization_config(quant)), out,
                        lambda: _copy_tokenizer_files(in_dir, out_dir))
    return {"tensors": len(expected), "bytes_in": bytes_in, "bytes_out": sum(v.nbytes for v in out.values())}
