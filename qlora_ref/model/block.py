"""A decoder block (pre-norm residual), with optional gradient checkpointing.

    h   = x + attn(input_layernorm(x))
    out = h + mlp(post_attention_layernorm(h))

Backward follows the two residual branches in reverse: the gradient of ``out`` flows to ``h`` directly and
through the MLP branch, then to ``x`` directly and through the attention branch.

Gradient checkpointing (Chen et al. 2016; the paper uses it to fit 65B on one GPU): in the forward pass a
checkpointed block keeps only its input ``x``, and every layer inside drops what it saved for backward. In the
backward pass the block runs its forward again from ``x`` (restoring the LoRA dropout random state first, so
the same masks are drawn) and then its backward. Memory for activations falls from "all the intermediates of
every block" to "one tensor per block plus the intermediates of one block", at the price of a second forward.
The measurement is in docs/transformer.md.
"""

from __future__ import annotations

import copy

import numpy as np

from .attention import Attention, KVCache
from .mlp import SwiGLU
from .rmsnorm import RMSNorm


def _rng_state(layer):
    """The dropout random state of a LoRA linear layer (None if it has none), to replay it on recompute."""
    rng = getattr(layer, "_dropout_rng", None)
    return None if rng is None else copy.deepcopy(rng.bit_generator.state)


def _set_rng_state(layer, state) -> None:
    if state is not None:
        layer._dropout_rng.bit_generator.state = state


def _clear_cache(layer) -> None:
    clear = getattr(layer, "clear_cache", None)
    if clear is not None:
        clear()


class DecoderBlock:
    """A pre-norm decoder block: attention and SwiGLU on residual branches (docs/transformer.md#decoder-block)."""

    def __init__(self, input_layernorm: RMSNorm, self_attn: Attention, post_attention_layernorm: RMSNorm,
                 mlp: SwiGLU, gradient_checkpointing: bool = False):
        self.input_layernorm = input_layernorm
        self.self_attn = self_attn
        self.post_attention_layernorm = post_attention_layernorm
        self.mlp = mlp
        self.gradient_checkpointing = gradient_checkpointing
        self._checkpoint = None  # (x, rng states, position_ids) of a checkpointed forward

    def linears(self) -> dict:
        """The block's linear layers by their Hugging Face names (``self_attn.q_proj``, ``mlp.up_proj`` ...)."""
        out = {f"self_attn.{n}": m for n, m in self.self_attn.linears().items()}
        out.update({f"mlp.{n}": m for n, m in self.mlp.linears().items()})
        return out

    def _layers(self) -> list:
        return [self.input_layernorm, self.self_attn, self.post_attention_layernorm, self.mlp,
                *self.linears().values()]

    def _forward(self, x: np.ndarray, kv_cache: KVCache | None, position_ids: np.ndarray | None = None) -> np.ndarray:
        h = x + self.self_attn.forward(self.input_layernorm.forward(x), kv_cache, position_ids)
        return h + self.mlp.forward(self.post_attention_layernorm.forward(h))

    def forward(self, x: np.ndarray, kv_cache: KVCache | None = None, position_ids: np.ndarray | None = None
                ) -> np.ndarray:
        """``position_ids``: packed rows (``Attention.forward``)."""
        if not self.gradient_checkpointing or kv_cache is not None:
            self._checkpoint = None
            return self._forward(x, kv_cache, position_ids)
        rng_states = [_rng_state(m) for m in self.linears().values()]
        out = self._forward(x, None, position_ids)
        for layer in self._layers():  # keep only x: everything else is recomputed in backward
            _clear_cache(layer)
        self._checkpoint = (x, rng_states, position_ids)
        return out

    def backward(self, grad: np.ndarray) -> np.ndarray:
        if self._checkpoint is not None:
            x, rng_states, position_ids = self._checkpoint
            for m, state in zip(self.linears().values(), rng_states, strict=True):
                _set_rng_state(m, state)
            self._forward(x, None, position_ids)
            self._checkpoint = None
        grad_h = grad + self.post_attention_layernorm.backward(self.mlp.backward(grad))
        grad_x = grad_h + self.input_layernorm.backward(self.self_attn.backward(grad_h))
        if self.gradient_checkpointing:
            for layer in self._layers():
                _clear_cache(layer)
        return grad_x

    def clear_cache(self) -> None:
        self._checkpoint = None
        for layer in self._layers():
            _clear_cache(layer)
