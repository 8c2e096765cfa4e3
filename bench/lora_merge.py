"""How much merging a LoRA adapter into a 4-bit base weight loses: float32 merge, bfloat16 merge and re-quantized
merge (NF4 + double quantization, the base weight's settings), for adapters of growing size.

    python bench/lora_merge.py [--size 1024] [--r 16] [--tokens 256]

The base weight is N(0, 0.02²); B is drawn so that ||ΔW||_F / ||W||_F = rho (ΔW = s·B A, A as PEFT initialises
it). Errors are of the outputs on N(0, 1) inputs, relative to the adapter's contribution (0: the fine-tuning is
kept; 1: as if the adapter were dropped): ``qlora_ref.lora_merge.merge_error``.
"""

from __future__ import annotations

import argparse

import numpy as np


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--quant-type", default="nf4")
    args = parser.parse_args(argv)

    import qlora_ref
    from qlora_ref.lora import QLoRALinear
    from qlora_ref.lora_merge import merge_error

    rng = np.random.default_rng(0)
    n = args.size
    W = (rng.standard_normal((n, n)) * 0.02).astype(np.float32)
    layer = QLoRALinear.from_weight(W, args.r, 16.0, quant_type=args.quant_type, compute_dtype="float32")
    w = qlora_ref.dequantize_4bit(layer.weight, "float32")
    x = rng.standard_normal((args.tokens, n)).astype(np.float32)
    qerr = np.linalg.norm(w - W) / np.linalg.norm(W)
    print(f"{n}x{n} weight N(0, 0.02^2), {args.quant_type} + double quantization, blocksize 64, r={args.r}; "
          f"quantization error of the base weight ||Q(W) - W|| / ||W|| = {qerr:.3f}")
    print(f"{'||dW||/||W||':>12s} {'float32':>9s} {'bfloat16':>9s} {'requantized':>12s} {'retained':>9s} "
          f"{'codes changed':>14s}")
    for rho in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3):
        b = rng.standard_normal((n, args.r)).astype(np.float32)
        b *= rho * np.linalg.norm(w) / np.linalg.norm(layer.scaling * (b @ layer.lora_A))
        layer.lora_B = b
        e = merge_error(layer, x)
        print(f"{rho:12.3f} {e['float32']:9.1e} {e['bfloat16']:9.3f} {e['requantized']:12.3f} {e['retained']:9.3f} "
              f"{e['codes_changed']:14.4f}")


if __name__ == "__main__":
    main()
