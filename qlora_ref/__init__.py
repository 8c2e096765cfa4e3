"""qlora_ref — QLoRA (Dettmers et al. 2023) as a readable NumPy reference: the specification that
``qlora_gpu`` is checked against. Each module implements one piece of the paper:

- ``codebooks`` (NF4 and the other data types, section 3), ``blockwise`` (eq. 1-2), ``quantize`` (double
  quantization and the bitsandbytes storage format);
- ``lora`` (the QLoRA linear layer, eq. 5-6, with its hand-derived backward), ``model`` (a Llama-style decoder with
  manual backprop through every layer);
- ``data``, ``loss``, ``optim`` (AdamW, the simulated paged AdamW), ``train`` (Algorithm 2), ``adapters`` (PEFT files),
  ``export`` (merged 16-bit and bitsandbytes 4-bit folders), ``files`` (atomic writes);
- ``memory`` (the memory calculator) and ``table2`` (the paper's Table 2 on a real model);
- ``cli`` (the ``qlora`` command, on top of everything else; docs/api.md, "Package layout").
"""

from .adapters import load_adapter, save_adapter
from .codebooks import codebook, dynamic_map, normal_float_codebook
from .lora import QLoRALinear
from .model import LlamaModel, LoraConfig, ModelConfig, QuantConfig, load_model
from .optim import AdamW, AdamW8bit, PagedAdamW
from .quantize import (
    Quantized4bit,
    Quantized8bit,
    dequantize_4bit,
    dequantize_blockwise_8bit,
    quantize_4bit,
    quantize_blockwise_8bit,
)
from .train.api import finetune
from .train.config import TrainConfig

__all__ = [
    "AdamW",
    "AdamW8bit",
    "LlamaModel",
    "LoraConfig",
    "ModelConfig",
    "PagedAdamW",
    "QLoRALinear",
    "QuantConfig",
    "Quantized4bit",
    "Quantized8bit",
    "TrainConfig",
    "codebook",
    "dequantize_4bit",
    "dequantize_blockwise_8bit",
    "dynamic_map",
    "finetune",
    "load_adapter",
    "load_model",
    "normal_float_codebook",
    "quantize_4bit",
    "quantize_blockwise_8bit",
    "save_adapter",
]
