"""The decoder: token embedding, N decoder blocks, final RMSNorm, LM head (Llama, Mistral, Qwen2, Qwen3, SmolLM2).

``forward(input_ids)`` returns float32 logits (batch, seq, vocab); ``backward(grad_logits)`` runs every block's
hand-written backward in reverse and leaves the LoRA gradients in the linear layers, readable with
``lora_grads()`` under PEFT's names (``model.layers.0.self_attn.q_proj.lora_A.weight``). Embedding, norms and
LM head are frozen and kept in float32 (the paper quantizes and adapts only the linear layers of the blocks);
their gradients are not computed, only the gradient that flows through them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .attention import Attention, KVCache
from .block import DecoderBlock
from .config import ATTENTION_MODULES, LINEAR_MODULES, LoraConfig, ModelConfig, QuantConfig, linear_shapes
from .embedding import Embedding
from .linear import lora_seed, make_linear
from .mlp import SwiGLU
from .rmsnorm import RMSNorm
from .rope import RotaryEmbedding


def module_path(name: str) -> str:
    """Where a projection sits in a block: ``self_attn.q_proj``, ``mlp.up_proj`` ..."""
    return f"self_attn.{name}" if name in ATTENTION_MODULES else f"mlp.{name}"


def has_bias(config: ModelConfig, name: str) -> bool:
    """Whether this projection carries a bias in this architecture (Qwen2's q/k/v do)."""
    if name in ("q_proj", "k_proj", "v_proj"):
        return config.qkv_bias
    if name == "o_proj":
        return config.o_bias
    return config.mlp_bias


def expected_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint must hold, by its Hugging Face name, with its shape."""
    d, V = config.hidden_size, config.vocab_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (V, d)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (d,)
        out[p + "post_attention_layernorm.weight"] = (d,)
        if config.qk_norm:
            out[p + "self_attn.q_norm.weight"] = out[p + "self_attn.k_norm.weight"] = (config.head_dim,)
        for name, shape in linear_shapes(config).items():
            out[f"{p}{module_path(name)}.weight"] = shape
            if has_bias(config, name):
                out[f"{p}{module_path(name)}.bias"] = (shape[0],)
    return out


class LlamaModel:
    """A Llama-family causal LM whose block linears are ``QLoRALinear`` layers."""

    def __init__(self, config: ModelConfig, embed_tokens: Embedding, layers: list[DecoderBlock], norm: RMSNorm,
                 lm_head_weight: np.ndarray, quant: QuantConfig | None = None, lora: LoraConfig | None = None):
        self.config = config
        self.embed_tokens = embed_tokens
        self.layers = layers
        self.norm = norm
        self.lm_head_weight = lm_head_weight  # the embedding table itself when tied
        self.quant = quant
        self.lora = lora
        self.tokenizer = None  # set by load_model when the checkpoint has one
        self._hidden = None

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_weights(cls, config: ModelConfig, weights: Mapping, quant: QuantConfig | None = None,
                     lora: LoraConfig | None = None, gradient_checkpointing: bool = False,
                     progress: bool = False) -> LlamaModel:
        """Build from Hugging Face-named tensors (float arrays, or ``Quantized4bit`` for the block linears).

        Shapes are checked by the loader (``loading.py``), which knows which file each tensor came from.
        ``progress``: a bar over the blocks while ``quant`` quantizes them.
        """
        from ..bars import progress_iter

        f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
        embed = Embedding(f32(weights["model.embed_tokens.weight"]))
        rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        layers = []
        blocks = range(config.num_hidden_layers)
        if progress and quant is not None:
            blocks = progress_iter(blocks, len(blocks), desc="quantizing layers", unit="layer")
        for i in blocks:
            p = f"model.layers.{i}."
            linears = {}
            for name in LINEAR_MODULES:
                path = p + module_path(name)
                bias = f32(weights[path + ".bias"]) if has_bias(config, name) else None
                w = weights[path + ".weight"]
                w = w if not isinstance(w, np.ndarray) else f32(w)
                linears[name] = make_linear(w, bias, name=name, quant=quant, lora=lora, seed=lora_seed(lora, i, name))
            qk_norms = None
            if config.qk_norm:
                qk_norms = tuple(RMSNorm(f32(weights[f"{p}self_attn.{n}.weight"]), config.rms_norm_eps)
                                 for n in ("q_norm", "k_norm"))
            attn = Attention(linears["q_proj"], linears["k_proj"], linears["v_proj"], linears["o_proj"],
                             config.num_attention_heads, config.num_key_value_heads, config.head_dim, rope,
                             layer_idx=i, sliding_window=config.sliding_window, qk_norms=qk_norms)
            mlp = SwiGLU(linears["gate_proj"], linears["up_proj"], linears["down_proj"])
            layers.append(DecoderBlock(RMSNorm(f32(weights[p + "input_layernorm.weight"]), config.rms_norm_eps), attn,
                                       RMSNorm(f32(weights[p + "post_attention_layernorm.weight"]),
                                               config.rms_norm_eps),
                                       mlp, gradient_checkpointing))
        norm = RMSNorm(f32(weights["model.norm.weight"]), config.rms_norm_eps)
        lm_head = embed.weight if config.tie_word_embeddings else f32(weights["lm_head.weight"])
        return cls(config, embed, layers, norm, lm_head, quant, lora)

    # ----------------------------------------------------------------- forward / backward
    def hidden_states(self, input_ids: np.ndarray, kv_cache: KVCache | None = None,
                      position_ids: np.ndarray | None = None) -> np.ndarray:
        """The final norm's output (batch, seq, hidden), what the LM head reads; without a KV cache it is kept for
        ``backward_hidden`` (a chunked loss computes the LM head itself: ``qlora_ref.loss.chunked_lm_head_loss``).
        ``position_ids`` (batch, seq): packed rows, positions restarting with every example (``Attention``)."""
        input_ids = np.asarray(input_ids)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {input_ids.shape}")
        if position_ids is not None:
            position_ids = np.asarray(position_ids).reshape(input_ids.shape) if np.ndim(position_ids) == 1 \
                else np.asarray(position_ids)
            if position_ids.shape != input_ids.shape:
                raise ValueError(f"position_ids must have input_ids' shape {input_ids.shape}, got {position_ids.shape}")
        h = self.embed_tokens.forward(input_ids)
        for layer in self.layers:
            h = layer.forward(h, kv_cache, position_ids)
        h = self.norm.forward(h)
        self._hidden = None if kv_cache is not None else h
        return h

    def forward(self, input_ids: np.ndarray, kv_cache: KVCache | None = None, last_only: bool = False,
                position_ids: np.ndarray | None = None) -> np.ndarray:
        """Logits, float32 (batch, seq, vocab) — or (batch, 1, vocab) with ``last_only`` (generation)."""
        h = self.hidden_states(input_ids, kv_cache, position_ids)
        if last_only:
            h = h[:, -1:]
            self._hidden = None if kv_cache is not None else h
        return np.matmul(h, self.lm_head_weight.T)

    __call__ = forward

    def backward(self, grad_logits: np.ndarray) -> None:
        """Backpropagate d loss / d logits through the model; fills the LoRA gradients of every linear layer."""
        if self._hidden is None:
            raise RuntimeError("backward() needs a forward() without a KV cache first")
        grad_logits = np.asarray(grad_logits, dtype=np.float32)
        if grad_logits.shape[:-1] != self._hidden.shape[:-1] or grad_logits.shape[-1] != self.config.vocab_size:
            expected = (*self._hidden.shape[:-1], self.config.vocab_size)
            raise ValueError(f"grad_logits must have the logits' shape {expected}, got {grad_logits.shape}")
        self.backward_hidden(np.matmul(grad_logits, self.lm_head_weight))  # logits = h W^T  =>  dh = dlogits W

    def backward_hidden(self, grad_hidden: np.ndarray) -> None:
        """Backpropagate d loss / d hidden (the gradient of ``hidden_states``' output) through the model."""
        if self._hidden is None:
            raise RuntimeError("backward_hidden() needs a hidden_states() or forward() without a KV cache first")
        grad = np.asarray(grad_hidden, dtype=np.float32)
        if grad.shape != self._hidden.shape:
            raise ValueError(f"grad_hidden must have the hidden states' shape {self._hidden.shape}, got {grad.shape}")
        grad = self.norm.backward(grad)
        for layer in reversed(self.layers):
            grad = layer.backward(grad)
        self._hidden = None

    # ----------------------------------------------------------------- adapters
    def named_linears(self) -> dict:
        """Every block linear by its Hugging Face module name (``model.layers.0.self_attn.q_proj``)."""
        return {f"model.layers.{i}.{n}": m for i, layer in enumerate(self.layers) for n, m in layer.linears().items()}

    def lora_parameters(self) -> dict[str, np.ndarray]:
        """The trainable LoRA arrays (the live arrays, so an optimizer may update them in place), PEFT-named."""
        return {f"{name}.{k}.weight": v for name, m in self.named_linears().items()
                for k, v in m.parameters().items()}

    def lora_grads(self) -> dict[str, np.ndarray]:
        """The gradients accumulated by ``backward`` since the last ``zero_grad``, named like ``lora_parameters``
        (None for a parameter that has received no gradient yet)."""
        out = {}
        for name, m in self.named_linears().items():
            for k in m.parameters():
                g = m.grads.get(k)
                out[f"{name}.{k}.weight"] = g
        return out

    def save_adapter(self, folder, base_model_name_or_path: str | None = None):
        """Write the adapters in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``)."""
        from ..adapters import save_adapter

        return save_adapter(self, folder, base_model_name_or_path)

    def load_adapter(self, folder) -> dict:
        """Load a PEFT adapter folder (ours or PEFT's) into this model's adapters; returns its config. A model built
        without LoRA first receives the adapters its ``adapter_config.json`` describes, as transformers'
        ``load_adapter`` adds them (``qlora_ref.adapters.load_adapter``)."""
        from ..adapters import load_adapter

        return load_adapter(self, folder)

    def load_lora_parameters(self, params: Mapping[str, np.ndarray]) -> None:
        """Copy adapter weights in (PEFT names, with or without the ``base_model.model.`` prefix)."""
        own = self.lora_parameters()
        for key, value in params.items():
            name = key.removeprefix("base_model.model.")
            if name not in own:
                raise KeyError(f"no LoRA parameter named {key!r} in this model")
            if own[name].shape != np.shape(value):
                raise ValueError(f"{key}: shape {np.shape(value)} does not match the model's {own[name].shape}")
            own[name][...] = value

    def zero_grad(self) -> None:
        """Reset the LoRA gradients (``backward`` accumulates into them, like torch's ``.grad``)."""
        for m in self.named_linears().values():
            m.zero_grad()

    def train(self, mode: bool = True) -> LlamaModel:
        """Training mode (LoRA dropout active); ``train(False)`` is ``eval()``, as in torch."""
        for m in self.named_linears().values():
            m.train(mode)
        return self

    def eval(self) -> LlamaModel:
        for m in self.named_linears().values():
            m.eval()
        return self

    @property
    def gradient_checkpointing(self) -> bool:
        return all(layer.gradient_checkpointing for layer in self.layers)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        for layer in self.layers:
            layer.gradient_checkpointing = bool(value)
            layer.clear_cache()

    def clear_cache(self) -> None:
        """Drop every activation kept for backward."""
        self._hidden = None
        self.embed_tokens.clear_cache()
        self.norm.clear_cache()
        for layer in self.layers:
            layer.clear_cache()

    # ----------------------------------------------------------------- generation
    def generate(self, input_ids, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 eos_token_id=None, seed: int | None = None, stream=None) -> list[int]:
        """Continue ``input_ids`` (a list of ids); returns the prompt's ids followed by the new ones, as transformers'
        ``generate`` does (``qlora_ref.model.generate``; the same in ``qlora_gpu``).
        Runs in evaluation mode (no LoRA dropout); the layers' modes are restored afterwards."""
        from .generate import generate

        modes = [m.training for m in self.named_linears().values()]
        self.eval()
        try:
            return generate(self, input_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            eos_token_id=eos_token_id, seed=seed, stream=stream)
        finally:
            for m, mode in zip(self.named_linears().values(), modes, strict=True):
                m.train(mode)
            self.clear_cache()

    def new_kv_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers)
