"""Building the seven linear layers of a block as ``QLoRALinear`` (the paper puts adapters on all of them)."""

from __future__ import annotations

import numpy as np

from .config import LoraConfig, QuantConfig


def make_linear(weight, bias: np.ndarray | None, *, name: str, quant: QuantConfig | None,
                lora: LoraConfig | None, seed: int = 0):
    """A ``QLoRALinear`` for one projection.

    weight: a float (out, in) array, quantized here according to ``quant`` (None keeps it float32, the exact
    mode), or a ``Quantized4bit`` read from a bitsandbytes checkpoint, used as stored. ``name`` is the module's
    short name (``q_proj`` ...): it carries an adapter if ``lora`` targets it.
    """
    from ..lora import QLoRALinear
    from ..quantize import Quantized4bit

    adapted = lora is not None and lora.r > 0 and name in lora.target_modules
    r = lora.r if adapted else None  # None: a frozen layer without adapter
    alpha = lora.alpha if adapted else 1.0
    dropout = lora.dropout if adapted else 0.0
    if isinstance(weight, Quantized4bit):
        compute_dtype = quant.compute_dtype if quant is not None else "float32"
        return QLoRALinear.from_quantized(weight, r, alpha, dropout=dropout, bias=bias,
                                          compute_dtype=compute_dtype, seed=seed)
    if quant is None:
        return QLoRALinear.from_weight(weight, r, alpha, dropout=dropout, quant_type=None, bias=bias,
                                       compute_dtype="float32", seed=seed)
    return QLoRALinear.from_weight(weight, r, alpha, dropout=dropout, quant_type=quant.quant_type,
                                   blocksize=quant.blocksize, double_quant=quant.double_quant, bias=bias,
                                   compute_dtype=quant.compute_dtype, seed=seed)
