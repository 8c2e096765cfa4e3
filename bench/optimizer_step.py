"""The optimizer step after the backward pass, ours against HF Trainer's, over the LoRA adapters of a LLaMA size
(r=64 on the seven linears of every block: 448 tensors, 160M elements for 7B; 1,120 and 800M for 65B).

    python bench/optimizer_step.py                               # 7b,13b,65b tensor counts, tiny widths (CPU)
    python bench/optimizer_step.py --models 7b,65b --widths real  # on a CUDA GPU: the real adapter shapes
    python bench/optimizer_step.py --steps 11 --json optimizer_step.json  # every step time, stamped

- baseline: what HF Trainer does — ``torch.nn.utils.clip_grad_norm_`` to 0.3, ``bitsandbytes.optim.PagedAdamW``
  (32-bit states) over every adapter tensor, ``zero_grad(set_to_none=True)``;
- ours: ``qlora_gpu.train.optimizer_step`` — multi-tensor clipping and the same bitsandbytes optimizer over one
  flat buffer holding every adapter (``qlora_gpu.optim``), gradients zeroed in place.

The arithmetic is the same bit for bit (``tests/test_gpu_scale.py``, ``tests/test_optim_flat.py``). The cost
is not: bitsandbytes' ``step`` is a Python loop that, for every tensor, looks up its state, prefetches it if
paged, launches one kernel and synchronises the GPU. With ``--widths tiny`` (every adapter 8 × 64, the default
and the only choice without CUDA) the arithmetic is negligible and what remains is that per-tensor host work; with
``--widths real`` the adapters have the model's shapes (GPU only: 160M to 800M elements).

The two stacks are timed interleaved, step by step: each of ``--steps`` repeats times one step of each, the order
alternating (baseline first in even repeats, ours first in odd ones), so that a change in the machine's load or
clocks hits both. Printed per model: each stack's median step time after one warm-up step each, the aten operators
one step dispatches, and ours / baseline as the median of the per-repeat ratios with its order-statistic interval
(``intervals.median_interval``: none below 5 repeats). ``--json PATH`` writes a stamped result (``bench/stamp.py``):
the command, the settings, every step time of both stacks, the order they ran in, and the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import gpu_scale  # noqa: E402  (bench/ is on sys.path when run as a script)
import torch  # noqa: E402
from intervals import MIN_REPEATS, median_interval  # noqa: E402
from stamp import stamp as make_stamp  # noqa: E402

STACKS = ("baseline", "ours")


def adapter_shapes(model: str, widths: str) -> dict[str, tuple[int, int]]:
    """name -> shape of every LoRA tensor of ``model``'s blocks (the recipe's r on the seven linears of
    ``qlora_ref.model.config.linear_shapes``); ``widths="tiny"``: each 8 × 64, as many tensors."""
    from qlora_ref.model.config import linear_shapes

    config = gpu_scale.model_config(model)
    r = gpu_scale.recipe(model)["r"]
    out = {}
    for i in range(config.num_hidden_layers):
        for name, (fan_out, fan_in) in linear_shapes(config).items():
            if widths == "tiny":
                r, fan_in, fan_out = 8, 64, 64
            out[f"layers.{i}.{name}.lora_A"] = (r, fan_in)
            out[f"layers.{i}.{name}.lora_B"] = (fan_out, r)
    return out


def _time_one(update, set_grads, device) -> float:
    """Seconds of one ``update()``, its gradients set before and the device synchronised around it."""
    set_grads()
    gpu_scale._sync(device)
    t0 = time.perf_counter()
    update()
    gpu_scale._sync(device)
    return time.perf_counter() - t0


def interleaved(stacks: dict, device, steps: int) -> tuple[dict[str, list[float]], list[list[str]]]:
    """``steps`` repeats of one timed step of every stack (``name -> (update, set_grads)``), the order reversed
    every other repeat; (every step's seconds per stack, the order of each repeat)."""
    names = list(stacks)
    times: dict[str, list[float]] = {n: [] for n in names}
    orders = []
    for i in range(steps):
        order = names if i % 2 == 0 else names[::-1]
        for n in order:
            times[n].append(_time_one(*stacks[n], device))
        orders.append(list(order))
    return times, orders


def run(model: str, widths: str, device, steps: int) -> dict:
    """Both steps over the same adapters and gradients, interleaved (``interleaved``): every step's seconds, their
    medians, the per-repeat ratios ours / baseline with their median and its interval, operators per step, and
    whether the parameters ended equal."""
    rec = gpu_scale.recipe(model)
    shapes = adapter_shapes(model, widths)
    g = torch.Generator(device=device).manual_seed(0)
    init = {k: torch.randn(s, generator=g, device=device) * 0.01 for k, s in shapes.items()}
    grads = {k: torch.randn(s, generator=g, device=device) for k, s in shapes.items()}
    row = dict(model=model, widths=widths, tensors=len(shapes), elements=sum(t.numel() for t in init.values()))
    params, stacks = {}, {}
    for stack in STACKS:
        named = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
        plist = list(named.values())

        class _Model:
            def lora_parameters(self, named=named):
                return named

        update = gpu_scale.make_update(stack, _Model(), plist, rec)

        def set_grads(named=named):  # what the backward pass leaves: not timed, not counted
            for k, p in named.items():
                if p.grad is None:
                    p.grad = grads[k].clone()
                else:
                    p.grad.copy_(grads[k])

        set_grads()
        update()  # warm-up: the states are allocated
        stacks[stack] = (update, set_grads)
        params[stack] = named
    times, orders = interleaved(stacks, device, steps)
    for stack, (update, set_grads) in stacks.items():
        row[f"{stack}_s"] = statistics.median(times[stack])
        row[f"{stack}_times_s"] = times[stack]
        set_grads()
        row[f"{stack}_ops"], _ = gpu_scale.count_ops(update)
    row["order"] = orders
    row["ratios"] = [o / b for o, b in zip(times["ours"], times["baseline"], strict=True)]
    row["ratio"] = median_interval(row["ratios"])  # ours / baseline time: median, low, high, coverage, n
    row["equal"] = all(torch.equal(params["baseline"][k], params["ours"][k]) for k in shapes)
    return row


def _interval(iv: dict) -> str:
    if iv["low"] is None:
        return f"no interval ({iv['n']} repeats < {MIN_REPEATS})"
    return f"{iv['low']:.3f}–{iv['high']:.3f} ({iv['coverage']:.1%})"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="7b,13b,65b", help="comma-separated LLaMA sizes (7b, 13b, 33b, 65b)")
    parser.add_argument("--widths", choices=("tiny", "real"), default="tiny",
                        help="tiny: every adapter 8 x 64 (host work only); real: the model's shapes (CUDA only)")
    parser.add_argument("--steps", type=int, default=11,
                        help="interleaved repeats (one timed step of each stack each; >= 5 for an interval)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--json", default=None, help="write the stamped result (every step time) to this file")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.widths == "real" and device.type != "cuda":
        parser.error("--widths real needs a CUDA device (160M to 800M adapter elements per step)")
    models = [gpu_scale._model_name(m, "--models") for m in args.models.split(",") if m.strip()]
    if device.type == "cpu":
        gpu_scale.cpu_setup()
    warnings.filterwarnings("ignore", message=".*[Pp]aged.*")
    command = ["bench/optimizer_step.py", *(sys.argv[1:] if argv is None else argv)]
    payload = dict(stamp=make_stamp(command), benchmark="optimizer_step", command=" ".join(command),
                   settings=dict(models=models, widths=args.widths, steps=args.steps, device=str(device),
                                 device_name=gpu_scale._device_name(device), stacks=list(STACKS),
                                 order="interleaved, reversed every other repeat"),
                   status="running", rows=[])
    print(f"device: {payload['settings']['device_name']}; {args.steps} interleaved repeats (median step time; "
          "ours / baseline: median of the per-repeat ratios, interval from order statistics)")
    print("| model | adapter tensors | elements | baseline ms | ours ms | ours / baseline time | interval | "
          "baseline ops | ours ops | same parameters |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|---|")
    for m in models:
        r = run(m, args.widths, device, args.steps)
        payload["rows"].append(r)
        if args.json:  # after every model: a run cut off keeps what it measured
            gpu_scale._write_json(args.json, payload)
        print(f"| {m} | {r['tensors']} | {r['elements']:,} | {r['baseline_s'] * 1e3:.2f} | {r['ours_s'] * 1e3:.2f} | "
              f"{r['ratio']['median']:.3f}x | {_interval(r['ratio'])} | {r['baseline_ops']} | {r['ours_ops']} | "
              f"{'yes' if r['equal'] else 'NO'} |", flush=True)
    payload["status"] = "done"
    if args.json:
        gpu_scale._write_json(args.json, payload)
        print(f"wrote {args.json}")
    return payload


if __name__ == "__main__":
    main()
