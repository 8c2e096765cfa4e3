"""The longest sequence that trains — one optimizer step at batch 1, QLoRA r=32 on all seven linears of every block —
for the Llama-3.1-8B and -70B shapes: ours (chunked loss, activation offload, SDPA) beside transformers + peft +
bitsandbytes with SDPA, found by search in the same run (issue 35).

    python bench/long_context.py --json long_context.json                  # on a CUDA GPU: the default plan below
    python bench/long_context.py --runs 8b:ours@342733 --budget 560        # one try at one length
    python bench/long_context.py --tiny                                    # CPU check of the search (not a result)

Both stacks hold the same random weights (``bench/gpu_scale.py``'s builders: NF4 + double quantization, bfloat16
compute, float32 adapters, paged AdamW 32-bit, clipping at 0.3, gradient checkpointing, SDPA attention); LoRA
r=32, alpha=32, dropout 0 (Unsloth's published setting; dropout would keep a copy of every adapter input). What
differs is what each does at long context:

- baseline: transformers' causal LM loss (``labels=``): the logits of every position upcast to float32, and their
  log-softmax kept for the backward pass; the checkpointed block inputs stay on the GPU (peft's
  ``prepare_model_for_kbit_training`` also upcasts the embedding and LM head to float32, as it does for users);
- ours: the LM head and the loss in chunks of ``--loss-chunk`` positions (``qlora_gpu.chunked_loss``) and the
  checkpointed block inputs in pinned host memory (``qlora_gpu.offload``, up to ``--host-fraction`` of the host's
  RAM; the rest stay on the GPU).

The search, per (model, stack), in one child process (the GPU empty when it ends; bitsandbytes' paged states die
with it): the model is built once; a try is one step on a batch of random tokens, an out-of-memory error (device or
pinned host) is a result, and after every try the gradients, the exception and every tensor of the step are
dropped, then ``gc.collect`` and ``torch.cuda.empty_cache``. It starts where ``qlora_ref.memory`` predicts the
card full (ours: with ``loss_chunk`` and ``offload``), doubles (or halves) until it brackets the limit, then
bisects to ``--tolerance``. A try's time is predicted from a FLOP count (linear layers 6 N per token with the
recomputation, attention 4.5 x 2 T^2 H D per block for forward, backward and recomputation) scaled by the
measured time of the previous try; a try predicted past the run's time slice is not started, and the result then
says "time-limited": the longest length that trained is a lower bound, not the limit. The results (every try:
length, status, seconds, peak GPU memory) are written after each try, stamped (commit, versions, hardware).

Time: every run has a slice of ``--budget`` (default 520 s, about 9 minutes of device time; the plan: 8b:baseline
80 s, 8b:ours 190 s, 70b:baseline 80 s, 70b:ours 150 s; process start, imports and the build — 2 s at 8B, 8 s at
70B on 2026-11-30's H200 — come out of the slice), so the invocation ends within the budget whatever the card.
``--plan-only`` prints where each search starts and what its first try should cost. On an 80 GB H100 at an
assumed 300 TFLOP/s (80 x 10^9 bytes): 8b:baseline starts at 33,792 tokens (~10 s a try) and converges; 8b:ours
starts at 120,832 (~76 s) and doubling would cost ~266 s, so it ends time-limited with a lower bound; 70b:baseline
starts at 5,120 (~8 s); 70b:ours at 27,648 (~53 s), time-limited too. The calculator expects ours full at 181,248
tokens at 8B (80 GB; the float32 residual stream of ``prepare_model``) — the block being recomputed holds its MLP's
intermediates, 4 x 14,336 values a token, three of them float32 — so Unsloth's 342,733 is out of reach of this
design on 80 GB (docs/long_context.md); a single try at the predicted limit costs ~2.6 minutes:
``--runs 8b:ours@182272 --budget 560`` in a session of its own.

Without CUDA only ``--tiny`` runs: a 2-block model of the 8B layout's kind with a simulated memory cap (a try
longer than ``--tiny-cap`` tokens raises ``torch.OutOfMemoryError`` before its step), which checks the search,
the cleanup and the report, not memory.
"""

from __future__ import annotations

import time

T0 = time.monotonic()  # a child's time slice starts with the process, imports included

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

from qlora_ref.memory import LLAMA3_CONFIGS, estimate_memory, load_model_shape  # noqa: E402
from qlora_ref.model.config import ModelConfig  # noqa: E402

STACKS = ("ours", "baseline")
#: the default plan: (model, stack, seconds of the budget); the rest of --budget is left as a margin
PLAN = (("8b", "baseline", 80), ("8b", "ours", 190), ("70b", "baseline", 80), ("70b", "ours", 150))
#: LoRA of the comparison (Unsloth's published long-context setting) and the optimizer's hyperparameters
RECIPE = dict(r=32, alpha=32.0, dropout=0.0, lr=2e-4, max_grad_norm=0.3, betas=(0.9, 0.999), eps=1e-8,
              weight_decay=0.0)
#: throughput assumed for the first try's time prediction (later tries scale the previous try's measured time)
ASSUMED_FLOPS = {"cuda": 300e12, "cpu": 2e10}
GiB = 2**30


def model_config(name: str) -> ModelConfig:
    """``8b`` / ``70b``: Llama-3.1's shape (``qlora_ref.memory.LLAMA3_CONFIGS``, rope theta 500,000 with the
    llama3 scaling of Meta's config.json); ``tiny``: 2 blocks, 4 query heads sharing 2 key/value heads."""
    if name == "tiny":
        return ModelConfig(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=256,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                           rms_norm_eps=1e-5, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    c = LLAMA3_CONFIGS[f"llama-3.1-{name}"]
    return ModelConfig(model_type="llama", vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                       intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_hidden_layers"],
                       num_attention_heads=c["num_attention_heads"], num_key_value_heads=c["num_key_value_heads"],
                       head_dim=c["hidden_size"] // c["num_attention_heads"], rms_norm_eps=1e-5,
                       rope_theta=500000.0, max_position_embeddings=131072, bos_token_id=128000,
                       eos_token_id=128001,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def step_flops(config: ModelConfig, seq: int) -> float:
    """FLOPs of one checkpointed QLoRA step at batch 1 (see the module docstring; adapters and the optimizer are
    negligible): 6 N per token through the frozen linears (forward, input gradients, recomputation), the LM head
    twice forward (ours recomputes it) and once backward, attention 4.5 x 2 T^2 H D per block (causal: half of
    the 4 T^2 H D of QK^T and PV, times forward + recomputation + 2.5 for the backward pass)."""
    d, f, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    linear = d * (2 * q + 2 * kv) + 3 * d * f
    head = config.vocab_size * d
    attention = 4.5 * 2 * seq * seq * q
    return L * (6 * linear * seq + attention) + 6 * head * seq


def feasible_length(config: ModelConfig, seconds: float, device_type: str, quantum: int) -> int:
    """The longest length (a multiple of ``quantum``) whose step ``step_flops`` predicts within ``seconds``."""
    lo, hi = quantum, quantum
    while step_flops(config, hi) / ASSUMED_FLOPS[device_type] <= seconds and hi < 2**24:
        lo, hi = hi, 2 * hi
    while hi - lo > quantum:
        mid = (lo + hi) // 2 // quantum * quantum
        lo, hi = (mid, hi) if step_flops(config, mid) / ASSUMED_FLOPS[device_type] <= seconds else (lo, mid)
    return lo


def predicted_limit(name: str, stack: str, device_bytes: int, loss_chunk: int) -> int:
    """The longest sequence ``qlora_ref.memory`` expects to fit ``device_bytes`` (the paged states counted on the
    device, a 10 % margin for what it does not count), by bisection over its estimate."""
    if name == "tiny":
        return 1024
    shape = load_model_shape(f"llama-3.1-{name}")
    kwargs = dict(method="qlora", r=RECIPE["r"], attention="flash", lora_dropout=0.0, adapter_dtype="float32",
                  unquantized_dtype="bfloat16" if stack == "ours" else "float32")
    if stack == "ours":
        kwargs.update(loss_chunk=loss_chunk, offload=True)

    def fits(seq):
        return estimate_memory(shape, seq=seq, **kwargs).total_bytes <= 0.9 * device_bytes

    lo, hi = 1024, 1024
    while fits(hi) and hi < 2**24:
        lo, hi = hi, hi * 2
    while hi - lo > 1024:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ----------------------------------------------------------------------------------------------- one stack
class Stack:
    """A built model with its step at a given length: ``step(seq)`` runs forward, loss, backward, clipping and the
    optimizer step on random tokens; ``clear()`` drops everything the step left."""

    def __init__(self, name: str, stack: str, device: torch.device, loss_chunk: int, host_fraction: float):
        import gpu_scale

        self.config, self.device, self.stack = model_config(name), device, stack
        if stack == "baseline":
            self.model, self.params, self.loss_fn = gpu_scale.build_baseline(self.config, device, RECIPE,
                                                                           progress=False)
            self.update = gpu_scale.HFUpdate(gpu_scale.make_optimizer(self.params, RECIPE), self.params,
                                             RECIPE["max_grad_norm"])
        else:
            from qlora_gpu.chunked_loss import chunked_nll_sum
            from qlora_gpu.offload import ActivationOffload

            model, self.params, _ = gpu_scale.build_ours(self.config, device, RECIPE, progress=False)
            host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            model.activation_offload = ActivationOffload(max_host_bytes=int(host_fraction * host))

            def loss_fn(ids):
                nll, n = chunked_nll_sum(model.hidden_states(ids), model.lm_head_weight, ids, loss_chunk)
                return nll / n

            self.model, self.loss_fn = model, loss_fn
            self.update = gpu_scale.OursUpdate(model.lora_parameters(), RECIPE)

    def step(self, seq: int) -> float:
        g = torch.Generator().manual_seed(seq)
        ids = torch.randint(0, self.config.vocab_size, (1, seq), generator=g).to(self.device)
        loss = self.loss_fn(ids)
        import gpu_scale

        gpu_scale.backward(loss)  # as qlora's training step runs it (the baseline has no deferring layers)
        self.update()
        return float(loss.detach())

    def clear(self) -> None:
        for p in self.params:
            p.grad = None
        zero = getattr(getattr(self.update, "optimizer", None), "zero_grad", None)
        if callable(zero) and self.stack == "ours":  # qlora_gpu.optim's flat gradient buffer
            zero(self.model.lora_parameters())
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def search(stack: Stack, start: int, budget_s: float, tolerance: float, quantum: int, only: int | None,
           cap: int | None, report) -> dict:
    """Find the longest length that trains (see the module docstring); ``report(result)`` after every try."""
    t_end = time.monotonic() + budget_s
    result = {"tries": [], "status": "running"}
    lo = hi = None
    seq = only if only is not None else max(quantum, start // quantum * quantum)
    prev = None  # (seq, seconds) of the last completed try
    device_type = stack.device.type
    while True:
        if only is None and lo is not None and hi is not None and hi <= lo * (1 + tolerance) + quantum:
            result["status"] = "converged"
            break
        flops = step_flops(stack.config, seq)
        predicted = prev[1] * flops / step_flops(stack.config, prev[0]) if prev else flops / ASSUMED_FLOPS[
            device_type]
        if predicted > t_end - time.monotonic():
            result["status"] = "time-limited"
            result["next_untried"] = {"seq": seq, "predicted_s": predicted}
            break
        row = {"seq": seq, "predicted_s": round(predicted, 1)}
        t0 = time.perf_counter()
        oom = None
        try:
            if cap is not None and seq > cap:  # --tiny: the simulated card
                raise torch.OutOfMemoryError(f"simulated: {seq} tokens > --tiny-cap {cap}")
            row["loss"] = stack.step(seq)
            if device_type == "cuda":
                torch.cuda.synchronize(stack.device)
                row["peak_bytes"] = int(torch.cuda.max_memory_allocated(stack.device))
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - an out-of-memory error is a result; anything else is not
            if not _is_oom(e):
                raise
            oom = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if oom is not None:  # outside the except block: the traceback and the step's tensors are gone
            row.update(status="OOM", error=oom)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        stack.clear()
        result["tries"].append(row)
        report(result)
        if only is not None:
            result["status"] = "done"
            break
        if row["status"] == "ok":
            prev = (seq, row["seconds"])
            lo = seq
            seq = 2 * seq if hi is None else (lo + hi) // 2 // quantum * quantum
        else:
            hi = seq
            if lo is None and seq <= quantum:
                result["status"] = "nothing fits"
                break
            seq = max(quantum, seq // 2 // quantum * quantum) if lo is None else (lo + hi) // 2 // quantum * quantum
    result["longest_ok"] = lo if only is None else (seq if result["tries"][-1]["status"] == "ok" else None)
    result["shortest_oom"] = hi if only is None else (seq if result["tries"][-1]["status"] == "OOM" else None)
    report(result)
    return result


def run_child(job: dict, out_path: str) -> None:
    from stamp import stamp

    device = torch.device(job["device"])
    if device.type == "cpu":
        from gpu_scale import cpu_setup

        cpu_setup()
    out = dict(job, stamp=stamp(), status="build")

    def report(result):
        out.update(result)
        Path(out_path).write_text(json.dumps(out, indent=2))

    report({})
    t0 = time.perf_counter()
    stack = Stack(job["model"], job["stack"], device, job["loss_chunk"], job["host_fraction"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["model_bytes"] = int(torch.cuda.memory_allocated(device))
        out["device_bytes"] = int(torch.cuda.get_device_properties(device).total_memory)
    out["build_s"] = round(time.perf_counter() - t0, 1)
    out["startup_s"] = round(time.monotonic() - T0, 1)  # imports and build
    search(stack, job["start"], job["budget_s"] - (time.monotonic() - T0) - 5, job["tolerance"], job["quantum"],
           job["only"], job["cap"], report)


# ----------------------------------------------------------------------------------------------- orchestration
def parse_runs(spec: str | None, tiny: bool) -> list[tuple[str, str, int | None, float | None]]:
    """``model:stack[@seq]`` comma-separated -> (model, stack, only this length or None, seconds or None)."""
    if spec is None:
        return [("tiny", s, None, None) for s in STACKS] if tiny else [(m, s, None, float(t)) for m, s, t in PLAN]
    runs = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        head, _, only = item.partition("@")
        model, _, stack = head.lower().partition(":")
        if model not in ("8b", "70b", "tiny") or stack not in STACKS:
            raise SystemExit(f"--runs: {item!r} is not model:stack[@seq] with model 8b|70b|tiny, stack "
                             f"{'|'.join(STACKS)}")
        runs.append((model, stack, int(only) if only else None, None))
    return runs


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=None, help="comma-separated model:stack[@seq] (8b|70b|tiny, ours|baseline; "
                   "@seq: one try at that length) in order; default: the plan in the module docstring")
    p.add_argument("--tiny", action="store_true", help="the CPU check: tiny model, simulated memory cap")
    p.add_argument("--tiny-cap", type=int, default=700, help="--tiny: tries longer than this 'run out of memory'")
    p.add_argument("--budget", type=float, default=520.0, help="seconds for the whole invocation")
    p.add_argument("--tolerance", type=float, default=0.05, help="stop bisecting when the bracket is this narrow")
    p.add_argument("--loss-chunk", type=int, default=8192, help="ours: positions per chunk of the LM head + loss")
    p.add_argument("--host-fraction", type=float, default=0.7, help="ours: at most this share of the host's RAM "
                   "for offloaded block inputs")
    p.add_argument("--start", type=int, default=None, help="first length of every search (default: the memory "
                   "calculator's prediction for the card)")
    p.add_argument("--json", default=None, help="write all results here (after every try)")
    p.add_argument("--plan-only", action="store_true", help="print each search's start and first try's predicted "
                   "time (CUDA: from this card's memory), run nothing")
    p.add_argument("--device", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        run_child(json.loads(args.child), args.child_out)
        return []

    t_start = time.monotonic()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("without CUDA only --tiny runs (a CPU check of the search, not a result)")
    runs = parse_runs(args.runs, args.tiny)
    device_bytes = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    plan_s = [t if t is not None else args.budget / len(runs) for *_, t in runs]
    scale = min(1.0, (args.budget - 10) / sum(plan_s))
    print(f"plan ({device}): " + ", ".join(f"{m}:{s}{'@' + str(o) if o else ''} {t * scale:.0f} s"
                                            for (m, s, o, _), t in zip(runs, plan_s, strict=True))
          + f"; budget {args.budget:.0f} s", flush=True)
    rows = []

    def write():
        if args.json:
            tmp = Path(args.json).with_suffix(".tmp")
            tmp.write_text(json.dumps({"rows": rows, "summary": summary(rows)}, indent=2))
            os.replace(tmp, args.json)

    for (model, stack, only, _), slice_s in zip(runs, plan_s, strict=True):
        left = args.budget - (time.monotonic() - t_start)
        budget_s = min(slice_s * scale, left - 5)
        if budget_s < 30:
            rows.append(dict(model=model, stack=stack, status="skipped", error=f"only {left:.0f} s left"))
            continue
        quantum = 64 if model == "tiny" else 1024
        # where the calculator expects the card full, unless a step there would take more than 40 % of the slice
        start = args.start or (args.tiny_cap // 2 if model == "tiny" else min(
            predicted_limit(model, stack, device_bytes, args.loss_chunk),
            feasible_length(model_config(model), 0.4 * budget_s, device.type, quantum)))
        job = dict(model=model, stack=stack, device=str(device), start=start, budget_s=budget_s,
                   tolerance=args.tolerance, quantum=quantum, only=only, cap=args.tiny_cap if model == "tiny" else None,
                   loss_chunk=args.loss_chunk if model != "tiny" else 96, host_fraction=args.host_fraction)
        first = start if only is None else only
        print(f"== {model}:{stack} start {first}, {budget_s:.0f} s (first try predicted "
              f"{step_flops(model_config(model), first) / ASSUMED_FLOPS[device.type]:.0f} s)", flush=True)
        if args.plan_only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job), "--child-out", str(out)]
            try:
                subprocess.run(cmd, timeout=budget_s + 20, check=False)
                status = None
            except subprocess.TimeoutExpired:
                status = "timeout"
            row = json.loads(out.read_text()) if out.exists() else dict(job, status="failed")
            if status:
                row["status"] = status
        rows.append(row)
        for t in row.get("tries", []):
            print(f"   {t['seq']:>8} tokens: {t['status']:<3} {t['seconds']:7.1f} s (predicted {t['predicted_s']} s)"
                  + (f", peak {t['peak_bytes'] / GiB:.1f} GiB" if "peak_bytes" in t else ""), flush=True)
        print(f"   -> longest that trained: {row.get('longest_ok')}, shortest OOM: {row.get('shortest_oom')}, "
              f"{row.get('status')}", flush=True)
        write()
    print(json.dumps(summary(rows), indent=2))
    write()
    return rows


def summary(rows: list[dict]) -> dict:
    """Per model: each stack's longest length that trained (and how the search ended), and ours / baseline."""
    out = {}
    for row in rows:
        out.setdefault(row["model"], {})[row["stack"]] = {"longest_ok": row.get("longest_ok"),
                                                          "shortest_oom": row.get("shortest_oom"),
                                                          "status": row.get("status")}
    for by in out.values():
        a, b = by.get("ours", {}).get("longest_ok"), by.get("baseline", {}).get("longest_ok")
        if a and b:
            by["ours_over_baseline"] = round(a / b, 2)
    return out


if __name__ == "__main__":
    main()

__all__ = ["PLAN", "model_config", "predicted_limit", "search", "step_flops", "summary"]
