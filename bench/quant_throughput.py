"""Throughput of 4-bit quantize / dequantize on a 4096x4096 float32 matrix: qlora_ref (Numba kernels and the plain
NumPy definition) against bitsandbytes' CPU path (and torchao's NF4 if installed), all measured in this one run,
with the fraction of this machine's memory-copy bandwidth.

    python bench/quant_throughput.py [--size 4096] [--repeats 5]

GB/s counts the bytes read plus the bytes written by the operation (float32 in, packed codes + absmax out, and the
reverse), the same way the memory-copy figure counts them.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def best_time(fn, repeats: int) -> float:
    fn()  # warm up: compiles, caches, page faults
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    return 2 * nbytes / best_time(lambda: np.copyto(dst, src), repeats) / 1e9


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import bitsandbytes.functional as bnbf
    import torch

    import qlora_ref

    n = args.size
    x = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    xt = torch.from_numpy(x)
    packed_bytes = x.size // 2 + 4 * (x.size // 64)
    quant_bytes = x.nbytes + packed_bytes
    deq_bytes = {"float32": packed_bytes + x.nbytes, "bfloat16": packed_bytes + x.nbytes // 2}

    copy_gbs = copy_bandwidth(x.nbytes, args.repeats)
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

    print(f"{'operation':24s} {'implementation':30s} {'ms':>8s} {'GB/s':>7s} {'vs bnb':>7s} {'of copy':>8s}")
    for op, (nbytes, impls) in cases.items():
        times = {name: best_time(fn, args.repeats) for name, fn in impls.items()}
        bnb_time = times["bitsandbytes CPU"]
        for name, t in times.items():
            gbs = nbytes / t / 1e9
            print(f"{op:24s} {name:30s} {1e3 * t:8.1f} {gbs:7.2f} {bnb_time / t:6.2f}x {gbs / copy_gbs:7.1%}")


if __name__ == "__main__":
    main()
