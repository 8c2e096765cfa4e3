"""``prepare_model``: a QLoRA model built layer by layer on the device, from a Hugging Face folder or a config alone.

This is how the paper fits LLaMA-65B on one 48 GB GPU (section 1; section 3, "QLoRA"): the frozen weights are
stored in 4-bit NormalFloat with double quantization (0.127 + 4 bits per parameter), so the 16-bit model
(131 GB) must never be on the GPU at once. The transformers skeleton is created on the meta device (shapes, no
memory); then, one decoder layer after another, each block linear is read (one tensor from a memory-mapped
safetensors shard, or drawn at random for a config alone), moved to the device, quantized to NF4 + DQ there,
and its float copy dropped before the next is read. The device holds at most one linear layer in 16/32 bits.

What the model then is — the paper's training setup (section 4, Appendix B):

- every block linear a ``QLoRALinear`` (adapters on all seven, "LoRA on all linear layers");
- embedding and LM head stored in ``dtype`` (bfloat16), frozen;
- the residual stream in float32 (``residual_dtype``), as in the standard stack (peft's float32 norms widen it
  there) and the paper's ``qlora.py``: the linears writing into it add their adapter's output in float32
  (``qlora_gpu.model.set_residual_dtype``). In a bfloat16 stream the first updates of the adapters are rounded
  away at LLaMA's widths and training lags by steps (docs/training.md);
- RMSNorm weights in float32, computed in float32 and rounded to the compute dtype for the next matrix products
  (the stability trick of ``peft.prepare_model_for_kbit_training``), through torch's fused RMSNorm operator
  (``qlora_gpu.rms_norm.rms_norm``);
- non-reentrant gradient checkpointing per decoder layer, dropout masks replayed (``qlora_gpu.model``).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch
from torch import nn

from qlora_ref.memory import MODEL_SHAPES
from qlora_ref.model.config import LINEAR_MODULES, LoraConfig, ModelConfig, QuantConfig
from qlora_ref.model.linear import adapter_args, lora_seed
from qlora_ref.model.llama import expected_tensors, has_bias, module_path

from .lora import QLoRALinear, check_kernel, set_kernel
from .model import HF_CLASSES, QLoRAModel, default_device, fast_by_default, hf_skeleton, lora_linears, set_block_linear
from .quantize import Quantized4bit

_DTYPES = ("bfloat16", "float16", "float32")
_PAPER_QUANT = QuantConfig()  # NF4 + double quantization, bfloat16 compute
_PAPER_LORA = LoraConfig()  # r=64, alpha=16 on all seven linears


# ----------------------------------------------------------------------------------------------- configs
def llama_config(name: str) -> ModelConfig:
    """LLaMA-1 7B/13B/33B/65B (``qlora_ref.memory.LLAMA_SHAPES``: Touvron et al. 2023, Table 2) as a
    ``ModelConfig``: the models of the paper's Table 3 and of the 65B-on-48-GB claim; also LLaMA-2-70B
    (``qlora_ref.memory.MODEL_SHAPES``: the model of the FSDP-QLoRA figures, docs/sharded.md)."""
    key = name.lower() if name.lower().startswith("llama-") else f"llama-{name.lower()}"
    if key not in MODEL_SHAPES:
        raise ValueError(f"model must be one of {', '.join(MODEL_SHAPES)} (or 7b/13b/33b/65b), got {name!r}")
    s = MODEL_SHAPES[key]
    return ModelConfig(model_type="llama", vocab_size=s.vocab_size, hidden_size=s.hidden_size,
                       intermediate_size=s.intermediate_size, num_hidden_layers=s.num_layers,
                       num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads, head_dim=s.head_dim,
                       rms_norm_eps=1e-6, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)


def model_config(model) -> ModelConfig:
    """The ``ModelConfig`` of what ``prepare_model`` accepts: a Hugging Face folder (its config.json), a
    transformers ``PretrainedConfig``, a config.json dict, a ``ModelConfig``, or a LLaMA size (``"7b"``,
    ``"llama-65b"``)."""
    if isinstance(model, ModelConfig):
        return model
    if isinstance(model, dict):
        return ModelConfig.from_hf_dict(model, "config dict")
    if hasattr(model, "to_dict") and hasattr(model, "model_type"):  # a transformers PretrainedConfig
        return ModelConfig.from_hf_dict(model.to_dict(), type(model).__name__)
    if isinstance(model, str | Path):
        path = Path(model)
        if path.is_dir():
            if not (path / "config.json").exists():
                raise ValueError(f"model: {path} has no config.json (a GGUF file goes through "
                                 "QLoRAModel.from_pretrained)")
            from qlora_ref.model.loading import read_folder_config

            return read_folder_config(path)  # the reference's reader: its errors name the file
        if path.exists():
            raise ValueError(f"model: {path} is a file; expected a Hugging Face folder (a GGUF file goes through "
                             "QLoRAModel.from_pretrained)")
        return llama_config(str(model))
    raise ValueError("model must be a Hugging Face folder, a transformers PretrainedConfig, a config.json dict, a "
                     f"qlora ModelConfig or a LLaMA size such as '7b'; got {type(model).__name__}")


# ----------------------------------------------------------------------------------------------- weights
def init_weight(name: str, shape, std: float, seed: int = 0, device=None, dtype=torch.float32) -> torch.Tensor:
    """A random weight N(0, std²) for a model built from a config alone (transformers' ``initializer_range``
    init), drawn on ``device`` from a generator seeded by (``seed``, ``name``): the same tensor whichever order
    the layers are built in, and the same for any stack that asks with the same name (benchmarks compare
    stacks holding identical weights)."""
    device = torch.device(device if device is not None else "cpu")
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    w = torch.empty(tuple(shape), device=device, dtype=torch.float32).normal_(0.0, std, generator=g)
    return w.to(dtype)


class _Source:
    """Where the tensors come from: a folder's safetensors files (one tensor read at a time, memory-mapped) or
    ``init_weight`` (a config alone)."""

    def __init__(self, config: ModelConfig, folder: Path | None, seed: int, init_std: float, device):
        from qlora_ref.model.loading import check_tensor, folder_tensors

        self.config, self.folder, self.seed, self.init_std, self.device = config, folder, seed, init_std, device
        self._files: dict[Path, object] = {}
        self.shapes = expected_tensors(config)
        if folder is not None:  # every tensor present with its shape, before anything is built
            self._all = folder_tensors(folder)
            for name, shape in self.shapes.items():
                if self.quantized_prefix(name) is None:
                    check_tensor(self._all, name, shape, str(folder))

    def quantized_prefix(self, weight_name: str) -> str | None:
        """The state-dict prefix of a linear stored 4-bit (a bitsandbytes checkpoint), else None."""
        from qlora_ref.model.loading import quantized_key

        if self.folder is None or not weight_name.endswith(".weight"):
            return None
        return weight_name[: -len("weight")] if quantized_key(self._all, weight_name) is not None else None

    def _read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self._all[name].file
        if file not in self._files:
            self._files[file] = safe_open(str(file), framework="pt", device="cpu")
        return self._files[file].get_tensor(name)

    def tensor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Tensor ``name`` on the device in ``dtype``."""
        if self.folder is not None:
            return self._read(name).to(device=self.device, dtype=dtype)
        shape = self.shapes[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape, device=self.device, dtype=dtype)
        if name.endswith(".bias"):
            return torch.zeros(shape, device=self.device, dtype=dtype)
        return init_weight(name, shape, self.init_std, self.seed, self.device, dtype)

    def quantized(self, prefix: str) -> Quantized4bit:
        """A linear stored 4-bit, used as stored (never re-quantized)."""
        sub = {k: self._read(k) for k in self._all if k.startswith(prefix)}
        return Quantized4bit.from_state_dict(sub, prefix).to(self.device)


# ----------------------------------------------------------------------------------------------- building
def prepare_model(model, quant: QuantConfig | None = _PAPER_QUANT, lora: LoraConfig | None = _PAPER_LORA, *,
                  device=None, dtype: str = "bfloat16", gradient_checkpointing: bool = True,
                  attn_implementation: str = "sdpa", seed: int = 0, init_std: float | None = None,
                  adapter_dtype: str = "float32", kernel: str = "bnb", progress: bool = True,
                  tokenizer: bool = True, layer_hook=None, residual_dtype: str | None = "float32",
                  fast: bool | None = None) -> QLoRAModel:
    """A QLoRA model on ``device`` (default: CUDA if available, else CPU), built layer by layer.

    model: a Hugging Face folder (config.json + safetensors, possibly sharded; a bitsandbytes 4-bit folder's
    linears are used as stored), a transformers ``PretrainedConfig``, a config.json dict, a qlora
    ``ModelConfig`` or a LLaMA size (``"7b"`` ... ``"65b"``). Without weights, every linear is drawn by
    ``init_weight(name, shape, init_std, seed)`` (``init_std`` default: the config's ``initializer_range``, else
    0.02), norms are ones.
    quant: storage of the block linears (the paper's NF4 + double quantization, bfloat16 compute, by default);
    None keeps them float32 (plain LoRA). lora: adapters (r=64, alpha=16 on all seven linears by default; None:
    frozen). dtype: storage of the embedding and LM head ("bfloat16", "float16" or "float32").
    residual_dtype: the residual stream's dtype, "float32" by default (the standard stack's arithmetic:
    ``qlora_gpu.model.set_residual_dtype``); None keeps the stream in ``dtype`` and every linear's output in its
    input's dtype, the adapter's output added in the compute dtype (the reference's rounding,
    ``qlora_ref.lora``; in bfloat16 it loses the adapters' first updates at LLaMA's widths, docs/training.md).
    adapter_dtype: storage of ``lora_A``/``lora_B`` (and so of their gradients): "float32" (default; the
    optimizer updates float32 values) or "bfloat16" (the paper's scripts: half the adapter and gradient memory,
    1.6 GB less at 65B).
    kernel: the block linears' matrix products, "bnb" (bitsandbytes, the default) or "triton" (the fused kernels of
    ``qlora_gpu.fast.triton_kernels``, opt-in until checked on a GPU; 4-bit weights only; docs/fused_kernels.md).
    fast: the same values in fewer kernel launches (``qlora_gpu.fast.enable``); None: on CUDA, not on the CPU
    (``qlora_gpu.model.fast_by_default``).
    layer_hook: called with each decoder layer as soon as it is built — ``qlora_gpu.fsdp.shard_layer`` shards it
    there, so that a rank never holds more than one whole block; the adapters are then not laid out in one
    buffer (each is sharded on its own) and the block's scales are not laid out together.
    """
    cfg = model_config(model)
    for arg, value in (("dtype", dtype), ("adapter_dtype", adapter_dtype), ("residual_dtype", residual_dtype)):
        if value not in _DTYPES and not (arg == "residual_dtype" and value is None):
            raise ValueError(f"{arg} must be one of {_DTYPES}{' or None' if arg == 'residual_dtype' else ''}, "
                             f"got {value!r}")
    # before the (long) build; with quant=None a stored 4-bit folder may still take "triton": set_kernel decides
    check_kernel(kernel, quant.quant_type if quant is not None else "nf4")
    if attn_implementation not in ("eager", "sdpa", "flash_attention_2"):
        raise ValueError(f"attn_implementation must be 'eager', 'sdpa' or 'flash_attention_2', "
                         f"got {attn_implementation!r}")
    if cfg.model_type not in HF_CLASSES:
        raise ValueError(f"model_type {cfg.model_type!r} is not supported on the GPU backend ({list(HF_CLASSES)})")
    device = default_device(device)
    fast = fast_by_default(device) if fast is None else bool(fast)
    folder = Path(model) if isinstance(model, str | Path) and Path(model).is_dir() else None
    if init_std is None:  # a config.json dict's or a transformers config's (the others have none)
        init_std = float(model.get("initializer_range", 0.02) if isinstance(model, dict)
                         else getattr(model, "initializer_range", 0.02))
    source = _Source(cfg, folder, seed, init_std, device)
    tdtype = getattr(torch, dtype)

    hf = hf_skeleton(cfg, attn_implementation)
    hf.model.embed_tokens = nn.Embedding.from_pretrained(source.tensor("model.embed_tokens.weight", tdtype),
                                                         freeze=True)
    _set_norm(hf.model.norm, source.tensor("model.norm.weight", torch.float32))
    if cfg.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    else:
        hf.lm_head.weight = nn.Parameter(source.tensor("lm_head.weight", tdtype), requires_grad=False)
    compute = quant.compute_dtype if quant is not None else "float32"

    from qlora_ref.bars import progress_iter  # a bar on a terminal, plain lines in a log

    adapters = _AdapterPlaces(source, cfg, lora, getattr(torch, adapter_dtype), device) if layer_hook is None else None
    layers = hf.model.layers
    if progress:
        layers = progress_iter(layers, len(layers), desc="quantizing layers", unit="layer")
    for i, layer in enumerate(layers):
        p = f"model.layers.{i}."
        _set_norm(layer.input_layernorm, source.tensor(p + "input_layernorm.weight", torch.float32))
        _set_norm(layer.post_attention_layernorm, source.tensor(p + "post_attention_layernorm.weight", torch.float32))
        if cfg.qk_norm:
            for n in ("q_norm", "k_norm"):
                _set_norm(getattr(layer.self_attn, n), source.tensor(f"{p}self_attn.{n}.weight", torch.float32))
        for name in LINEAR_MODULES:
            path = p + module_path(name)
            lin = _build_linear(source, cfg, path, name, quant, lora, compute, seed=lora_seed(lora, i, name))
            if adapters is not None:
                adapters.place(lin)
            set_block_linear(layer, name, lin)
        if layer_hook is not None:
            layer_hook(layer)
        elif fast:
            # the block's 8-bit scale codes into one buffer now (qlora_gpu.fast.block_scales), while the next
            # blocks' allocations can reuse the per-layer tensors this frees (laid out at the first step, they would
            # stay cached: 1 GB at 65B)
            from .fast.block_scales import BlockScales

            BlockScales.of(layer, lora_linears(layer))
    tok = None
    if folder is not None and tokenizer:
        from qlora_ref.model.tokenizer import Tokenizer

        tok = Tokenizer.from_folder(folder)
    out = QLoRAModel.assemble(hf, cfg, quant, lora, tok, device=device, gradient_checkpointing=gradient_checkpointing,
                              residual_dtype=residual_dtype)
    set_kernel(out, kernel)
    if fast:
        from .fast import enable  # the switch (qlora_gpu.fast)

        enable(out)
    return out


def load(path, quant: QuantConfig | None = _PAPER_QUANT, lora: LoraConfig | None = _PAPER_LORA, *, device=None,
         **kwargs) -> QLoRAModel:
    """Any checkpoint the reference loads: a Hugging Face folder through ``prepare_model`` (``kwargs`` go there),
    a GGUF file through the reference loader (``QLoRAModel.from_pretrained``, float32 on the host first; of
    ``kwargs`` only ``gradient_checkpointing``, ``kernel``, ``fast`` and ``progress`` apply there).
    The embedding and LM head default to bfloat16 on CUDA and float32 on the CPU (where bfloat16 arithmetic is
    slow)."""
    device = default_device(device)
    if (Path(path) / "config.json").exists():
        kwargs.setdefault("dtype", "bfloat16" if device.type == "cuda" else "float32")
        model = prepare_model(path, quant, lora, device=device, **kwargs)
        model.name_or_path = str(Path(path).resolve())  # what a saved adapter records as its base model
        return model
    model = QLoRAModel.from_pretrained(path, quant, lora, device=device, tokenizer=kwargs.get("tokenizer", True),
                                       gradient_checkpointing=kwargs.get("gradient_checkpointing", False),
                                       progress=kwargs.get("progress", True))
    model.name_or_path = str(Path(path).resolve())
    set_kernel(model, kwargs.get("kernel", "bnb"))
    if fast_by_default(device) if kwargs.get("fast") is None else kwargs["fast"]:
        from .fast import enable  # the switch (qlora_gpu.fast)

        enable(model)
    return model


def load_model(path, quant: QuantConfig | None = None, lora: LoraConfig | None = None,
               gradient_checkpointing: bool = False, tokenizer: bool = True, *, adapter=None, kernel: str = "bnb",
               progress: bool = True, device=None, **options) -> QLoRAModel:
    """``qlora_ref.load_model`` on this backend: the same arguments with the same defaults (float32 weights unless
    ``quant`` says otherwise, no adapters unless ``lora`` or ``adapter`` brings them) and the same meaning.
    adapter: a PEFT adapter folder loaded into the model (``QLoRAModel.load_adapter``: with ``lora`` None the
    adapters are built from its ``adapter_config.json`` and the model comes back in eval mode, as the reference's
    does). kernel: one of ``qlora_gpu.lora.KERNELS``. progress: bars on stderr while the model loads. device:
    CUDA when present, else the CPU; ``options`` go to ``prepare_model`` for a Hugging Face folder (``load``)."""
    model = load(path, quant, lora, device=device, gradient_checkpointing=gradient_checkpointing,
                 tokenizer=tokenizer, kernel=kernel, progress=progress, **options)
    if adapter is not None:
        model.load_adapter(adapter)
        if lora is None:  # loaded for inference: eval mode (no LoRA dropout), as peft's from_pretrained returns
            model.eval()
    return model


def _set_norm(norm: nn.Module, weight: torch.Tensor) -> None:
    """A float32 norm weight; ``QLoRAModel.assemble`` routes the norm through ``qlora_gpu.rms_norm.rms_norm``, which
    casts its float32 product back to the residual stream's dtype."""
    norm.weight = nn.Parameter(weight, requires_grad=False)


class _AdapterPlaces:
    """Every adapter of the model in one zeroed buffer (``qlora_gpu.optim.adapter_buffer``), in the order the
    linears are built, which is ``QLoRAModel.lora_parameters``' order: each linear's ``lora_A``/``lora_B`` are
    copied to their places as it is built (and cast to the adapter dtype). The flat optimizer then binds them
    without a copy; re-pointing separately allocated adapters held a second copy of them all at the first step
    (at LLaMA-65B the whole gap between its measured peak and its steady state, docs/benchmarks.md)."""

    def __init__(self, source: _Source, cfg: ModelConfig, lora: LoraConfig | None, dtype: torch.dtype, device):
        from .optim import adapter_buffer

        shapes = []
        for i in range(cfg.num_hidden_layers):
            for name in LINEAR_MODULES:
                r = adapter_args(name, lora)["r"]
                if r is not None:
                    out_f, in_f = source.shapes[f"model.layers.{i}.{module_path(name)}.weight"]
                    shapes += [(r, in_f), (out_f, r)]
        self.buffer, self.starts = adapter_buffer([a * b for a, b in shapes], dtype, device)
        self.shapes, self.next = shapes, 0

    @torch.no_grad()
    def place(self, lin: QLoRALinear) -> None:
        if lin.r is None:
            return
        for key in ("lora_A", "lora_B"):
            param, shape, start = getattr(lin, key), self.shapes[self.next], self.starts[self.next]
            if tuple(param.shape) != shape:  # the layout was computed from the same config: a bug if reached
                raise RuntimeError(f"adapter {key} of shape {tuple(param.shape)} where {shape} was expected")
            view = self.buffer[start:start + param.numel()].view(shape)
            view.copy_(param)
            param.data = view
            self.next += 1


def _build_linear(source: _Source, cfg: ModelConfig, path: str, name: str, quant: QuantConfig | None,
                  lora: LoraConfig | None, compute: str, seed: int) -> QLoRALinear:
    """One block linear: read, quantized on the device, the float copy dropped on return."""
    bias = source.tensor(path + ".bias", torch.float32) if has_bias(cfg, name) else None
    common = dict(**adapter_args(name, lora), bias=bias, compute_dtype=compute, seed=seed, device=source.device)
    prefix = source.quantized_prefix(path + ".weight")
    if prefix is not None:
        return QLoRALinear.from_quantized(source.quantized(prefix), **common)
    w = source.tensor(path + ".weight", torch.float32)
    if quant is None:
        return QLoRALinear.from_weight(w, quant_type=None, **common)
    return QLoRALinear.from_weight(w, quant_type=quant.quant_type, blocksize=quant.blocksize,
                                   double_quant=quant.double_quant, **common)


__all__ = ["init_weight", "llama_config", "load", "load_model", "model_config", "prepare_model"]
