"""The optimizer step after the backward pass, ours against HF Trainer's, over the LoRA adapters of a LLaMA size
(r=64 on the seven linears of every block: 448 tensors, 160M elements for 7B; 1,120 and 800M for 65B).

    python bench/optimizer_step.py                               # 7b,13b,65b tensor counts, tiny widths (CPU)
    python bench/optimizer_step.py --models 7b,65b --widths real  # on a CUDA GPU: the real adapter shapes

- baseline: what HF Trainer does — ``torch.nn.utils.clip_grad_norm_`` to 0.3, ``bitsandbytes.optim.PagedAdamW``
  (32-bit states) over every adapter tensor, ``zero_grad(set_to_none=True)``;
- ours: ``qlora_gpu.train.optimizer_step`` — multi-tensor clipping and the same bitsandbytes optimizer over one
  flat buffer holding every adapter (``qlora_gpu.optim``), gradients zeroed in place.

The arithmetic is the same bit for bit (``tests/test_gpu_scale.py``, ``tests/test_optim_flat.py``). The cost
is not: bitsandbytes' ``step`` is a Python loop that, for every tensor, looks up its state, prefetches it if
paged, launches one kernel and synchronises the GPU. With ``--widths tiny`` (every adapter 8 × 64, the default
and the only choice without CUDA) the arithmetic is negligible and what remains is that per-tensor host work; with
``--widths real`` the adapters have the model's shapes (GPU only: 160M to 800M elements). Printed per model: the
median of ``--steps`` timed steps after one warm-up, the aten operators one step dispatches, and ours / baseline.
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


def _time(update, set_grads, device, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        set_grads()
        gpu_scale._sync(device)
        t0 = time.perf_counter()
        update()
        gpu_scale._sync(device)
        times.append(time.perf_counter() - t0)
    return times


def run(model: str, widths: str, device, steps: int) -> dict:
    """Both steps over the same adapters and gradients; median seconds and operators per step, and whether the
    parameters ended equal."""
    rec = gpu_scale.recipe(model)
    shapes = adapter_shapes(model, widths)
    g = torch.Generator(device=device).manual_seed(0)
    init = {k: torch.randn(s, generator=g, device=device) * 0.01 for k, s in shapes.items()}
    grads = {k: torch.randn(s, generator=g, device=device) for k, s in shapes.items()}
    row = dict(model=model, widths=widths, tensors=len(shapes), elements=sum(t.numel() for t in init.values()))
    params = {}
    for stack in ("baseline", "ours"):
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
        row[f"{stack}_s"] = statistics.median(_time(update, set_grads, device, steps))
        set_grads()
        row[f"{stack}_ops"], _ = gpu_scale.count_ops(update)
        params[stack] = named
    row["equal"] = all(torch.equal(params["baseline"][k], params["ours"][k]) for k in shapes)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="7b,13b,65b", help="comma-separated LLaMA sizes (7b, 13b, 33b, 65b)")
    parser.add_argument("--widths", choices=("tiny", "real"), default="tiny",
                        help="tiny: every adapter 8 x 64 (host work only); real: the model's shapes (CUDA only)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
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
    print(f"device: {gpu_scale._device_name(device)}; median of {args.steps} steps")
    print("| model | adapter tensors | elements | baseline ms | ours ms | ours / baseline time | baseline ops | "
          "ours ops | same parameters |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for m in models:
        r = run(m, args.widths, device, args.steps)
        print(f"| {m} | {r['tensors']} | {r['elements']:,} | {r['baseline_s'] * 1e3:.2f} | {r['ours_s'] * 1e3:.2f} | "
              f"{r['ours_s'] / r['baseline_s']:.3f}x | {r['baseline_ops']} | {r['ours_ops']} | "
              f"{'yes' if r['equal'] else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
