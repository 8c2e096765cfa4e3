"""Paged optimizers shown on a GPU (paper, section 3, "Paged Optimizers"; issue 6): under a memory cap, a long
sequence that makes plain AdamW run out of memory completes with bitsandbytes' paged AdamW.

    python bench/paged_oom.py                          # LLaMA-7B from its config, seq 4096 vs 512, cap chosen
    python bench/paged_oom.py --model 7b --seq 2048 --short-seq 512 --cap-gb 12 --json paged_oom.json

Three optimizers, each in its own child process, on the same QLoRA model (``qlora_gpu.prepare.prepare_model``,
random weights, the paper's recipe as in bench/gpu_scale.py), all with 32-bit states:

- ``paged``: ``bitsandbytes.optim.PagedAdamW`` (what the paper uses);
- ``bnb_adamw``: ``bitsandbytes.optim.AdamW`` (the same kernel, states in ordinary device memory);
- ``torch_adamw``: ``torch.optim.AdamW``.

Each takes ``--warmup`` + ``--steps`` timed steps on a batch of ``--short-seq`` tokens (where every optimizer fits:
the slowdown of paging is measured there), then one step on ``--seq`` tokens, the memory spike. The cap is
``torch.cuda.set_per_process_memory_fraction(cap / total)``; without ``--cap-gb`` the paged run calibrates it
(``choose_cap``) from its own uncapped peaks S (short) and L (long) and the states P it pages: a plain optimizer
holds P in torch's memory as well, so it needs about S + P at the short sequence and L + P at the long one, and the
paged run L. Any cap in [max(L, S + P), L + P) lets the plain optimizers through the short steps and stops them
at the long one while the paged run completes both; the middle of that window leaves each side half of it for
the allocator's fragmentation. The paged run then repeats its short and long steps under that cap, and the plain
optimizers run under the same cap from the start. The window is min(P, L − S) wide: a longer ``--seq`` widens it
(up to P). The cap counts what torch's allocator reserves (its cached blocks too; it releases them and retries
before reporting an OOM).

The mechanism, honestly: bitsandbytes allocates the paged states (tensors of >= 100k elements) with
``cudaMallocManaged``, outside torch's caching allocator, so torch's cap does not count them. That is what lets
the paged run through here: the cap only sees the weights, adapters, gradients and activations. On a card with
memory to spare nothing is evicted — the pages stay resident on the GPU; only under real physical memory pressure
does the CUDA driver evict pages to CPU RAM and fetch them back on access (the paper's use: surviving the spikes
of long sequences on a 48 GB card). This demonstration never oversubscribes the card (that can hang a GPU): it
checks ``torch.cuda.mem_get_info`` before the paged states are allocated and refuses if they would not fit.

Without CUDA it says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import gpu_scale  # noqa: E402  (bench/gpu_scale.py: the model, the recipe, the step)
import torch  # noqa: E402

OPTIMIZERS = ("paged", "bnb_adamw", "torch_adamw")
GiB = 2**30
#: bitsandbytes pages only state tensors of at least this many elements (optim.Optimizer8bit.get_state_buffer)
PAGED_MIN_NUMEL = 100_000
#: free device memory kept beyond the paged states before they are allocated
MANAGED_MARGIN = 1 * GiB


def make_optimizer(name: str, params, rec: dict):
    import bitsandbytes as bnb

    kw = dict(lr=rec["lr"], betas=rec["betas"], eps=rec["eps"], weight_decay=rec["weight_decay"])
    if name == "paged":
        return bnb.optim.PagedAdamW(params, **kw)
    if name == "bnb_adamw":
        return bnb.optim.AdamW(params, is_paged=False, **kw)
    if name == "torch_adamw":
        return torch.optim.AdamW(params, **kw)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def state_bytes(params) -> tuple[int, int]:
    """(bytes bitsandbytes will page, all state bytes) of 32-bit Adam (two float32 tensors per parameter)."""
    paged = sum(8 * p.numel() for p in params if p.numel() >= PAGED_MIN_NUMEL)
    return paged, sum(8 * p.numel() for p in params)


def choose_cap(short_peak: int, long_peak: int, paged_bytes: int) -> tuple[int, tuple[int, int]]:
    """(cap, (low, high)): the middle of the window of caps under which the plain optimizers complete the short
    step and run out of memory on the long one while the paged run completes both. From the paged run's uncapped
    peak allocated bytes at the short and long sequence (S, L) and the states it pages (P, which a plain optimizer
    keeps in torch's memory on top): low = max(L, S + P), high = L + P. Section 3, "Paged Optimizers": the states
    make room for the spike of a long sequence."""
    for name, value in (("short_peak", short_peak), ("long_peak", long_peak), ("paged_bytes", paged_bytes)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0 bytes, got {value}")
    if paged_bytes == 0:
        raise ValueError("paged_bytes is 0: nothing is paged, so no cap separates the paged optimizer from plain ones")
    if long_peak <= short_peak:
        raise ValueError(f"the long step's peak ({long_peak} bytes) does not exceed the short step's ({short_peak}): "
                         "no cap stops a plain optimizer at the long step only; raise --seq")
    low, high = max(long_peak, short_peak + paged_bytes), long_peak + paged_bytes
    return (low + high) // 2, (low, high)


def _timed_steps(loss_fn, params, opt, ids, max_grad_norm: float, n: int, device) -> list[float]:
    times = []
    for _ in range(n):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        gpu_scale.train_step(loss_fn, gpu_scale.HFUpdate(opt, params, max_grad_norm), ids)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def _peaks(device) -> dict:
    return dict(peak_bytes=int(torch.cuda.max_memory_allocated(device)),
                peak_reserved_bytes=int(torch.cuda.max_memory_reserved(device)))


def _measured(loss_fn, params, opt, ids, max_grad_norm: float, n: int, device, warmup: int = 0) -> dict:
    """``warmup`` + ``n`` steps on ``ids`` from freed memory and reset peaks: median time of the last ``n``, peak
    allocated / reserved. An OOM propagates."""
    gpu_scale.free_memory(device)
    torch.cuda.reset_peak_memory_stats(device)
    times = _timed_steps(loss_fn, params, opt, ids, max_grad_norm, warmup + n, device)[warmup:]
    return dict(status="ok", step_s=statistics.median(times), step_times_s=times, **_peaks(device))


def _steps(loss_fn, params, opt, ids, max_grad_norm: float, n: int, device) -> dict:
    """``_measured``, with an OOM as a result (status "OOM": under a cap, the result being demonstrated)."""
    try:
        return _measured(loss_fn, params, opt, ids, max_grad_norm, n, device)
    except Exception as e:  # noqa: BLE001 - an OOM is the result being demonstrated
        if not gpu_scale._is_oom(e):
            raise
        for p in params:
            p.grad = None
        out = dict(status="OOM", error=str(e).splitlines()[0][:300], **_peaks(device))
        gpu_scale.free_memory(device)
        return out


def run_case(optimizer: str, config, device, seq: int, short_seq: int, cap_bytes: int | None = None,
             calibrate: bool = False, warmup: int = 1, steps: int = 3, seed: int = 0, rec: dict | None = None,
             progress: bool = True) -> dict:
    """Build the model, take ``warmup`` + ``steps`` steps at ``short_seq`` and one at ``seq`` with ``optimizer``
    under ``cap_bytes``. ``calibrate`` (paged only, no cap): measure both uncapped, set the cap in the middle of
    ``choose_cap``'s window, and repeat the short and the long steps under it (the result's ``cap_bytes``,
    ``cap_window``, ``short_capped``, ``long_capped``)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError("run_case needs a CUDA device: paged optimizers page CUDA managed memory")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if calibrate and (optimizer != "paged" or cap_bytes is not None):
        raise ValueError("calibrate is for the paged optimizer without a cap")
    rec = rec or gpu_scale.recipe("7b")
    out = dict(optimizer=optimizer, seq=seq, short_seq=short_seq, cap_bytes=cap_bytes, status="ok")
    gpu_scale.set_cap(device, cap_bytes)
    model = params = opt = loss_fn = None
    try:
        t0 = time.perf_counter()
        model, params, loss_fn = gpu_scale.build_ours(config, device, rec, seed=seed, progress=progress)
        out["build_s"] = time.perf_counter() - t0
        paged, total = state_bytes(params)
        out.update(lora_params=int(sum(p.numel() for p in params)), state_bytes=total,
                   expected_paged_bytes=paged if optimizer == "paged" else 0)
        if optimizer == "paged":
            free, _ = torch.cuda.mem_get_info(device)
            if paged + MANAGED_MARGIN > free:  # oversubscribing managed memory can hang the GPU
                out.update(status="refused", error=f"paged states {paged / GiB:.2f} GiB + margin exceed the "
                                                   f"{free / GiB:.2f} GiB free on the device")
                return out
        opt = make_optimizer(optimizer, params, rec)
        short = gpu_scale.make_batch(config, short_seq, 1, device, seed)
        # uncapped or under a plain optimizer's cap, an OOM here fails the run (the outer handler)
        out["short"] = _measured(loss_fn, params, opt, short, rec["max_grad_norm"], steps, device, warmup)
        out["paged_state_bytes"], out["device_state_bytes"] = gpu_scale.optimizer_state_bytes(opt)
        long = gpu_scale.make_batch(config, seq, 1, device, seed + 1)
        out["long"] = _steps(loss_fn, params, opt, long, rec["max_grad_norm"], 1, device)
        if calibrate and out["long"]["status"] == "ok":
            try:
                cap, out["cap_window"] = choose_cap(out["short"]["peak_bytes"], out["long"]["peak_bytes"],
                                                    out["paged_state_bytes"])
            except ValueError as e:
                out.update(status="calibration failed", error=str(e))
                return out
            out["cap_bytes"] = cap
            gpu_scale.set_cap(device, cap)
            # the short steps again under the cap, as the plain optimizers take theirs: the slowdown compares like;
            # an OOM there is a result too: the long step still runs
            out["short_capped"] = _steps(loss_fn, params, opt, short, rec["max_grad_norm"], steps, device)
            out["long_capped"] = _steps(loss_fn, params, opt, long, rec["max_grad_norm"], 1, device)
        free, total_dev = torch.cuda.mem_get_info(device)
        out["device_used_bytes"], out["device_total_bytes"] = int(total_dev - free), int(total_dev)
    except Exception as e:  # noqa: BLE001 - an OOM while building or in the short steps is a result too
        if not gpu_scale._is_oom(e):
            raise
        out.update(status="OOM", error=str(e).splitlines()[0][:300])
    finally:
        del model, params, opt, loss_fn
        gpu_scale.free_memory(device)
        gpu_scale.set_cap(device, None)
    return out


def run_isolated(job: dict, timeout: float | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job), "--child-out", str(result)]
        try:
            proc = subprocess.run(cmd, timeout=timeout)
        except subprocess.TimeoutExpired:
            return dict(optimizer=job["optimizer"], status="timeout", error=f"over {timeout} s")
        if result.exists():
            return json.loads(result.read_text())
        return dict(optimizer=job["optimizer"], status="failed", error=f"child process exited with {proc.returncode}")


def _gib(x) -> str:
    return "–" if x is None else f"{x / GiB:.2f}"


def _short_steps(row: dict) -> dict | None:
    """A run's short steps to compare: those under the cap when the paged run took them again there."""
    capped = row.get("short_capped", {})
    return capped if capped.get("status") == "ok" else row.get("short")


def report(rows: list[dict], cap_bytes: int | None) -> str:
    """The table of the demonstration, the cap's window when calibrated, and the slowdown of paging at the short
    sequence (the paged run's steps under the cap when it took them, as the plain runs did)."""
    lines = [f"cap: {_gib(cap_bytes)} GiB of torch-reserved memory (set_per_process_memory_fraction)"]
    by = {r["optimizer"]: r for r in rows}
    window = by.get("paged", {}).get("cap_window")
    if window:
        lines.append(f"calibrated: the middle of [{_gib(window[0])}, {_gib(window[1])}) GiB, the caps under which "
                     "a plain AdamW completes the short step and runs out of memory on the long one")
    lines += ["", "| optimizer | short: s/step | short: peak GiB | long: status | long: peak reserved GiB | "
              "long: s/step | paged states GiB (outside torch) |", "|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        if "short" not in r:
            lines.append(f"| {r['optimizer']} | {r['status']}: {r.get('error', '')} |  |  |  |  |  |")
            continue
        short = _short_steps(r)
        long = r.get("long_capped") or r.get("long", {})
        long_s = f"{long['step_s']:.3f}" if long.get("status") == "ok" else "–"
        lines.append(f"| {r['optimizer']} | {short['step_s']:.3f} | {_gib(r['short']['peak_bytes'])} | "
                     f"{long.get('status')} | {_gib(long.get('peak_reserved_bytes'))} | {long_s} | "
                     f"{_gib(r.get('paged_state_bytes'))} |")
    paged = _short_steps(by.get("paged", {}))
    for other in ("bnb_adamw", "torch_adamw"):
        plain = by.get(other, {}).get("short")
        if paged and plain:
            lines.append(f"\nslowdown of paging at the short sequence: paged / {other} = "
                         f"{paged['step_s'] / plain['step_s']:.3f}x")
    lines.append("\nThe paged states are allocated with cudaMallocManaged, outside torch's caching allocator: the cap "
                 "does not count them, which is why the paged run fits under it. Nothing is evicted unless the GPU's "
                 "physical memory runs out; then the driver pages them to CPU RAM.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="7b", help="a LLaMA size (7b, 13b, 33b, 65b)")
    p.add_argument("--seq", type=int, default=4096, help="the long sequence (the memory spike)")
    p.add_argument("--short-seq", type=int, default=512, help="where every optimizer fits: the timed steps")
    p.add_argument("--cap-gb", type=float, default=None, help="torch's memory cap; default: calibrated")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    p.add_argument("--json", default=None)
    p.add_argument("--child-timeout", type=float, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("paged_oom.py needs a CUDA GPU (paged optimizers page CUDA managed memory); none here: nothing to do.")
        return 0
    if args.child is not None:
        job = json.loads(args.child)
        name = job.pop("model")
        result = run_case(config=gpu_scale.model_config(name), rec=gpu_scale.recipe(name), device="cuda", **job)
        gpu_scale._write_json(args.child_out, result)
        return 0
    names = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    if not names or any(o not in OPTIMIZERS for o in names):
        raise SystemExit(f"--optimizers must be a subset of {','.join(OPTIMIZERS)}, got {args.optimizers!r}")
    if args.seq <= args.short_seq or args.short_seq < 2:
        raise SystemExit(f"--seq ({args.seq}) must exceed --short-seq ({args.short_seq}), which must be >= 2")
    name = args.model.lower().removeprefix("llama-")
    gpu_scale.model_config(name)  # a clear error for an unknown size, before any child starts
    cap = None if args.cap_gb is None else int(args.cap_gb * GiB)
    if cap is None and "paged" not in names:
        raise SystemExit("without --cap-gb the paged optimizer calibrates the cap: include it in --optimizers")
    device = torch.device("cuda")
    print(f"device: {gpu_scale._device_name(device)}; model {name}; long seq {args.seq}, short seq {args.short_seq}",
          flush=True)
    from stamp import stamp as make_stamp

    stamp = make_stamp()
    rows = []
    order = ["paged", *[o for o in names if o != "paged"]] if "paged" in names else names
    for opt in order:
        job = dict(model=name, optimizer=opt, seq=args.seq, short_seq=args.short_seq, cap_bytes=cap,
                   calibrate=cap is None and opt == "paged", warmup=args.warmup, steps=args.steps, seed=args.seed,
                   progress=not args.no_progress)
        print(f"\n== {opt} (cap {_gib(cap)} GiB)", flush=True)
        row = run_isolated(job, args.child_timeout)
        rows.append(row)
        if cap is None and opt == "paged":
            cap = row.get("cap_bytes")
            if cap is None:
                print(f"calibration failed ({row.get('status')}: {row.get('error', row.get('long'))}); stopping")
                break
        print(json.dumps({k: v for k, v in row.items() if k != "short"}), flush=True)
        if args.json:
            gpu_scale._write_json(args.json, dict(stamp=stamp, cap_bytes=cap, rows=rows))
    print()
    print(report(rows, cap))
    if args.json:
        gpu_scale._write_json(args.json, dict(stamp=stamp, cap_bytes=cap, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
