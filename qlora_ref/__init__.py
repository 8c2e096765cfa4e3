"""qlora_ref — QLoRA (Dettmers et al. 2023) as a readable NumPy reference: the specification that
``qlora_gpu`` is checked against. Each module implements one piece of the paper:

- ``codebooks`` (NF4 and the other data types, section 3), ``blockwise`` (eq. 1-2), ``quantize`` (double
  quantization and the bitsandbytes storage format);
- ``lora`` (the QLoRA linear layer, eq. 5-6, with its hand-derived backward), ``model`` (a Llama-style decoder with
  manual backprop through every layer);
- ``data``, ``loss``, ``optim`` (AdamW, the simulated paged AdamW), ``train`` (the fine-tuning loop),
  ``adapters`` (PEFT files), ``export`` (merged 16-bit and bitsandbytes 4-bit folders), ``files`` (atomic writes);
- ``memory`` (the memory calculator) and ``table2`` (the paper's Table 2 on a real model);
- ``cli`` (the ``qlora`` command, on top of everything else; docs/api.md, "Package layout").

Everything the README and the docs use is importable from here; ``qlora_gpu`` exports the same interface
(``tests/test_interface_parity.py`` lists the intended differences).
"""

from .adapters import load_adapter, save_adapter
from .backends import available_backends, load_backend
from .codebooks import codebook, dynamic_map, normal_float_codebook
from .data import (
    DataReport,
    build_dataset,
    collate_packed,
    iterate_batches,
    iterate_packed_batches,
    load_examples,
    pack_examples,
)
from .export import merge_adapter
from .lora import KERNELS, QLoRALinear, set_kernel
from .memory import estimate_memory, load_model_shape
from .model import LlamaModel, LoraConfig, ModelConfig, QuantConfig, find_smollm2_gguf, load_model
from .optim import AdamW, AdamW8bit, DeviceMemory, PagedAdamW, make_optimizer
from .quantize import (
    Quantized4bit,
    Quantized8bit,
    dequantize_4bit,
    dequantize_blockwise_8bit,
    quantize_4bit,
    quantize_blockwise_8bit,
)
from .train.api import evaluate_model, finetune
from .train.config import TrainConfig

__all__ = [
    "KERNELS",
    "AdamW",
    "AdamW8bit",
    "DataReport",
    "DeviceMemory",
    "LlamaModel",
    "LoraConfig",
    "ModelConfig",
    "PagedAdamW",
    "QLoRALinear",
    "QuantConfig",
    "Quantized4bit",
    "Quantized8bit",
    "TrainConfig",
    "available_backends",
    "build_dataset",
    "codebook",
    "collate_packed",
    "dequantize_4bit",
    "dequantize_blockwise_8bit",
    "dynamic_map",
    "estimate_memory",
    "find_smollm2_gguf",
    "evaluate_model",
    "finetune",
    "iterate_batches",
    "iterate_packed_batches",
    "load_adapter",
    "load_backend",
    "load_examples",
    "load_model",
    "load_model_shape",
    "make_optimizer",
    "merge_adapter",
    "normal_float_codebook",
    "pack_examples",
    "quantize_4bit",
    "quantize_blockwise_8bit",
    "save_adapter",
    "set_kernel",
]
