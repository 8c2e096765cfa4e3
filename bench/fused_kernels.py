"""Forward + backward of one QLoRA linear layer on CUDA: the fused Triton kernels (``kernel="triton"``) against
bitsandbytes' unfused path (``kernel="bnb"``) and the peer, PEFT's LoRA layer around a bitsandbytes ``Linear4bit``
— all three in the same run, on the linear shapes of LLaMA-7B/13B/65B at 512 tokens, bfloat16 compute.

    python bench/fused_kernels.py [--models 7b,13b,65b] [--tokens 512] [--r 64] [--repeats 20] [--json out.json]

Every implementation holds the same NF4 + double-quantization state (block size 64), the same adapter (r=64,
alpha=16) and the same input; dropout 0.1 (each draws its own mask). Time: the median of ``--repeats`` CUDA-event
timed runs of forward + backward (input gradient and both adapter gradients), after warm-up (Triton compilation),
the implementations interleaved round by round. Peak memory: ``torch.cuda.max_memory_allocated`` during one
forward + backward, above what was allocated before it (the layer, its input and output gradient). TFLOP/s counts
the useful work (2·N·in·out per base product, forward and backward, plus the adapter's products); "of bf16 GEMM"
divides by a plain bfloat16 ``torch.matmul`` of the forward shape timed in the same rounds (the physical limit as
this GPU reaches it). A first line checks that the fused and unfused outputs agree.

On a machine without CUDA it prints that it needs one and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

#: (name, out_features, in_features) of the linear layers of a LLaMA block (q = k = v = o, gate = up, down)
SHAPES = {
    "7b": [("q/k/v/o", 4096, 4096), ("gate/up", 11008, 4096), ("down", 4096, 11008)],
    "13b": [("q/k/v/o", 5120, 5120), ("gate/up", 13824, 5120), ("down", 5120, 13824)],
    "33b": [("q/k/v/o", 6656, 6656), ("gate/up", 17920, 6656), ("down", 6656, 17920)],
    "65b": [("q/k/v/o", 8192, 8192), ("gate/up", 22016, 8192), ("down", 8192, 22016)],
}
IMPLS = ("triton (fused)", "bnb (unfused)", "peft + bnb Linear4bit")


def build(out_f: int, in_f: int, args, device: str = "cuda"):
    """The three implementations of one layer as zero-argument calls of forward + backward, plus the inputs
    (``device="cpu"`` under ``TRITON_INTERPRET=1``: a smoke run of the set-up, not a measurement)."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    from qlora_gpu.lora import QLoRALinear
    from qlora_gpu.quantize import quantize_4bit

    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    W = torch.randn(out_f, in_f, generator=g, device=dev) * 0.02
    q = quantize_4bit(W, "nf4", 64, True)
    del W
    kw = dict(dropout=0.1, compute_dtype="bfloat16")
    fused = QLoRALinear.from_quantized(q, args.r, 16.0, kernel="triton", **kw)
    unfused = QLoRALinear.from_quantized(q, args.r, 16.0, kernel="bnb", **kw)
    B = torch.randn(out_f, args.r, generator=g, device=dev) * 0.01
    with torch.no_grad():
        unfused.lora_A.copy_(fused.lora_A)
        fused.lora_B.copy_(B)
        unfused.lora_B.copy_(B)

    base = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                             compress_statistics=True)
    sd = {k.removeprefix("weight."): v for k, v in q.state_dict("weight.").items()}
    sd = {k: (torch.as_tensor(v) if not isinstance(v, torch.Tensor) else v).to(dev) for k, v in sd.items()}
    packed = sd.pop("weight")
    base.weight = bnb.nn.Params4bit.from_prequantized(packed, sd, requires_grad=False, device=dev, module=base)
    peft = PeftLinear4bit(base, "default", config=LoraConfig(r=args.r, lora_alpha=16, lora_dropout=0.1), r=args.r,
                          lora_alpha=16, lora_dropout=0.1)
    peft.to(dev)
    peft.lora_A.to(torch.bfloat16)  # QLoRA's recipe: bfloat16 adapters
    peft.lora_B.to(torch.bfloat16)
    with torch.no_grad():
        peft.lora_A["default"].weight.copy_(fused.lora_A)
        peft.lora_B["default"].weight.copy_(B)

    x = torch.randn(args.tokens, in_f, generator=g, device=dev).bfloat16().requires_grad_(True)
    gy = torch.randn(args.tokens, out_f, generator=g, device=dev).bfloat16()

    def step(layer):
        def run():
            x.grad = None
            layer(x).backward(gy)
            layer.zero_grad(set_to_none=True)
        return run

    a = torch.randn(args.tokens, in_f, generator=g, device=dev).bfloat16()
    w = torch.randn(in_f, out_f, generator=g, device=dev).bfloat16()
    impls = dict(zip(IMPLS, (step(fused), step(unfused), step(peft)), strict=True))
    impls["bf16 GEMM"] = lambda: a @ w
    return impls, (fused, unfused, x)


def time_ms(fn, torch) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def peak_mb(fn, torch) -> float:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def agreement(fused, unfused, x, torch) -> float:
    """max |y_fused − y_unfused| / max |y_unfused| in eval mode (no dropout)."""
    fused.eval()
    unfused.eval()
    with torch.no_grad():
        y1, y2 = fused(x).float(), unfused(x).float()
    fused.train()
    unfused.train()
    return float((y1 - y2).abs().max() / y2.abs().max().clamp_min(1e-30))


def run_shape(name: str, out_f: int, in_f: int, args, torch) -> dict:
    impls, (fused, unfused, x) = build(out_f, in_f, args)
    errors = {}
    try:
        rel = agreement(fused, unfused, x, torch)
    except Exception as e:  # the fused kernels have not run on a GPU before: report, measure the others
        rel, errors[IMPLS[0]] = float("nan"), f"{type(e).__name__}: {e}"
    for k in list(impls):
        try:
            if k in errors:
                raise RuntimeError(errors[k])
            for _ in range(args.warmup):
                impls[k]()
            torch.cuda.synchronize()
        except Exception as e:
            errors[k] = errors.get(k) or f"{type(e).__name__}: {e}"
            print(f"!! {k} failed on {name} ({out_f}x{in_f}): {errors[k][:500]}", flush=True)
            del impls[k]
    torch.cuda.synchronize()
    times = {k: [] for k in impls}
    for _ in range(args.repeats):
        for k, fn in impls.items():
            times[k].append(time_ms(fn, torch))
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {k: peak_mb(impls[k], torch) for k in IMPLS if k in impls}
    n, r = args.tokens, args.r
    flops = 2 * 2 * n * in_f * out_f + 2 * n * r * (in_f + out_f) * 3
    gemm_tflops = 2 * n * in_f * out_f / med["bf16 GEMM"] / 1e9 if "bf16 GEMM" in med else float("nan")
    row = dict(layer=name, out_features=out_f, in_features=in_f, tokens=n, r=r, rel_diff_fused_unfused=rel,
               time_ms={k: med[k] for k in impls}, peak_mb=mem, gemm_tflops=gemm_tflops,
               tflops={k: flops / med[k] / 1e9 for k in IMPLS if k in med}, errors=errors)
    del impls, fused, unfused, x
    torch.cuda.empty_cache()
    return row


def print_row(row: dict, model: str) -> None:
    t, m, tf = row["time_ms"], row["peak_mb"], row["tflops"]
    print(f"{model} {row['layer']} ({row['out_features']}x{row['in_features']}), {row['tokens']} tokens, "
          f"r={row['r']}: fused vs unfused outputs differ by {row['rel_diff_fused_unfused']:.1e} of max|y|; "
          f"bf16 GEMM {row['gemm_tflops']:.0f} TFLOP/s")
    print(f"  {'implementation':24s} {'time ms':>8s} {'TFLOP/s':>8s} {'of GEMM':>8s} {'peak MB':>8s} "
          f"{'time / fused':>12s} {'mem / fused':>11s}")
    t0, m0 = t.get(IMPLS[0], float("nan")), m.get(IMPLS[0], float("nan"))
    for k in IMPLS:
        if k not in t:
            print(f"  {k:24s} failed: {row['errors'].get(k, '?')[:200]}")
            continue
        print(f"  {k:24s} {t[k]:8.3f} {tf[k]:8.1f} {tf[k] / row['gemm_tflops']:8.0%} {m[k]:8.0f} "
              f"{t[k] / t0:11.2f}x {m[k] / max(m0, 1e-9):10.2f}x")


def _write_json(path: str, payload: dict) -> None:
    """Atomic: a temporary file in the same folder, then a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="7b,13b,65b", help=f"comma-separated among {','.join(SHAPES)}")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the results here (after every shape)")
    args = parser.parse_args(argv)
    models = [m.strip().lower().removeprefix("llama-") for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in SHAPES]
    if bad:
        parser.error(f"--models must be among {','.join(SHAPES)}, got {','.join(bad)}")

    import torch

    if not torch.cuda.is_available():
        print("bench/fused_kernels.py needs a CUDA GPU (the Triton kernels and the peers run there); none is "
              "available on this machine: nothing measured.")
        return 0
    import triton

    print(f"device {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}; "
          f"NF4 + DQ blocksize 64, bfloat16 compute, dropout 0.1, forward + backward, median of {args.repeats}\n")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from stamp import stamp as make_stamp  # bench/stamp.py

    stamp = make_stamp()
    rows = []
    for model in models:
        for name, out_f, in_f in SHAPES[model]:
            row = run_shape(name, out_f, in_f, args, torch)
            row["model"] = model
            rows.append(row)
            print_row(row, model)
            if args.json:
                _write_json(args.json, {"stamp": stamp, "device": torch.cuda.get_device_name(), "rows": rows})
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
