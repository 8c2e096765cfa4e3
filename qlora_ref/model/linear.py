"""Building the seven linear layers of a block as ``QLoRALinear`` (the paper puts adapters on all of them)."""

from __future__ import annotations

import numpy as np

from .config import LINEAR_MODULES, LoraConfig, QuantConfig


def adapter_args(name: str, lora: LoraConfig | None) -> dict:
    """The adapter keywords (r, alpha, dropout, use_rslora) of ``QLoRALinear`` for projection ``name``, in both
    backends: ``r`` None (a frozen layer without adapter) unless ``lora`` targets it (the paper, section 4:
    adapters on every linear layer of every block)."""
    if lora is None or lora.r == 0 or name not in lora.target_modules:
        return dict(r=None, alpha=1.0, dropout=0.0, use_rslora=False)
    return dict(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, use_rslora=lora.use_rslora)


def lora_seed(lora: LoraConfig | None, layer: int, name: str) -> int:
    """The seed of the adapter of projection ``name`` in block ``layer``: distinct for every linear, so that both
    backends (and every way of building a model) initialise the same adapters."""
    # 1_000_003 is a prime above any layer·7 + index of a real model: (seed, layer, module) never collide
    return (lora.seed if lora else 0) * 1_000_003 + layer * len(LINEAR_MODULES) + LINEAR_MODULES.index(name)


def add_adapters(model, lora: LoraConfig) -> int:
    """Attach fresh adapters, as ``lora`` describes them, to the block linears of a model built without LoRA
    (either backend's: ``named_linears()`` by Hugging Face name, each with ``add_adapter``), seeded as a model
    built with ``lora`` would be; sets ``model.lora``. Returns how many layers received one."""
    linears = model.named_linears()
    if any(m.r is not None for m in linears.values()):
        raise ValueError("the model already carries LoRA adapters: build it without LoRA (lora=None) to attach "
                         "others, or load weights matching its LoraConfig")
    n = 0
    for full_name, m in linears.items():
        parts = full_name.split(".")  # model.layers.{i}.{self_attn|mlp}.{name}
        layer, name = int(parts[2]), parts[-1]
        adapter = adapter_args(name, lora)
        if adapter["r"] is not None:
            m.add_adapter(**adapter, seed=lora_seed(lora, layer, name))
            n += 1
    model.lora = lora
    return n


def make_linear(weight, bias: np.ndarray | None, *, name: str, quant: QuantConfig | None,
                lora: LoraConfig | None, seed: int = 0):
    """A ``QLoRALinear`` for one projection.

    weight: a float (out, in) array, quantized here according to ``quant`` (None keeps it float32, the exact
    mode), or a ``Quantized4bit`` read from a bitsandbytes checkpoint, used as stored. ``name`` is the module's
    short name (``q_proj`` ...): it carries an adapter if ``lora`` targets it.
    """
    from ..lora import QLoRALinear
    from ..quantize import Quantized4bit

    adapter = adapter_args(name, lora)
    if isinstance(weight, Quantized4bit):
        compute_dtype = quant.compute_dtype if quant is not None else "float32"
        return QLoRALinear.from_quantized(weight, **adapter, bias=bias, compute_dtype=compute_dtype, seed=seed)
    if quant is None:
        return QLoRALinear.from_weight(weight, **adapter, quant_type=None, bias=bias, compute_dtype="float32",
                                       seed=seed)
    return QLoRALinear.from_weight(weight, **adapter, quant_type=quant.quant_type, blocksize=quant.blocksize,
                                   double_quant=quant.double_quant, bias=bias, compute_dtype=quant.compute_dtype,
                                   seed=seed)
