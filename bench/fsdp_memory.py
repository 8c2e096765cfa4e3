"""QLoRA sharded with FSDP2 at real scale on one GPU: each rank's peak memory for world sizes 1-8, beside the
calculator's figure, and the engine's cost at world size 1 (issue 33).

    python bench/fsdp_memory.py --json fsdp.json --deadline 520       # on a CUDA GPU (bench/gpu_session.sh fsdp)
    python bench/fsdp_memory.py --tiny                                # CPU smoke run of every path (not a benchmark)

**Memory.** LLaMA-2-70B (``--model``), batch 1 x sequence 2048 (``--seq``), the paper's recipe for models above 13B
(NF4 + double quantization, bfloat16 compute, LoRA r=64 / alpha 16 / dropout 0.05 on all seven linears with
float32 adapters, paged AdamW 32-bit, clipping at 0.3, gradient checkpointing; SDPA attention), built and sharded
by ``qlora_gpu.fsdp`` and stepped by ``qlora_gpu.fsdp_train.ShardedTrainer``, for each world size of
``--world-sizes`` (without offload) and of ``--offload`` (with FSDP2's CPU offload). One GPU plays rank 0 of N:
torch's fake process group (``torch.testing._internal.distributed.fake_pg``, the way torchtitan estimates memory)
accepts every collective and moves nothing, so rank 0 allocates what it would among N ranks — its shards, the
all-gather and reduce-scatter buffers, its micro-batch's activations — while it computes on whatever those
buffers hold (the other ranks' shards never arrive: the losses mean nothing, the memory does). Each world size
runs in a process of its own. Per run: the build's peak; the steps' peak (``max_memory_allocated``, reset after
the build); the paged optimizer states, which bitsandbytes allocates in CUDA managed memory outside torch's
allocator (so "peak + paged" is what the GPU holds when no page is evicted); and ``qlora memory --gpus N``'s
figures for the same settings (``qlora_ref.memory_sharded.estimate_sharded_memory``).

**Engine cost.** LLaMA-7B (``--throughput-model``) at the same sequence in one process: the unsharded trainer
(``GpuTrainer``) and world size 1 under FSDP2 (a real process group of one: the all-gathers are copies), their
steps interleaved (``--rounds`` rounds of ``--steps`` steps each, after a warm-up), tokens/s and the ratio.

Every result is stamped with the commit, the versions and the device. Without CUDA the tiny config runs on the
CPU (gloo and the fake group): a smoke test of the code paths, its numbers are not measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_scale import TINY, _brief, _device_name, _is_oom, _write_json, cpu_setup, free_memory  # noqa: E402
from stamp import stamp as make_stamp  # noqa: E402

GiB = 2**30
#: the paper's recipe above 13B (Appendix B), as the calculator and the trainer take it
RECIPE = dict(lora_r=64, lora_alpha=16.0, lora_dropout=0.05, learning_rate=1e-4, max_grad_norm=0.3,
              optimizer="paged_adamw", gradient_checkpointing=True, compute_dtype="bfloat16")


# ----------------------------------------------------------------------------------------------- pieces
def fake_process_group(world_size: int) -> None:
    """This process as rank 0 of ``world_size`` under torch's fake process group; a clear error where this torch
    lacks it (it is internal: ``torch.testing._internal``)."""
    import torch.distributed as dist

    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError as e:
        raise SystemExit(f"this torch ({torch.__version__}) has no fake process group "
                         f"(torch.testing._internal.distributed.fake_pg: {e}); the memory table needs it") from e
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)


def real_process_group(device: torch.device) -> None:
    """A real process group of one (NCCL on a GPU, gloo on the CPU) on a free local port."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)


def world_of(device: torch.device):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from qlora_gpu.fsdp_train import World

    return World(init_device_mesh(device.type, (dist.get_world_size(),)), device)


def model_config(name: str):
    if name == "tiny":
        return TINY
    from qlora_gpu.prepare import llama_config

    return llama_config(name)


def train_config(tiny: bool):
    from qlora_ref.train.config import TrainConfig

    return TrainConfig(**{**RECIPE, **(dict(lora_r=8) if tiny else {})})


def build(name: str, config, device, world=None, cpu_offload: bool = False):
    """The model of ``name`` on ``device`` with the recipe (random weights drawn from the config alone), sharded
    block by block over ``world``'s mesh when given; its trainer."""
    from qlora_gpu.fsdp import shard_layer, shard_model
    from qlora_gpu.fsdp_train import ShardedTrainer
    from qlora_gpu.prepare import prepare_model
    from qlora_gpu.train import GpuTrainer

    hook = None if world is None else (lambda layer: shard_layer(layer, world.mesh, cpu_offload=cpu_offload))
    model = prepare_model(model_config(name), config.quant_config(), config.lora_config(), device=device,
                          dtype="bfloat16", attn_implementation="sdpa", progress=False, layer_hook=hook)
    if world is None:
        return GpuTrainer(model, config)
    shard_model(model, world.mesh, cpu_offload=cpu_offload)
    return ShardedTrainer(model, config, world, cpu_offload=cpu_offload)


def make_batch(vocab: int, seq: int, seed: int = 0) -> dict:
    ids = np.random.default_rng(seed).integers(0, vocab, (1, seq), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()}


def step(trainer, batch, config) -> float:
    loss = trainer.forward_backward(batch, int(batch["labels"].size) - 1)
    trainer.optimizer_step(config.learning_rate, config.max_grad_norm)
    return loss


@contextlib.contextmanager
def measured(device: torch.device, out: dict, key: str):
    """``out[key]``: the peak of torch's allocated device memory inside the block (on CUDA; synchronized), and
    ``out["model_bytes"]``: what stays allocated after it; the peak counter then starts afresh."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield
    sync(device)
    if device.type == "cuda":
        out[key] = int(torch.cuda.max_memory_allocated(device))
        free_memory(device)
        out["model_bytes"] = int(torch.cuda.memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paged_bytes(trainer) -> int:
    """Bytes of the optimizer states bitsandbytes put in CUDA managed memory (not counted by torch)."""
    inner = getattr(trainer.optimizer, "inner", trainer.optimizer)
    opt = inner.torch_optimizer
    return 0 if opt is None else sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                                     if torch.is_tensor(t) and getattr(t, "is_paged", False))


def prediction_shape(name: str):
    """The calculator's shape of model ``name`` (the tiny config's, or a named one)."""
    from qlora_ref.memory import ModelShape, load_model_shape

    if name != "tiny":
        return load_model_shape(name)
    return ModelShape.from_config(TINY, "tiny")


def prediction(name: str, world_size: int, seq: int, cpu_offload: bool, tiny: bool) -> dict:
    """``qlora memory --gpus N`` for the run's settings."""
    from qlora_ref.memory_sharded import estimate_sharded_memory

    r = train_config(tiny)
    m = estimate_sharded_memory(prediction_shape(name), world_size, cpu_offload=cpu_offload, seq=seq, r=r.lora_r,
                                lora_dropout=r.lora_dropout, adapter_dtype="float32", unquantized_dtype="bfloat16",
                                attention="flash", optimizer=r.optimizer)
    return m.to_dict()


def stamp(device: torch.device) -> dict:
    """``bench/stamp.py``'s stamp (code, versions, GPUs, host) and the device this run measured on."""
    return dict(make_stamp(), device=_device_name(device))


# ----------------------------------------------------------------------------------------------- children
def memory_run(name: str, world_size: int, cpu_offload: bool, seq: int, warmup: int, steps: int) -> dict:
    """One world size: rank 0 of ``world_size`` under the fake process group."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = name == "tiny"
    out = dict(kind="memory", model=name, world_size=world_size, cpu_offload=cpu_offload, seq=seq, batch=1,
               status="ok", stamp=stamp(device), predicted=prediction(name, world_size, seq, cpu_offload, tiny))
    fake_process_group(world_size)
    world = world_of(device)
    config = train_config(tiny)
    phase, trainer = "build", None
    try:
        t0 = time.perf_counter()
        with measured(device, out, "build_peak_bytes"):
            trainer = build(name, config, device, world, cpu_offload)
        out["build_s"] = time.perf_counter() - t0
        phase = "step"
        batch = make_batch(model_config(name).vocab_size, seq)
        times = []
        for i in range(warmup + steps):
            sync(device)
            t0 = time.perf_counter()
            step(trainer, batch, config)
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        out["step_s"] = statistics.median(times)
        out["paged_state_bytes"] = paged_bytes(trainer)
        if device.type == "cuda":
            out["peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
            out["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
            out["peak_plus_paged_bytes"] = out["peak_bytes"] + out["paged_state_bytes"]
            # measured against predicted: the GPU's share with pages out, and with them in
            out["peak_over_predicted"] = out["peak_bytes"] / out["predicted"]["device_min_bytes"]
            out["peak_plus_paged_over_predicted"] = out["peak_plus_paged_bytes"] / out["predicted"]["device_bytes"]
    except Exception as e:  # noqa: BLE001 - an OOM is a result
        if not _is_oom(e):
            raise
        out.update(status="OOM", phase=phase, error=_brief(e))
    finally:
        del trainer
        free_memory(device)
    return out


def throughput_run(name: str, seq: int, warmup: int, steps: int, rounds: int) -> dict:
    """The unsharded trainer and FSDP2 at world size 1, in this process, steps interleaved."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = name == "tiny"
    out = dict(kind="throughput", model=name, seq=seq, batch=1, status="ok", stamp=stamp(device))
    real_process_group(device)
    config = train_config(tiny)
    trainers = {"unsharded": build(name, config, device), "fsdp1": build(name, config, device, world_of(device))}
    batch = make_batch(model_config(name).vocab_size, seq)
    times = {k: [] for k in trainers}
    for t in trainers.values():
        for _ in range(warmup):
            step(t, batch, config)
    for _ in range(rounds):
        for k, t in trainers.items():
            for _ in range(steps):
                sync(device)
                t0 = time.perf_counter()
                step(t, batch, config)
                sync(device)
                times[k].append(time.perf_counter() - t0)
    for k, ts in times.items():
        med = statistics.median(ts)
        out[k] = {"step_s": med, "tokens_per_s": seq / med, "min_s": min(ts), "max_s": max(ts), "step_times_s": ts}
    out["fsdp1_over_unsharded_tokens_per_s"] = out["fsdp1"]["tokens_per_s"] / out["unsharded"]["tokens_per_s"]
    return out


# ----------------------------------------------------------------------------------------------- orchestration
def child(job: dict, path: str) -> None:
    if torch.device("cuda" if torch.cuda.is_available() else "cpu").type == "cpu":
        cpu_setup()
    if job["kind"] == "memory":
        result = memory_run(job["model"], job["world_size"], job["cpu_offload"], job["seq"], job["warmup"],
                            job["steps"])
    else:
        result = throughput_run(job["model"], job["seq"], job["warmup"], job["steps"], job["rounds"])
    Path(path).write_text(json.dumps(result))


def run_child(job: dict, timeout: float) -> dict:
    """``job`` in a process of its own (this script with ``--child``): the GPU is empty again when it returns."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "result.json")
        this = [sys.executable, str(Path(__file__).resolve())]
        try:
            code = subprocess.run([*this, "--child", json.dumps(job), "--child-out", str(path)], timeout=timeout)
        except subprocess.TimeoutExpired:
            return dict(job, status="timeout", error=f"over {timeout:.0f} s")
        failed = dict(job, status="failed", error=f"child process exited with {code.returncode}")
        return json.loads(path.read_text()) if path.exists() else failed


def plan(args) -> list[dict]:
    """The runs in order: the goal (world size 2, with and without offload), the engine's cost, then the rest of
    the table."""
    sizes = [int(x) for x in args.world_sizes.split(",") if x]
    offload = [int(x) for x in args.offload.split(",") if x]
    mem = lambda n, o: dict(kind="memory", model=args.model, world_size=n, cpu_offload=o, seq=args.seq,  # noqa: E731
                            warmup=args.warmup, steps=args.steps)
    first = [mem(n, o) for n, o in ((2, False), (2, True)) if (n in sizes and not o) or (n in offload and o)]
    rest = [mem(n, False) for n in sizes if n != 2] + [mem(n, True) for n in offload if n != 2]
    thr = [dict(kind="throughput", model=args.throughput_model, seq=args.seq, warmup=2, steps=args.tp_steps,
                rounds=args.rounds)] if args.throughput_model else []
    return first + thr + rest


def gb(x) -> str:
    return "-" if x is None else f"{x / 1e9:.2f}"


def table(rows: list[dict]) -> str:
    lines = ["| world size | CPU offload | status | build peak GB | step peak GB | paged GB | peak + paged GB | "
             "predicted GB (pages out / in) | measured / predicted | s/step |", "|" + "---|" * 10]
    for r in rows:
        if r.get("kind") != "memory":
            continue
        p = r.get("predicted", {})
        ratio = r.get("peak_plus_paged_over_predicted")
        lines.append(f"| {r['world_size']} | {'yes' if r['cpu_offload'] else 'no'} | {r['status']} | "
                     f"{gb(r.get('build_peak_bytes'))} | {gb(r.get('peak_bytes'))} | {gb(r.get('paged_state_bytes'))}"
                     f" | {gb(r.get('peak_plus_paged_bytes'))} | {gb(p.get('device_min_bytes'))} / "
                     f"{gb(p.get('device_bytes'))} | {'-' if ratio is None else f'{ratio:.3f}'} | "
                     f"{r.get('step_s', float('nan')):.2f} |")
    for r in rows:
        if r.get("kind") == "throughput" and r.get("status") == "ok":
            u, f = r["unsharded"], r["fsdp1"]
            lines.append(f"\nworld size 1 under FSDP2 / unsharded, {r['model']} seq {r['seq']}: "
                         f"{r['fsdp1_over_unsharded_tokens_per_s']:.3f}x tokens/s ({f['tokens_per_s']:.0f} vs "
                         f"{u['tokens_per_s']:.0f}; step {f['min_s']:.3f}-{f['max_s']:.3f} s vs "
                         f"{u['min_s']:.3f}-{u['max_s']:.3f} s)")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-2-70b")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--world-sizes", default="1,2,3,4,5,6,7,8", help="without CPU offload")
    p.add_argument("--offload", default="2,8", help="world sizes run with CPU offload too")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=1, help="measured steps per world size (after --warmup)")
    p.add_argument("--throughput-model", default="7b", help="'' skips the engine-cost run")
    p.add_argument("--tp-steps", type=int, default=3, help="steps per round of the engine-cost run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="the tiny config on whatever device (a smoke run)")
    p.add_argument("--deadline", type=float, default=None, help="seconds for the whole command")
    p.add_argument("--child-timeout", type=float, default=150.0)
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny or not torch.cuda.is_available():
        if not args.tiny:
            print("no CUDA device: the tiny config only (a smoke run, not a benchmark)", file=sys.stderr)
        args.model = "tiny"
        args.throughput_model = "tiny" if args.throughput_model else ""
        args.seq = min(args.seq, 64)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.child:
        child(json.loads(args.child), args.child_out)
        return []
    t_start = time.perf_counter()
    rows = []
    for job in plan(args):
        left = None if args.deadline is None else args.deadline - (time.perf_counter() - t_start)
        if left is not None and left < 45:
            rows.append({**job, "status": "skipped", "error": f"{left:.0f} s left"})
            continue
        timeout = args.child_timeout if left is None else min(args.child_timeout, left - 10)
        print(f"== {time.strftime('%H:%M:%S')} {job}", flush=True)
        rows.append(run_child(job, timeout))
        print(table(rows[-1:]), flush=True)
        if args.json:
            _write_json(args.json, {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "rows": rows})
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
