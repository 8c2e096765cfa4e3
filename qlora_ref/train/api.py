"""``finetune(model_path, data, config, backend=...)``: one QLoRA fine-tune from files, on either backend.

The backend is found by name through the ``qlora.backends`` entry points (``qlora_ref.backends``), so the
reference never imports ``qlora_gpu``; the GPU backend's trainer lives in ``<backend module>.train``, its sharded
trainer (FSDP2 over the processes torchrun started, ``launch``) in ``<backend module>.fsdp_train``. Data
(``qlora_ref.data``), schedule, checkpoints and the adapter format are the same for both (``loop``).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..adapters import ADAPTER_CONFIG
from ..data import DataReport, build_dataset, load_examples
from ..data.formats import is_corpus_spec, is_glob, matching_files
from ..data.pipeline import no_stop_token
from .checkpoint import check_not_locked, check_resume_backend, latest_checkpoint, list_checkpoints, new_run_id
from .config import TrainConfig
from .init_adapter import check_init_adapter
from .launch import launched_by_torchrun, process_rank
from .loop import TrainResult, check_no_foreign_checkpoints, train


@dataclass
class FinetuneRun:
    result: TrainResult
    trainer: object  # RefTrainer or qlora_gpu.train.GpuTrainer
    tokenizer: object | None
    train_data: object  # TokenizedDataset
    eval_data: object | None
    report: DataReport


def load_tokenizer(path):
    """The tokenizer of a Hugging Face folder (tokenizer.json) or a GGUF file; None if the model has none; a
    ``CheckpointError`` if ``path`` is neither."""
    from ..model.loading import model_source, read_gguf
    from ..model.tokenizer import Tokenizer

    path, gguf = model_source(path)
    if gguf is None:
        return Tokenizer.from_folder(path)
    meta, _ = read_gguf(gguf)
    return Tokenizer.from_gguf_metadata(meta, str(gguf))


def _check_sharding(backend: str, sharded: bool, cpu_offload: bool) -> None:
    if cpu_offload and not sharded:
        raise ValueError("cpu_offload applies to a sharded (FSDP) run: launch with --nproc N or torchrun")
    if sharded and backend == "ref":
        raise ValueError("the reference backend trains in one process; sharding over processes needs --backend gpu")


def make_trainer(model_path, config: TrainConfig, backend: str = "ref", *, sharded: bool = False,
                 cpu_offload: bool = False):
    """``(trainer, tokenizer)``: a ``StepBackend`` holding the model at ``model_path`` with fresh adapters.
    ``sharded``: this process is one of several that torchrun started, and the model is sharded over them with
    FSDP2 (GPU backend only); ``cpu_offload``: FSDP2's offload of parameters, gradients and optimizer states to
    host memory (sharded only)."""
    _check_sharding(backend, sharded, cpu_offload)
    if backend == "ref":
        from ..model.loading import load_model
        from .reference import RefTrainer

        model = load_model(model_path, quant=config.quant_config(), lora=config.lora_config(),
                           gradient_checkpointing=config.gradient_checkpointing, progress=config.progress)
        return RefTrainer(model, config), model.tokenizer
    from ..backends import load_backend

    module = load_backend(backend)
    if sharded:
        fsdp_train = importlib.import_module(f"{module.__name__}.fsdp_train")
        trainer = fsdp_train.ShardedTrainer.from_pretrained(model_path, config, cpu_offload=cpu_offload)
        return trainer, load_tokenizer(model_path)
    gpu_train = importlib.import_module(f"{module.__name__}.train")
    return gpu_train.GpuTrainer.from_pretrained(model_path, config), load_tokenizer(model_path)


def split_examples(examples: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded held-out split: ``ceil(eval_fraction * n)`` examples held out, in their file order."""
    n_eval = math.ceil(eval_fraction * len(examples)) if eval_fraction > 0 else 0
    if n_eval >= len(examples):
        raise ValueError(f"eval_fraction={eval_fraction} leaves no training examples out of {len(examples)}")
    held = set(np.random.default_rng([seed, 2**31 - 1]).permutation(len(examples))[:n_eval].tolist())
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


def check_data_spec(spec) -> None:
    """A data file or folder that exists, a pattern that matches data files, or a ``chatterbot[...]`` spec that no
    local path shadows (``is_corpus_spec``, as ``load_examples`` reads it); None passes: no data given."""
    if spec is None or is_corpus_spec(spec) or Path(spec).exists():
        return
    if not is_glob(str(spec)):
        raise ValueError(f"{spec}: data file does not exist")
    matching_files(str(spec))


def prepare_data(data, tokenizer, config: TrainConfig, eval_data=None, warn_left_out: bool = True):
    """(train dataset, held-out dataset or None, report) from data specs (``qlora_ref.data.load_examples``).
    ``warn_left_out``: warn with the report when it left something out or split a conversation (``finetune``
    prints the report itself when it shows progress, and then does not warn it a second time)."""
    if tokenizer is None:
        raise ValueError("the model has no tokenizer (tokenizer.json in its folder, or GGUF tokenizer metadata), "
                         "so text data cannot be tokenized")
    for spec in (data, eval_data):
        check_data_spec(spec)
    report = DataReport()
    on_malformed = "drop" if config.skip_malformed else None
    examples = load_examples(data, report, on_malformed)
    if not examples:
        raise ValueError(f"{data}: no examples ({report.summary()})")
    if (why := no_stop_token(tokenizer)) is not None and process_rank() == 0:  # once, not per part
        warnings.warn(why, stacklevel=2)
    build = lambda ex, rep: build_dataset(ex, tokenizer, config.max_length, config.train_on_inputs, rep,  # noqa: E731
                                          warn=False, skip_unrenderable=config.skip_malformed)
    if eval_data is not None:  # a file of its own: its own report, and it must give something to evaluate
        eval_report = DataReport()
        eval_ex = load_examples(eval_data, eval_report, on_malformed)
        eval_ds = build(eval_ex, eval_report)
        if len(eval_ds) == 0:
            raise ValueError(f"{eval_data}: no usable held-out example ({eval_report.summary()})")
        if eval_report.noteworthy and process_rank() == 0:  # every rank reads the data; one says so
            warnings.warn(f"held-out data {eval_data}: {eval_report.summary()}", stacklevel=2)
        train_ds = build(examples, report)
    else:  # a split of --data: one report over both parts, so that kept = training + held-out
        train_ex, eval_ex = split_examples(examples, config.eval_fraction, config.seed)
        train_ds = build(train_ex, report)
        eval_ds = build(eval_ex, report) if eval_ex else None
        if eval_ex and len(eval_ds) == 0 and process_rank() == 0:
            warnings.warn(f"{data}: none of the {len(eval_ex)} held-out examples is left after the length filter: "
                          "no held-out evaluation", stacklevel=2)
        if eval_ex and len(eval_ds) == 0:
            eval_ds = None
    if report.noteworthy and warn_left_out and process_rank() == 0:
        warnings.warn(f"data: {report.summary()}", stacklevel=2)
    if len(train_ds) == 0:
        held = f"; the {len(eval_ds)} left are held out" if eval_ds is not None and len(eval_ds) else ""
        raise ValueError(f"{data}: no training example left ({report.summary()}{held})")
    return train_ds, eval_ds, report


def check_output_dir_adapter(output_dir: Path, config: TrainConfig, resuming: bool) -> None:
    """Refuse an output folder whose adapter this run would replace without having written it: one that holds an
    adapter (``adapter_config.json`` / ``adapter_model.safetensors``: peft's, a copy, a run whose checkpoints are
    gone) and no checkpoint to resume; or the start adapter's own folder (its run would be resumed, not a new one
    started from the adapter)."""
    init = config.init_adapter
    if init is not None and output_dir.exists() and Path(init).exists() and os.path.samefile(init, output_dir):
        raise ValueError(f"init_adapter {config.init_adapter} is the output folder: a run there would resume that "
                         "folder's own run rather than start from its adapter; choose another output folder")
    if resuming or not output_dir.is_dir() or list_checkpoints(output_dir):  # checkpoints: check_no_foreign_...
        return
    for name in (ADAPTER_CONFIG, "adapter_model.safetensors"):
        if (output_dir / name).exists():
            raise ValueError(f"{output_dir}: holds an adapter ({name}) and no checkpoint of a run to resume, so this "
                             "run would replace it; nothing was changed: choose another output folder or move the "
                             "adapter away")


def finetune(model, data, config: TrainConfig | None = None, *, backend: str = "ref", eval_data=None,
             output_dir=None, resume=True, stop_after: int | None = None, trainer=None, sharded: bool | None = None,
             cpu_offload: bool = False) -> FinetuneRun:
    """Fine-tune the model at ``model`` (HF folder or GGUF) on ``data`` (a .jsonl / .json / .parquet / .yml file, a
    folder, a file pattern, or ``"chatterbot[:language]"``: ``qlora_ref.data.load_examples``). The held-out set
    is ``eval_data`` if given, else ``config.eval_fraction`` of ``data`` (a seeded split). ``trainer``: an already
    built ``(trainer, tokenizer)`` from :func:`make_trainer`.
    ``sharded`` (None: when torchrun started this process) and ``cpu_offload``: see :func:`make_trainer`.

    The output folder and the data are checked before the model is loaded, so that a bad path or record costs
    seconds, not a model load.
    """
    from ..paths import check_writable_dir

    config = config or TrainConfig()
    if eval_data is not None:  # nothing of ``data`` is held out: recorded so, and evaluate's held-out split refuses
        config = config.replace(eval_fraction=0.0)
    if config.lora_r == 0:
        raise ValueError("lora_r must be a positive integer to train adapters, got 0")
    if backend == "ref":
        from .reference import check_reference_config

        check_reference_config(config)
    output_dir = output_dir if output_dir is not None else config.output_dir
    resuming = output_dir is not None and resume is not False and (
        not isinstance(resume, bool) or latest_checkpoint(output_dir) is not None)
    if not resuming:  # a resumed run starts from its checkpoint: the start adapter need not be there any more
        check_init_adapter(config)  # a missing folder or a misfit adapter, before the model loads
    if output_dir is not None:
        check_output_dir_adapter(Path(output_dir), config, resuming)
        check_writable_dir(output_dir, "output_dir")
        if Path(model).is_dir() and os.path.samefile(model, output_dir):
            raise ValueError(f"output_dir {output_dir} is the base model's folder: the adapter and checkpoints would "
                             "be written among its weights (and the folder would then load as a model with the "
                             "adapter ignored); choose another folder")
        if resume is False:  # a new run: the checkpoints it would replace are known before the model loads
            last = config.max_steps if stop_after is None else min(config.max_steps, stop_after)
            check_no_foreign_checkpoints(Path(output_dir), new_run_id(), 0, last, config, fresh=True)
    if sharded is None:
        sharded = launched_by_torchrun()
    _check_sharding(backend, sharded, cpu_offload)  # before the data is read
    if output_dir is not None and resume is True and not sharded:  # qlora_gpu.fsdp_train checks its own mark
        check_resume_backend(output_dir, "ref" if backend == "ref" else "gpu")
    if output_dir is not None and process_rank() == 0:  # the lock's holder, named before the model loads
        check_not_locked(output_dir)
    if trainer is None:
        from ..model.loading import read_model_config

        read_model_config(model)  # a model the loader refuses is named before the data is read
        tokenizer = load_tokenizer(model)
        train_ds, eval_ds, report = prepare_data(data, tokenizer, config, eval_data, not config.progress)
        trainer, _ = make_trainer(model, config, backend, sharded=sharded, cpu_offload=cpu_offload)
    else:
        trainer, tokenizer = trainer
        train_ds, eval_ds, report = prepare_data(data, tokenizer, config, eval_data, not config.progress)
    if process_rank() == 0:
        warn_beyond_context(trainer, config, train_ds, eval_ds)
    if config.progress and process_rank() == 0:  # beside the bar, before it: what the run trains and evaluates on
        n_eval = 0 if eval_ds is None else len(eval_ds)
        print(f"data: {report.summary()}; {len(train_ds)} training / {n_eval} held-out examples", file=sys.stderr,
              flush=True)
        if output_dir is not None and config.max_steps > 1 and not 0 < config.save_every < config.max_steps:
            print(f"checkpoints: none before step {config.max_steps} (save_every {config.save_every}), so a run "
                  "stopped before then starts over; --save-every N keeps one every N steps", file=sys.stderr,
                  flush=True)
    result = train(trainer, train_ds, config, eval_data=eval_ds, output_dir=output_dir, resume=resume,
                   base_model=base_model_name(model), stop_after=stop_after)
    return FinetuneRun(result, trainer, tokenizer, train_ds, eval_ds, report)


def warn_beyond_context(trainer, config: TrainConfig, *datasets) -> None:
    """Warn when examples are longer than the model's context (``max_position_embeddings``): ``max_length`` let
    them through, and positions past the context were never trained, so they teach little and cost the most. Only
    the examples' lengths matter: packed rows restart the positions with every example, so a ``pack_length``
    beyond the context is harmless."""
    context = getattr(getattr(getattr(trainer, "model", None), "config", None), "max_position_embeddings", None)
    if not isinstance(context, int) or config.max_length <= context:
        return
    longer = sum(int((d.lengths > context).sum()) for d in datasets if d is not None)
    if longer:
        warnings.warn(f"max_length={config.max_length} is more than the model's context of {context} tokens "
                      f"(max_position_embeddings): {longer} example{'s are' if longer > 1 else ' is'} longer than "
                      f"{context} tokens, at positions the model was never trained on; max_length={context} drops "
                      "them", stacklevel=3)


def base_model_name(model) -> str:
    """What the adapter records as its base (``base_model_name_or_path``): a model here as its absolute path, so
    that ``qlora generate --adapter`` finds it from any folder; anything else (a hub id) as given."""
    path = Path(model)
    return str(path.resolve()) if path.exists() else str(model)


#: what ``evaluate_model`` evaluates of ``data``: all of it, or the part ``finetune`` held out of it
SPLITS = ("all", "held-out")


def evaluate_model(model, data, config: TrainConfig | None = None, *, adapter=None, backend: str = "ref",
                   split: str = "all", progress: bool = False) -> dict:
    """``qlora evaluate``: the loss and perplexity of the model at ``model`` (with the PEFT adapter in the folder
    ``adapter``) on ``data``, computed by the evaluation the training runs (``loop.evaluate``), so that it repeats
    the held-out figure ``qlora finetune`` printed for the same data and recipe.

    config: the recipe whose storage (``quant_type`` ...) and data settings (``max_length``, ``train_on_inputs``,
    ``micro_batch_size``, ``eval_batches``; for ``split="held-out"`` also ``eval_fraction`` and ``seed``) apply;
    default the adapter's ``train_config.json``, else ``TrainConfig()``. split: ``"all"`` of ``data``, or the
    ``"held-out"`` part ``finetune`` made of it. Without an adapter the model is built with rank-1 adapters whose
    B is zero, as LoRA initialises it: they add exactly 0.0 to every output, so the loss is the base model's,
    through the same code. Returns ``eval_loss``, ``eval_perplexity``, ``eval_targets``, ``examples`` and the
    ``config`` used. Every argument and the data are checked before the model is loaded. ``progress``: a bar over
    the batches."""
    from ..adapters import read_adapter_lora_config
    from .config import adapter_recipe
    from .loop import evaluate

    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if config is None:
        config = (adapter_recipe(adapter) if adapter is not None else None) or TrainConfig()
    if adapter is not None:
        lora = read_adapter_lora_config(adapter)
        config = config.replace(lora_r=lora.r, lora_alpha=lora.alpha, target_modules=tuple(lora.target_modules))
    else:
        config = config.replace(lora_r=1)
    config = config.replace(lora_dropout=0.0, gradient_checkpointing=False, progress=False)
    tokenizer = load_tokenizer(model)
    if tokenizer is None:
        raise ValueError(f"{model}: the model has no tokenizer (tokenizer.json, or GGUF tokenizer metadata)")
    check_data_spec(data)
    report = DataReport()
    examples = load_examples(data, report, "drop" if config.skip_malformed else None)
    if split == "held-out":
        if config.eval_fraction == 0:
            raise ValueError("split='held-out': the recipe's eval_fraction is 0, so training held nothing out of "
                             f"{data} (it was given separate held-out data, or none); evaluate a separate file with "
                             "split='all'")
        _, examples = split_examples(examples, config.eval_fraction, config.seed)
    dataset = build_dataset(examples, tokenizer, config.max_length, config.train_on_inputs, report, warn=False,
                            skip_unrenderable=config.skip_malformed)
    if len(dataset) == 0:
        raise ValueError(f"{data}: no example to evaluate ({report.summary()})")
    trainer, _ = make_trainer(model, config, backend)
    if adapter is not None:
        trainer.model.load_adapter(adapter)
    result = evaluate(trainer, dataset, config.micro_batch_size, config.eval_batches, progress=progress)
    n = len(dataset) if not config.eval_batches else min(len(dataset), config.eval_batches * config.micro_batch_size)
    return dict(result, examples=n, config=config, report=report)


__all__ = ["FinetuneRun", "evaluate_model", "finetune", "load_tokenizer", "make_trainer", "prepare_data",
           "split_examples"]
