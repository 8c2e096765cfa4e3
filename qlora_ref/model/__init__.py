"""The reference decoder transformer (Llama, Mistral, Qwen2, SmolLM2) with QLoRA linear layers.

Each layer is a short module with a forward pass and a hand-written backward pass; ``load_model`` reads Hugging
Face folders, GGUF files and bitsandbytes 4-bit checkpoints.
"""

from .attention import Attention, KVCache
from .block import DecoderBlock
from .config import LINEAR_MODULES, ConfigError, LoraConfig, ModelConfig, QuantConfig
from .embedding import Embedding
from .generate import generate
from .llama import LlamaModel
from .loading import CheckpointError, find_smollm2_gguf, load_model
from .mlp import SwiGLU
from .rmsnorm import RMSNorm
from .rope import RotaryEmbedding
from .tokenizer import Tokenizer

__all__ = [
    "LINEAR_MODULES", "Attention", "CheckpointError", "ConfigError", "DecoderBlock", "Embedding", "KVCache",
    "LlamaModel", "LoraConfig", "ModelConfig", "QuantConfig", "RMSNorm", "RotaryEmbedding", "SwiGLU", "Tokenizer",
    "find_smollm2_gguf", "generate", "load_model",
]
