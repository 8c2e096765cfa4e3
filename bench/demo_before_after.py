"""``qlora demo`` end to end from two checkouts of the project — a base commit and this one — run alternately
(base, this, base, this, ...) on the same machine, so that the load of a shared machine falls on both alike.

    git worktree add --detach ../qlora-base 708c012          # the commit to compare with
    python bench/demo_before_after.py --base ../qlora-base --rounds 2 --json demo_before_after.json

Each run is ``python -m qlora_ref.cli demo --output-dir <tmp>`` in a child process whose ``PYTHONPATH`` is the
checkout (so its ``qlora_ref`` is imported, whatever is installed), with this environment's packages and thread
settings. One short warm-up run per checkout (``--max-steps 1``, not timed) first fills each checkout's Numba cache,
so that no timed run pays for compilation. Recorded per run: wall time of the whole command, the demo's own
``demo_summary.json`` (perplexity before and after, training seconds, answers). The figure of merit is the
per-round ratio of wall times, base / this (above 1: this checkout is faster); the perplexities must agree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from model_step import cpu_info, load_average, write_json  # noqa: E402  (bench/ is on sys.path as a script)


def commit_of(checkout: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True,
                          check=True).stdout.strip()


def run_demo(checkout: Path, extra: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    with tempfile.TemporaryDirectory(prefix="demo_") as out:
        cmd = [sys.executable, "-m", "qlora_ref.cli", "demo", "--output-dir", out, *extra]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{checkout}: qlora demo failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                             f"{proc.stderr[-4000:]}")
        summary = json.loads((Path(out) / "demo_summary.json").read_text())
    return {"wall_seconds": seconds, "summary": summary}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, type=Path, help="a checkout of the commit to compare with")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    checkouts = {"base": args.base.resolve(), "this": ROOT}
    for path in checkouts.values():
        if not any((path / "qlora_ref" / f).is_file() for f in ("cli.py", "cli/__main__.py")):  # older and newer layout
            raise SystemExit(f"--base: {path} is not a checkout of this project (no qlora_ref/cli)")
    print(f"CPU: {cpu_info()}; load average {load_average()}")
    for name, path in checkouts.items():
        print(f"warm-up (Numba cache) of {name} = {path} at {commit_of(path)[:10]}", flush=True)
        run_demo(path, ["--max-steps", "1"])
    runs = {name: [] for name in checkouts}
    for r in range(args.rounds):
        for name, path in checkouts.items():
            res = run_demo(path, [])
            runs[name].append(res)
            s = res["summary"]
            print(f"round {r + 1}: {name}: {res['wall_seconds']:.0f} s, perplexity {s['perplexity_before']:.4f} -> "
                  f"{s['perplexity_after']:.4f}, training {s['train_seconds']:.0f} s", flush=True)
    ratios = [b["wall_seconds"] / t["wall_seconds"] for b, t in zip(runs["base"], runs["this"], strict=True)]
    train_ratios = [b["summary"]["train_seconds"] / t["summary"]["train_seconds"]
                    for b, t in zip(runs["base"], runs["this"], strict=True)]
    result = {"benchmark": "demo_before_after", "cpu": cpu_info(), "load_average": load_average(),
              "command": " ".join(["python", "bench/" + Path(sys.argv[0]).name, *sys.argv[1:]]),
              "commits": {n: commit_of(p) for n, p in checkouts.items()}, "runs": runs,
              "speedup_wall": {"median": statistics.median(ratios), "all": ratios},
              "speedup_train": {"median": statistics.median(train_ratios), "all": train_ratios},
              "threads_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                         "NUMBA_NUM_THREADS") if k in os.environ}}
    print(f"end to end: base / this = {result['speedup_wall']['median']:.2f}x per round "
          f"({', '.join(f'{x:.2f}' for x in ratios)}); training alone {result['speedup_train']['median']:.2f}x")
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
