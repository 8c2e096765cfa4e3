#!/usr/bin/env bash
# The GPU session of issue 6 in one script: GPU tests, real-scale steps (bench/gpu_scale.py), the paged-optimizer
# demonstration (bench/paged_oom.py) and the fused kernels' benchmark (bench/fused_kernels.py, if present).
#
# Before (on the development machine, once; puts the bitsandbytes wheel the GPU machine lacks in .whl/):
#   bash ../shared/device/prepare-wheels.sh
#
# Then with the `run` tool, one call per part (the device allows 10 minutes per command and 30 minutes of device
# time per session; the machine is bare, so every call installs the wheel again unless it is still warm):
#   run(carry=[".whl"], command="bash bench/gpu_session.sh tests small")    # GPU tests, then 7B and 13B
#   run(carry=[".whl"], command="bash bench/gpu_session.sh large")          # 65B, then 33B if time is left
#   run(carry=[".whl"], command="bash bench/gpu_session.sh paged kernels")  # paged optimizers; fused kernels
# Parts: tests | small (7b,13b) | large (65b, 65b ours with bf16 adapters, then 33b) | 7b | 13b | 33b | 65b | paged | kernels | all.
# Several parts run in the order given. The whole command stops itself before BUDGET seconds (default 570), so
# what was measured comes back: every benchmark writes its JSON after each (model, stack) it finishes; the GPU
# tests get at most TESTS_MAX seconds (default 240). Device time is 30 minutes a session, machine start included:
# if only two calls fit, run "tests small" and "65b paged" (the issue's two goals, then the paging demonstration).
#
# Outputs, in $OUT (the run tool's folder; /tmp/qlora_gpu_out elsewhere), at most 8 files a call:
#   session_<parts>.log  everything printed (nvidia-smi, versions, progress, tables)
#   gpu_tests.log        python3 -m pytest -q -m gpu tests/
#   scale_small.json (7b,13b), scale_65b.json, scale_65b_bf16.json, scale_33b.json, scale_<size>.json   bench/gpu_scale.py
#   paged_oom.json       bench/paged_oom.py
#   fused_kernels.json   bench/fused_kernels.py (or its output in the session log)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/qlora_gpu_out}
mkdir -p "$OUT"
BUDGET=${BUDGET:-570}
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(all)
tag=$(IFS=_; echo "${parts[*]}")
exec > >(tee -a "$OUT/session_${tag}.log") 2>&1

left() { echo $((BUDGET - SECONDS)); }
# run CMD... under the time left (less a margin for the rest of the script); skip it when too little is left
timed() {
  local t=$(( $(left) - 15 ))
  [ -n "${TIMED_MAX:-}" ] && [ "$TIMED_MAX" -lt "$t" ] && t=$TIMED_MAX
  if [ "$t" -lt 60 ]; then echo "!! skipped (only $(left) s left of $BUDGET): $*"; return 0; fi
  echo "== $(date -u +%H:%M:%S) [${t} s allowed] $*"
  timeout --kill-after=10 "$t" "$@"
  local rc=$?
  [ $rc -eq 124 ] && echo "!! timed out after ${t} s: $*"
  return $rc
}

# --- environment: the carried bitsandbytes wheel, the project on the path ---
export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1  # a command cut off by `timeout` loses no printed line (Python buffers a piped stdout)
if ! python3 -c "import bitsandbytes" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "no .whl/ here: run bash ../shared/device/prepare-wheels.sh on the development machine and carry .whl"
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 2
fi
nvidia-smi
python3 - <<'PY'
import bitsandbytes, peft, torch, transformers
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}; "
      f"device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NONE'}")
PY

run_part() {
  case "$1" in
    tests)
      TIMED_MAX=${TESTS_MAX:-240} timed python3 -m pytest -q -m gpu --continue-on-collection-errors tests/ 2>&1 \
        | tee "$OUT/gpu_tests.log" ;;
    small)
      timed python3 bench/gpu_scale.py --models 7b,13b --stacks ours,baseline,ours-triton \
        --json "$OUT/scale_small.json" ;;
    large)  # the paper's claim first: 65B under 48 GB; then with the paper's bf16 adapters (qlora.py); then 33B
      timed python3 bench/gpu_scale.py --models 65b --json "$OUT/scale_65b.json"
      timed python3 bench/gpu_scale.py --models 65b --stacks ours --adapter-dtype bfloat16 \
        --json "$OUT/scale_65b_bf16.json"
      timed python3 bench/gpu_scale.py --models 33b --json "$OUT/scale_33b.json" ;;
    7b|13b|33b|65b)
      timed python3 bench/gpu_scale.py --models "$1" --json "$OUT/scale_$1.json" ;;
    paged)
      timed python3 bench/paged_oom.py --json "$OUT/paged_oom.json" ;;
    kernels)
      if [ -f bench/fused_kernels.py ]; then
        if python3 bench/fused_kernels.py --help 2>/dev/null | grep -q -- '--json'; then
          timed python3 bench/fused_kernels.py --json "$OUT/fused_kernels.json"
        else
          timed python3 bench/fused_kernels.py
        fi
      else
        echo "bench/fused_kernels.py is not in this tree: skipped"
      fi ;;
    all)
      for p in tests small large paged kernels; do run_part "$p"; done ;;
    *)
      echo "unknown part '$1' (tests | small | large | 7b | 13b | 33b | 65b | paged | kernels | all)"; return 2 ;;
  esac
}

status=0
for part in "${parts[@]}"; do
  run_part "$part" || status=$?
done
echo "== done in ${SECONDS} s; files in $OUT:"
ls -la "$OUT"
sleep 1  # let tee flush the session log
exit $status
