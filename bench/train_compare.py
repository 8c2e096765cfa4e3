"""Ours against the standard stack as training runs it (issue 36): both loss curves on the same data, and tokens/s
with the stacks interleaved run by run, on packed real instruction data (``bench/corpus.py``).

    python bench/train_compare.py curves --model 7b --steps 200 --shape 1x512 --json curves_7b.json
    python bench/train_compare.py speed --model 7b --shapes 1x512,4x512,1x2048 --repeats 5 --json speed_7b.json \\
        --stacks ours,baseline-paper,baseline-paper-compile
    python bench/train_compare.py speed --model tiny --shapes 1x32,2x64 --repeats 5 --micro 2   # CPU: the code path

Every stack lives in this one process (at 7B and 13B they fit together), so that they share the host's state at
every moment; the stacks are those of ``bench/gpu_scale.py`` (the same 4-bit bytes and norms), trained as a run
trains them, at the paper's recipe (``gpu_scale.recipe``):

- ``ours``: ``prepare_model`` + ``qlora_gpu.train.GpuTrainer`` (``forward_backward`` per micro-batch, the summed loss
  over the step's targets; ``optimizer_step``: clipping, the flat paged AdamW);
- ``baseline``, ``baseline-paper``, ``baseline-paper-compile``: transformers + bitsandbytes + peft as HF Trainer
  with ``bf16=True`` trains it (the model's own loss with ``num_items_in_batch`` under autocast,
  ``clip_grad_norm_``, bitsandbytes' ``PagedAdamW``); ``-paper``: after the casts of the paper's ``qlora.py``
  (bfloat16 embedding, head and adapters, float32 norms); ``-compile``: that model under ``torch.compile``.

All start from ours' initial adapters (copied into peft's, rounded where bfloat16) and see the same rows.

**curves**: ``--steps`` optimizer steps of ``--accum`` micro-batches of the shape BxS each, the stacks alternating
step by step (which one goes first alternates too). Both curves are recorded; with dropout the masks differ between
stacks (different generators), so the curves are compared as a difference d_t = ours_t − baseline_t whose noise is
estimated from the series itself (``agreement``): the mean of d and of each window of 20 steps in units of its
standard error. A lag like the one of issue 36 (a systematic d > 0 of tenths) is hundreds of standard errors.

**speed**: for each repeat, for each shape, each stack in an order rotated by the repeat: ``--micro`` micro-batches
(forward and backward, each timed to the device's end) then its optimizer step (timed). An optimizer step of the
paper's recipe is ``--accum`` (16) such micro-batches of identical work and one update, so its time is estimated as
accum · median(micro) + update and tokens/s = accum · B · S / that (``--micro 16`` measures it whole). Before the
repeats each stack takes one untimed micro-batch and update per shape (the compile, cuBLAS's plans, the allocator).
Per repeat the ratio ours / baseline is paired (the same repeat, moments apart); the result is the median ratio
over the repeats with its distribution-free interval from order statistics (``median_interval``, with its exact
coverage; none below 5 repeats).

Every JSON carries ``bench/stamp.py``'s stamp; ``bench/tables.py`` turns the files into the docs' tables.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import corpus  # noqa: E402
import gpu_scale  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from intervals import MIN_REPEATS, median_interval  # noqa: E402
from stamp import stamp as make_stamp  # noqa: E402

from qlora_ref.loss import count_targets  # noqa: E402

STACKS = ("ours", *gpu_scale.BASELINES)
WINDOW = 20


def parse_shapes(spec: str) -> list[tuple[int, int]]:
    """``"1x512,4x512"`` -> [(1, 512), (4, 512)] (batch x sequence)."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        try:
            b, s = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: {item!r} is not BATCHxSEQ (e.g. 4x512)") from None
        if b < 1 or s < 2:
            raise SystemExit(f"--shapes: {item!r} needs batch >= 1 and sequence >= 2")
        out.append((b, s))
    if not out:
        raise SystemExit("--shapes is empty; give BATCHxSEQ items, e.g. 1x512,4x512")
    return out


def parse_stacks(spec: str) -> list[str]:
    stacks = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in stacks if s not in STACKS]
    if bad or "ours" not in stacks or len(stacks) < 2:
        raise SystemExit(f"--stacks: 'ours' and at least one of {', '.join(gpu_scale.BASELINES)}, got {spec!r}")
    return stacks


# ----------------------------------------------------------------------------------------------- the stacks
class Stack:
    """One stack trained as a run trains it: ``micro(ids, labels, num_items)`` (forward and backward of a
    micro-batch, its loss, the gradients accumulated), ``update()`` (clipping, optimizer step, gradients cleared)."""

    def __init__(self, name: str, model, micro, update, adapters: dict):
        self.name, self.model, self.micro, self.update, self.adapters = name, model, micro, update, adapters


def build_ours(config, device, rec: dict, seed: int) -> Stack:
    from qlora_gpu.train import GpuTrainer
    from qlora_ref.train.config import TrainConfig

    model, _, _ = gpu_scale.build_ours(config, device, rec, seed=seed, progress=False)
    tc = TrainConfig(lora_r=rec["r"], lora_alpha=rec["alpha"], lora_dropout=rec["dropout"],
                     learning_rate=rec["lr"], adam_beta1=rec["betas"][0], adam_beta2=rec["betas"][1],
                     adam_epsilon=rec["eps"], weight_decay=rec["weight_decay"], max_grad_norm=rec["max_grad_norm"],
                     progress=False)
    trainer = GpuTrainer(model, tc)

    def micro(ids: np.ndarray, labels: np.ndarray, num_items: int) -> float:
        return trainer.forward_backward(dict(input_ids=ids, attention_mask=np.ones_like(ids), labels=labels),
                                        num_items)

    def update() -> None:
        trainer.optimizer_step(rec["lr"], rec["max_grad_norm"])

    adapters = {k: v.detach().clone() for k, v in model.lora_parameters().items()}
    return Stack("ours", model, micro, update, adapters)


def build_baseline(name: str, config, device, rec: dict, seed: int, adapters: dict) -> Stack:
    """``gpu_scale``'s baseline ``name``, its adapters set to ``adapters`` (ours' names and values)."""
    model, params, loss_fn = gpu_scale.BUILDERS[name](config, device, rec, seed=seed, progress=False)
    load_adapters(model, adapters)
    step = gpu_scale.HFUpdate(gpu_scale.make_optimizer(params, rec), params, rec["max_grad_norm"])
    device = torch.device(device)

    def micro(ids: np.ndarray, labels: np.ndarray, num_items: int) -> float:
        loss = loss_fn(torch.from_numpy(ids).to(device), torch.from_numpy(labels).to(device), num_items)
        loss.backward()
        return float(loss.detach())

    return Stack(name, model, micro, step, adapters)


@torch.no_grad()
def load_adapters(peft_model, adapters: dict) -> None:
    """Ours' adapter tensors (``model.layers.0.self_attn.q_proj.lora_A.weight``) into peft's
    (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``), cast to their dtype."""
    named = dict(peft_model.named_parameters())
    for k, v in adapters.items():
        peft_name = "base_model.model." + k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.",
                                                                                            ".lora_B.default.")
        if peft_name not in named:
            raise KeyError(f"peft has no adapter {peft_name!r} (ours: {k!r})")
        named[peft_name].copy_(v.to(named[peft_name].device, named[peft_name].dtype))


def build_stacks(names: list[str], config, device, rec: dict, seed: int = 0) -> dict[str, Stack]:
    stacks = {"ours": build_ours(config, device, rec, seed)}
    for name in names:
        if name != "ours":
            stacks[name] = build_baseline(name, config, device, rec, seed, stacks["ours"].adapters)
    return stacks


def _sync(device) -> None:
    gpu_scale._sync(torch.device(device))


def n_targets(labels: np.ndarray) -> int:
    """Counted next-token targets of micro-batches (..., seq), at least 1: the loop's divisor
    (``qlora_ref.train.loop``; a short row may hold a prompt only)."""
    return max(1, count_targets(labels))


# ----------------------------------------------------------------------------------------------- statistics
def agreement(ours, base, window: int = WINDOW) -> dict:
    """Loss curves compared: d = ours − baseline per step; its noise sd from the step-to-step changes of d
    (sd(Δd)/√2: steps' mask noise is independent, a lag changes slowly); the mean of d and each window's mean in
    units of their standard errors (z). Agreement: |z| <= 3 for the whole curve and every window."""
    d = np.asarray(ours, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    if d.size < 4:
        raise ValueError("agreement needs at least 4 steps")
    sd = float(np.std(np.diff(d), ddof=1) / math.sqrt(2))
    se = lambda n: sd / math.sqrt(n) if sd > 0 else float("inf")  # noqa: E731
    windows = [d[i:i + window] for i in range(0, d.size, window)]
    wz = [float(w.mean() / se(w.size)) for w in windows]
    z = float(d.mean() / se(d.size))
    return dict(steps=int(d.size), max_abs_diff=float(np.abs(d).max()), mean_diff=float(d.mean()), noise_sd=sd,
                z=z, window=window, window_mean_diff=[float(w.mean()) for w in windows], window_z=wz,
                agree=bool(abs(z) <= 3 and all(abs(x) <= 3 for x in wz)))


# ----------------------------------------------------------------------------------------------- runs
def run_curves(stacks: dict[str, Stack], device, steps: int, shape: tuple[int, int], accum: int, seed: int = 0,
               deadline: float | None = None, on_step=None) -> dict:
    """``deadline``: a ``time.monotonic()`` after which no step starts; ``on_step(step, partial result)``."""
    b, s = shape
    ids, labels = corpus.packed(s, steps * accum * b, seed=seed)
    names = list(stacks)
    curves = {n: [] for n in names}
    times = {n: [] for n in names}
    for step in range(steps):
        if deadline is not None and time.monotonic() > deadline:
            break
        rows = slice(step * accum * b, (step + 1) * accum * b)
        x, y = ids[rows].reshape(accum, b, s), labels[rows].reshape(accum, b, s)
        num_items = n_targets(labels[rows])
        order = names if step % 2 == 0 else names[::-1]
        for n in order:
            st = stacks[n]
            _sync(device)
            t0 = time.perf_counter()
            loss = sum(st.micro(x[i], y[i], num_items) for i in range(accum))
            st.update()
            _sync(device)
            times[n].append(time.perf_counter() - t0)
            curves[n].append(loss)
        if on_step is not None:
            on_step(step, _curves_result(shape, accum, curves, times))
    return _curves_result(shape, accum, curves, times)


def _curves_result(shape, accum: int, curves: dict, times: dict) -> dict:
    out = dict(shape=list(shape), accum=accum, steps_done=len(curves["ours"]), losses=curves, step_times_s=times)
    out["agreement"] = {n: agreement(curves["ours"], c) for n, c in curves.items() if n != "ours" and len(c) >= 4}
    return out


def _micro_and_update(st: Stack, device, x, y, num_items: int, micro: int) -> tuple[list[float], float]:
    times = []
    for i in range(micro):
        _sync(device)
        t0 = time.perf_counter()
        st.micro(x[i % len(x)], y[i % len(y)], num_items)
        _sync(device)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    st.update()
    _sync(device)
    return times, time.perf_counter() - t0


def run_speed(stacks: dict[str, Stack], device, shapes: list[tuple[int, int]], repeats: int, micro: int,
              accum: int, seed: int = 0, deadline: float | None = None, on_repeat=None) -> dict:
    """``deadline``: a ``time.monotonic()`` after which no repeat starts; ``on_repeat(r, partial result)``."""
    names = list(stacks)
    data = {}
    for b, s in shapes:
        ids, labels = corpus.packed(s, micro * b, seed=seed)
        data[(b, s)] = (ids.reshape(micro, b, s), labels.reshape(micro, b, s),
                        n_targets(labels) * accum // micro)  # the accumulated step's targets, as in a run
    results = {f"{b}x{s}": {n: dict(micro_s=[], update_s=[], tokens_per_s=[]) for n in names} for b, s in shapes}
    warm = {}
    for (b, s), (x, y, items) in data.items():  # compile, plans, allocator: untimed
        for n in names:
            t0 = time.perf_counter()
            _micro_and_update(stacks[n], device, x, y, items, 1)
            warm[f"{b}x{s}/{n}"] = time.perf_counter() - t0
    done = 0
    for r in range(repeats):
        if deadline is not None and time.monotonic() > deadline:
            break
        for (b, s), (x, y, items) in data.items():
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                mt, ut = _micro_and_update(stacks[n], device, x, y, items, micro)
                row = results[f"{b}x{s}"][n]
                row["micro_s"].append(mt)
                row["update_s"].append(ut)
                row["tokens_per_s"].append(accum * b * s / (accum * statistics.median(mt) + ut))
        done += 1
        if on_repeat is not None:
            on_repeat(r, _speed_result(shapes, done, micro, accum, warm, results))
    return _speed_result(shapes, done, micro, accum, warm, results)


def _speed_result(shapes, done: int, micro: int, accum: int, warm: dict, results: dict) -> dict:
    return dict(shapes=[list(x) for x in shapes], repeats_done=done, micro=micro, accum=accum, warmup_s=warm,
                results=results, ratios=speed_ratios(results))


def speed_ratios(results: dict) -> dict:
    """Per shape and baseline: the per-repeat ratios ours / baseline of tokens/s, their median with its
    order-statistic interval (``median_interval``: none below 5 repeats), the ratio of the two stacks' median
    tokens/s beside it (the two can disagree when repeats scatter), and each stack's median tokens/s."""
    out = {}
    for shape, by in results.items():
        ours = by["ours"]["tokens_per_s"]
        out[shape] = {"tokens_per_s": {n: statistics.median(v["tokens_per_s"]) for n, v in by.items()
                                       if v["tokens_per_s"]}}
        for n, v in by.items():
            k = min(len(ours), len(v["tokens_per_s"]))
            if n == "ours" or k == 0:
                continue
            ratios = [a / c for a, c in zip(ours[:k], v["tokens_per_s"][:k], strict=True)]
            iv = median_interval(ratios)
            excludes = None if iv["low"] is None else bool(iv["low"] > 1 or iv["high"] < 1)
            ratio_of_medians = statistics.median(ours[:k]) / statistics.median(v["tokens_per_s"][:k])
            out[shape][n] = dict(ratios=ratios, **iv, excludes_one=excludes, ratio_of_medians=ratio_of_medians)
    return out


# ----------------------------------------------------------------------------------------------- main
def _write(path: str | None, payload: dict) -> None:
    if path:
        gpu_scale._write_json(path, payload)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("curves", "speed"))
    p.add_argument("--model", default="7b", help="7b, 13b, 33b, 65b, tiny or tiny-<blocks>")
    p.add_argument("--stacks", default="ours,baseline", help=f"'ours' and baselines among {','.join(STACKS)}")
    p.add_argument("--shape", default="1x512", help="curves: BATCHxSEQ of a micro-batch")
    p.add_argument("--shapes", default="1x512,4x512", help="speed: comma-separated BATCHxSEQ")
    p.add_argument("--accum", type=int, default=None, help="micro-batches per optimizer step (default: curves 1, "
                   "speed 16, the paper's)")
    p.add_argument("--steps", type=int, default=200, help="curves: optimizer steps")
    p.add_argument("--repeats", type=int, default=5, help="speed: interleaved repeats (>= 5 for an interval)")
    p.add_argument("--micro", type=int, default=3, help="speed: micro-batches timed per repeat and stack")
    p.add_argument("--dropout", type=float, default=None, help="LoRA dropout (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--deadline", type=float, default=None, help="seconds from the start of this process: no step "
                   "or repeat starts after it (the JSON is written after every 10 steps and every repeat)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    deadline = None if args.deadline is None else time.monotonic() + args.deadline
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = gpu_scale._model_name(args.model, "--model")
    if device.type == "cpu":
        if not gpu_scale._is_tiny(name):
            raise SystemExit(f"{name}: LLaMA sizes need a CUDA GPU; --model tiny runs the code path on the CPU")
        gpu_scale.cpu_setup()
    stacks_wanted = parse_stacks(args.stacks)
    accum = args.accum or (1 if args.mode == "curves" else 16)
    if accum < 1 or args.steps < 4 or args.repeats < 1 or args.micro < 1:
        raise SystemExit("--accum, --repeats and --micro must be >= 1 and --steps >= 4")
    config = gpu_scale.model_config(name)
    rec = gpu_scale.recipe(name)
    if args.dropout is not None:
        rec["dropout"] = args.dropout
    payload = dict(stamp=make_stamp(), mode=args.mode, model=name, device=gpu_scale._device_name(device),
                   recipe={k: list(v) if isinstance(v, tuple) else v for k, v in rec.items()}, stacks=stacks_wanted)
    payload["status"] = "building"
    _write(args.json, payload)
    t0 = time.perf_counter()
    stacks = build_stacks(stacks_wanted, config, device, rec, args.seed)
    payload["build_s"] = time.perf_counter() - t0
    payload["status"] = "running"  # what a cut-off run leaves in the file
    _write(args.json, payload)
    print(f"{args.mode}: {name} on {payload['device']}; stacks {', '.join(stacks)} built in {payload['build_s']:.1f} s",
          flush=True)
    if args.mode == "curves":
        def progress(step, partial):
            if step % 10 == 9:
                print(f"  step {step + 1}", flush=True)
                _write(args.json, {**payload, **partial})

        payload.update(run_curves(stacks, device, args.steps, parse_shapes(args.shape)[0], accum, args.seed,
                                  deadline, progress))
        for n, a in payload["agreement"].items():
            print(f"ours vs {n}: {a['steps']} steps, mean d {a['mean_diff']:+.4f} (z {a['z']:+.1f}), "
                  f"max |d| {a['max_abs_diff']:.4f}, windows z {[round(z, 1) for z in a['window_z']]}: "
                  f"{'agree' if a['agree'] else 'DIFFER'}", flush=True)
    else:
        def repeat_done(r, partial):
            print(f"  repeat {r + 1} of {args.repeats}", flush=True)
            _write(args.json, {**payload, **partial})

        payload.update(run_speed(stacks, device, parse_shapes(args.shapes), args.repeats, args.micro, accum,
                                 args.seed, deadline, repeat_done))
        for shape, by in payload["ratios"].items():
            for n, r in by.items():
                if n != "tokens_per_s":
                    interval = (f"[{r['low']:.2f}, {r['high']:.2f}] ({r['coverage']:.1%})" if r["low"] is not None
                                else f"no interval ({r['n']} repeats < {MIN_REPEATS})")
                    print(f"{shape}: ours / {n} = {r['median']:.2f}x {interval} "
                          f"(tokens/s {by['tokens_per_s']['ours']:.0f} / {by['tokens_per_s'][n]:.0f})", flush=True)
    if any(n.endswith("-compile") for n in stacks):
        payload["compile"] = gpu_scale.compile_stats()  # whether the compiled stack was compiled (graph breaks)
    payload["seconds"] = time.perf_counter() - t0
    payload["status"] = "done"
    _write(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
