"""Every generated section of the docs, rendered again from its result files: the single list of which section
comes from which files, so that no figure in a marked section is retyped (issue 36).

    python bench/render_docs.py            # rewrite every marked section from bench/results/
    python bench/render_docs.py --check    # exit 1, naming the sections, if any differs from its rendering

A section lies between ``<!-- generated: <slug> begin -->`` and ``<!-- generated: <slug> end -->``;
``bench/model_step_report.py`` renders model-step, demo and packing results, ``bench/merge_perplexity.py`` and
``bench/data_prep.py`` their own. A new marked section is added here with its files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
import data_prep  # noqa: E402
import merge_perplexity  # noqa: E402
import model_step_report  # noqa: E402

R = "bench/results"
#: (document, slug, title, result files) of every generated section, in the order they stand
SECTIONS = [
    ("docs/benchmarks.md", "reference-speed-issue-34-2026-12-05-2-cpus",
     "Reference speed (issue 34), 2026-12-05, 2 CPUs",
     [f"{R}/2026-12-05-cpu/model_step.json", f"{R}/2026-12-05-cpu/model_step_1thread.json",
      f"{R}/2026-12-05-cpu/demo_before_after.json"]),
    ("docs/benchmarks.md", "reference-speed-issue-34-2026-12-05-evening-2-cpus",
     "Reference speed (issue 34), 2026-12-05 evening, 2 CPUs",
     [f"{R}/2026-12-05-cpu-evening/model_step.json", f"{R}/2026-12-05-cpu-evening/model_step_1thread.json",
      f"{R}/2026-12-05-cpu-evening/demo_before_after.json"]),
    ("docs/benchmarks.md", "reference-speed-issue-34-2026-12-05-final-2-cpus",
     "Reference speed (issue 34), 2026-12-05 final, 2 CPUs",
     [f"{R}/2026-12-05-cpu-final/model_step.json", f"{R}/2026-12-05-cpu-final/model_step_1thread.json",
      f"{R}/2026-12-05-cpu-night/demo_before_after.json"]),
    ("docs/benchmarks.md", "reference-speed-issue-34-2026-12-05-late-night-2-cpus",
     "Reference speed (issue 34), 2026-12-05 late night, 2 CPUs",
     [f"{R}/2026-12-05-cpu-latenight/model_step_9rounds.json", f"{R}/2026-12-05-cpu-latenight/model_step.json",
      f"{R}/2026-12-05-cpu-latenight/model_step_1thread.json"]),
    ("docs/benchmarks.md", "reference-speed-issue-34-2026-12-06-the-flop-count-corrected-2-cpus",
     "Reference speed (issue 34), 2026-12-06, the FLOP count corrected, 2 CPUs",
     [f"{R}/2026-12-06-cpu/model_step_9rounds.json", f"{R}/2026-12-06-cpu/model_step_1thread.json"]),
    ("docs/benchmarks.md", "packing-2026-12-07",
     "Packing on the demo, 2026-12-07: the copy-free split (809 pairs), reference backend",
     [f"{R}/2026-12-07-cpu/packing_throughput.json"]),
    ("docs/benchmarks.md", "packing-2026-12-06",
     "Packing on the demo, 2026-12-06: rows longer than an example, attention example by example, an epoch's time",
     [f"{R}/2026-12-06-cpu/packing_throughput.json"]),
    ("docs/benchmarks.md", "packing-2026-12-06-gpu-backend",
     "Packing on the demo, 2026-12-06, the qlora_gpu backend on the same CPU",
     [f"{R}/2026-12-06-cpu/packing_throughput_gpu_backend.json"]),
    ("docs/training.md", "merge-perplexity", None, [f"{R}/2026-12-07-cpu/merge_perplexity.json"]),
    ("docs/benchmarks.md", "data-prep-2026-12-07", None, [f"{R}/2026-12-07-cpu/data_prep.json"]),
]


def _block(text: str, slug: str) -> tuple[int, int]:
    begin, end = f"<!-- generated: {slug} begin -->\n", f"<!-- generated: {slug} end -->"
    if begin not in text or end not in text:
        raise ValueError(f"no section {slug!r} between generated markers")
    return text.index(begin) + len(begin), text.index(end)


def rendering(slug: str, title: str | None, files: list[str]) -> str:
    """A section's text as its renderer gives it from the result files (what stands between the markers)."""
    results = [json.loads((ROOT / f).read_text()) for f in files]
    if slug == "merge-perplexity":
        return merge_perplexity.markdown(results[0]) + "\n"
    if slug.startswith("data-prep"):
        return data_prep.markdown(results[0]) + "\n"
    return model_step_report.section(results, title)


def stale(root: Path = ROOT) -> list[str]:
    """The slugs whose text in the docs differs from their rendering."""
    out = []
    for doc, slug, title, files in SECTIONS:
        text = (root / doc).read_text()
        a, b = _block(text, slug)
        if text[a:b] != rendering(slug, title, files):
            out.append(f"{doc}: {slug}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a section differs")
    args = parser.parse_args(argv)
    if args.check:
        bad = stale()
        print("\n".join(f"differs from its result files: {s}" for s in bad) or "every generated section is current")
        return 1 if bad else 0
    for doc, slug, title, files in SECTIONS:
        model_step_report.update(ROOT / doc, slug, rendering(slug, title, files))
        print(f"rendered {doc}: {slug}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
