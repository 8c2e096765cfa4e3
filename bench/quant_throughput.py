"""Throughput of 4-bit quantize / dequantize on a 4096x4096 float32 matrix: qlora_ref (Numba kernels and the plain
NumPy definition) against bitsandbytes' CPU path (and torchao's NF4 if installed), all measured in this one run,
with the fraction of this machine's memory-copy bandwidth.

    python bench/quant_throughput.py [--size 4096] [--repeats 5] [--json quant_throughput.json]

GB/s counts the bytes read plus the bytes written by the operation (float32 in, packed codes + absmax out, and the
reverse), the same way the memory-copy figure counts them.

Each operation's implementations are timed interleaved: after one untimed call of each, every one of ``--repeats``
rounds calls each implementation once, in an order rotated by one every round, so that a change in the machine's
load hits all of them. The table keeps the best time (ms, GB/s, vs bnb, of copy: each implementation's best against
bitsandbytes' best and the best memory copy) and adds each implementation's median and min–max, and "vs bnb" as the
median of the per-round ratios with its order-statistic interval (``intervals.median_interval``: none below 5
rounds). ``--json PATH`` writes every time, the round orders and the ratios, stamped (``bench/stamp.py``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:  # imported from elsewhere: intervals, stamp
    sys.path.insert(0, str(BENCH))

from intervals import MIN_REPEATS, median_interval  # noqa: E402


def copy_bandwidth(nbytes: int, repeats: int, times: list | None = None) -> float:
    """GB/s of the best of ``repeats`` copies of ``nbytes`` (read + written); every copy's seconds appended to
    ``times`` when given."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    copies = interleaved_times({"copy": lambda: np.copyto(dst, src)}, repeats)[0]["copy"]
    if times is not None:
        times.extend(copies)
    return 2 * nbytes / min(copies) / 1e9


def interleaved_times(impls: dict, repeats: int, warmup: bool = True) -> tuple[dict[str, list[float]], list[list[str]]]:
    """Every implementation (``name -> zero-argument call``) called once untimed (``warmup``), then ``repeats``
    rounds of one timed call of each, the order rotated by one every round (no implementation always first or right
    after the same one); (every call's seconds per implementation, each round's order)."""
    names = list(impls)
    if warmup:
        for fn in impls.values():
            fn()  # compiles, caches, page faults
    times: dict[str, list[float]] = {n: [] for n in names}
    orders = []
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            impls[n]()
            times[n].append(time.perf_counter() - t0)
        orders.append(order)
    return times, orders


def spread(times: list[float]) -> dict:
    """Best, median, min and max of a list of seconds."""
    return dict(best_s=min(times), median_s=statistics.median(times), min_s=min(times), max_s=max(times))


def interval_text(iv: dict, fmt: str = ".2f") -> str:
    """``median_interval``'s low–high, or why there is none."""
    if iv["low"] is None:
        return f"none (n={iv['n']} < {MIN_REPEATS})"
    return f"{iv['low']:{fmt}}–{iv['high']:{fmt}}"


def write_json(path, payload: dict, argv) -> None:
    """Atomically (``qlora_ref.files``), with the stamp of ``bench/stamp.py`` and the command."""
    from stamp import stamp as make_stamp

    from qlora_ref.files import atomic_write_json

    command = [f"bench/{Path(__file__).name}", *(sys.argv[1:] if argv is None else argv)]
    atomic_write_json(Path(path), {"stamp": make_stamp(command), "command": " ".join(command), **payload})
    print(f"wrote {path}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (>= 5 for an interval)")
    parser.add_argument("--json", default=None, help="write every time and ratio, stamped, to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.size < 8 or args.size * args.size % 64:
        parser.error("--repeats must be >= 1 and --size >= 8 with size * size a multiple of 64 (the blocksize)")

    import bitsandbytes.functional as bnbf
    import torch

    import qlora_ref

    n = args.size
    x = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    xt = torch.from_numpy(x)
    packed_bytes = x.size // 2 + 4 * (x.size // 64)
    quant_bytes = x.nbytes + packed_bytes
    deq_bytes = {"float32": packed_bytes + x.nbytes, "bfloat16": packed_bytes + x.nbytes // 2}

    copy_times: list[float] = []
    copy_gbs = copy_bandwidth(x.nbytes, args.repeats, copy_times)
    print(f"machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"numba threads {__import__('numba').get_num_threads()}; memory copy {copy_gbs:.1f} GB/s")
    print(f"matrix {n}x{n} float32, NF4, blocksize 64, no double quantization\n")

    q = qlora_ref.quantize_4bit(x, double_quant=False)
    packed, state = bnbf.quantize_4bit(xt, blocksize=64, quant_type="nf4")
    state_bf16 = bnbf.quantize_4bit(xt, blocksize=64, quant_type="nf4")[1]
    state_bf16.dtype = torch.bfloat16

    cases = {
        "quantize": (quant_bytes, {
            "qlora_ref (numba)": lambda: qlora_ref.quantize_4bit(x, double_quant=False),
            "qlora_ref (numpy definition)": lambda: qlora_ref.quantize_4bit(x, double_quant=False, kernel="numpy"),
            "bitsandbytes CPU": lambda: bnbf.quantize_4bit(xt, blocksize=64, quant_type="nf4"),
        }),
        "dequantize -> float32": (deq_bytes["float32"], {
            "qlora_ref (numba)": lambda: qlora_ref.dequantize_4bit(q, "float32"),
            "qlora_ref (numpy definition)": lambda: qlora_ref.dequantize_4bit(q, "float32", kernel="numpy"),
            "bitsandbytes CPU": lambda: bnbf.dequantize_4bit(packed, state),
        }),
        "dequantize -> bfloat16": (deq_bytes["bfloat16"], {
            "qlora_ref (numba)": lambda: qlora_ref.dequantize_4bit(q, "bfloat16"),
            "qlora_ref (numpy definition)": lambda: qlora_ref.dequantize_4bit(q, "bfloat16", kernel="numpy"),
            "bitsandbytes CPU": lambda: bnbf.dequantize_4bit(packed, state_bf16),
        }),
    }
    try:
        try:
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4  # torchao >= 0.15
        except ImportError:
            from torchao.dtypes.nf4tensor import to_nf4

        nf4 = to_nf4(xt.to(torch.bfloat16), 64, 256)
        cases["quantize"][1]["torchao NF4 (bf16 in)"] = lambda: to_nf4(xt.to(torch.bfloat16), 64, 256)
        cases["dequantize -> bfloat16"][1]["torchao NF4"] = lambda: nf4.get_original_weight()
    except ImportError:
        print("(torchao not installed: its NF4 rows are left out)\n")

    result = dict(benchmark="quant_throughput", settings=dict(
        size=n, repeats=args.repeats, cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
        numba_threads=__import__("numba").get_num_threads(), blocksize=64, quant_type="nf4", double_quant=False,
        order="interleaved per operation, rotated by one every round"), copy_gbs=copy_gbs,
        copy_times_s=copy_times, copy_bytes=2 * x.nbytes, cases={})
    print(f"{'operation':24s} {'implementation':30s} {'ms':>8s} {'GB/s':>7s} {'vs bnb':>7s} {'of copy':>8s} "
          f"{'median ms':>10s} {'min-max ms':>17s} {'vs bnb per round (median, interval)':>36s}")
    for op, (nbytes, impls) in cases.items():
        times, orders = interleaved_times(impls, args.repeats)
        bnb_times = times["bitsandbytes CPU"]
        bnb_time = min(bnb_times)
        rows = {}
        for name, ts in times.items():
            t = min(ts)
            gbs = nbytes / t / 1e9
            ratios = [b / x for b, x in zip(bnb_times, ts, strict=True)]  # bitsandbytes' time / this one's, per round
            iv = median_interval(ratios)
            rows[name] = dict(times_s=ts, **spread(ts), gbs_best=gbs, gbs_median=nbytes / statistics.median(ts) / 1e9,
                              vs_bnb_best=bnb_time / t, vs_bnb_ratios=ratios, vs_bnb=iv)
            rng = f"{1e3 * min(ts):.1f}-{1e3 * max(ts):.1f}"
            print(f"{op:24s} {name:30s} {1e3 * t:8.1f} {gbs:7.2f} {bnb_time / t:6.2f}x {gbs / copy_gbs:7.1%} "
                  f"{1e3 * statistics.median(ts):10.1f} {rng:>17s} "
                  f"{iv['median']:9.2f}x {interval_text(iv):>26s}", flush=True)
        result["cases"][op] = dict(bytes=nbytes, orders=orders, implementations=rows)
    if args.json:
        write_json(args.json, result, argv)
    return result


if __name__ == "__main__":
    main()
