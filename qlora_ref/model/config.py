"""Configurations: the decoder's shape (``ModelConfig``), how its weights are stored (``QuantConfig``) and
which LoRA adapters it carries (``LoraConfig``).

``ModelConfig`` is read from a Hugging Face ``config.json`` (Llama, Mistral, Qwen2) or from a GGUF file's
metadata; everything the reference transformer needs is an explicit field, so a reader sees the whole
architecture in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

#: model_type in config.json -> the architecture the reference implements
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
#: the architectures a GGUF file may name (llama.cpp's names; its Qwen3 files are not read yet)
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")

#: the linear layers of a decoder block, by their Hugging Face / PEFT names
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTENTION_MODULES + MLP_MODULES

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class ConfigError(ValueError):
    """A configuration that the reference transformer cannot build, with the file it came from."""


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    #: None, or {"rope_type": "linear", "factor": f} or {"rope_type": "llama3", "factor", "low_freq_factor",
    #: "high_freq_factor", "original_max_position_embeddings"} or {"rope_type": "yarn", "factor",
    #: "original_max_position_embeddings", optional "attention_factor", "beta_fast", "beta_slow", "truncate"}
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: biases on q, k, v (not o)
    o_bias: bool = False  # Llama's attention_bias puts a bias on o_proj too
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral: each query sees at most this many keys
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model_type must be one of {SUPPORTED_MODEL_TYPES}, got {self.model_type!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in ROPE_TYPES:
                raise ConfigError(f"rope_scaling type must be one of {ROPE_TYPES}, got {rope_type!r}")
            needed = {"linear": ("factor",), "yarn": ("factor", "original_max_position_embeddings"),
                      "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
            missing = [k for k in needed.get(rope_type, ()) if self.rope_scaling.get(k) is None]
            if missing:
                raise ConfigError(f"rope_scaling type {rope_type!r} needs {missing}, got {self.rope_scaling}")

    @property
    def qk_norm(self) -> bool:
        """Qwen3: an RMSNorm over each head's query and key (weights of head_dim), before the rotation."""
        return self.model_type == "qwen3"

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list | tuple) else [self.eos_token_id]

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> ModelConfig:
        """From a Hugging Face config.json (as a dict). ``source`` names the file in errors."""
        model_type = d.get("model_type")
        if model_type is None:
            archs = d.get("architectures") or []
            raise ConfigError(f"{source}: no model_type (architectures: {archs}); "
                              f"supported: {SUPPORTED_MODEL_TYPES}")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"{source}: unknown architecture model_type={model_type!r} "
                              f"(architectures: {d.get('architectures')}); supported: {SUPPORTED_MODEL_TYPES}")
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):  # transformers' ACT2FN maps both to torch's SiLU
            raise ConfigError(f"{source}: hidden_act must be 'silu' (SwiGLU; 'swish' is the same), got {act!r}")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing keys {missing}")
        heads = d["num_attention_heads"]
        # rope: transformers >= 5 writes rope_parameters (with rope_theta inside); older files rope_theta + rope_scaling
        rope = dict(d.get("rope_parameters") or {})
        theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
        scaling = rope or d.get("rope_scaling")
        if scaling is not None:
            scaling = dict(scaling)
            scaling["rope_type"] = scaling.pop("type", scaling.get("rope_type", "default"))
            if scaling["rope_type"] == "default":
                scaling = None
            elif scaling["rope_type"] == "yarn" and scaling.get("original_max_position_embeddings") is None:
                # transformers' standardize_rope_params: the context YaRN extends is then the config's own
                scaling["original_max_position_embeddings"] = d.get("max_position_embeddings", 2048)
        quantizer = (d.get("quantization_config") or {}).get("quant_method")
        if quantizer not in (None, "bitsandbytes"):  # GPTQ, AWQ, FP8...: their tensors are not weights we can read
            raise ConfigError(f"{source}: weights stored by quantization_config.quant_method={quantizer!r} are not "
                              f"supported: use the 16-bit model, or a bitsandbytes 4-bit folder (qlora quantize)")
        sliding = None
        if model_type == "mistral":  # a config without the key: transformers' MistralConfig default, 4096
            sliding = d.get("sliding_window", 4096)
        elif model_type in ("qwen2", "qwen3") and d.get("use_sliding_window"):
            sliding = _qwen2_window(d, source)
        qkv_bias = model_type == "qwen2" or bool(d.get("attention_bias", False))
        try:
            return cls(
                model_type=model_type,
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"],
                num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=d.get("num_key_value_heads") or heads,
                head_dim=d.get("head_dim") or d["hidden_size"] // heads,
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=scaling,
                max_position_embeddings=d.get("max_position_embeddings", 2048),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                qkv_bias=qkv_bias,
                o_bias=model_type != "qwen2" and bool(d.get("attention_bias", False)),
                mlp_bias=bool(d.get("mlp_bias", False)),
                sliding_window=sliding,
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=d.get("eos_token_id"),
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_gguf_metadata(cls, meta: dict, source: str = "model.gguf") -> ModelConfig:
        """From GGUF key/value metadata (``general.architecture`` and ``{arch}.*`` keys)."""
        arch = meta.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ConfigError(f"{source}: unknown architecture general.architecture={arch!r}; "
                              f"supported: {GGUF_ARCHITECTURES}")

        def get(key, default=None, required=True):
            full = f"{arch}.{key}"
            if full not in meta:
                if required and default is None:
                    raise ConfigError(f"{source}: missing metadata {full}")
                return default
            return meta[full]

        heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        vocab = meta.get(f"{arch}.vocab_size")
        if vocab is None:
            tokens = meta.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise ConfigError(f"{source}: missing metadata {arch}.vocab_size and tokenizer.ggml.tokens")
            vocab = len(tokens)
        scaling = None
        scaling_type = get("rope.scaling.type", "none", required=False)
        if scaling_type == "linear":
            scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        elif scaling_type != "none":  # yarn and the rest change every rotation: refused, never run unscaled
            raise ConfigError(f"{source}: {arch}.rope.scaling.type={scaling_type!r} is not supported (none, linear; "
                              f"Llama 3's scaling comes as the tensor rope_freqs.weight)")
        try:
            return cls(
                model_type=arch,
                vocab_size=int(vocab),
                hidden_size=hidden,
                intermediate_size=int(get("feed_forward_length")),
                num_hidden_layers=int(get("block_count")),
                num_attention_heads=heads,
                num_key_value_heads=int(get("attention.head_count_kv", heads)),
                head_dim=int(get("rope.dimension_count", hidden // heads)),
                rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
                rope_theta=float(get("rope.freq_base", 10000.0)),
                rope_scaling=scaling,
                max_position_embeddings=int(get("context_length", 2048)),
                tie_word_embeddings=False,  # decided by the loader: no output.weight tensor means tied
                qkv_bias=arch == "qwen2",
                sliding_window=None,
                bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict:
        """A config.json dict that transformers reads back into the same architecture."""
        d = {
            "model_type": self.model_type,
            "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[self.model_type]],
            "hidden_act": "silu",
        }
        for f in fields(self):
            if f.name in ("model_type", "rope_scaling", "qkv_bias", "o_bias"):
                continue
            d[f.name] = getattr(self, f.name)
        if self.model_type in ("llama", "qwen3"):
            d["attention_bias"] = self.qkv_bias
        if self.model_type in ("qwen2", "qwen3") and self.sliding_window is not None:  # all windowed (_qwen2_window)
            d.update(use_sliding_window=True, max_window_layers=0)
        if self.rope_scaling is not None:
            d["rope_scaling"] = dict(self.rope_scaling)
        return d


def _qwen2_window(d: dict, source: str) -> int | None:
    """The one sliding window of a Qwen2 config with ``use_sliding_window``, as transformers' Qwen2Config reads it:
    layer i slides when ``sliding_window`` is set and i >= ``max_window_layers`` (default 28), or as its
    ``layer_types`` say. None when no layer slides (full attention, as Qwen2.5's released configs: windows off past
    their 28 layers or more); a window when every layer slides; a mixture is refused (the reference has one
    window for all layers)."""
    window, n = d.get("sliding_window", 4096), d["num_hidden_layers"]
    if window is None:
        return None
    types = d.get("layer_types") or ["sliding_attention" if i >= d.get("max_window_layers", 28) else "full_attention"
                                     for i in range(n)]
    sliding = [t == "sliding_attention" for t in types]
    if not any(sliding):
        return None
    if all(sliding):
        return window
    raise ConfigError(f"{source}: Qwen2 with sliding-window attention in layers {sliding.index(True)} and above only "
                      "(use_sliding_window, max_window_layers) is not supported: the reference gives every layer the "
                      "same attention")


def linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each linear layer of a block, by its PEFT name: the shape of its weight
    (torch's ``nn.Linear`` layout). The one definition, for the model, the loaders and the memory calculator."""
    d, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
            "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}


@dataclass(frozen=True)
class QuantConfig:
    """How the frozen weights of the linear layers are stored and computed (the paper's QLoRA recipe by default).

    quant_type: "nf4" (NormalFloat, the paper's data type), "fp4", "int4" or "fp4_e3m0" (Table 2's); blocksize: weights
    per absmax constant (64 in the paper); double_quant: quantize the absmax constants again (8-bit, blocks of 256);
    compute_dtype: "bfloat16" (the paper) or "float32".
    """

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = "bfloat16"

    def __post_init__(self):
        # the same checks, and messages, as quantize_4bit and QLoRALinear
        from ..checks import REFERENCE_QUANT_TYPES_4BIT, check_blocksize, check_bool, check_quant_type
        from ..lora_checks import check_compute_dtype

        check_quant_type(self.quant_type, REFERENCE_QUANT_TYPES_4BIT)
        object.__setattr__(self, "blocksize", check_blocksize(self.blocksize))
        object.__setattr__(self, "double_quant", check_bool(self.double_quant, "double_quant"))
        object.__setattr__(self, "compute_dtype", check_compute_dtype(self.compute_dtype))


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters, with PEFT's meaning: r (rank; 0 = no adapters), alpha (scaling alpha / r, or alpha / √r with
    ``use_rslora``), dropout on the adapter input, and the linear layers that carry adapters (default: all seven,
    as the paper does). Dropout defaults to 0 here, for a model built to be run; ``TrainConfig`` (the training
    recipe) sets the paper's 0.1."""

    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default=LINEAR_MODULES)
    seed: int = 0
    use_rslora: bool = False

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0:
            raise ValueError(f"r must be a non-negative integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not (
                math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a finite positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora must be True or False, got {self.use_rslora!r}")
        targets = ("all-linear",) if self.target_modules == "all-linear" else tuple(self.target_modules)
        if targets == ("all-linear",):
            targets = LINEAR_MODULES
        unknown = sorted(set(targets) - set(LINEAR_MODULES))
        if unknown:
            raise ValueError(f"target_modules must be among {LINEAR_MODULES}, got unknown {unknown}")
        object.__setattr__(self, "target_modules", targets)

    @property
    def scaling(self) -> float:
        """The adapters' scale s (``qlora_ref.lora.lora_scaling``, as every layer built from this config has it)."""
        from ..lora import lora_scaling

        return lora_scaling(self.alpha, self.r, self.use_rslora)
