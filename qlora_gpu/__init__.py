"""qlora_gpu — the qlora interface on PyTorch + bitsandbytes, for real training on a GPU (and tests on CPU).
Everything that is not a tensor kernel (configs, checks, formats) comes from ``qlora_ref``."""

from qlora_ref.codebooks import dynamic_map, normal_float_codebook

from .graphs import GraphedStep
from .lora import KERNELS, QLoRALinear, set_kernel
from .model import QLoRAModel
from .prepare import init_weight, llama_config, load, model_config, prepare_model
from .quantize import (
    Quantized4bit,
    Quantized8bit,
    dequantize_4bit,
    dequantize_blockwise_8bit,
    quantize_4bit,
    quantize_blockwise_8bit,
)


def codebook(name: str):
    """The 4-bit data type's 16 values as a float32 torch tensor (see ``qlora_ref.codebook``)."""
    import torch

    from qlora_ref.codebooks import codebook as _codebook

    return torch.from_numpy(_codebook(name).copy())


__all__ = [
    "GraphedStep",
    "KERNELS",
    "QLoRALinear",
    "QLoRAModel",
    "Quantized4bit",
    "Quantized8bit",
    "codebook",
    "dequantize_4bit",
    "dequantize_blockwise_8bit",
    "dynamic_map",
    "init_weight",
    "llama_config",
    "load",
    "model_config",
    "normal_float_codebook",
    "prepare_model",
    "quantize_4bit",
    "quantize_blockwise_8bit",
    "set_kernel",
]
