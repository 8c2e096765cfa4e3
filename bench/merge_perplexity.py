"""What merging keeps, measured on a whole model: the held-out perplexity of a ``qlora demo`` adapter on its 4-bit
base (what was trained) against ``qlora merge``'s 16-bit folders — merged into the weights the adapter was trained
against (the default), merged into the original weights (``--quant-type none``, what peft's ``merge_and_unload`` on
a 16-bit base gives), and the default merge quantized again to 4 bits (what loading the merged folder with a
4-bit config does).

    qlora demo --output-dir qlora-demo && python bench/merge_perplexity.py --adapter qlora-demo [--json F]
    python bench/merge_perplexity.py --render F    # the table of a result file

Each figure is ``qlora evaluate --split held-out`` (``evaluate_model``) with the adapter's recipe: the demo's held-out
pairs and batches, the training's own evaluation. Every model runs on the reference.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the project's packages and bench.stamp
    sys.path.insert(0, str(ROOT))

from bench.stamp import stamp  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", type=Path, help="a qlora demo (or finetune) output folder")
    parser.add_argument("--json", type=Path, default=None, help="also write the result (stamped) here")
    parser.add_argument("--render", type=Path, default=None, help="only print the table of a result file")
    args = parser.parse_args(argv)
    if args.render:
        return render(args.render)
    if args.adapter is None:
        parser.error("--adapter is required (or --render FILE)")

    from qlora_ref.demo import demo_model
    from qlora_ref.export import describe_quant, merge_adapter
    from qlora_ref.train.api import evaluate_model
    from qlora_ref.train.config import adapter_recipe

    recipe = adapter_recipe(args.adapter)
    if recipe is None:
        parser.error(f"{args.adapter}: no train_config.json (a qlora demo or finetune output folder is needed)")
    quant, base, data = recipe.quant_config(), demo_model(), "chatterbot:english"
    as_stored = recipe.replace(quant_type="none")  # the weights as the folder holds them

    def perplexity(model, config, adapter=None) -> tuple[float, int]:
        # qlora evaluate --split held-out: the demo's held-out pairs, its batches, the training's own evaluation
        r = evaluate_model(model, data, config, adapter=adapter, split="held-out")
        return r["eval_perplexity"], r["examples"]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(("the original weights, no adapter", *perplexity(base, as_stored)))
        rows.append((f"the {quant.quant_type} base, no adapter", *perplexity(base, recipe)))
        rows.append((f"the adapter on the {quant.quant_type} base ({describe_quant(quant)}): what was trained",
                     *perplexity(base, recipe, args.adapter)))
        for name, q in (("trained", "trained"), ("original", None)):
            merge_adapter(args.adapter, Path(tmp) / name, base, quant=q)
        rows.append(("qlora merge (default), bfloat16, loaded as is", *perplexity(Path(tmp) / "trained", as_stored)))
        rows.append(("qlora merge --quant-type none (into the original weights), bfloat16",
                     *perplexity(Path(tmp) / "original", as_stored)))
        rows.append((f"qlora merge (default), quantized again to {quant.quant_type}",
                     *perplexity(Path(tmp) / "trained", recipe)))

    n_eval = rows[0][2]
    result = {"benchmark": "merge_perplexity", "stamp": stamp(),
              "command": "merge_perplexity.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "base": base.name, "adapter_steps": recipe.max_steps, "eval_pairs": n_eval,
              "rows": [{"model": n, "perplexity": p} for n, p, _ in rows]}
    print(markdown(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def markdown(res: dict) -> str:
    """The result as docs/training.md shows it."""
    code, host = res["stamp"].get("code", {}), res["stamp"].get("host", {})
    lines = [f"    python bench/{res['command']}", "",
             f"{res['base']} with a `qlora demo` adapter ({res['adapter_steps']} steps); held-out perplexity on "
             f"the demo's first {res['eval_pairs']} held-out chatterbot pairs. Commit "
             f"{str(code.get('commit'))[:10]} ({'uncommitted changes' if code.get('dirty') else 'clean'}), "
             f"{res['stamp'].get('time_utc')}; {host.get('cpu', '?')}.", "",
             "| model | held-out perplexity |", "|---|---:|"]
    lines += [f"| {r['model']} | {r['perplexity']:.3f} |" for r in res["rows"]]
    return "\n".join(lines)


def render(path: Path) -> None:
    print(markdown(json.loads(path.read_text())))

if __name__ == "__main__":
    main()
