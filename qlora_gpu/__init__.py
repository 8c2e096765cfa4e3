"""qlora_gpu — the qlora interface on PyTorch + bitsandbytes, for real training on a GPU (and tests on CPU).
Everything that is not a tensor kernel (configs, checks, formats) comes from ``qlora_ref``; the configurations,
adapter files and the training entry point are re-exported here, so that a user of this backend imports one
package. ``tests/test_interface_parity.py`` holds the two packages' interfaces equal, up to the differences it
lists.

bitsandbytes is imported first (no ``qlora_ref`` module imports it), through ``bnb_import``: without the Hugging
Face Hub kernel it would otherwise fetch while being imported (qlora downloads nothing at run time)."""

from qlora_ref.adapters import load_adapter, save_adapter
from qlora_ref.codebooks import dynamic_map, normal_float_codebook
from qlora_ref.model.config import LoraConfig, ModelConfig, QuantConfig
from qlora_ref.train.config import TrainConfig

from . import bnb_import  # noqa: F401  (imports bitsandbytes: before any module that uses it)
from .fast import GraphedStep, check_capturable
from .lora import KERNELS, QLoRALinear, set_kernel
from .model import QLoRAModel, merge_adapter
from .optim import make_optimizer
from .prepare import init_weight, llama_config, load, load_model, model_config, prepare_model
from .quantize import (
    Quantized4bit,
    Quantized8bit,
    dequantize_4bit,
    dequantize_blockwise_8bit,
    quantize_4bit,
    quantize_blockwise_8bit,
)
from .train import evaluate_model, finetune, optimizer_step


def codebook(name: str):
    """The 4-bit data type's 16 values as a float32 torch tensor (see ``qlora_ref.codebook``)."""
    import torch

    from qlora_ref.codebooks import codebook as _codebook

    return torch.from_numpy(_codebook(name).copy())


__all__ = [
    "KERNELS",
    "GraphedStep",
    "LoraConfig",
    "ModelConfig",
    "QLoRALinear",
    "QLoRAModel",
    "QuantConfig",
    "Quantized4bit",
    "Quantized8bit",
    "TrainConfig",
    "check_capturable",
    "codebook",
    "dequantize_4bit",
    "dequantize_blockwise_8bit",
    "dynamic_map",
    "evaluate_model",
    "finetune",
    "merge_adapter",
    "init_weight",
    "llama_config",
    "load",
    "load_adapter",
    "load_model",
    "make_optimizer",
    "model_config",
    "normal_float_codebook",
    "optimizer_step",
    "prepare_model",
    "quantize_4bit",
    "quantize_blockwise_8bit",
    "save_adapter",
    "set_kernel",
]
