"""``qlora memory``: the memory calculator on the command line.

    qlora memory --model llama-65b --method qlora            # a table, MB/GB
    qlora memory --model path/to/config.json --method lora --batch 4 --seq 1024 --json
    qlora memory --model llama-65b --plot memory_65b.png    # stacked bars like the paper's memory figure
    qlora memory --model llama-2-70b --seq 2048 --gpus 2    # per GPU, sharded with FSDP2, with and without offload
    qlora memory --model llama-3.1-8b --seq 131072 --attention flash --loss-chunk 4096 --offload   # long context

The arithmetic lives in ``qlora_ref.memory``; this module only parses arguments, formats and plots.
"""

from __future__ import annotations

import argparse
import json
import warnings

from qlora_ref.memory import (
    ATTENTION_IMPLS,
    DTYPE_BYTES,
    GB,
    GIB,
    LLAMA3_CONFIGS,
    LLAMA_SHAPES,
    MB,
    METHODS,
    MODEL_SHAPES,
    OPTIMIZERS,
    QUANT_TYPES_4BIT,
    RESIDUAL_DTYPE,
    TARGET_PRESETS,
    MemoryBreakdown,
    estimate_memory,
    format_bytes,
    load_model_shape,
)
from qlora_ref.memory_sharded import FSDP_GATHERED_BLOCKS, ShardedMemory, estimate_sharded_memory
from qlora_ref.paths import check_figure_file

#: how each part is called in the table and the plot's legend
PART_LABELS = {
    "weights": "weights",
    "quant_constants": "quantization constants",
    "adapters": "LoRA adapters",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "activations": "activations",
}

#: one colour per part, shared by both panels of the plot
PART_COLORS = {
    "weights": "#4c72b0",
    "quant_constants": "#8172b2",
    "adapters": "#55a868",
    "gradients": "#c44e52",
    "optimizer_states": "#dd8452",
    "activations": "#937860",
}

#: ``estimate_memory``'s and ``load_model_shape``'s arguments, and the options that set them (for errors: the
#: library names its arguments, the command names its options; ``finetune.named_by_option``)
MEMORY_OPTIONS = {"model": "--model", "method": "--method", "batch": "--batch", "seq": "--seq", "r": "--r",
                  "targets": "--targets", "lora_dropout": "--lora-dropout", "quant_type": "--quant-type",
                  "blocksize": "--blocksize", "double_quant": "--no-double-quant",
                  "gradient_checkpointing": "--no-gradient-checkpointing", "optimizer": "--optimizer",
                  "compute_dtype": "--compute-dtype", "adapter_dtype": "--adapter-dtype",
                  "unquantized_dtype": "--unquantized-dtype", "attention": "--attention", "gpus": "--gpus",
                  "packing": "--packing", "example_length": "--example-length", "loss_chunk": "--loss-chunk",
                  "offload": "--offload", "residual_dtype": "--residual-dtype"}

#: GPU memory sizes drawn as reference lines: consumer 24 GB, the paper's 48 GB, an 80 GB data-centre card; a card
#: sold as "N GB" holds N GiB (nvidia-smi: 24576 MiB), so each line is drawn at N x 2^30 bytes
GPU_LINES_GIB = (24, 48, 80)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "memory",
        help="estimate the GPU memory of full, LoRA or QLoRA fine-tuning",
        description="Estimate the GPU memory one fine-tuning step needs, part by part (weights, quantization "
        "constants, adapters, gradients, optimizer states, activations). Defaults are the QLoRA paper's recipe; "
        "sizes are decimal (1 MB = 10^6 bytes, 1 GB = 10^9 bytes). See docs/memory.md.",
    )
    p.add_argument(
        "--model",
        default="llama-7b",
        help=f"{', '.join(MODEL_SHAPES)} (or 7b/13b/33b/65b), {', '.join(LLAMA3_CONFIGS)}, or a Hugging Face "
        "config.json / a folder holding one, or a .gguf file (default: llama-7b)",
    )
    p.add_argument("--method", choices=METHODS, default="qlora", help="fine-tuning method (default: qlora)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (default: 1)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (default: 512)")
    p.add_argument("--r", type=int, default=64, help="LoRA rank (default: 64)")
    p.add_argument(
        "--targets",
        default="all",
        help=f"LoRA target modules: {', '.join(TARGET_PRESETS)} or a comma-separated list such as q_proj,v_proj "
        "(default: all linear layers, the paper's recipe)",
    )
    p.add_argument("--lora-dropout", type=float, default=0.1, help="LoRA dropout; > 0 keeps a copy of each "
                   "adapter's input (default: 0.1)")
    p.add_argument("--quant-type", choices=QUANT_TYPES_4BIT, default="nf4", help="4-bit storage type (default: nf4)")
    p.add_argument("--blocksize", type=int, default=64, help="quantization block size, a power of two from 32 to "
                   "4096 (default: 64)")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="keep the quantization constants in float32 (0.5 instead of 0.127 bits per parameter)")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                   help="keep every layer's activations instead of recomputing them")
    p.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default=None,
                   help="default: paged_adamw for qlora, adamw otherwise")
    p.add_argument("--compute-dtype", choices=tuple(DTYPE_BYTES), default="bfloat16",
                   help="dtype of 16-bit weights, activations and gradients (default: bfloat16)")
    p.add_argument("--residual-dtype", choices=tuple(DTYPE_BYTES), default=RESIDUAL_DTYPE,
                   help="dtype of the residual stream: the block inputs gradient checkpointing keeps (and --offload "
                   "moves) and the norms' inputs (default: float32, as qlora_gpu's prepare_model and "
                   "transformers + peft keep it)")
    p.add_argument("--adapter-dtype", choices=tuple(DTYPE_BYTES), default="bfloat16",
                   help="dtype of the LoRA weights and their gradients (default: bfloat16, the paper's script; "
                   "qlora finetune --backend gpu: float32)")
    p.add_argument("--unquantized-dtype", choices=tuple(DTYPE_BYTES), default=None,
                   help="QLoRA: dtype of the embeddings, LM head and norms (default: the compute dtype, the paper's "
                   "script; qlora finetune --backend gpu: float32)")
    p.add_argument("--attention", choices=ATTENTION_IMPLS, default="eager",
                   help="eager keeps the seq x seq softmax for the backward pass; flash recomputes it "
                   "(default: eager)")
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="QLoRA sharded over N GPUs with FSDP2 (qlora finetune --nproc N): the memory of each GPU, "
                   "with and without CPU offload; --batch is each GPU's micro-batch (docs/sharded.md)")
    p.add_argument("--packing", action="store_true", help="with --example-length (needed): pack whole examples into "
                   "each sequence (counts the useful tokens, moves no memory; docs/long_context.md)")
    p.add_argument("--example-length", type=int, default=None, help="tokens per training example: how many of a "
                   "step's batch x seq token slots are useful, packed or not (default: all of them)")
    p.add_argument("--loss-chunk", type=int, default=0, help="compute the LM head and the loss this many tokens at "
                   "a time, so the float32 logits never exist whole (default: 0, all at once)")
    p.add_argument("--offload", action="store_true", help="keep the checkpointed block inputs in host memory "
                   "(activation offload; needs gradient checkpointing)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON object (total_bytes, parts, and every other figure the table shows)")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="also write a stacked-bar figure: the three methods on this model, and this method on "
                   "the four LLaMA sizes (needs matplotlib)")
    p.set_defaults(func=run, option_defaults=vars(p.parse_args([])))  # to tell the options given (errors)
    return p


def _estimate_kwargs(args) -> dict:
    return dict(
        batch=args.batch,
        seq=args.seq,
        r=args.r,
        targets=args.targets,
        quant_type=args.quant_type,
        double_quant=args.double_quant,
        blocksize=args.blocksize,
        gradient_checkpointing=args.gradient_checkpointing,
        optimizer=args.optimizer,
        compute_dtype=args.compute_dtype,
        adapter_dtype=args.adapter_dtype,
        unquantized_dtype=args.unquantized_dtype,
        lora_dropout=args.lora_dropout,
        attention=args.attention,
        packing=args.packing,
        example_length=args.example_length,
        loss_chunk=args.loss_chunk,
        offload=args.offload,
        residual_dtype=args.residual_dtype,
    )


def run(args) -> int:
    from .finetune import named_by_option

    try:
        return _run(args)
    except ValueError as e:  # the options given are named wherever they stand ("--targets must be ..."), the others
        # only as settings (a word such as "attention" is also a preset of --targets)
        raise named_by_option(e, _options_given(args), MEMORY_OPTIONS) from None


def _options_given(args) -> set[str]:
    """The arguments of ``MEMORY_OPTIONS`` the user set: those whose option (or argparse's abbreviation of it)
    is on the command line, and those whose value is not the default."""
    defaults = getattr(args, "option_defaults", {})
    given = {k for k in MEMORY_OPTIONS if k not in defaults or getattr(args, k, None) != defaults[k]}
    for token in getattr(args, "argv", []):
        name = token.split("=", 1)[0]
        if name.startswith("--"):
            fields = [k for k, option in MEMORY_OPTIONS.items() if option.startswith(name)]
            exact = [k for k in fields if MEMORY_OPTIONS[k] == name]
            given.update(exact or (fields if len(fields) == 1 else []))
    return given


def _run(args) -> int:
    if args.plot:
        check_figure_file(args.plot, "--plot")
    shape = load_model_shape(args.model)
    kwargs = _estimate_kwargs(args)
    if args.gpus is not None:
        return run_sharded(args, shape, kwargs)
    breakdown = estimate_memory(shape, args.method, **kwargs)
    if not args.plot:  # the figure shows every method: there each option acts
        _warn_other_methods_options(args)
    if args.plot:
        write_plot(args.plot, shape, args.method, kwargs)
    if args.json:
        print(json.dumps(breakdown.to_dict(), indent=2))
    else:
        print(format_table(breakdown))
        if args.plot:
            print(f"\nplot written to {args.plot}")
    return 0


#: options that act only on LoRA and QLoRA, and only on QLoRA (``estimate_memory``'s docstring)
LORA_ONLY = ("r", "targets", "lora_dropout", "adapter_dtype")
QLORA_ONLY = ("quant_type", "blocksize", "double_quant", "unquantized_dtype")


def _warn_other_methods_options(args) -> None:
    """A warning naming the options given that ``--method`` leaves without effect (accepted and ignored without a
    word before: ``--method full --r 8`` printed the same table as without it)."""
    ignored = (*LORA_ONLY, *QLORA_ONLY) if args.method == "full" else QLORA_ONLY if args.method == "lora" else ()
    unused = sorted(MEMORY_OPTIONS[f] for f in _options_given(args) if f in ignored)
    if unused:
        warnings.warn(f"{', '.join(unused)} {'have' if len(unused) > 1 else 'has'} no effect with --method "
                      f"{args.method}", stacklevel=3)


def run_sharded(args, shape, kwargs) -> int:
    """``--gpus N``: one GPU's memory under FSDP2, without and with CPU offload."""
    if args.method != "qlora":
        raise ValueError(f"--gpus estimates QLoRA sharded with FSDP2; --method {args.method} is not sharded here")
    if args.plot:
        raise ValueError("--plot draws the single-GPU estimate; leave out --gpus")
    plain, offload = (estimate_sharded_memory(shape, args.gpus, cpu_offload=o, **kwargs) for o in (False, True))
    if args.optimizer is not None:  # what qlora finetune --nproc refuses is not estimated either
        from qlora_ref.train.launch import check_sharded_recipe

        check_sharded_recipe(args.optimizer, args.gpus)  # its message names the optimizer, which main renames
    if args.json:
        print(json.dumps({"without_offload": plain.to_dict(), "with_cpu_offload": offload.to_dict()}, indent=2))
    else:
        print(format_sharded_table(estimate_memory(shape, "qlora", **kwargs), plain, offload))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------------------------


def _describe(b: MemoryBreakdown) -> list[str]:
    s = b.settings
    lines = [f"{b.model}: {b.n_params / 1e9:.2f} B parameters, method {b.method}"]
    if b.method == "qlora":
        lines.append(
            f"  base: {s['quant_type'].upper()} blocksize {s['blocksize']}"
            f"{' + double quantization' if s['double_quant'] else ''}, unquantized parts in {s['unquantized_dtype']}"
        )
    if b.method != "full":
        lines.append(
            f"  LoRA r={s['r']} on {_targets_name(s['targets'])}, dropout {s['lora_dropout']}, {s['adapter_dtype']}: "
            f"{b.n_trainable:,} trainable ({100 * b.n_trainable / b.n_params:.3g} % of the weights)"
        )
    lines.append(
        f"  batch {s['batch']} x seq {s['seq']}, {s['optimizer']}, {s['compute_dtype']} compute "
        f"({s['residual_dtype']} residual stream), {s['attention']} attention, gradient checkpointing "
        f"{'on' if s['gradient_checkpointing'] else 'off'}"
    )
    if s.get("example_length") is not None:
        lines.append(f"  examples of {s['example_length']} tokens, {'packed' if s['packing'] else 'one per sequence'}: "
                     f"{b.useful_tokens:,} useful of {b.tokens:,} token slots")
    if s.get("loss_chunk") or s.get("offload"):
        lines.append("  " + ", ".join(([f"loss in chunks of {s['loss_chunk']:,} tokens"] if s["loss_chunk"] else [])
                                      + (["block inputs offloaded to host memory"] if s["offload"] else [])))
    return lines


def _targets_name(targets: list[str]) -> str:
    for name, modules in TARGET_PRESETS.items():
        if tuple(targets) == modules:
            return f"{name} ({','.join(modules)})" if name != "all" else "all linear layers"
    return ",".join(targets)


def format_table(b: MemoryBreakdown) -> str:
    notes = {
        "activations": f"checkpointing: {format_bytes(b.activations_checkpointing)}, "
        f"without: {format_bytes(b.activations_no_checkpointing)}; of which logits {format_bytes(b.logits)}",
    }
    if b.quant_constants:
        notes["quant_constants"] = f"{b.quant_constant_bits_per_param:.3f} bits per quantized parameter"
    if b.paged:
        notes["optimizer_states"] = "paged: evicted to CPU RAM under memory pressure"
    if b.method != "full":
        notes["adapters"] = f"LoRA inputs (the paper's 'input gradients'): {format_bytes(b.lora_inputs)}"
    width = max(len(v) for v in PART_LABELS.values())
    lines = _describe(b) + [""]
    for name, value in b.parts.items():
        note = f"   {notes[name]}" if name in notes else ""
        lines.append(f"  {PART_LABELS[name]:<{width}}  {format_bytes(value):>12}{note}")
    lines.append(f"  {'-' * width}  {'-' * 12}")
    lines.append(f"  {'total':<{width}}  {format_bytes(b.total_bytes):>12}   = {b.total_bytes / GIB:.2f} GiB "
                 "(a GPU sold as 'N GB' holds N GiB)")
    if b.paged:
        lines.append(f"  {'of which paged':<{width}}  {format_bytes(b.paged):>12}")
        lines.append(f"  {'GPU, all pages out':<{width}}  {format_bytes(b.device_min_bytes):>12}   = "
                     f"{b.device_min_bytes / GIB:.2f} GiB")
    if b.offloaded:
        lines.append(f"  {'host: offloaded':<{width}}  {format_bytes(b.offloaded):>12}   checkpointed block inputs")
    s = b.settings
    if b.method == "qlora" and (s["adapter_dtype"], s["unquantized_dtype"]) != ("float32", "float32"):
        lines.append(f"\n  {s['adapter_dtype']} adapters, {s['unquantized_dtype']} embeddings and LM head are the "
                     "paper's script's;\n  qlora finetune --backend gpu keeps both in float32: "
                     "--adapter-dtype float32 --unquantized-dtype float32 estimates its run")
    return "\n".join(lines)


def format_sharded_table(b: MemoryBreakdown, plain: ShardedMemory, offload: ShardedMemory) -> str:
    """One GPU's memory under FSDP2, side by side without and with CPU offload (``b``: the same recipe on one
    GPU, for its description)."""
    n = plain.gpus
    lines = _describe(b)[:-1] + [
        f"  batch {plain.settings['batch']} x seq {plain.settings['seq']} per GPU, {plain.settings['optimizer']}, "
        f"{plain.settings['attention']} attention, gradient checkpointing "
        f"{'on' if plain.settings['gradient_checkpointing'] else 'off'}",
        f"  sharded over {n} GPU{'s' if n > 1 else ''} with FSDP2 (one unit per decoder block; 4-bit codes and "
        f"scales in {plain.settings['storage_dtype']} storage)", ""]
    rows = [(f"{PART_LABELS[k]} (1/{n})", plain.shards[k], offload.shards[k]) for k in plain.shards]
    rows += [("replicated constants", plain.replicated, offload.replicated),
             (f"gathered: root + {FSDP_GATHERED_BLOCKS} blocks", plain.gathered, offload.gathered),
             ("reduce-scatter (1 block)", plain.reduce_scatter, offload.reduce_scatter),
             ("activations (1 micro-batch)", plain.activations, offload.activations)]
    width = max(len(r[0]) for r in rows)
    lines.append(f"  {'':<{width}}  {'per GPU':>12}  {'CPU offload':>12}")
    for label, a, c in rows:
        moved = label.endswith(f"(1/{n})")
        lines.append(f"  {label:<{width}}  {format_bytes(a):>12}  {('host' if moved else format_bytes(c)):>12}")
    lines.append(f"  {'-' * width}  {'-' * 12}  {'-' * 12}")
    lines.append(f"  {'total per GPU':<{width}}  {format_bytes(plain.device_bytes):>12}  "
                 f"{format_bytes(offload.device_bytes):>12}")
    if plain.paged:
        lines.append(f"  {'GPU, all pages out':<{width}}  {format_bytes(plain.device_min_bytes):>12}")
    lines.append(f"  {'host memory per GPU':<{width}}  {'':>12}  {format_bytes(offload.host_bytes):>12}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Plot (matplotlib is optional: imported only here)
# ----------------------------------------------------------------------------------------------------------------


def write_plot(path: str, shape, method: str, kwargs: dict) -> None:
    """Two panels of stacked bars, one segment per part (paged optimizer states hatched):
    left, full / LoRA / QLoRA on ``shape`` (the paper's Figure 1 in numbers); right, ``method`` on LLaMA
    7B-65B with the 24/48/80 GB GPU sizes, in GiB as the cards hold them (the paper's memory-footprint figure,
    Appendix G)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ValueError(f"--plot needs matplotlib, which is not installed ({e}): pip install matplotlib") from e
    from qlora_ref.files import save_figure

    # The optimizer default depends on the method (paged only for QLoRA) unless the user fixed it.
    by_method = [estimate_memory(shape, m, **kwargs) for m in METHODS]
    by_size = [estimate_memory(s, method, **kwargs) for s in LLAMA_SHAPES.values()]

    fig = Figure(figsize=(14, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_m, ax_s = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 4]})
    _stacked_bars(ax_m, [b.method for b in by_method], by_method, label_segments=False)
    ax_m.set_title(f"{shape.name}: full vs LoRA vs QLoRA")
    _stacked_bars(ax_s, [b.model.removeprefix("llama-").upper() for b in by_size], by_size, label_segments=True)
    ax_s.set_title(f"{method} on LLaMA (segments in MB)")
    top = max(b.total_bytes for b in by_size) / GB
    lines = [(gib, gib * GIB / GB) for gib in GPU_LINES_GIB if gib * GIB / GB < 1.15 * top]
    for gib, at in lines:
        ax_s.axhline(at, color="grey", linestyle="--", linewidth=0.8)
        ax_s.text(-0.45, at, f"{gib} GB GPU ({gib} GiB = {at:.1f} GB)", va="bottom", fontsize=8, color="grey")
    ax_s.set_ylim(0, max([1.08 * top] + [1.06 * at for _, at in lines]))  # every line and its label inside
    s = kwargs
    fig.suptitle(
        f"Fine-tuning memory: batch {s['batch']}, sequence {s['seq']}, r={s['r']}, gradient checkpointing "
        f"{'on' if s['gradient_checkpointing'] else 'off'} (qlora_ref.memory)",
        fontsize=10,
    )
    handles = [
        _patch(PART_COLORS[p], label=PART_LABELS[p]) for p in MemoryBreakdown.PARTS
    ] + [_patch("white", hatch="//", label="paged (evictable)")]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    save_figure(fig, path)


def _patch(color, **kw):
    from matplotlib.patches import Patch

    return Patch(facecolor=color, edgecolor="black", linewidth=0.5, **kw)


def _stacked_bars(ax, labels, breakdowns, label_segments: bool) -> None:
    x = range(len(breakdowns))
    bottoms = [0.0] * len(breakdowns)
    top = max(b.total_bytes for b in breakdowns) / GB
    for part in MemoryBreakdown.PARTS:
        heights = [b.parts[part] / GB for b in breakdowns]
        hatches = ["//" if part == "optimizer_states" and b.paged else "" for b in breakdowns]
        bars = ax.bar(x, heights, bottom=bottoms, color=PART_COLORS[part], edgecolor="black", linewidth=0.5)
        for bar, hatch, b in zip(bars, hatches, breakdowns, strict=True):
            bar.set_hatch(hatch)
            if label_segments and bar.get_height() > 0.035 * top:
                ax.text(bar.get_x() + bar.get_width() / 2, bar.get_y() + bar.get_height() / 2,
                        f"{b.parts[part] / MB:,.0f}", ha="center", va="center", fontsize=7,
                        bbox={"facecolor": "white", "alpha": 0.75, "linewidth": 0, "pad": 1})
        bottoms = [lo + h for lo, h in zip(bottoms, heights, strict=True)]
    for i, b in enumerate(breakdowns):
        ax.text(i, bottoms[i], format_bytes(b.total_bytes), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("GB")
    ax.set_ylim(0, 1.12 * top)

