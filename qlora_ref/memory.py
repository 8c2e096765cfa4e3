"""How much GPU memory fine-tuning needs: full 16-bit fine-tuning, 16-bit LoRA and QLoRA.

The paper's headline (QLoRA, section 1): fine-tuning LLaMA-65B in 16 bits needs more than 780 GB of GPU memory;
QLoRA fits in less than 48 GB. In between, 16-bit LoRA still needs the > 130 GB of frozen 16-bit weights (derived
here, 65.3e9 parameters × 2 bytes, not a paper figure). This module counts, tensor by tensor, what a training step
keeps in memory, so those figures can be reproduced and any other configuration estimated:

- ``weights``           the base model: 16-bit for full fine-tuning and LoRA, 4-bit codes for QLoRA (the
                        embeddings, LM head and norms are never quantized)
- ``quant_constants``   the per-block scales of the quantized weights (section 3, "Double Quantization")
- ``adapters``          the LoRA matrices (section 2, "Low-rank Adapters")
- ``gradients``         one gradient per trainable parameter
- ``optimizer_states``  Adam's two moments per trainable parameter (section 3, "Paged Optimizers": paged states
                        can be evicted to CPU RAM, so they are reported as the ``paged`` part as well)
- ``activations``       what the forward pass keeps for the backward pass, with or without gradient checkpointing
                        (section 2, "Memory Requirement of Parameter-Efficient Finetuning"), including the float32
                        logits of the loss (``logits_bytes``: all positions at once, or one chunk with a chunked
                        loss) and less the block inputs moved to host memory by activation offload
                        (``offloaded_bytes``); the residual stream — each block's input, which checkpointing keeps
                        and offload moves — in its own dtype (``residual_dtype``, float32 by default)

For long sequences and short examples (docs/long_context.md), three more settings: ``packing`` with an
``example_length`` (how many of a step's token slots are useful, ``step_tokens``), ``loss_chunk`` and ``offload``.

Everything here is pure Python integer arithmetic on the model's shape: no tensor is allocated and neither
NumPy nor torch is imported. Bytes are exact integers; MB and GB are decimal (10**6, 10**9 bytes), which is the
unit in which the paper's 780 GB works out (65.3e9 parameters x 12 bytes = 783 GB, see ``estimate_memory``).
docs/memory.md lists the formulas, the assumptions and the paper's figures next to ours; the same training
sharded over several GPUs is ``qlora_ref.memory_sharded``'s.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .checks import QUANT_TYPES_4BIT, check_blocksize, check_quant_type
from .files import read_json_object
from .model.config import ATTENTION_MODULES, LINEAR_MODULES, MLP_MODULES, ModelConfig, linear_shapes

MB = 10**6
GB = 10**9
#: a GPU's memory is sold in binary units: a card sold as "24 GB" holds 24 GiB = 25.77e9 bytes
GIB = 2**30

#: the fine-tuning methods of the paper's Figure 1
METHODS = ("full", "lora", "qlora")

#: bytes per element of the float formats a weight, an adapter or an activation may have
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

#: bytes per trainable parameter of each optimizer's state, and whether that state is paged (section 3,
#: "Paged Optimizers": the states live in NVIDIA unified memory and are evicted to CPU RAM under pressure).
#: 32-bit Adam(W) keeps two float32 moments: 4 + 4 bytes. bitsandbytes' 8-bit Adam keeps two uint8 moments,
#: each quantized blockwise in blocks of 256 with one float32 absmax per block: 2 x (1 + 4/256) bytes.
OPTIMIZERS: dict[str, tuple[float, bool]] = {
    "adamw": (8.0, False),
    "paged_adamw": (8.0, True),
    "adamw_8bit": (2 * (1 + 4 / 256), False),
    "paged_adamw_8bit": (2 * (1 + 4 / 256), True),
    "sgd": (0.0, False),
}

#: named sets of LoRA target modules. "all" is the paper's recipe (section 4 / Appendix B: LoRA on all linear
#: layers of the transformer blocks, not the LM head); "qv" is the original LoRA paper's choice.
TARGET_PRESETS = {
    "all": LINEAR_MODULES,
    "attention": ATTENTION_MODULES,
    "mlp": MLP_MODULES,
    "qv": ("q_proj", "v_proj"),
}

#: how the attention probabilities are computed: "eager" materializes the (seq x seq) softmax per head and keeps
#: it for the backward pass (Hugging Face's LLaMA of 2023, which the paper used); "flash" (FlashAttention /
#: PyTorch SDPA) recomputes it in the backward pass and keeps only one float32 log-sum-exp per head and token.
ATTENTION_IMPLS = ("eager", "flash")


#: Llama 3.1 (Meta's config.json of Llama-3.1-8B / -70B): grouped-query attention with 8 key/value heads, a
#: 128,256-token vocabulary — the shapes of the long-context comparisons (docs/long_context.md)
LLAMA3_CONFIGS = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256),
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, vocab_size=128256),
}

#: the residual stream's dtype by default: float32, the standard stack's (transformers + peft's
#: ``prepare_model_for_kbit_training`` under autocast, and the paper's qlora.py, whose float32 norms widen the stream)
#: and ``qlora_gpu.prepare.prepare_model``'s (``residual_dtype="float32"``; docs/training.md, "Precision of the
#: residual stream"): the block inputs, the norms' inputs and the residual additions are float32 while the matrix
#: products compute in the compute dtype
RESIDUAL_DTYPE = "float32"

#: how many checkpointed block inputs activation offload leaves on the device at once: the block being recomputed
#: and the one before it, already on its way back (``qlora_gpu.offload``)
OFFLOAD_RESIDENT_BLOCKS = 2


def format_bytes(n: int | float | None) -> str:
    """Decimal units, as the paper writes them: "5,048.0 MB", "45.17 GB"; "?" for an unknown amount."""
    if n is None:
        return "?"
    if n >= GB:
        return f"{n / GB:,.2f} GB"
    return f"{n / MB:,.1f} MB"


def check_positive_int(name: str, value) -> None:
    """``value`` an int >= 1 (never a bool): shapes, counts and sizes of the calculators."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


# ----------------------------------------------------------------------------------------------------------------
# Model shapes
# ----------------------------------------------------------------------------------------------------------------


def llama_intermediate_size(hidden_size: int, multiple_of: int = 256) -> int:
    """The SwiGLU width of a LLaMA model: 2/3 of 4 x hidden, rounded up to a multiple of 256.

    LLaMA (Touvron et al. 2023, section 2.2) uses SwiGLU "with a dimension of 2/3 4d instead of 4d"; the released
    code rounds it up to ``multiple_of`` = 256, which gives 11008 / 13824 / 17920 / 22016 for the four sizes.
    """
    width = int(2 * 4 * hidden_size / 3)
    return multiple_of * math.ceil(width / multiple_of)


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-style decoder (pre-norm RMSNorm, rotary attention, SwiGLU MLP, no biases).

    ``num_kv_heads`` < ``num_heads`` describes grouped-query attention (k_proj and v_proj are narrower);
    ``tie_word_embeddings`` shares one matrix between the input embedding and the LM head; ``qk_norm``: Qwen3's
    per-head RMSNorms on queries and keys (two weight vectors of ``head_dim`` per layer).
    """

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    qk_norm: bool = False

    def __post_init__(self):
        for arg in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "vocab_size"):
            check_positive_int(arg, getattr(self, arg))
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        check_positive_int("num_kv_heads", self.num_kv_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads}) "
                    "unless head_dim is given"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        check_positive_int("head_dim", self.head_dim)

    # -- the same decoder as the reference's ModelConfig ----------------------------------------------------------
    @classmethod
    def from_config(cls, config: ModelConfig, name: str = "custom") -> ModelShape:
        """The shape of a ``qlora_ref.model.config.ModelConfig`` (biases, rope and norms do not count here)."""
        return cls(name=name, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                   num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
                   vocab_size=config.vocab_size, num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
                   tie_word_embeddings=config.tie_word_embeddings, qk_norm=config.qk_norm)

    @property
    def config(self) -> ModelConfig:
        """This shape as a Llama (or, with ``qk_norm``, Qwen3) ``ModelConfig``: the definition the reference model
        builds from."""
        return ModelConfig(model_type="qwen3" if self.qk_norm else "llama", vocab_size=self.vocab_size,
                           hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                           num_hidden_layers=self.num_layers,
                           num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                           head_dim=self.head_dim, tie_word_embeddings=self.tie_word_embeddings)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of the linear layers of one decoder layer, by PEFT's names
        (``qlora_ref.model.config.linear_shapes``)."""
        return linear_shapes(self.config)

    # -- parameter counts ----------------------------------------------------------------------------------------
    @property
    def n_linear_params(self) -> int:
        """Weights of the linear layers of all decoder layers: what QLoRA quantizes."""
        return self.num_layers * sum(o * i for o, i in self.linear_shapes().values())

    @property
    def n_embedding_params(self) -> int:
        """The input embedding and the LM head (one matrix when tied); never quantized (bitsandbytes skips the
        LM head, and the embedding is not a linear layer)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def n_norm_params(self) -> int:
        """Two RMSNorm weight vectors per decoder layer plus the final norm (and Qwen3's two per-head ones)."""
        return (2 * self.num_layers + 1) * self.hidden_size + self.qk_norm * 2 * self.num_layers * self.head_dim

    @property
    def n_params(self) -> int:
        return self.n_linear_params + self.n_embedding_params + self.n_norm_params

    def lora_params(self, r: int, targets: Sequence[str]) -> int:
        """LoRA parameters: ``lora_A`` (r x in) plus ``lora_B`` (out x r) for every target module of every layer
        (paper, eq. 3: L1 in R^{h x r}, L2 in R^{r x o})."""
        shapes = self.linear_shapes()
        return self.num_layers * sum(r * (shapes[m][0] + shapes[m][1]) for m in targets)


#: LLaMA-1 (Touvron et al. 2023, Table 2: dimension, heads, layers; vocabulary 32,000; SwiGLU width as above)
LLAMA_SHAPES: dict[str, ModelShape] = {
    name: ModelShape(
        name=name,
        hidden_size=hidden,
        intermediate_size=llama_intermediate_size(hidden),
        num_layers=layers,
        num_heads=heads,
        vocab_size=32000,
    )
    for name, hidden, heads, layers in (
        ("llama-7b", 4096, 32, 32),
        ("llama-13b", 5120, 40, 40),
        ("llama-33b", 6656, 52, 60),
        ("llama-65b", 8192, 64, 80),
    )
}


#: other shapes by name: LLaMA-2-70B (Touvron et al. 2023b, "Llama 2", Table 1, and its released config.json):
#: grouped-query attention with 8 key/value heads, SwiGLU width 28,672 — the model of the FSDP-QLoRA figures
#: (Answer.AI's fsdp_qlora on 2 x 24 GB, PEFT's FSDP guide; docs/sharded.md)
OTHER_SHAPES: dict[str, ModelShape] = {
    "llama-2-70b": ModelShape(name="llama-2-70b", hidden_size=8192, intermediate_size=28672, num_layers=80,
                              num_heads=64, num_kv_heads=8, vocab_size=32000),
}

#: every shape known by name
MODEL_SHAPES: dict[str, ModelShape] = {**LLAMA_SHAPES, **OTHER_SHAPES}


#: config.json keys of a mixture-of-experts model (Mixtral, Qwen2-MoE, DeepSeek-MoE, Phi-MoE, ...), whose
#: experts multiply the MLP's parameters: a dense estimate of one would be several times too small
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


def shape_from_hf_config(config: dict, name: str = "custom", source: str | None = None) -> ModelShape:
    """A ``ModelShape`` from the dictionary of a Hugging Face ``config.json`` of a Llama-style model
    (Llama, Mistral, SmolLM2, ...: the keys of ``transformers.LlamaConfig``). A ``model_type`` the loaders do not
    build, or any mixture-of-experts key, is refused; errors are prefixed with ``source`` (the file) and use the
    config.json key names."""
    from .model.config import SUPPORTED_MODEL_TYPES

    where = f"{source}: " if source else ""
    if not isinstance(config, dict):
        raise ValueError(f"config must be a JSON object (a dict), got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{where}model_type {model_type!r} is not one the calculator estimates (it counts the "
                         f"dense decoder of {', '.join(SUPPORTED_MODEL_TYPES)}, as the loaders build)")
    if moe := [k for k in MOE_KEYS if config.get(k)]:
        raise ValueError(f"{where}{moe[0]}={config[moe[0]]!r}: a mixture-of-experts model, whose experts the "
                         "calculator does not count (an estimate as a dense model would be several times too small)")
    required = {
        "hidden_size": "hidden_size",
        "intermediate_size": "intermediate_size",
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
        "vocab_size": "vocab_size",
    }
    missing = [k for k in required if k not in config]
    if missing:
        raise ValueError(
            f"{where or f'config for model {name!r} '}lacks {', '.join(repr(k) for k in missing)}: the memory "
            "calculator needs "
            f"the keys of a Llama-style config.json ({', '.join(required)})"
        )
    kwargs = {ours: config[theirs] for theirs, ours in required.items()}
    try:
        return ModelShape(
            name=name,
            num_kv_heads=config.get("num_key_value_heads"),
            head_dim=config.get("head_dim"),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qk_norm=model_type == "qwen3",
            **kwargs,
        )
    except ValueError as e:  # ModelShape's field names, said as config.json's keys
        message = str(e)
        for theirs, ours in (*required.items(), ("num_key_value_heads", "num_kv_heads")):
            if theirs != ours:
                message = re.sub(rf"\b{ours}\b", theirs, message)
        raise ValueError(f"{where}{message}") from None


def load_model_shape(model: str | Path | ModelShape) -> ModelShape:
    """The shape named by ``model``: ``llama-7b``/``13b``/``33b``/``65b`` (the ``llama-`` may be left out),
    ``llama-2-70b``, ``llama-3.1-8b``/``llama-3.1-70b``, a Hugging Face ``config.json`` file, a folder that
    holds one, or a ``.gguf`` file (its metadata)."""
    if isinstance(model, ModelShape):
        return model
    if not isinstance(model, (str, Path)) or not str(model):
        raise ValueError(f"model must be a name or a path, got {model!r}")
    key = str(model).lower()
    if key in MODEL_SHAPES:
        return MODEL_SHAPES[key]
    if key in LLAMA3_CONFIGS:
        return shape_from_hf_config(LLAMA3_CONFIGS[key], name=key)
    if f"llama-{key}" in MODEL_SHAPES:
        return MODEL_SHAPES[f"llama-{key}"]
    path = Path(model)
    if path.suffix.lower() == ".gguf" and path.is_file():
        import dataclasses

        from .model.config import ModelConfig
        from .model.loading import read_gguf

        meta, tensors = read_gguf(path)
        config = dataclasses.asdict(ModelConfig.from_gguf_metadata(meta, str(path)))
        config["tie_word_embeddings"] = "lm_head.weight" not in tensors  # no output tensor: the embedding's
        return shape_from_hf_config(config, name=path.stem)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(
            f"model must be one of {', '.join([*MODEL_SHAPES, *LLAMA3_CONFIGS])} or a path to a Hugging Face "
            f"config.json (file or folder) or a .gguf file, got {str(model)!r}"
            + (f" ({path} does not exist)" if path != Path(model) else "")
        )
    try:
        config = read_json_object(path)
    except ValueError as e:
        raise ValueError(f"model: {e}") from None
    name = path.parent.name if path.name == "config.json" and path.parent.name else path.stem
    return shape_from_hf_config(config, name=name, source=str(path))


# ----------------------------------------------------------------------------------------------------------------
# Quantization constants (section 3, "Double Quantization")
# ----------------------------------------------------------------------------------------------------------------


def quant_constant_bits_per_param(blocksize: int = 64, double_quant: bool = True, dq_blocksize: int = 256) -> float:
    """Average bits of quantization constants per quantized parameter, ignoring per-tensor tables.

    Without double quantization every block of ``blocksize`` weights has one float32 absmax: 32/64 = 0.5 bits per
    parameter. With it (paper, section 3) the absmax values are themselves quantized to 8 bits in blocks of 256,
    each of which keeps one float32 second-level constant: 8/64 + 32/(64 * 256) = 0.127 bits per parameter.
    """
    check_blocksize(blocksize)
    check_positive_int("dq_blocksize", dq_blocksize)
    if not double_quant:
        return 32 / blocksize
    return 8 / blocksize + 32 / (blocksize * dq_blocksize)


def double_quant_saving_bits_per_param(blocksize: int = 64, dq_blocksize: int = 256) -> float:
    """What double quantization saves per parameter: 0.5 - 0.127 = 0.373 bits at the paper's block sizes
    (exactly 0.373046875), "approximately 3 GB for a 65B model" (section 1)."""
    return quant_constant_bits_per_param(blocksize, False, dq_blocksize) - quant_constant_bits_per_param(
        blocksize, True, dq_blocksize
    )


def quantized_tensor_bytes(
    n: int, bits: int = 4, blocksize: int = 64, double_quant: bool = True, dq_blocksize: int = 256
) -> tuple[int, int]:
    """(code bytes, constant bytes) of one weight tensor of ``n`` elements quantized blockwise to ``bits`` bits.

    Exactly the tensors bitsandbytes keeps for a ``Linear4bit`` weight (and writes to a checkpoint):
    - ``weight``: the codes, two 4-bit codes per byte (``(n + 1) // 2`` bytes; k bits in general, packed densely);
    - without double quantization: ``absmax``, one float32 per block (the last block may be partial: ceil);
    - with double quantization: ``absmax`` as one uint8 code per block, ``nested_absmax`` (one float32 per 256
      blocks), and the float32 offset (the mean of the absmax values that is subtracted before quantizing);
    - ``quant_map`` (the 2^bits code values in float32) and, with double quantization, ``nested_quant_map``
      (the 256 values of the dynamic 8-bit map in float32): small per-tensor tables.
    """
    check_positive_int("n", n)
    n_blocks = math.ceil(n / blocksize)
    codes = math.ceil(n * bits / 8)
    quant_map = 2**bits * 4
    if not double_quant:
        return codes, n_blocks * 4 + quant_map
    nested = math.ceil(n_blocks / dq_blocksize) * 4 + 4 + 256 * 4
    return codes, n_blocks * 1 + nested + quant_map


# ----------------------------------------------------------------------------------------------------------------
# Activations (section 2, "Memory Requirement of Parameter-Efficient Finetuning"; Appendix G)
# ----------------------------------------------------------------------------------------------------------------


def layer_activation_bytes_per_token(shape: ModelShape, seq: int, attention: str, act_bytes: int,
                                     residual_bytes: int | None = None) -> int:
    """Bytes one decoder layer keeps for its backward pass, per token, without LoRA.

    Each tensor a Llama decoder layer's backward pass reads, counted once (a tensor read by two operations, like
    the normed input shared by q/k/v_proj, is one tensor), in the compute dtype (``act_bytes``) except those
    marked *, which have the residual stream's dtype (``residual_bytes``, default ``act_bytes``):

    attention half                                       MLP half
      layer input (the RMSNorm's input)       h*           RMSNorm input                      h*
      normed input (q/k/v_proj's input)       h            normed input (gate/up_proj's)      h
      q and k after rotary embedding     q + kv            gate output (SiLU's input)         f*
      v                                      kv            SiLU output and up output         2f*
      softmax probabilities         heads x seq  (eager)   their product (down_proj's input)  f
      attention output (o_proj's input)       q

    * A float32 stream (the standard stack's and ``qlora_gpu.prepare.prepare_model``'s; docs/training.md,
    "Precision of the residual stream"): the norms' inputs are the stream itself (the layer input is the block's
    checkpoint; the residual additions keep nothing), and gate and up return the stream's dtype (bitsandbytes'
    ``Linear4bit`` returns its float32 input's dtype; ``qlora_gpu.model.WIDENED_OUTPUTS``), so SiLU and the
    gating product keep float32 values; down_proj keeps its input cast to the compute dtype, and q and k, widened
    too, reach attention cast back to it (``torch.autocast``), which is what attention keeps.
    With "flash" attention the (seq x seq) probabilities are recomputed in the backward pass and only one float32
    log-sum-exp per head and token is kept. The same tensors are kept for full fine-tuning (they give the weight
    gradients) and for (Q)LoRA (the frozen layers still pass gradients to their inputs, and the 4-bit matmul keeps
    its input when that input needs a gradient), so this count does not depend on the method.
    """
    h = shape.hidden_size
    f = shape.intermediate_size
    q = shape.num_heads * shape.head_dim
    kv = shape.num_kv_heads * shape.head_dim
    stream = act_bytes if residual_bytes is None else residual_bytes
    attention_half = h * stream + (h + q + kv + kv + q) * act_bytes
    if attention == "eager":
        attention_half += shape.num_heads * seq * act_bytes
    else:
        attention_half += shape.num_heads * 4
    mlp_half = (h + 3 * f) * stream + (h + f) * act_bytes
    return attention_half + mlp_half


def lora_activation_bytes_per_token(
    shape: ModelShape, r: int, targets: Sequence[str], lora_dropout: float, act_bytes: int
) -> tuple[int, int]:
    """(extra bytes LoRA adds to one layer's activations, the layer's "LoRA input" bytes), per token.

    PEFT computes ``base(x) + lora_B(lora_A(dropout(x))) * alpha / r``. The weight gradients need
    dL/dA = (dL/d(Ax))^T dropout(x) and dL/dB = (dL/dy)^T (A dropout(x)), so every adapter keeps
    - its input ``dropout(x)`` (``in_features`` values): its own copy when dropout > 0, plus the dropout mask
      (one byte per value); with dropout = 0 it is the base layer's input, already counted;
    - the rank-r intermediate ``A dropout(x)`` (r values).
    The second number, the input of every adapter counted once per adapter (``in_features + r`` values) whether
    shared or not, is the paper's "LoRA input gradients" (section 2: dL/dx of an adapter has the size of x).
    """
    shapes = shape.linear_shapes()
    inputs = sum(shapes[m][1] for m in targets)  # in_features
    rank_part = len(targets) * r * act_bytes
    extra = rank_part + (inputs * (act_bytes + 1) if lora_dropout > 0 else 0)
    return extra, inputs * act_bytes + rank_part


def head_activation_bytes_per_token(shape: ModelShape, act_bytes: int, residual_bytes: int | None = None) -> int:
    """Bytes the final norm and the LM head keep per token (never checkpointed), the logits aside
    (``logits_bytes``): the final RMSNorm's input, the residual stream (h values, ``residual_bytes``, default
    ``act_bytes``), and the LM head's input (h values, compute dtype)."""
    return shape.hidden_size * ((act_bytes if residual_bytes is None else residual_bytes) + act_bytes)


def logits_bytes(shape: ModelShape, tokens: int, loss_chunk: int = 0) -> int:
    """Bytes of the loss's float32 logits at their peak.

    Unchunked (``loss_chunk`` 0): the logits of every token, which Hugging Face's LLaMA upcasts to float32 and
    returns (vocab x 4 bytes each), and the float32 log-softmax the cross entropy keeps for its backward pass
    (as much again) — 2 x tokens x vocab x 4. Chunked (``qlora_ref.loss.chunked_lm_head_loss``,
    ``qlora_gpu.chunked_loss``): one chunk's float32 logits and their softmax (the gradient, in the backward pass)
    at a time, 2 x min(chunk, tokens) x vocab x 4, plus one float32 log-sum-exp per token kept between the passes.
    """
    if not loss_chunk:
        return 2 * tokens * shape.vocab_size * 4
    return 2 * min(loss_chunk, tokens) * shape.vocab_size * 4 + tokens * 4


def offloaded_bytes(shape: ModelShape, tokens: int, residual_bytes: int) -> int:
    """Bytes activation offload keeps in host memory: every decoder block's checkpointed input, the residual
    stream (hidden values per token in the stream's dtype, ``residual_bytes``: 4 for the float32 stream of
    ``qlora_gpu.prepare.prepare_model`` and the standard stack) — L x tokens x hidden x residual_bytes
    (``qlora_gpu.offload``: its ``OffloadStats.bytes_to_host`` for one step)."""
    return shape.num_layers * tokens * shape.hidden_size * residual_bytes


def step_tokens(batch: int, seq: int, packing: bool = False, example_length: int | None = None) -> tuple[int, int]:
    """(token slots one step computes on, useful ones among them) for ``batch`` sequences of ``seq`` tokens.

    Without ``example_length`` every slot is useful. With examples of ``example_length`` tokens: unpacked, a
    sequence carries one example and padding (``batch x example_length`` useful); packed, as many whole examples
    as fit (``batch x floor(seq / example_length) x example_length``). Memory follows the slots; the useful tokens
    are what a step at that memory trains on."""
    slots = batch * seq
    if example_length is None:
        return slots, slots
    if example_length > seq:
        raise ValueError(f"example_length ({example_length}) must be at most seq ({seq})")
    return slots, batch * example_length * ((seq // example_length) if packing else 1)


# ----------------------------------------------------------------------------------------------------------------
# The estimate
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryBreakdown:
    """Memory of one fine-tuning configuration, in bytes.

    The six parts in ``PARTS`` add up to ``total_bytes``. ``paged`` is the share of ``optimizer_states`` held in
    paged (unified) memory that can be evicted to CPU RAM, so ``device_min_bytes`` = total - paged is what the
    GPU must hold when every page is out. ``activations_checkpointing`` and ``activations_no_checkpointing`` give
    both settings whichever one ``activations`` uses; ``lora_inputs`` is the paper's "LoRA input gradients" term
    (section 2) under the chosen setting. ``logits`` (a detail of ``activations``) is the loss's float32 logits
    (``logits_bytes``); ``offloaded`` the host memory activation offload fills (not in the total: the device
    does not hold it); ``tokens`` and ``useful_tokens`` the step's token slots and the non-padding ones
    (``step_tokens``).
    """

    PARTS = ("weights", "quant_constants", "adapters", "gradients", "optimizer_states", "activations")

    model: str
    method: str
    settings: dict
    n_params: int
    n_trainable: int
    weights: int
    quant_constants: int
    adapters: int
    gradients: int
    optimizer_states: int
    activations: int
    paged: int
    activations_checkpointing: int
    activations_no_checkpointing: int
    lora_inputs: int
    quantized_params: int = 0
    logits: int = 0
    offloaded: int = 0
    tokens: int = 0
    useful_tokens: int = 0

    @property
    def parts(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.PARTS}

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def device_min_bytes(self) -> int:
        return self.total_bytes - self.paged

    @property
    def quant_constant_bits_per_param(self) -> float:
        """Constant bits per quantized parameter, per-tensor tables included (0 when nothing is quantized)."""
        return 8 * self.quant_constants / self.quantized_params if self.quantized_params else 0.0

    def to_dict(self) -> dict:
        """A JSON-ready dictionary: the settings, ``total_bytes``, the ``parts`` (summing to it) and the details."""
        return {
            "model": self.model,
            "method": self.method,
            "settings": dict(self.settings),
            "n_params": self.n_params,
            "n_trainable": self.n_trainable,
            "total_bytes": self.total_bytes,
            "parts": self.parts,
            "paged_bytes": self.paged,
            "device_min_bytes": self.device_min_bytes,
            "activations_checkpointing_bytes": self.activations_checkpointing,
            "activations_no_checkpointing_bytes": self.activations_no_checkpointing,
            "lora_inputs_bytes": self.lora_inputs,
            "quant_constant_bits_per_param": self.quant_constant_bits_per_param,
            "logits_bytes": self.logits,
            "offloaded_bytes": self.offloaded,
            "tokens": self.tokens,
            "useful_tokens": self.useful_tokens,
        }


def resolve_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """LoRA target modules from a preset name (``all``, ``attention``, ``mlp``, ``qv``), a comma-separated list
    of module names, or a sequence of them."""
    if isinstance(targets, str):
        if targets in TARGET_PRESETS:
            return TARGET_PRESETS[targets]
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    names = tuple(dict.fromkeys(targets))  # unique, order kept
    unknown = [t for t in names if t not in LINEAR_MODULES]
    if not names or unknown:
        raise ValueError(
            f"targets must be one of {', '.join(TARGET_PRESETS)} or a comma-separated list of "
            f"{', '.join(LINEAR_MODULES)}; got {targets!r}"
        )
    return names


def default_optimizer(method: str) -> str:
    """The paper's optimizer: paged AdamW with 32-bit states for QLoRA; plain 32-bit AdamW for the 16-bit
    baselines (Figure 1 draws paging only for QLoRA)."""
    return "paged_adamw" if method == "qlora" else "adamw"


def estimate_memory(
    shape: ModelShape | str | Path,
    method: str = "qlora",
    *,
    batch: int = 1,
    seq: int = 512,
    r: int = 64,
    targets: str | Sequence[str] = "all",
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    gradient_checkpointing: bool = True,
    optimizer: str | None = None,
    compute_dtype: str = "bfloat16",
    adapter_dtype: str = "bfloat16",
    unquantized_dtype: str | None = None,
    lora_dropout: float = 0.1,
    attention: str = "eager",
    packing: bool = False,
    example_length: int | None = None,
    loss_chunk: int = 0,
    offload: bool = False,
    residual_dtype: str = RESIDUAL_DTYPE,
) -> MemoryBreakdown:
    """The memory one training step of ``method`` needs on ``shape``, part by part.

    Defaults are the paper's recipe (Appendix B and its released scripts): LoRA r = 64 on all linear layers of the
    transformer blocks, NF4 with double quantization and block size 64, bfloat16 compute and adapters, paged
    32-bit AdamW for QLoRA, gradient checkpointing, LoRA dropout 0.1; batch 1 and sequence 512 are the setting
    of the paper's memory figure (Appendix G). ``method`` is "full" (every weight trained in 16 bits), "lora"
    (frozen 16-bit weights + adapters) or "qlora" (frozen ``quant_type`` weights + adapters); ``r``,
    ``targets``, ``lora_dropout`` and ``adapter_dtype`` only apply to LoRA/QLoRA, ``quant_type``,
    ``double_quant``, ``blocksize`` and ``unquantized_dtype`` only to QLoRA. ``unquantized_dtype`` is the dtype
    of the parameters QLoRA leaves unquantized (embeddings, LM head, norms); it defaults to ``compute_dtype``
    (the paper's script casts them back to bfloat16), "float32" is what PEFT's ``prepare_model_for_kbit_training``
    leaves them in. Long context (docs/long_context.md): ``packing`` and ``example_length`` count the useful
    tokens (``step_tokens``), ``loss_chunk`` > 0 computes the loss in chunks of that many tokens
    (``logits_bytes``), ``offload`` keeps the checkpointed block inputs in host memory (``offloaded_bytes``; it
    needs gradient checkpointing). ``residual_dtype`` is the residual stream's dtype — the block inputs
    (checkpointed or offloaded) and the norms' inputs: float32 by default (``RESIDUAL_DTYPE``: the standard stack,
    the paper's script and ``qlora_gpu.prepare.prepare_model``), the compute dtype for a model kept in it
    throughout (``prepare_model(residual_dtype=None)`` with a 16-bit ``dtype``).
    """
    shape = load_model_shape(shape)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    check_positive_int("batch", batch)
    check_positive_int("seq", seq)
    check_blocksize(blocksize)
    if example_length is not None:
        check_positive_int("example_length", example_length)
    if isinstance(loss_chunk, bool) or not isinstance(loss_chunk, int) or loss_chunk < 0:
        raise ValueError(f"loss_chunk must be a non-negative integer (0: no chunks), got {loss_chunk!r}")
    if packing and example_length is None:
        raise ValueError("packing=True needs example_length=N, the tokens of each example: it counts the whole "
                         "examples that fit a sequence (the useful tokens) and moves no memory by itself")
    if offload and not gradient_checkpointing:
        raise ValueError("offload moves the checkpointed block inputs to host memory: it needs gradient checkpointing")
    for arg, value in (("compute_dtype", compute_dtype), ("residual_dtype", residual_dtype)):
        if value not in DTYPE_BYTES:
            raise ValueError(f"{arg} must be one of {', '.join(DTYPE_BYTES)}, got {value!r}")
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_IMPLS)}, got {attention!r}")
    optimizer = default_optimizer(method) if optimizer is None else optimizer
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    uses_lora = method != "full"
    if uses_lora:
        check_positive_int("r", r)
        targets = resolve_targets(targets)
        if adapter_dtype not in DTYPE_BYTES:
            raise ValueError(f"adapter_dtype must be one of {', '.join(DTYPE_BYTES)}, got {adapter_dtype!r}")
        if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {lora_dropout!r}")
    if method == "qlora":
        check_quant_type(quant_type, QUANT_TYPES_4BIT)  # bitsandbytes' 4-bit types: the same bytes, other codes
        unquantized_dtype = compute_dtype if unquantized_dtype is None else unquantized_dtype
        if unquantized_dtype not in DTYPE_BYTES:
            raise ValueError(f"unquantized_dtype must be one of {', '.join(DTYPE_BYTES)}, got {unquantized_dtype!r}")

    c = DTYPE_BYTES[compute_dtype]  # bytes of a 16-bit (or 32-bit) weight, activation or gradient
    s = DTYPE_BYTES[residual_dtype]  # bytes of a value of the residual stream (a block's input)
    L = shape.num_layers
    n_unquantized = shape.n_embedding_params + shape.n_norm_params  # never quantized

    # --- weights and quantization constants (sections 2 and 3) --------------------------------------------------
    quantized_params = 0
    if method == "qlora":
        # Every linear weight of every decoder layer is stored as 4-bit codes plus its blockwise constants; the
        # embeddings, the LM head and the norms stay in the compute dtype (bitsandbytes replaces nn.Linear only
        # and skips the LM head). Counted per tensor, so partial blocks and per-tensor tables are exact.
        # At the paper's block sizes the constants come to 0.127 bits per parameter (0.5 without double
        # quantization), see quant_constant_bits_per_param.
        codes = consts = 0
        for n_out, n_in in shape.linear_shapes().values():
            code_b, const_b = quantized_tensor_bytes(n_in * n_out, 4, blocksize, double_quant)
            codes += L * code_b
            consts += L * const_b
        quantized_params = shape.n_linear_params
        weights = codes + n_unquantized * DTYPE_BYTES[unquantized_dtype]
    else:
        # Full fine-tuning and 16-bit LoRA keep every weight in 16 bits (2 bytes): 65.3e9 x 2 = 131 GB at 65B,
        # the > 130 GB floor of 16-bit LoRA (derived, not a paper figure).
        consts = 0
        weights = shape.n_params * c

    # --- trainable parameters: adapters, their gradients and optimizer states (section 2, section 3) ------------
    if uses_lora:
        n_trainable = shape.lora_params(r, targets)
        adapters = n_trainable * DTYPE_BYTES[adapter_dtype]
        grad_bytes = DTYPE_BYTES[adapter_dtype]  # a gradient has its parameter's dtype
    else:
        n_trainable = shape.n_params
        adapters = 0
        grad_bytes = c
    gradients = n_trainable * grad_bytes
    # Full fine-tuning: 2 (bf16 weight) + 2 (bf16 gradient) + 8 (two fp32 Adam moments) = 12 bytes per parameter,
    # 65,285,660,672 x 12 = 783 GB for LLaMA-65B before any activation: the paper's "more than 780 GB".
    state_bytes, paged_states = OPTIMIZERS[optimizer]
    optimizer_states = math.ceil(n_trainable * state_bytes)
    paged = optimizer_states if paged_states else 0

    # --- activations (section 2, "Memory Requirement of Parameter-Efficient Finetuning"; Appendix G) ------------
    tokens, useful_tokens = step_tokens(batch, seq, packing, example_length)
    per_layer = layer_activation_bytes_per_token(shape, seq, attention, c, s)
    if uses_lora:
        lora_extra, lora_in = lora_activation_bytes_per_token(shape, r, targets, lora_dropout, c)
    else:
        lora_extra = lora_in = 0
    per_layer += lora_extra
    head = head_activation_bytes_per_token(shape, c, s)
    logits = logits_bytes(shape, tokens, loss_chunk)
    # Without checkpointing every layer keeps everything until its backward pass.
    no_ckpt = tokens * (L * per_layer + head) + logits
    # With checkpointing (one segment per decoder layer, as Hugging Face does) only each layer's input, the
    # residual stream (h values in its dtype), is kept; in the backward pass one layer at a time is recomputed, so
    # one layer's activations are live on top of the checkpoints (its input is the checkpoint itself, hence - h).
    layer_input = shape.hidden_size * s
    ckpt = tokens * (L * layer_input + (per_layer - layer_input) + head) + logits
    # Offload moves the checkpoints to host memory; at most OFFLOAD_RESIDENT_BLOCKS of them are on the device.
    offloaded = offloaded_bytes(shape, tokens, s) if offload else 0
    if offload:
        ckpt -= offloaded - tokens * min(L, OFFLOAD_RESIDENT_BLOCKS) * layer_input
    activations = ckpt if gradient_checkpointing else no_ckpt
    # The paper's "LoRA input gradients": all layers' worth without checkpointing (567 MB for its 7B example),
    # one layer's worth with it ("an average of 18 MB per sequence" = 567 MB / 32 layers).
    lora_inputs = tokens * lora_in * (1 if gradient_checkpointing else L)

    settings = {
        "batch": batch,
        "seq": seq,
        "gradient_checkpointing": bool(gradient_checkpointing),
        "optimizer": optimizer,
        "compute_dtype": compute_dtype,
        "residual_dtype": residual_dtype,
        "attention": attention,
        "packing": bool(packing),
        "example_length": example_length,
        "loss_chunk": loss_chunk,
        "offload": bool(offload),
    }
    if uses_lora:
        settings.update(r=r, targets=list(targets), lora_dropout=lora_dropout, adapter_dtype=adapter_dtype)
    if method == "qlora":
        settings.update(
            quant_type=quant_type,
            double_quant=bool(double_quant),
            blocksize=blocksize,
            unquantized_dtype=unquantized_dtype,
        )

    return MemoryBreakdown(
        model=shape.name,
        method=method,
        settings=settings,
        n_params=shape.n_params,
        n_trainable=n_trainable,
        weights=weights,
        quant_constants=consts,
        adapters=adapters,
        gradients=gradients,
        optimizer_states=optimizer_states,
        activations=activations,
        paged=paged,
        activations_checkpointing=ckpt,
        activations_no_checkpointing=no_ckpt,
        lora_inputs=lora_inputs,
        quantized_params=quantized_params,
        logits=logits,
        offloaded=offloaded,
        tokens=tokens,
        useful_tokens=useful_tokens,
    )
