"""What merging an adapter into its 4-bit base loses, measured exactly (docs/lora_backprop.md, "Merging").

Merging writes W + s·B A as one weight; stored again in 16 or 4 bits, the merged model is no longer the adapted
model it came from. ``merge_error`` says by how much, for a ``qlora_ref.lora.QLoRALinear``."""

from __future__ import annotations

import numpy as np

from .dtypes import round_to
from .lora import QLoRALinear
from .lora_checks import float_array
from .quantize import Quantized4bit, dequantize_4bit, quantize_4bit


def merge_error(layer: QLoRALinear, x) -> dict[str, float]:
    """How much merging loses, measured exactly (float64) on inputs ``x`` (..., in).

    The adapted layer computes with W + ΔW, W the dequantized base weight and ΔW = s·B A. For each way to merge —
    ``"float32"`` (``merge()``), ``"bfloat16"`` (``merge()`` rounded to bfloat16, how merged models are usually
    saved) and ``"requantized"`` (``merge()`` quantized again with the base weight's settings) — the error of the
    merged weight M relative to the adapter's own contribution::

        ||x Mᵀ − x (W + ΔW)ᵀ|| / ||x ΔWᵀ||      0: the fine-tuning is kept; 1: as if the adapter were dropped

    plus, for the re-quantized weight, ``"retained"`` = ⟨M − W, ΔW⟩ / ||ΔW||² (the share of ΔW that survives) and
    ``"codes_changed"``, the fraction of 4-bit codes that differ from the base weight's.
    """
    if layer.r is None or not isinstance(layer.weight, Quantized4bit):
        raise ValueError("merge_error needs a layer with an adapter and a quantized base weight")
    x = float_array(x, "x").reshape(-1, layer.in_features).astype(np.float64)
    w = dequantize_4bit(layer.weight, "float32").astype(np.float64)
    delta = np.float64(layer.scaling) * (layer.lora_B.astype(np.float64) @ layer.lora_A.astype(np.float64))
    adapted = x @ (w + delta).T
    norm = np.linalg.norm(x @ delta.T)
    merged = layer.merge()
    q = layer.weight
    requantized = quantize_4bit(merged, q.quant_type, q.blocksize, q.double_quant)
    weights = {
        "float32": merged,
        "bfloat16": round_to(merged, "bfloat16"),
        "requantized": dequantize_4bit(requantized, "float32"),
    }
    out = {k: float(np.linalg.norm(x @ m.astype(np.float64).T - adapted) / norm) for k, m in weights.items()}
    out["retained"] = float(np.sum((weights["requantized"] - w) * delta) / np.sum(delta * delta))
    out["codes_changed"] = float(np.mean(requantized.codes() != q.codes()))
    return out


__all__ = ["merge_error"]
