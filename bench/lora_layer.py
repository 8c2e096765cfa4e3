"""Forward + backward of one QLoRA linear layer (4096x4096 NF4 + double quantization, r=64, 512 tokens) on CPU:
qlora_ref (fused Numba dequantize-matmul, and the naive dequantize-everything path) against qlora_gpu (torch +
bitsandbytes on CPU), both compute dtypes, time and peak memory, all measured in this one run, with the fraction
of this machine's sgemm FLOP/s.

    python bench/lora_layer.py [--size 4096] [--r 64] [--tokens 512] [--repeats 3] [--tile-sweep] [--json out.json]

Time: the best of ``--repeats`` runs of forward + backward (+ zeroing the LoRA gradients), the implementations
interleaved so that a change in machine load hits all of them: each round times one run of each, in an order
rotated by one every round (``quant_throughput.interleaved_times``). Printed beside the best: each implementation's
median and min–max, and every ratio also as the median of the per-round ratios with its order-statistic interval
(``intervals.median_interval``: none below 5 rounds). ``--json PATH`` writes every time, the round orders, the
ratios, the memory figures and the tile sweep, stamped (``bench/stamp.py``).

Peak memory: measured in a fresh process per implementation, the growth of its resident set (Linux VmHWM, reset
through /proc/self/clear_refs) during one forward + backward above what the layer, its input and its output gradient
already hold — one number for NumPy and torch alike (glibc's mmap threshold is pinned so that freed buffers leave
the resident set at once); for qlora_ref also the bytes NumPy allocated (tracemalloc), which sees every buffer
because the Numba kernels allocate none. GFLOP/s counts the useful work (2·N·in·out per base product, forward and
backward, plus the adapter's products).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time
import tracemalloc

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
if BENCH not in sys.path:  # imported from elsewhere: the other benchmarks' helpers, intervals, stamp
    sys.path.insert(0, BENCH)

from intervals import median_interval  # noqa: E402
from quant_throughput import interleaved_times, interval_text, spread, write_json  # noqa: E402


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_growth_mb(fn) -> float | None:
    """Resident-set growth (MB) at the peak of one call of ``fn``, above the resident set just before it."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current VmRSS
    except OSError:
        return None
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    return None if before is None or peak is None else (peak - before) / 1024


def tracemalloc_peak_mb(fn) -> float:
    gc.collect()
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def sgemm_call(n: int, k: int, m: int):
    """A float32 (n, k) @ (k, m) product through NumPy's BLAS: the physical limit the layer is compared with."""
    a = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((k, m)).astype(np.float32)
    return lambda: a @ b


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


IMPLS = ("qlora_ref, fused", "qlora_ref, naive", "qlora_gpu (torch + bitsandbytes)")


def build(args, compute_dtype: str, tile: int | None = None) -> dict:
    """The three implementations of one layer (the same NF4 state, adapter and data), as zero-argument calls of
    forward + backward."""
    import torch

    import qlora_ref
    from qlora_gpu.lora import QLoRALinear as GpuLinear
    from qlora_ref.lora import QLoRALinear as RefLinear

    n_in = n_out = args.size
    n, r = args.tokens, args.r
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((n_out, n_in)) * 0.02).astype(np.float32)
    x = rng.standard_normal((n, n_in)).astype(np.float32)
    gy = rng.standard_normal((n, n_out)).astype(np.float32)
    B = (rng.standard_normal((n_out, r)) * 0.01).astype(np.float32)
    q = qlora_ref.quantize_4bit(W)  # NF4, blocksize 64, double quantization: both backends load this state
    del W
    kw = dict(dropout=0.1, compute_dtype=compute_dtype)
    ref_fused = RefLinear.from_quantized(q, r, 16.0, kernel="fused", tile=tile, **kw)
    ref_naive = RefLinear.from_quantized(q, r, 16.0, kernel="naive", **kw)
    gpu = GpuLinear.from_quantized(q, r, 16.0, **kw)
    for layer in (ref_fused, ref_naive):
        layer.lora_B = B
    with torch.no_grad():
        gpu.lora_B.copy_(torch.from_numpy(B))
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    gyt = torch.from_numpy(gy.copy())

    def run_ref(layer):
        layer.forward(x)
        layer.backward(gy)
        layer.zero_grad()
        layer.clear_cache()

    def run_gpu():
        xt.grad = None
        gpu(xt).backward(gyt)
        gpu.zero_grad(set_to_none=True)

    return dict(zip(IMPLS, (lambda: run_ref(ref_fused), lambda: run_ref(ref_naive), run_gpu), strict=True))


def memory_child(args) -> None:
    """Run in a fresh process: warm up one implementation, then print its peak RSS growth and NumPy peak (MB)."""
    fn = build(args, args.compute_dtypes[0])[args.memory_of]
    fn()
    rss = peak_rss_growth_mb(fn)
    traced = tracemalloc_peak_mb(fn) if args.memory_of.startswith("qlora_ref") else float("nan")
    print(f"{float('nan') if rss is None else rss} {traced}")


def measure_memory(args, impl: str, compute_dtype: str) -> tuple[float, float]:
    cmd = [sys.executable, os.path.abspath(__file__), "--size", str(args.size), "--r", str(args.r), "--tokens",
           str(args.tokens), "--compute-dtypes", compute_dtype, "--memory-of", impl]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.split()
    return float(out[-2]), float(out[-1])


def frozen_path_memory(args, compute_dtype: str, tile: int | None = None) -> tuple[float, float]:
    """NumPy peak (MB) of the frozen path alone (x Wᵀ, then G W), naive and fused: the dequantized weight's share."""
    import qlora_ref
    from qlora_ref import fused_matmul as fm

    rng = np.random.default_rng(0)
    q = qlora_ref.quantize_4bit((rng.standard_normal((args.size, args.size)) * 0.02).astype(np.float32))
    x = rng.standard_normal((args.tokens, args.size)).astype(np.float32)
    naive = tracemalloc_peak_mb(lambda: (fm.naive_x_wt(x, q, compute_dtype), fm.naive_g_w(x, q, compute_dtype)))
    fused = tracemalloc_peak_mb(lambda: (fm.fused_x_wt(x, q, compute_dtype, tile),
                                         fm.fused_g_w(x, q, compute_dtype, tile)))
    return naive, fused


def _finite(x: float) -> float | None:
    """NaN (not measured) as None: the result file stays strict JSON."""
    return None if np.isnan(x) else float(x)


def paired(times: dict, num: str, den: str) -> dict:
    """``num``'s time over ``den``'s per round: the ratios and their ``median_interval``."""
    ratios = [a / b for a, b in zip(times[num], times[den], strict=True)]
    return dict(ratios=ratios, **median_interval(ratios))


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="in_features = out_features")
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compute-dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--tile-sweep", action="store_true", help="also time the fused path for several tile sizes")
    parser.add_argument("--json", default=None, help="write every time and ratio, stamped, to this file")
    parser.add_argument("--memory-of", choices=IMPLS, help=argparse.SUPPRESS)  # internal: the memory child
    args = parser.parse_args(argv)
    if args.memory_of:
        return memory_child(args)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    import numba
    import torch

    from qlora_ref import fused_matmul

    n_in = n_out = args.size
    n, r = args.tokens, args.r
    flops = 2 * 2 * n * n_in * n_out + 2 * n * r * (n_in + n_out) * 3
    sgemm = sgemm_call(n, n_in, n_out)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; torch {torch.__version__} "
          f"threads {torch.get_num_threads()}, numba threads {numba.get_num_threads()}")
    print(f"layer {n_out}x{n_in} NF4+DQ blocksize 64, r={r}, alpha=16, dropout 0.1, {n} tokens; "
          f"fused tile {fused_matmul.TILE_BYTES >> 20} MiB; forward + backward, best of {args.repeats} interleaved "
          "rounds (median and min-max beside it)\n")
    result = dict(benchmark="lora_layer", settings=dict(
        size=args.size, r=r, tokens=n, repeats=args.repeats, compute_dtypes=args.compute_dtypes,
        tile_sweep=args.tile_sweep, cpus=os.cpu_count(), load_average=list(os.getloadavg()),
        torch_threads=torch.get_num_threads(), numba_threads=numba.get_num_threads(),
        tile_bytes=fused_matmul.TILE_BYTES, order="interleaved, rotated by one every round"),
        flops=flops, compute_dtypes={})

    for cd in args.compute_dtypes:
        impls = build(args, cd)
        impls["sgemm"] = sgemm  # the limit, timed in the same rounds
        times, orders = interleaved_times(impls, args.repeats)  # warm-up first: Numba compilation, page faults
        del impls
        sgemm_times = times.pop("sgemm")
        peak = 2 * n * n_in * n_out / min(sgemm_times) / 1e9
        memory = {k: measure_memory(args, k, cd) for k in IMPLS}
        best = {k: min(v) for k, v in times.items()}
        torch_t = best[IMPLS[2]]
        vs_torch = {k: paired(times, k, IMPLS[2]) for k in IMPLS}
        naive_fused = paired(times, IMPLS[1], IMPLS[0])
        rec = result["compute_dtypes"][cd] = dict(
            orders=orders, sgemm_times_s=sgemm_times, sgemm_gflops_best=peak,
            implementations={k: dict(times_s=times[k], **spread(times[k]), gflops_best=flops / best[k] / 1e9,
                                     peak_rss_mb=_finite(memory[k][0]), numpy_peak_mb=_finite(memory[k][1]),
                                     time_vs_torch=vs_torch[k])
                             for k in IMPLS},
            naive_over_fused=naive_fused)
        print(f"compute dtype {cd} (sgemm {n}x{n_in} @ {n_in}x{n_out}, NumPy float32, in the same rounds: "
              f"{peak:.1f} GFLOP/s)")
        print(f"  {'implementation':34s} {'time s':>8s} {'GFLOP/s':>8s} {'of sgemm':>9s} {'peak RSS MB':>12s} "
              f"{'NumPy MB':>9s} {'time / torch':>13s} {'median s':>9s} {'min-max s':>15s} "
              f"{'time / torch per round (median, interval)':>42s}")
        for k in IMPLS:
            rss, traced = memory[k]
            tm = "-" if np.isnan(traced) else f"{traced:.0f}"
            iv = vs_torch[k]
            rng = f"{min(times[k]):.3f}-{max(times[k]):.3f}"
            print(f"  {k:34s} {best[k]:8.3f} {flops / best[k] / 1e9:8.1f} {flops / best[k] / 1e9 / peak:9.0%} "
                  f"{rss:12.0f} {tm:>9s} {best[k] / torch_t:12.2f}x {statistics.median(times[k]):9.3f} {rng:>15s} "
                  f"{iv['median']:13.2f}x {interval_text(iv):>28s}")
        fused_t, naive_t = best[IMPLS[0]], best[IMPLS[1]]
        fv = vs_torch[IMPLS[0]]
        print(f"  ratios: qlora_ref fused / qlora_gpu = {fused_t / torch_t:.2f} (goal <= 1.5); "
              f"naive / fused time = {naive_t / fused_t:.2f}; naive / fused peak RSS = "
              f"{memory[IMPLS[1]][0] / max(memory[IMPLS[0]][0], 1e-9):.1f}")
        print(f"  per round (median, interval): fused / qlora_gpu = {fv['median']:.2f} ({interval_text(fv)}); "
              f"naive / fused = {naive_fused['median']:.2f} ({interval_text(naive_fused)})\n")

        naive_mb, fused_mb = frozen_path_memory(args, cd)
        rec["frozen_path_numpy_peak_mb"] = dict(naive=naive_mb, fused=fused_mb)
        print(f"  frozen path alone (x W^T, then G W), NumPy peak: naive {naive_mb:.0f} MB, fused {fused_mb:.0f} MB "
              f"(both include their {8 * n * n_in / 2**20:.0f} MB of outputs): {naive_mb / fused_mb:.1f}x less\n")

        if args.tile_sweep:
            print(f"  fused path by tile size ({cd}): rows (forward) = columns (backward) per tile; layer forward +"
                  " backward time, frozen path's NumPy peak")
            sweep = rec["tile_sweep"] = {}
            for rows in sorted({min(t, n_out) for t in (64, 256, 1024, n_out)}):
                fn = build(args, cd, tile=rows)[IMPLS[0]]
                fn()
                ts = [_timed(fn) for _ in range(args.repeats)]
                t = min(ts)
                mb = frozen_path_memory(args, cd, tile=rows)[1]
                sweep[str(rows)] = dict(times_s=ts, **spread(ts), frozen_path_numpy_peak_mb=mb)
                print(f"    tile {rows:5d} ({4 * rows * n_in / 2**20:5.1f} MiB): {t:7.3f} s, frozen path {mb:5.0f} MB"
                      f" (median {statistics.median(ts):.3f} s, {min(ts):.3f}-{max(ts):.3f})")
            print()
    if args.json:
        write_json(args.json, result, argv)
    return result


if __name__ == "__main__":
    main()
