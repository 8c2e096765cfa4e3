"""qlora_ref — QLoRA (Dettmers et al. 2023) as a readable NumPy reference: the specification that
``qlora_gpu`` is checked against. Each module implements one piece of the paper; start with ``codebooks``
(NF4, section 3), ``blockwise`` (eq. 1-2) and ``quantize`` (double quantization)."""

from .codebooks import codebook, dynamic_map, normal_float_codebook
from .lora import QLoRALinear
from .quantize import (
    Quantized4bit,
    Quantized8bit,
    dequantize_4bit,
    dequantize_blockwise_8bit,
    quantize_4bit,
    quantize_blockwise_8bit,
)

__all__ = [
    "QLoRALinear",
    "Quantized4bit",
    "Quantized8bit",
    "codebook",
    "dequantize_4bit",
    "dequantize_blockwise_8bit",
    "dynamic_map",
    "normal_float_codebook",
    "quantize_4bit",
    "quantize_blockwise_8bit",
]
