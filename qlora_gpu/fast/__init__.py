"""``qlora_gpu.fast``: the same training step as the plain core (``qlora_gpu.lora``, ``qlora_gpu.model``,
``qlora_gpu.optim``) in fewer kernel launches and less host time. At batch 1 a QLoRA step on a large GPU waits on
the host, which pays per operator launched whatever its size (docs/benchmarks.md); everything here exists only to
cut that, and computes the same values (tests/test_fast_switch.py: losses and LoRA gradients of the two paths bit
for bit over several optimizer steps, dropout, gradient accumulation and checkpointing included).

- ``layer``: a ``QLoRALinear``'s forward call using what its block staged (``FastQLoRAFunction``), and the fused
  Triton path (``TritonQLoRAFunction``, ``kernel="triton"``; kernels in ``triton_kernels``);
- ``staging``: per decoder block, the adapters cast and the double-quantized scales decoded once
  (``block_scales``), one dropout of an input shared by several layers, the last linear's unused output skipped
  in the recomputation;
- ``deferred_grads``: the adapters' gradients widened and accumulated in one operation per backward pass;
- ``graphs``: a training step captured into a CUDA graph and replayed (``GraphedStep``).

The one switch: ``enable(model)`` (and ``disable``). ``prepare_model(fast=...)`` and ``TrainConfig.fast`` call
it; their default (None, ``qlora_gpu.model.fast_by_default``) is on for a model on CUDA — what docs/benchmarks.md
measured faster — and off on the CPU.
The core imports this package only there and in ``QLoRALinear``'s choice of its forward path
(``qlora_gpu.lora.fast_forward``); this package imports the core.
"""

from __future__ import annotations

from torch import nn

from ..lora import QLoRALinear
from . import staging
from .graphs import GraphedStep, check_capturable


def enable(model: nn.Module) -> nn.Module:
    """Switch ``model`` (a ``QLoRAModel``, or any module holding ``QLoRALinear`` layers) to the fast path: every
    ``QLoRALinear`` computes through ``qlora_gpu.fast.layer``, and every decoder block of a ``QLoRAModel`` stages
    its adapters and scales at once (``staging``). The same values; returns ``model``."""
    return _switch(model, True)


def disable(model: nn.Module) -> nn.Module:
    """Back to the plain core: undoes ``enable``; returns ``model``."""
    return _switch(model, False)


def _switch(model: nn.Module, on: bool) -> nn.Module:
    for m in model.modules():
        if isinstance(m, QLoRALinear):
            m.fast = on
    for layer in _decoder_layers(model):
        (staging.install if on else staging.uninstall)(layer)
    return model


def is_enabled(model: nn.Module) -> bool:
    """Whether every ``QLoRALinear`` of ``model`` is on the fast path (and there is at least one)."""
    layers = [m for m in model.modules() if isinstance(m, QLoRALinear)]
    return bool(layers) and all(m.fast for m in layers)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    hf = getattr(model, "hf", None)
    return list(hf.model.layers) if hf is not None else []


__all__ = ["GraphedStep", "check_capturable", "disable", "enable", "is_enabled"]
