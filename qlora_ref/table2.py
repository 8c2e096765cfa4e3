"""The paper's Table 2 on a real model: held-out perplexity with the linear weights stored in each 4-bit data type.

Table 2 (section 4, "4-bit NormalFloat yields better performance than 4-bit Floating Point") reports the Pile Common
Crawl perplexity, averaged over 125M-13B OPT, BLOOM, LLaMA and Pythia models, with their weights in Int4 (34.34), FP4
E2M1 (31.07), FP4 E3M0 (29.48) and NF4 + double quantization (27.41). Here every linear layer of the decoder blocks is
quantized with blocksize 64 and dequantized again (the weights a QLoRA forward pass computes with); embeddings, norms
and the LM head stay as loaded, and the compute stays float32 so that only the storage data type differs between rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .quantize import dequantize_4bit, quantize_4bit

#: (row label, quant_type or None for the unquantized baseline, double quantization)
VARIANTS: tuple[tuple[str, str | None, bool], ...] = (
    ("16-bit baseline", None, False),
    ("Int4", "int4", False),
    ("FP4 (E2M1)", "fp4", False),
    ("FP4 (E3M0)", "fp4_e3m0", False),
    ("NF4", "nf4", False),
    ("NF4 + DQ", "nf4", True),
)

#: the paper's Table 2 (Pile Common Crawl perplexity, mean over 125M-13B OPT, BLOOM, LLaMA and Pythia), for the
#: side-by-side print
PAPER_TABLE2 = {"Int4": 34.34, "FP4 (E2M1)": 31.07, "FP4 (E3M0)": 29.48, "NF4 + DQ": 27.41}


@dataclass
class Table2Row:
    label: str
    perplexity: float
    mean_abs_weight_error: float


def check_window(window, context: int | None = None) -> None:
    """A scoring window: at least 2 tokens and at most the model's context (``max_position_embeddings``)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an integer of at least 2 tokens, got {window!r}")
    if context is not None and window > context:
        raise ValueError(f"window must be at most the model's context of {context} tokens (max_position_embeddings), "
                         f"got {window}")


def perplexity(model, token_ids: np.ndarray, window: int = 256) -> float:
    """exp(mean next-token negative log-likelihood) over ``token_ids`` cut into windows of ``window`` tokens
    (each window is scored on its own, the standard strided evaluation with stride = window)."""
    token_ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if token_ids.size < 2:
        raise ValueError(f"token_ids must hold at least 2 tokens, got {token_ids.size}")
    check_window(window, getattr(getattr(model, "config", None), "max_position_embeddings", None))
    total_nll, count = 0.0, 0
    for start in range(0, token_ids.size - 1, window):
        chunk = token_ids[start : start + window]
        if chunk.size < 2:
            break
        logits = model.forward(chunk[None, :])[0, :-1].astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        total_nll -= log_probs[np.arange(chunk.size - 1), chunk[1:]].sum()
        count += chunk.size - 1
    return math.exp(total_nll / count)


def fake_quantize(weight: np.ndarray, quant_type: str, double_quant: bool, blocksize: int = 64) -> np.ndarray:
    """The float32 weight a 4-bit layer computes with: dequantize(quantize(W)) (eq. 1-2)."""
    return dequantize_4bit(quantize_4bit(weight, quant_type, blocksize, double_quant), "float32")


def table2(build_model, weights: dict[str, np.ndarray], linear_names, token_ids: np.ndarray, window: int = 256,
           variants=VARIANTS, progress=None) -> list[Table2Row]:
    """Perplexity of ``token_ids`` for each storage data type.

    build_model(weights) -> a model with ``forward(input_ids) -> logits``; ``weights`` the float32 checkpoint;
    ``linear_names`` the keys of the block linear weights that are quantized.
    """
    linear_names = list(linear_names)
    missing = [n for n in linear_names if n not in weights]
    if missing:
        raise ValueError(f"linear_names not in weights: {missing[:3]}")
    rows = []
    for label, quant_type, double_quant in variants:
        if progress is not None:
            progress(label)
        variant = dict(weights)
        err_sum, n = 0.0, 0
        if quant_type is not None:
            for name in linear_names:
                variant[name] = fake_quantize(weights[name], quant_type, double_quant)
                err_sum += float(np.abs(variant[name] - weights[name]).sum())
                n += weights[name].size
        ppl = perplexity(build_model(variant), token_ids, window)
        rows.append(Table2Row(label, ppl, err_sum / n if n else 0.0))
    return rows


def format_table(rows: list[Table2Row]) -> str:
    lines = [f"{'data type':18s} {'perplexity':>11s} {'mean |ΔW|':>10s} {'paper (mean PPL)':>19s}"]
    for r in rows:
        paper = PAPER_TABLE2.get(r.label)
        lines.append(f"{r.label:18s} {r.perplexity:11.3f} {r.mean_abs_weight_error:10.5f} "
                     f"{(f'{paper:.2f}' if paper else '-'):>19s}")
    return "\n".join(lines)


def paper_ordering_holds(rows: list[Table2Row]) -> bool:
    """Does Int4 > FP4 (E2M1) > FP4 (E3M0) > NF4 + DQ in perplexity hold, as in the paper's Table 2?"""
    ppl = {r.label: r.perplexity for r in rows}
    return ppl["Int4"] > ppl["FP4 (E2M1)"] > ppl["FP4 (E3M0)"] > ppl["NF4 + DQ"]


def plot(rows: list[Table2Row], path) -> None:
    """A bar chart of the perplexities, the baseline as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .files import save_figure

    base = [r for r in rows if r.label == "16-bit baseline"]
    quant = [r for r in rows if r.label != "16-bit baseline"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([r.label for r in quant], [r.perplexity for r in quant], color="#4c72b0")
    if base:
        ax.axhline(base[0].perplexity, ls="--", color="k", label=f"16-bit baseline ({base[0].perplexity:.2f})")
        ax.legend()
    lo = min(r.perplexity for r in rows)
    ax.set_ylim(lo * 0.95, max(r.perplexity for r in rows) * 1.02)
    ax.set_ylabel("held-out perplexity")
    ax.set_title("Table 2 on SmolLM2-135M: 4-bit data types (blocksize 64)")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
