"""Markdown for docs/benchmarks.md from the JSON that ``bench/model_step.py``, ``bench/demo_before_after.py`` and
``bench/packing_throughput.py`` write, so that the figures in the docs are the measured ones, not retyped.

    python bench/model_step_report.py RESULT.json [MORE.json ...] --title "..." [--update docs/benchmarks.md]

Prints the section; with ``--update`` it replaces the text between ``<!-- generated: <slug> begin -->`` and
``<!-- generated: <slug> end -->`` in that file (``--slug``, default from the title), or, when the markers are not
there yet, adds the marked section at the end of the section headed ``--under`` (the model step's). The write is
atomic (a temporary file, then rename).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from intervals import median_interval  # noqa: E402

FEATURES = ("avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def _versions(stamp: dict) -> str:
    v = stamp.get("versions", {})
    return ", ".join(f"{k} {v[k]}" for k in ("python", "numpy", "numba", "torch", "transformers", "peft",
                                              "bitsandbytes") if k in v)


def _machine(res: dict) -> str:
    cpu = res["cpu"]
    flags = cpu.get("flags", {})
    have = [f for f in FEATURES if flags.get(f)]
    lacks = [f for f in FEATURES if f in flags and not flags[f]]
    text = f"{cpu['model']}, {cpu['cpus']} logical CPUs; features: {', '.join(have) or 'none of ' + str(FEATURES)}"
    return text + (f" (not: {', '.join(lacks)})" if lacks else "")


def _threads(res: dict) -> str:
    t = res.get("threads", {})
    env = t.get("env") or res.get("threads_env") or {}
    env_text = " ".join(f"{k}={v}" for k, v in sorted(env.items()))
    if "numba" in t:
        return f"threads: NumPy/BLAS {env.get('OPENBLAS_NUM_THREADS', 'default')}, Numba {t['numba']}, torch " \
               f"{t['torch']}" + (f" (`{env_text}`)" if env_text else "")
    return f"thread settings: `{env_text}`" if env_text else "default thread settings"


def _stamp(res: dict) -> str:
    s = res["stamp"]
    code = s.get("code", s)  # bench/stamp.py's stamp; results of before it kept commit and dirty at the top
    dirty = {True: "uncommitted changes", False: "clean", None: "unknown"}[code.get("dirty")]
    if code.get("dirty") and "diff_sha256" in code and code["diff_sha256"] is None:
        dirty = "no diff; untracked files, such as the run's own earlier results"
    return f"commit {str(code.get('commit'))[:10]} ({dirty}), {s.get('time_utc', s.get('date'))}; {_versions(s)}"


def _processes(res: dict) -> str:
    if res.get("isolated"):
        return "each implementation in a process of its own"
    return "every implementation in one process" + (" (`--same-process`)" if "isolated" in res else "")


def _goal(res: dict, key: str, g: dict, name: str) -> str:
    """A goal's value and verdict. The tokens/s goal is judged on the per-round ratios' median interval
    (``intervals.median_interval``): met only when the interval clears the line, not met when it lies below,
    "at the line" when it holds the goal (a median a hair above the line is not a goal met)."""
    seconds = res.get("seconds", {})
    if key != "tokens_per_s_vs_peft_float32" or not {"peft float32", "qlora_ref"} <= set(seconds):
        return f"{name} {g['value']:.2f} (goal ≥ {g['goal']}: {'met' if g['met'] else 'not met'})"
    ratios = [p / r for p, r in zip(seconds["peft float32"], seconds["qlora_ref"], strict=True)]
    iv = median_interval(ratios)
    if iv["low"] is None:
        return f"{name} {iv['median']:.2f} over {iv['n']} rounds (goal ≥ {g['goal']}: too few rounds to judge)"
    verdict = ("met" if iv["low"] >= g["goal"] else "not met" if iv["high"] < g["goal"]
               else "at the line, not clear of it")
    at_least = sum(r >= g["goal"] for r in ratios)
    return (f"{name} {iv['median']:.3f}, interval {iv['low']:.3f}–{iv['high']:.3f} ({iv['coverage']:.1%}, "
            f"{iv['n']} rounds, {at_least} of them ≥ {g['goal']}; goal ≥ {g['goal']}: {verdict})")


def model_step_markdown(res: dict) -> str:
    seq = res["seq"]
    shares = res.get("fraction_of_sgemm")  # every implementation's, since 2026-12-06
    env = res.get("threads", {}).get("env") or {}
    prefix = " ".join(f"{k}={v}" for k, v in sorted(env.items()))
    cmd = f"{prefix} python bench/{res['command']}" if prefix else f"python bench/{res['command']}"
    lines = [f"    {cmd.strip()}", "",
             f"{_machine(res)}; {_threads(res)}; load average {res['load_average'][0]} before, "
             f"{res['load_average'][1]} after (1, 5, 15 min). {_stamp(res)}. Gradient checkpointing "
             f"{'on' if res['checkpointing'] else 'off'}; {res['repeats']} rounds; {res['flops_per_step'] / 1e9:.1f} "
             f"GFLOP per step of {seq} tokens; {_processes(res)}.", "",
             "| implementation | s/step, median (min–max) | tokens/s | qlora_ref speed / this, per round | "
             + ("FLOP/s ÷ sgemm's, per round | " if shares else "") + "CPU s/step | CPU time / qlora_ref's |",
             "|---|---:|---:|---:|---:|---:|" + ("---:|" if shares else "")]
    for name, ts in res["seconds"].items():
        r = res["ref_speed_ratio"][name]
        c = res["ref_cpu_ratio"][name]
        cpu = statistics.median(res["cpu_seconds"][name])
        bold = "**" if name == "qlora_ref" else ""
        share = f" {shares[name]['median']:.1%} ({shares[name]['min']:.1%}–{shares[name]['max']:.1%}) |" if shares \
            else ""
        lines.append(f"| {bold}{name}{bold} | {statistics.median(ts):.2f} ({min(ts):.2f}–{max(ts):.2f}) | "
                     f"{res['tokens_per_s'][name]['median']:.1f} | {r['median']:.2f}× ({r['min']:.2f}–{r['max']:.2f})"
                     f" |{share} {cpu:.2f} | {c['median']:.2f}× |")
    s, f = res["sgemm_flops"], res["ref_fraction_of_sgemm"]
    achieved = res["flops_per_step"] / statistics.median(res["seconds"]["qlora_ref"])
    lines += ["", f"NumPy sgemm (2048³) in the same rounds: {s['median'] / 1e9:.0f} GFLOP/s ({s['min'] / 1e9:.0f}–"
                  f"{s['max'] / 1e9:.0f}); qlora_ref achieved {achieved / 1e9:.1f} GFLOP/s, {f['median']:.1%} of the "
                  f"round's sgemm ({f['min']:.1%}–{f['max']:.1%})."]
    if "products_seconds" in res:
        pf, over = res["products_fraction_of_sgemm"], res["ref_over_products"]
        lines.append(f"The step's products alone (each shape a NumPy float32 matmul, in the same rounds): "
                     f"{statistics.median(res['products_seconds']):.2f} s, {pf['median']:.1%} of sgemm "
                     f"({pf['min']:.1%}–{pf['max']:.1%}); qlora_ref's step takes {over['median']:.2f}× that "
                     f"({over['min']:.2f}–{over['max']:.2f}).")
    goals = res.get("goals", {})
    names = {"tokens_per_s_vs_peft_float32": "qlora_ref tokens/s ÷ peft float32's",
             "fraction_of_sgemm": "qlora_ref FLOP/s ÷ sgemm's"}
    if goals:
        lines.append("Goals of issue 34: " + "; ".join(_goal(res, k, g, names.get(k, k)) for k, g in goals.items())
                     + ".")
    if "ref_peak_traced_bytes" in res:
        p = res["ref_peak_traced_bytes"]
        lines.append(f"qlora_ref's peak traced memory of a step (tracemalloc, weights excluded): "
                     f"{p['off'] / 2**20:.1f} MiB without gradient checkpointing, {p['on'] / 2**20:.1f} MiB with.")
    return "\n".join(lines)


def demo_markdown(res: dict) -> str:
    c = res["commits"]
    lines = [f"    {res.get('command', 'python bench/demo_before_after.py --base <checkout of the base commit>')}", "",
             f"{_machine(res)}; {_threads(res)}; load average {res['load_average']} at the end. {_stamp(res)}. "
             f"Base commit {c['base'][:10]}, this commit {c['this'][:10]}.", "",
             "| round | checkout | wall time s | training s | perplexity before | after | answer after |",
             "|---:|---|---:|---:|---:|---:|---|"]
    for i in range(len(res["runs"]["base"])):
        for name in ("base", "this"):
            run = res["runs"][name][i]
            s = run["summary"]
            lines.append(f"| {i + 1} | {name} | {run['wall_seconds']:.0f} | {s['train_seconds']:.0f} | "
                         f"{s['perplexity_before']:.4f} | {s['perplexity_after']:.4f} | {s['answer_after']!r} |")
    w, t = res["speedup_wall"], res["speedup_train"]
    lines += ["", f"End to end, base time / this time: {w['median']:.2f}× (per round: "
                  f"{', '.join(f'{x:.2f}' for x in w['all'])}); the training steps alone {t['median']:.2f}×."]
    return "\n".join(lines)


def section(results: list[dict], title: str) -> str:
    parts = [f"### {title}", ""]
    for res in results:
        kind = res.get("benchmark")
        if kind == "model_step":
            parts.append(model_step_markdown(res))
        elif kind == "demo_before_after":
            parts.append(demo_markdown(res))
        elif kind == "packing_throughput":
            import packing_throughput  # bench/ is on sys.path when this runs as a script

            parts.append(packing_throughput.markdown(res))
        else:
            raise SystemExit(f"unknown benchmark kind {kind!r} (expected model_step, demo_before_after or "
                             "packing_throughput)")
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def update(path: Path, slug: str, text: str, under: str | None = None) -> None:
    begin, end = f"<!-- generated: {slug} begin -->", f"<!-- generated: {slug} end -->"
    old = path.read_text()
    block = f"{begin}\n{text}{end}\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(old):
        new = pattern.sub(lambda _: block, old, count=1)
    elif under is not None and f"\n{under}\n" in f"\n{old}":
        start = f"\n{old}".index(f"\n{under}\n") + len(under)
        nxt = old.find("\n## ", start)  # the end of that section: the next second-level heading
        at = len(old) if nxt < 0 else nxt + 1
        new = old[:at].rstrip("\n") + "\n\n" + block + ("\n" + old[at:] if at < len(old) else "")
    else:
        new = old.rstrip("\n") + "\n\n" + block
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new)
    tmp.replace(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--title", required=True)
    parser.add_argument("--update", type=Path, default=None, help="the markdown file whose marked section to replace")
    parser.add_argument("--slug", default=None, help="the marker's name [default: from the title]")
    parser.add_argument("--under", default="## Model step (bench/model_step.py)",
                        help="a new section goes at the end of the section with this heading (else: end of file)")
    args = parser.parse_args(argv)
    results = [json.loads(p.read_text()) for p in args.results]
    text = section(results, args.title)
    print(text)
    if args.update:
        slug = args.slug or re.sub(r"[^a-z0-9]+", "-", args.title.lower()).strip("-")
        update(args.update, slug, text, args.under)
        print(f"updated {args.update} (section {slug})")


if __name__ == "__main__":
    main()
