"""One QLoRA training step of LLaMA-7B/13B/33B/65B built from their configs alone, ours against the standard stack
(transformers + bitsandbytes ``Linear4bit`` + peft), measured in the same run on one GPU (issue 6).

    python bench/gpu_scale.py --models 7b,13b --json scale_small.json       # on a CUDA GPU
    python bench/gpu_scale.py --models 33b,65b --json scale_large.json
    python bench/gpu_scale.py --runs 65b:ours,7b:ours,7b:baseline,65b:ours:bfloat16 --deadline 380   # in this order
    python bench/gpu_scale.py --tiny --seq 64                                # CPU smoke run (not a benchmark)

The paper's recipe (section 4 and Appendix B; its ``qlora.py`` scripts): NF4 with double quantization, bfloat16
compute, LoRA r=64, alpha=16 on all seven linears of every block (not the LM head), dropout 0.1 up to 13B and 0.05
above, learning rate 2e-4 up to 13B and 1e-4 above, Adam betas (0.9, 0.999), no weight decay, max grad norm 0.3,
paged AdamW 32-bit (bitsandbytes), gradient checkpointing; batch 1 x sequence ``--seq`` (512) of random tokens.

The two stacks hold identical weights: every linear, the embedding and the LM head are drawn by
``qlora_gpu.prepare.init_weight`` with the same name and seed (norms are ones) and the linears are quantized by
the same bitsandbytes call from the same float32 tensor, so the 4-bit bytes are the same
(tests/test_gpu_scale.py checks this bit for bit, and that the first-step losses agree):

- ours: ``qlora_gpu.prepare.prepare_model`` (built on the meta device, then layer by layer on the GPU);
- baseline: the transformers model on the meta device, its linears replaced by bitsandbytes ``Linear4bit``
  (transformers' ``replace_with_bnb_linear`` with a ``BitsAndBytesConfig`` nf4 / double quant / bf16 compute),
  each weight materialised as transformers' loader does (``Params4bit(value, **old.__dict__).to(device)``), with
  its ``quant_state.dtype`` set to bfloat16 as when a bfloat16 checkpoint is loaded (the dequantized values are
  the same; only the dequantize kernel's output dtype changes), embedding / LM head / norms in bfloat16; then
  peft's ``prepare_model_for_kbit_training`` (non-reentrant checkpointing; it casts the non-4-bit parameters to
  float32) and ``get_peft_model``; the step under ``torch.autocast(bfloat16)``, as HF Trainer with ``bf16=True``.

After the backward pass each stack takes its own optimizer step, with the same arithmetic: bitsandbytes' paged
AdamW with 32-bit states and clipping to max grad norm 0.3. The baseline does what HF Trainer does
(``torch.nn.utils.clip_grad_norm_``, ``bitsandbytes.optim.PagedAdamW`` over every adapter tensor, gradients set to
None); ours what ``qlora_gpu.train.GpuTrainer`` does (``qlora_gpu.train.optimizer_step``: multi-tensor clipping,
the same bitsandbytes optimizer over one flat buffer of all adapters, bit-identical to the per-tensor loop —
``qlora_gpu.optim``).

What is measured, per model and stack:

- build time (wall clock, from config to a model ready to train, quantization included);
- peak memory: ``torch.cuda.max_memory_allocated`` over the warm-up and timed steps, after
  ``reset_peak_memory_stats`` at the end of the build (the weights are counted: they are allocated);
- paged optimizer states: bitsandbytes allocates the 32-bit Adam states of tensors of >= 100k elements with
  ``cudaMallocManaged``, outside torch's caching allocator, so ``max_memory_allocated`` does NOT count them; their
  size is reported separately (sum of the state tensors' bytes), and "peak + paged" is what the GPU must hold
  when no page is evicted to CPU RAM;
- tokens/s: batch x seq / the median of ``--steps`` timed steps after ``--warmup`` (CUDA synchronized; a step is
  forward, loss, backward, clipping, optimizer step, zeroing the gradients).

Each (model, stack) runs in its own child process: only one model is ever on the GPU, and everything (including
the managed memory bitsandbytes never frees: its page manager keeps every paged tensor alive) is released by the
process ending. An out-of-memory error is recorded as "OOM" and the run goes on. ``--deadline`` bounds the whole
invocation (a GPU session's time is counted): a run starts only with ``--min-left`` seconds left ("skipped"
otherwise) and its process is ended at the deadline ("timeout"). ``--no-isolate`` runs in this
process instead (del, gc.collect, torch.cuda.empty_cache between stacks).

Without CUDA only the tiny config runs (on the CPU; memory columns n/a): that is a smoke test of the code path,
not a benchmark. Sizes from 7B up refuse to run on the CPU.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: the project's packages
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from qlora_ref.model.config import LINEAR_MODULES, LoraConfig, ModelConfig, QuantConfig  # noqa: E402

SIZES = ("7b", "13b", "33b", "65b")
#: how many of the most frequent operators and kernels a profile lists
TOP = 30
STACKS = ("ours", "ours-triton", "ours-graph", "baseline", "baseline-paper", "baseline-paper-compile")
#: the standard stack's variants (issue 36): peft as ``prepare_model_for_kbit_training`` leaves it (float32 embedding,
#: head and adapters), as the paper's ``qlora.py`` then casts it (bfloat16 embedding, head and adapters, float32
#: norms), and that under ``torch.compile``
BASELINES = ("baseline", "baseline-paper", "baseline-paper-compile")
#: variants of ours, each compared with ours and the baseline in ``ratios``: the opt-in fused kernels
#: (docs/fused_kernels.md) and the step replayed as a CUDA graph (``qlora_gpu.fast.graphs``; CUDA only)
VARIANTS = {"ours-triton": "triton", "ours-graph": "graph"}
CUDA_ONLY_STACKS = ("ours-graph",)
GiB = 2**30

#: a small Llama config for CPU smoke runs and the tests (every dimension a multiple of the block size 64)
TINY = ModelConfig(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, head_dim=32, rms_norm_eps=1e-6,
                   max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
#: transformers' initializer_range: the std of every drawn weight (both stacks)
INIT_STD = 0.02


# ----------------------------------------------------------------------------------------------- the recipe
def recipe(name: str) -> dict:
    """The paper's hyperparameters for model ``name`` (Appendix B; the qlora.py scripts): dropout 0.1 and
    lr 2e-4 up to 13B, 0.05 and 1e-4 for 33B and 65B."""
    large = name in ("33b", "65b")
    return dict(r=64, alpha=16.0, dropout=0.05 if large else 0.1, lr=1e-4 if large else 2e-4, max_grad_norm=0.3,
                betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def model_config(name: str) -> ModelConfig:
    """``"tiny"``, ``"tiny-<blocks>"`` (the tiny widths with that many blocks: 32 has LLaMA-7B's structure, so the
    same operators per step) or a LLaMA-1 size (qlora_ref.memory.LLAMA_SHAPES through
    ``qlora_gpu.prepare.llama_config``)."""
    if _is_tiny(name):
        blocks = int(name.split("-")[1]) if "-" in name else TINY.num_hidden_layers
        return dataclasses.replace(TINY, num_hidden_layers=blocks)
    from qlora_gpu.prepare import llama_config

    return llama_config(name)


def _is_tiny(name: str) -> bool:
    return re.fullmatch(r"tiny(-[1-9][0-9]{0,2})?", name) is not None


def make_batch(config: ModelConfig, seq: int, batch: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, seq), generator=g).to(device)


def make_optimizer(params, rec: dict):
    """bitsandbytes' paged AdamW with 32-bit states (transformers' ``optim="paged_adamw_32bit"``)."""
    import bitsandbytes as bnb

    return bnb.optim.PagedAdamW(params, lr=rec["lr"], betas=rec["betas"], eps=rec["eps"],
                                weight_decay=rec["weight_decay"])


class HFUpdate:
    """What HF Trainer does after the backward pass: ``clip_grad_norm_``, ``optimizer.step()``, the gradients set
    to None (the baseline's step; also paged_oom's, whatever its optimizer)."""

    def __init__(self, optimizer, params: list, max_grad_norm: float):
        self.optimizer, self.params, self.max_grad_norm = optimizer, params, max_grad_norm

    def __call__(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def state_optimizer(self):
        """The optimizer holding the states (``optimizer_state_bytes``)."""
        return self.optimizer


class OursUpdate:
    """What ``qlora_gpu.train.GpuTrainer`` does after the backward pass (``qlora_gpu.train.optimizer_step``): the
    same paged AdamW through ``qlora_gpu.optim``, over one flat buffer bound before the first backward."""

    def __init__(self, named_params: dict, rec: dict):
        from qlora_gpu.optim import make_optimizer as make

        self.params, self.lr, self.max_grad_norm = named_params, rec["lr"], rec["max_grad_norm"]
        self.optimizer = make("paged_adamw", lr=rec["lr"], betas=rec["betas"], eps=rec["eps"],
                              weight_decay=rec["weight_decay"])
        self.optimizer.bind(named_params)

    def __call__(self) -> None:
        from qlora_gpu.train import optimizer_step

        optimizer_step(self.optimizer, self.params, self.lr, self.max_grad_norm)

    @property
    def state_optimizer(self):
        return self.optimizer.torch_optimizer


def make_update(stack: str, model, params: list, rec: dict):
    """The optimizer step of ``stack`` over the model's trainable ``params`` (as its builder returned them)."""
    if stack in BASELINES:
        return HFUpdate(make_optimizer(params, rec), params, rec["max_grad_norm"])
    return OursUpdate(model.lora_parameters(), rec)


# ----------------------------------------------------------------------------------------------- ours
def build_ours(config: ModelConfig, device, rec: dict, seed: int = 0, progress: bool = True,
               adapter_dtype: str = "float32", kernel: str = "bnb", init_std: float = INIT_STD):
    """``prepare_model`` with the paper's recipe; returns (model, trainable parameters, loss function).
    ``adapter_dtype`` "bfloat16" stores the adapters as the paper's qlora.py does (peft's default, and the
    baseline's, is float32)."""
    from qlora_gpu.prepare import prepare_model

    extra = {} if adapter_dtype == "float32" else {"adapter_dtype": adapter_dtype}
    model = prepare_model(config, quant=QuantConfig(), lora=LoraConfig(r=rec["r"], alpha=rec["alpha"],
                                                                      dropout=rec["dropout"]),
                          device=device, dtype="bfloat16", gradient_checkpointing=True, attn_implementation="sdpa",
                          seed=seed, init_std=init_std, progress=progress, tokenizer=False, kernel=kernel,
                          fast=True, **extra)  # qlora_gpu.fast: CUDA's default, and on the CPU the same launches
    model.train()
    params = list(model.lora_parameters().values())

    def loss_fn(ids: torch.Tensor) -> torch.Tensor:
        logits = model(ids)
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    return model, params, loss_fn


def ours_linears(model) -> dict:
    """Block linear name (``model.layers.0.self_attn.q_proj``) -> its bitsandbytes ``Params4bit`` weight."""
    return {name: m.weight for name, m in model.named_linears().items()}


# ----------------------------------------------------------------------------------------------- baseline
def bnb_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def build_baseline(config: ModelConfig, device, rec: dict, seed: int = 0, progress: bool = True, weights=None,
                   init_std: float = INIT_STD, paper: bool = False, compile: bool = False):
    """transformers + bitsandbytes ``Linear4bit`` + peft, materialised layer by layer with ``init_weight``'s
    weights (the same as ``prepare_model`` draws; ``weights(name, dtype)`` replaces them, e.g. a checkpoint's
    tensors); returns (peft model, trainable parameters, loss function). What
    ``transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config())`` and peft build
    from a bfloat16 checkpoint, bit for bit (tests/test_gpu_scale.py), without the checkpoint."""
    import bitsandbytes as bnb
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training
    from tqdm.auto import tqdm

    from qlora_gpu.model import hf_skeleton
    from qlora_gpu.prepare import init_weight
    from qlora_ref.model.llama import expected_tensors

    device = torch.device(device)
    bf16 = torch.bfloat16
    shapes = expected_tensors(config)
    hf = hf_skeleton(config, "sdpa")
    hf = _replace_with_bnb_linear(hf)

    def weight(name: str, dtype: torch.dtype) -> torch.Tensor:
        if weights is not None:
            return weights(name, dtype).to(device=device, dtype=dtype)
        if name.endswith("norm.weight"):
            return torch.ones(shapes[name], device=device, dtype=dtype)
        if name.endswith(".bias"):
            return torch.zeros(shapes[name], device=device, dtype=dtype)
        return init_weight(name, shapes[name], init_std, seed, device, dtype)

    def set_param(module: torch.nn.Module, attr: str, value: torch.Tensor) -> None:
        setattr(module, attr, torch.nn.Parameter(value, requires_grad=False))

    set_param(hf.model.embed_tokens, "weight", weight("model.embed_tokens.weight", bf16))
    set_param(hf.model.norm, "weight", weight("model.norm.weight", bf16))
    if config.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    else:
        set_param(hf.lm_head, "weight", weight("lm_head.weight", bf16))
    for i, layer in enumerate(tqdm(hf.model.layers, desc="baseline: quantizing layers", unit="layer",
                                   disable=not progress)):
        p = f"model.layers.{i}."
        set_param(layer.input_layernorm, "weight", weight(p + "input_layernorm.weight", bf16))
        set_param(layer.post_attention_layernorm, "weight", weight(p + "post_attention_layernorm.weight", bf16))
        for n in ("q_norm", "k_norm"):  # Qwen3
            if getattr(layer.self_attn, n, None) is not None:
                set_param(getattr(layer.self_attn, n), "weight", weight(f"{p}self_attn.{n}.weight", bf16))
        for name in LINEAR_MODULES:
            parent = layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
            lin = getattr(parent, name)
            if not isinstance(lin, bnb.nn.Linear4bit):
                raise RuntimeError(f"replace_with_bnb_linear left {p}{name} as {type(lin).__name__}")
            path = f"{p}{'self_attn' if parent is layer.self_attn else 'mlp'}.{name}"
            w = weight(path + ".weight", torch.float32)  # the float32 tensor prepare_model quantizes
            # transformers' loader (integrations.bitsandbytes.Bnb4bitQuantize): Params4bit(value, **old.__dict__)
            lin.weight = bnb.nn.Params4bit(w, requires_grad=False, **lin.weight.__dict__).to(device)
            lin.weight.quant_state.dtype = bf16  # as loaded from a bfloat16 checkpoint: dequantize into bf16
            if lin.bias is not None:
                set_param(lin, "bias", weight(path + ".bias", bf16))
            del w
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf.config).to(device)
    leftover = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t is not None and t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left on the meta device while building the baseline: {leftover[:5]}")
    hf.is_loaded_in_4bit = True  # what transformers' bitsandbytes quantizer sets after loading
    hf.config.use_cache = False
    hf = prepare_model_for_kbit_training(hf, use_gradient_checkpointing=True,
                                         gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(seed)  # peft draws lora_A from torch's global generator
    peft_model = get_peft_model(hf, PeftLoraConfig(r=rec["r"], lora_alpha=rec["alpha"], lora_dropout=rec["dropout"],
                                                   target_modules=list(LINEAR_MODULES), bias="none",
                                                   task_type="CAUSAL_LM"))
    if paper:
        qlora_py_casts(peft_model)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    forward = compile_for_training(peft_model) if compile else peft_model

    def loss_fn(ids: torch.Tensor, labels: torch.Tensor | None = None, num_items: int | None = None) -> torch.Tensor:
        """The model's own loss (transformers' ForCausalLMLoss: labels shifted inside), under autocast as HF Trainer
        with bf16=True; ``num_items``: the accumulated step's targets (Trainer's ``num_items_in_batch``)."""
        extra = {} if num_items is None else {"num_items_in_batch": num_items}
        with torch.autocast(device_type=device.type, dtype=bf16):
            return forward(input_ids=ids, labels=ids if labels is None else labels, use_cache=False, **extra).loss

    return peft_model, params, loss_fn


def compile_for_training(model):
    """``torch.compile(model)``, as HF Trainer's ``torch_compile=True`` compiles the peft model, with dynamo allowed
    to compile what gradient checkpointing wraps. transformers 5 with the ``kernels`` package routes each attention
    forward through a context variable it sets and resets (``use_kernelized_func``); under non-reentrant
    checkpointing dynamo refuses that side effect ("HOP: Unsafe side effect") and runs every block eagerly: on the
    tiny config on the CPU a step then dispatched 5,627 aten operators against eager's 5,765 — compiled in name only
    (tests/test_gpu_scale.py). ``skip_fwd_side_effects_in_bwd_under_checkpoint`` lets dynamo trace the block and
    leaves that side effect out of the backward's recomputation, where it changes no value (the routing it sets is
    already fixed in the traced graph): 2,317 operators, the loss eager's within bfloat16 round-off. Where this
    torch lacks the flag the model is compiled as it is and ``compile_stats`` shows what that gave."""
    from torch._dynamo import config as dynamo_config

    if hasattr(dynamo_config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        dynamo_config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    else:
        warnings.warn("torch._dynamo.config has no skip_fwd_side_effects_in_bwd_under_checkpoint: checkpointed "
                      "blocks may run eagerly under torch.compile (see the result's 'compile' entry)", stacklevel=2)
    return torch.compile(model)


def compile_stats() -> dict | None:
    """What ``torch.compile`` made of this process's steps so far, from dynamo's counters (an internal: None where
    they are missing): graphs compiled, operator calls captured in them, graph breaks and the five most frequent
    reasons (first line of each)."""
    try:
        from torch._dynamo.utils import counters

        stats, breaks = counters["stats"], counters["graph_break"]
        reasons = collections.Counter()
        for reason, n in breaks.items():
            reasons[str(reason).strip().splitlines()[0][:200]] += n
        return dict(graphs=int(stats["unique_graphs"]), ops_captured=int(stats["calls_captured"]),
                    graph_breaks=int(sum(breaks.values())), break_reasons=dict(reasons.most_common(5)))
    except (ImportError, AttributeError, KeyError, TypeError):
        return None


def qlora_py_casts(peft_model) -> None:
    """What the paper's ``qlora.py`` (``get_accelerate_model`` with ``--bf16``) does after ``get_peft_model``: every
    LoRA layer to bfloat16 (its adapters; the 4-bit weight is not floating point and stays), every module named
    ``norm`` to float32, the embedding and LM head to bfloat16."""
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            module.to(torch.bfloat16)
        if "norm" in name:
            module.to(torch.float32)
        if ("lm_head" in name or "embed_tokens" in name) and getattr(module, "weight", None) is not None \
                and module.weight.dtype == torch.float32:
            module.to(torch.bfloat16)


def _replace_with_bnb_linear(hf):
    """transformers' ``replace_with_bnb_linear`` (every linear but the LM head becomes a meta-device
    ``bnb.nn.Linear4bit``); if this transformers version's signature differs, the same replacement by hand."""
    import bitsandbytes as bnb
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    cfg = bnb_config()
    try:
        return replace_with_bnb_linear(hf, modules_to_not_convert=["lm_head"], quantization_config=cfg)
    except TypeError:  # pragma: no cover - another transformers 5.x signature
        pass
    for name, module in list(hf.named_modules()):
        if type(module) is torch.nn.Linear and not name.endswith("lm_head"):
            with torch.device("meta"):
                new = bnb.nn.Linear4bit(module.in_features, module.out_features, module.bias is not None,
                                        cfg.bnb_4bit_compute_dtype, compress_statistics=cfg.bnb_4bit_use_double_quant,
                                        quant_type=cfg.bnb_4bit_quant_type, quant_storage=cfg.bnb_4bit_quant_storage)
            new.requires_grad_(False)
            hf.set_submodule(name, new)
    return hf


def baseline_linears(peft_model) -> dict:
    """Block linear name (``model.layers.0.self_attn.q_proj``) -> the ``Params4bit`` weight under peft's wrapper."""
    import bitsandbytes as bnb

    out = {}
    for name, m in peft_model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            out[name.removeprefix("base_model.model.").removesuffix(".base_layer")] = m.weight
    return out


def build_ours_graph(config: ModelConfig, device, rec: dict, **kwargs):
    """``build_ours`` with the step captured into a CUDA graph at its first call and replayed after
    (``qlora_gpu.fast.graphs.GraphedStep``: the same kernels, launched in one call); the loss function it returns runs
    the backward pass too."""
    from qlora_gpu.fast.graphs import GraphedStep

    model, params, loss_fn = build_ours(config, device, rec, **kwargs)
    return model, params, GraphedStep(model, loss_fn)


BUILDERS = {"ours": build_ours, "ours-triton": functools.partial(build_ours, kernel="triton"),
            "ours-graph": build_ours_graph, "baseline": build_baseline,
            "baseline-paper": functools.partial(build_baseline, paper=True),
            "baseline-paper-compile": functools.partial(build_baseline, paper=True, compile=True)}


# ----------------------------------------------------------------------------------------------- the step
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def backward(loss: torch.Tensor) -> None:
    """``loss.backward()`` as qlora's training step runs it (``GpuTrainer.forward_backward``): the fast path's
    adapter gradients deferred into the flat buffer (``qlora_gpu.fast.deferred_grads.allowed``); a stack without
    qlora's layers is unaffected."""
    from qlora_gpu.fast import deferred_grads

    with deferred_grads.allowed():
        loss.backward()


def train_step(loss_fn, update, ids: torch.Tensor) -> float:
    """Forward, loss, backward, then ``update()`` (clipping, optimizer step, gradients cleared): one step. A
    ``loss_fn`` with ``runs_backward`` (``qlora_gpu.fast.graphs.GraphedStep``) has run the backward pass itself."""
    loss = loss_fn(ids)
    if not getattr(loss_fn, "runs_backward", False):
        backward(loss)
    update()
    return float(loss.detach())


def timed_train_step(loss_fn, update, ids: torch.Tensor, device: torch.device) -> tuple[float, float, float]:
    """``train_step`` timed: (loss, seconds of the whole step, seconds of ``update()`` alone — clipping and the
    optimizer step, where paged states evicted to CPU RAM are fetched back), the device synchronized around each."""
    _sync(device)
    t0 = time.perf_counter()
    loss = loss_fn(ids)
    if not getattr(loss_fn, "runs_backward", False):
        backward(loss)
    _sync(device)
    t1 = time.perf_counter()
    update()
    _sync(device)
    t2 = time.perf_counter()
    return float(loss.detach()), t2 - t0, t2 - t1


def reserve(device: torch.device, leave_free_bytes: int | None) -> torch.Tensor | None:
    """Occupy the device's free memory but ``leave_free_bytes`` with one tensor (None: nothing): the card as one
    with only that much memory left, for everything of this process — the model, the activations and
    bitsandbytes' paged states, which the driver then has to evict to CPU RAM when they do not fit."""
    if leave_free_bytes is None:
        return None
    if device.type != "cuda":
        raise ValueError("leave_free_bytes needs a CUDA device")
    free, _ = torch.cuda.mem_get_info(device)
    n = free - leave_free_bytes
    if n <= 0:
        return None
    return torch.empty(n, dtype=torch.uint8, device=device)


def count_ops(fn) -> tuple[int, object]:
    """(number of aten operators dispatched while ``fn()`` runs, its result): on a GPU nearly every one that is not
    a view is a kernel launch, each costing microseconds of host time whatever its size (``count_op_kinds``)."""
    total, _, result = count_op_kinds(fn)
    return total, result


def count_op_kinds(fn, names: collections.Counter | None = None) -> tuple[int, int, object]:
    """(aten operators dispatched while ``fn()`` runs, those of them that compute — not views, which only make
    new metadata and launch nothing —, its result). The second is the CPU's stand-in for the kernels a CUDA step
    launches (``--profile`` counts those on a GPU). ``names``: a Counter that gets each computing operator's
    name."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        n = compute = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            _Count.n += 1
            if not (func.is_view or func in _VIEWS):
                _Count.compute += 1
                if names is not None:
                    names[str(func)] += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        result = fn()
    return _Count.n, _Count.compute, result


#: views that the operator schema does not mark as such (``OpOverload.is_view``)
_VIEWS = frozenset({torch.ops.aten._unsafe_view.default})


def _busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals (µs in, seconds out): GPU time with any kernel running."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total * 1e-6


def _intervals(events, device_type) -> list[tuple[float, float]]:
    """(start, end) in µs of the profiler's events on ``device_type`` (``torch.autograd.DeviceType``)."""
    return [(e.time_range.start, e.time_range.end) for e in events if e.device_type == device_type]


def count_python_calls(fn) -> int:
    """Function calls (Python-level and built-in) while ``fn()`` runs, counted by cProfile: the interpreter's work,
    which a step pays on the host whatever its kernels — much of it in torch's checkpoint and autograd machinery,
    common to both stacks. Like the operator counts, device-independent enough to be counted on the CPU."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        fn()
    finally:
        profiler.disable()
    return pstats.Stats(profiler).total_calls


def _runtime_api(events) -> tuple[int, float]:
    """(calls, seconds) of the host's time inside the CUDA runtime and driver APIs (``cudaLaunchKernel``,
    ``cuLaunchKernel``, ``cudaMemsetAsync``, …: the profiler's CPU events named without an ``aten::``-style
    namespace and starting with ``cu``). Against the step's wall time it splits the host's cost per kernel into
    the launch itself (the driver: fewer kernels is the lever) and the rest (Python, the dispatcher, autograd:
    fewer Python calls is)."""
    from torch.autograd import DeviceType

    found = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("cu") and "::" not in e.name]
    return len(found), _busy_seconds([(e.time_range.start, e.time_range.end) for e in found])


def profile_step(step, device: torch.device) -> dict:
    """Where one more step's time goes: aten operators dispatched (host work per step), and on CUDA the kernels
    launched and the time the GPU had one running (torch.profiler) against the wall clock. ``gpu_busy_fraction``
    well below 1 means the step waits on the host (Python and launch overhead), not on the GPU."""
    out = {}
    ops = collections.Counter()
    out["aten_ops"], out["compute_ops"], _ = count_op_kinds(step, ops)
    out["top_ops"] = dict(ops.most_common(TOP))
    if device.type != "cuda":  # on a GPU the step's time says more, and the count would cost one more step
        out["python_calls"] = count_python_calls(step)
        return out
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    try:
        _sync(device)
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            _sync(device)
        wall = time.perf_counter() - t0
        events = prof.events()
        gpu = _intervals(events, DeviceType.CUDA)
        busy = _busy_seconds(gpu)
        api_calls, api_s = _runtime_api(events)
        out.update(profiled_wall_s=wall, kernels=len(gpu), gpu_busy_s=busy, runtime_api_calls=api_calls,
                   runtime_api_s=api_s,
                   gpu_busy_fraction=busy / wall if wall > 0 else None,
                   top_kernels=dict(collections.Counter(e.name for e in events
                                                        if e.device_type == DeviceType.CUDA).most_common(TOP)),
                   launch_us=launch_microseconds(device))
    except Exception as e:  # noqa: BLE001 - the profiler is diagnostic; the measurements above stand without it
        out["profiler_error"] = _brief(e)
    return out


def launch_microseconds(device: torch.device, n: int = 2000) -> float:
    """Host time of one tiny kernel launch (µs): ``n`` one-element additions, timed to the last one's end. The
    floor of a step's time is about its kernels times this when the GPU waits on the host."""
    x = torch.zeros(1, device=device)
    for _ in range(20):
        x.add_(1)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        x.add_(1)
    _sync(device)
    return (time.perf_counter() - t0) / n * 1e6


def optimizer_state_bytes(optimizer) -> tuple[int, int]:
    """(bytes in bitsandbytes' paged (CUDA managed) state tensors, bytes in ordinary device tensors)."""
    paged = plain = 0
    for state in optimizer.state.values():
        for t in state.values():
            if torch.is_tensor(t):
                if getattr(t, "is_paged", False):
                    paged += t.numel() * t.element_size()
                else:
                    plain += t.numel() * t.element_size()
    return paged, plain


def set_cap(device: torch.device, cap_bytes: int | None) -> None:
    """torch's per-process cap on the memory its caching allocator reserves on ``device`` (None lifts it).
    bitsandbytes' paged optimizer states (CUDA managed memory) and the CUDA context are outside it."""
    # set_per_process_memory_fraction refuses a device without an index (torch.device("cuda")): pass the index
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0 if cap_bytes is None else min(1.0, cap_bytes / total), index)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _brief(e: BaseException) -> str:
    """The exception's type and the first line of its message (at most 200 characters), for a JSON row."""
    first = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_stack(stack: str, name: str, device, seq: int = 512, batch: int = 1, warmup: int = 2, steps: int = 5,
              seed: int = 0, progress: bool = True, adapter_dtype: str = "float32", profile: bool = True,
              cap_bytes: int | None = None, leave_free_bytes: int | None = None) -> dict:
    """Build ``stack`` for model ``name`` on ``device``, take ``warmup`` + ``steps`` training steps; a dict of
    the measurements (status "OOM" with the phase when the GPU ran out of memory). ``adapter_dtype`` applies to
    ours only (the baseline keeps peft's float32 adapters). ``profile``: after the timed steps and the peak
    memory, one more step counted and profiled (``profile_step``). ``cap_bytes`` (CUDA): torch's allocator is
    capped there from the build on (``set_cap``) — a run that completes fits a card of that size, paged states
    aside. ``leave_free_bytes`` (CUDA): the rest of the free memory is occupied before the build (``reserve``): the
    paged states then compete for that much too, and ``update_times_s`` shows what their eviction costs."""
    if stack not in BUILDERS:
        raise ValueError(f"stack must be one of {STACKS}, got {stack!r}")
    if stack in CUDA_ONLY_STACKS and torch.device(device).type != "cuda":
        raise ValueError(f"stack {stack!r} needs a CUDA device (CUDA graphs), got {device!r}")
    if warmup < 0 or steps < 1:
        raise ValueError(f"warmup must be >= 0 and steps >= 1, got warmup={warmup}, steps={steps}")
    device = torch.device(device)
    config = model_config(name)
    rec = recipe(name)
    out = dict(model=name, stack=stack, device=_device_name(device), seq=seq, batch=batch, warmup=warmup, steps=steps,
               adapter_dtype="float32" if stack in BASELINES else adapter_dtype, cap_bytes=cap_bytes,
               recipe={k: list(v) if isinstance(v, tuple) else v for k, v in rec.items()}, status="ok")
    model = params = loss_fn = update = step = hog = None
    phase = "build"
    _preload()  # imports are not part of the build time
    if cap_bytes is not None and device.type != "cuda":
        raise ValueError("cap_bytes needs a CUDA device (it caps torch's CUDA allocator)")
    try:
        if cap_bytes is not None:
            set_cap(device, cap_bytes)
        free_memory(device)
        if leave_free_bytes is not None:
            hog = reserve(device, leave_free_bytes)
            out["leave_free_bytes"] = leave_free_bytes
            out["reserved_bytes"] = 0 if hog is None else hog.numel()
            out["free_bytes_at_build"] = int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t0 = time.perf_counter()
        extra = {"adapter_dtype": adapter_dtype} if stack not in BASELINES and adapter_dtype != "float32" else {}
        model, params, loss_fn = BUILDERS[stack](config, device, rec, seed=seed, progress=progress, **extra)
        _sync(device)
        out["build_s"] = time.perf_counter() - t0
        out["lora_params"] = int(sum(p.numel() for p in params))
        out["adapter_dtype"] = str(params[0].dtype).removeprefix("torch.")
        if device.type == "cuda":
            out["build_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
            free_memory(device)
            out["model_bytes"] = int(torch.cuda.memory_allocated(device))
            torch.cuda.reset_peak_memory_stats(device)
        phase = "step"
        update = make_update(stack, model, params, rec)
        ids = make_batch(config, seq, batch, device, seed)
        losses, times, update_times = [], [], []
        for i in range(warmup + steps):
            loss, step_s, update_s = timed_train_step(loss_fn, update, ids, device)
            losses.append(loss)
            if i >= warmup:
                times.append(step_s)
                update_times.append(update_s)
        out["first_loss"], out["last_loss"] = losses[0], losses[-1]
        out["losses"] = losses  # the loss curve on the repeated batch: both stacks learn alike (issue 36)
        out["step_s"] = statistics.median(times)
        out["step_times_s"] = times
        out["update_times_s"] = update_times
        out["tokens_per_s"] = batch * seq / out["step_s"]
        out["paged_state_bytes"], out["device_state_bytes"] = optimizer_state_bytes(update.state_optimizer)
        if stack.endswith("-compile"):
            out["compile"] = compile_stats()
        if device.type == "cuda":
            out["peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
            out["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
            free, total = torch.cuda.mem_get_info(device)
            out["device_used_bytes"] = int(total - free)  # CUDA context + torch's reserve + resident managed pages
            out["device_total_bytes"] = int(total)
        if profile:  # diagnostic: a failure here (an OOM too) leaves the measurements above standing
            try:
                step = functools.partial(train_step, loss_fn, update, ids)
                out["profile"] = profile_step(step, device)
            except Exception as e:  # noqa: BLE001
                out["profile"] = {"error": _brief(e)}
    except Exception as e:  # noqa: BLE001 - an OOM is a result; anything else is re-raised below
        if not _is_oom(e):
            raise
        out.update(status="OOM", phase=phase, error=str(e).splitlines()[0][:300])
    finally:
        del model, params, loss_fn, update, step, hog
        free_memory(device)
        if cap_bytes is not None:
            set_cap(device, None)
    return out


def cpu_setup() -> None:
    """On the CPU: bitsandbytes' CPU fallbacks are torch.compile'd (minutes per shape; the same arithmetic
    without), and its paged optimizers fall back to ordinary tensors with a warning per optimizer."""
    from torch import _dynamo

    _dynamo.config.disable = True
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")


def _preload() -> None:
    """Import both stacks' modules (seconds of import time that belong to neither build)."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers
    import transformers.integrations.bitsandbytes  # noqa: F401

    import qlora_gpu.prepare  # noqa: F401

    transformers.LlamaForCausalLM  # noqa: B018 - transformers imports its model classes lazily


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / GiB:.0f} GiB), torch {torch.__version__}"
    import platform

    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), torch {torch.__version__}"


# ----------------------------------------------------------------------------------------------- orchestration
def run_isolated(stack: str, name: str, args, adapter_dtype: str = "float32", timeout: float | None = None) -> dict:
    """``run_stack`` in a child process (this script with ``--child``): the GPU is empty when it returns.
    ``timeout`` seconds (None: no limit) end the child; the row then says "timeout"."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        job = dict(stack=stack, name=name, device=args.device, seq=args.seq, batch=args.batch, warmup=args.warmup,
                   steps=args.steps, seed=args.seed, progress=not args.no_progress, adapter_dtype=adapter_dtype,
                   profile=_profiled(name, args.profile), cap_bytes=_cap_bytes(args),
                   leave_free_bytes=_leave_free_bytes(args))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job), "--child-out", str(result)]
        try:
            proc = subprocess.run(cmd, timeout=timeout)
        except subprocess.TimeoutExpired:
            return dict(model=name, stack=stack, adapter_dtype=adapter_dtype, cap_bytes=_cap_bytes(args),
                        status="timeout", error=f"over {timeout:.0f} s")
        if result.exists():
            return json.loads(result.read_text())
        return dict(model=name, stack=stack, adapter_dtype=adapter_dtype, cap_bytes=_cap_bytes(args),
                    status="failed", error=f"child process exited with {proc.returncode}")


def parse_runs(spec: str) -> list[tuple[str, str, str]]:
    """``--runs``: comma-separated ``model:stack[:adapter_dtype]`` in the order to run, e.g.
    ``65b:ours,7b:ours,7b:baseline,65b:ours:bfloat16`` -> [(model, stack, adapter dtype), ...]."""
    runs = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        parts = item.lower().split(":")
        if len(parts) not in (2, 3):
            raise SystemExit(f"--runs: {item!r} is not model:stack[:adapter_dtype] (e.g. 65b:ours or "
                             "65b:ours:bfloat16)")
        name, stack = _model_name(parts[0], f"--runs ({item!r})"), parts[1]
        dtype = parts[2] if len(parts) == 3 else "float32"
        if stack not in STACKS:
            raise SystemExit(f"--runs: unknown stack {stack!r} in {item!r}; choose among {', '.join(STACKS)}")
        if dtype not in ("float32", "bfloat16"):
            raise SystemExit(f"--runs: adapter dtype {dtype!r} in {item!r} must be float32 or bfloat16")
        if stack in BASELINES and dtype != "float32":
            raise SystemExit(f"--runs: {item!r}: the baseline keeps peft's float32 adapters")
        runs.append((name, stack, dtype))
    if not runs:
        raise SystemExit("--runs is empty; give model:stack pairs, e.g. 65b:ours,7b:baseline")
    return runs


def ratios(rows: list[dict]) -> dict:
    """ours / baseline per model: peak memory, peak + paged states, tokens/s, build time (None where missing)."""
    out = {}
    for name in dict.fromkeys(r["model"] for r in rows):
        by = {r["stack"]: r for r in rows if r["model"] == name and r.get("status") == "ok"
              and r.get("adapter_dtype", "float32") == "float32"  # like for like: the baseline's adapters,
              and r.get("cap_bytes") is None and r.get("leave_free_bytes") is None}  # no cap, nothing reserved
        if "ours" not in by or "baseline" not in by:
            continue
        o, b = by["ours"], by["baseline"]

        def ratio(key, a=o, c=b):
            return a[key] / c[key] if a.get(key) and c.get(key) else None

        out[name] = dict(peak=ratio("peak_bytes"), tokens_per_s=ratio("tokens_per_s"), build=ratio("build_s"),
                         peak_plus_paged=(o["peak_bytes"] + o["paged_state_bytes"])
                         / (b["peak_bytes"] + b["paged_state_bytes"]) if o.get("peak_bytes") else None,
                         first_loss_diff=o["first_loss"] - b["first_loss"])
        for key in ("aten_ops", "compute_ops"):
            if o.get("profile", {}).get(key) and b.get("profile", {}).get(key):
                out[name][key] = o["profile"][key] / b["profile"][key]
        for stack, tag in VARIANTS.items():
            if stack in by and by[stack].get("tokens_per_s"):
                v = by[stack]
                out[name][f"tokens_per_s_{tag}"] = v["tokens_per_s"] / b["tokens_per_s"]
                out[name][f"peak_{tag}"] = ratio("peak_bytes", v, b)
                # the same model and adapters: a broken kernel or capture shows here first (before any update)
                out[name][f"first_loss_diff_{tag}"] = v["first_loss"] - o["first_loss"]
    return out


def _gib(x) -> str:
    return "n/a" if x is None else f"{x / GiB:.2f}"


def _label(r: dict) -> str:
    notes = [f"{r['adapter_dtype']} adapters"] if r.get("adapter_dtype", "float32") != "float32" \
        and r["stack"] not in BASELINES else []
    if r.get("cap_bytes") is not None:
        notes.append(f"capped at {r['cap_bytes'] / 1e9:g} GB")
    if r.get("leave_free_bytes") is not None:
        notes.append(f"{r['leave_free_bytes'] / 1e9:g} GB left free")
    return r["stack"] + (f" ({', '.join(notes)})" if notes else "")


def markdown(rows: list[dict], rat: dict) -> str:
    lines = ["| model | stack | build s | build peak GiB | peak GiB | paged states GiB | peak + paged GiB | tokens/s "
             "| first loss |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("status") != "ok":
            why = r.get("phase") or r.get("error", "")
            lines.append(f"| {r['model']} | {_label(r)} | {r.get('status')} ({why}) |  |  |  |  |  |  |")
            continue
        peak = r.get("peak_bytes")
        both = None if peak is None else peak + r["paged_state_bytes"]
        lines.append(f"| {r['model']} | {_label(r)} | {r['build_s']:.1f} | {_gib(r.get('build_peak_bytes'))} | "
                     f"{_gib(peak)} | "
                     f"{_gib(r['paged_state_bytes'])} | {_gib(both)} | {r['tokens_per_s']:.1f} | "
                     f"{r['first_loss']:.4f} |")
    prof = [r for r in rows if r.get("status") == "ok" and r.get("profile", {}).get("aten_ops")]
    if prof:
        lines += ["", "| model | stack | aten ops / step | of which compute | kernels / step | GPU busy / step "
                  "| step time / kernel µs | one launch µs | in CUDA API calls / step | Python calls / step |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in prof:
            q = r["profile"]
            busy, kernels, launch = q.get("gpu_busy_fraction"), q.get("kernels"), q.get("launch_us")
            per = "n/a" if not kernels else f"{r['step_s'] / kernels * 1e6:.1f}"
            api, wall = q.get("runtime_api_s"), q.get("profiled_wall_s")
            api = "n/a" if api is None or not wall else f"{100 * api / wall:.0f} % ({q['runtime_api_calls']} calls)"
            lines.append(f"| {r['model']} | {_label(r)} | {q['aten_ops']} | {q.get('compute_ops', 'n/a')} | "
                         f"{kernels or 'n/a'} | {'n/a' if busy is None else f'{100 * busy:.0f} %'} | {per} | "
                         f"{'n/a' if launch is None else f'{launch:.1f}'} | {api} | {q.get('python_calls', 'n/a')} |")
    if rat:
        lines += ["", "| model | peak ours/baseline | peak+paged ours/baseline | tokens/s ours/baseline | "
                      "build ours/baseline | first-loss difference | aten ops ours/baseline | "
                      "compute ops ours/baseline |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}x"  # noqa: E731
        for name, q in rat.items():
            tps, loss, peak = fmt(q['tokens_per_s']), f"{q['first_loss_diff']:+.2e}", fmt(q['peak'])
            for stack, tag in VARIANTS.items():
                if f"tokens_per_s_{tag}" in q:
                    tps += f" ({stack}: {fmt(q[f'tokens_per_s_{tag}'])})"
                    loss += f" ({stack} − ours: {q[f'first_loss_diff_{tag}']:+.2e})"
                    if q.get(f"peak_{tag}") is not None:
                        peak += f" ({stack}: {fmt(q[f'peak_{tag}'])})"
            lines.append(f"| {name} | {peak} | {fmt(q['peak_plus_paged'])} | {tps} | "
                         f"{fmt(q['build'])} | {loss} | {fmt(q.get('aten_ops'))} | {fmt(q.get('compute_ops'))} |")
    return "\n".join(lines)


def _write_json(path: str, payload: dict) -> None:
    """Atomic: a temporary file in the same folder, then renamed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, target)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help="comma-separated among 7b,13b,33b,65b (default 7b,13b on CUDA; "
                                                  "the tiny config without CUDA)")
    p.add_argument("--tiny", action="store_true", help="the tiny config (CPU smoke run)")
    p.add_argument("--stacks", default="ours,baseline", help=f"comma-separated among {','.join(STACKS)} "
                   "(ours-triton: ours with the opt-in fused Triton kernels; ours-graph: ours replayed as a CUDA "
                   "graph, CUDA only)")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adapter-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="ours only: the adapters' storage (the paper's qlora.py casts them to bfloat16)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--json", default=None, help="write the results here (after every stack)")
    p.add_argument("--append", action="store_true", help="keep the rows already in --json (a run of other options, "
                   "e.g. --leave-free-gb beside an unconstrained run, compared in one file by bench/tables.py)")
    p.add_argument("--no-isolate", action="store_true", help="run every stack in this process")
    p.add_argument("--runs", default=None, help="instead of --models x --stacks: comma-separated "
                   "model:stack[:adapter_dtype] in the order to run (e.g. 65b:ours,7b:ours,7b:baseline)")
    p.add_argument("--child-timeout", type=float, default=None, help="seconds per (model, stack) child process")
    p.add_argument("--cap-gb", type=float, default=None, help="cap torch's CUDA allocator at this many GB (10^9 "
                   "bytes) from the build on: a run that completes fits a card of that size (paged states aside)")
    p.add_argument("--leave-free-gb", type=float, default=None, help="occupy the GPU's free memory but this many GB "
                   "(10^9 bytes) before the build: a card with only that much left, paged optimizer states included "
                   "(they are evicted to CPU RAM when short; update_times_s shows the cost)")
    p.add_argument("--deadline", type=float, default=None, help="seconds for the whole run: a (model, stack) "
                   "starts only with --min-left seconds left, and is stopped at the deadline (row 'timeout')")
    p.add_argument("--min-left", type=float, default=45.0, help="with --deadline: seconds a run needs to start")
    p.add_argument("--profile", default="tiny,7b,13b", help="models that get one more step, counted and profiled "
                   "(comma-separated; tiny covers tiny-<blocks>; 'none': no model). Where host overhead decides the "
                   "speed; at 33B/65B the profiler's bookkeeping of ~10^5 events would cost more than it tells")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _model_names(args, device: torch.device) -> list[str]:
    if args.tiny:
        return ["tiny"]
    if args.models is None:
        return ["tiny"] if device.type == "cpu" else ["7b", "13b"]
    return [_model_name(m, "--models") for m in args.models.split(",") if m.strip()]


def _model_name(raw: str, option: str) -> str:
    """``raw`` ("7B", "llama-65b", "tiny-32") normalised, or SystemExit naming ``option`` and the choices."""
    name = raw.strip().lower().removeprefix("llama-")
    if name not in SIZES and not _is_tiny(name):
        raise SystemExit(f"{option}: unknown model {name!r}; choose among {', '.join(SIZES)}, tiny or tiny-<blocks>")
    return name


def _cap_bytes(args) -> int | None:
    return None if args.cap_gb is None else int(args.cap_gb * 1e9)


def _leave_free_bytes(args) -> int | None:
    return None if args.leave_free_gb is None else int(args.leave_free_gb * 1e9)


def _profiled(name: str, spec: str) -> bool:
    """Whether ``--profile`` (comma-separated models, "tiny" standing for every tiny-<blocks>) names ``name``."""
    chosen = {m.strip().lower() for m in spec.split(",")}
    return name in chosen or (_is_tiny(name) and "tiny" in chosen)


def _stack_names(args) -> list[str]:
    stacks = [s.strip() for s in args.stacks.split(",") if s.strip()]
    if not stacks or any(s not in STACKS for s in stacks):
        raise SystemExit(f"--stacks must be a comma-separated subset of {','.join(STACKS)}, got {args.stacks!r}")
    return stacks


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.child is not None:  # one (model, stack) in this process, result to --child-out
        job = json.loads(args.child)
        if torch.device(job["device"]).type == "cpu":
            cpu_setup()
        _write_json(args.child_out, run_stack(**job))
        return []
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.device = str(device)
    if device.type == "cpu":
        cpu_setup()
    if args.runs is not None:
        if args.models is not None or args.tiny:
            raise SystemExit("--runs replaces --models/--tiny/--stacks: give one or the other")
        runs = parse_runs(args.runs)
    else:
        runs = [(name, stack, args.adapter_dtype) for name in _model_names(args, device)
                for stack in _stack_names(args)]
    big = sorted({m for m, _, _ in runs if not _is_tiny(m)})
    if device.type == "cpu" and big:
        raise SystemExit(f"{','.join(big)}: LLaMA sizes from 7B up need a CUDA GPU (no CUDA device here); "
                         "run --tiny for a CPU smoke test of the code path")
    cuda_only = sorted({s for _, s, _ in runs if s in CUDA_ONLY_STACKS})
    if device.type == "cpu" and cuda_only:
        raise SystemExit(f"{','.join(cuda_only)}: needs a CUDA device (CUDA graphs), none here")
    if args.seq < 2 or args.batch < 1:
        raise SystemExit(f"--seq must be >= 2 and --batch >= 1, got {args.seq}, {args.batch}")
    if args.leave_free_gb is not None and (device.type != "cuda" or args.leave_free_gb <= 0):
        raise SystemExit(f"--leave-free-gb occupies GPU memory: it needs a CUDA device and a positive size, got "
                         f"{args.leave_free_gb} on {device}")
    if args.cap_gb is not None and (device.type != "cuda" or args.cap_gb <= 0):
        raise SystemExit(f"--cap-gb caps torch's CUDA allocator: it needs a CUDA device and a positive size, got "
                         f"{args.cap_gb} on {device}")
    if args.deadline is not None and args.no_isolate:
        raise SystemExit("--deadline needs child processes (it stops a run by ending its process): drop --no-isolate")

    print(f"device: {_device_name(device)}; seq {args.seq} x batch {args.batch}; warm-up {args.warmup}, timed "
          f"{args.steps}; {'one process' if args.no_isolate else 'one child process per (model, stack)'}",
          flush=True)
    if device.type == "cpu":
        print("CPU: a smoke test of the code path, not a benchmark (memory columns n/a)", flush=True)
    start = time.monotonic()
    from stamp import stamp as make_stamp

    stamp = make_stamp()
    rows: list[dict] = []
    if args.append and args.json and Path(args.json).exists():
        rows = json.loads(Path(args.json).read_text())["rows"]
    for name, stack, dtype in runs:
        label = _label(dict(stack=stack, adapter_dtype=dtype, cap_bytes=_cap_bytes(args),
                            leave_free_bytes=_leave_free_bytes(args)))
        timeout = args.child_timeout
        if args.deadline is not None:
            left = args.deadline - (time.monotonic() - start)
            if left < args.min_left:
                print(f"\n== {name} / {label}: skipped, {max(left, 0):.0f} s left of --deadline {args.deadline:.0f}",
                      flush=True)
                rows.append(dict(model=name, stack=stack, adapter_dtype=dtype, cap_bytes=_cap_bytes(args),
                                 status="skipped",
                                 error=f"{max(left, 0):.0f} s left of the deadline"))
                continue
            timeout = left if timeout is None else min(timeout, left)
        print(f"\n== {name} / {label}", flush=True)
        if args.no_isolate:
            row = run_stack(stack, name, device, seq=args.seq, batch=args.batch, warmup=args.warmup,
                            steps=args.steps, seed=args.seed, progress=not args.no_progress, adapter_dtype=dtype,
                            profile=_profiled(name, args.profile), cap_bytes=_cap_bytes(args),
                            leave_free_bytes=_leave_free_bytes(args))
        else:
            row = run_isolated(stack, name, args, adapter_dtype=dtype, timeout=timeout)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("recipe", "step_times_s")}), flush=True)
        if args.json:
            _write_json(args.json, dict(stamp=stamp, rows=rows, ratios=ratios(rows)))
    rat = ratios(rows)
    print()
    print(markdown(rows, rat))
    print("\npeak = torch.cuda.max_memory_allocated over the steps (weights included); the paged optimizer states "
          "live in CUDA managed memory, outside torch's allocator, and are not in it. aten ops / step: operators "
          "dispatched in one more step (host work); GPU busy: the time a kernel ran in a profiled step over its "
          "wall time (well below 100 %: the step waits on the host).")
    if args.json:
        _write_json(args.json, dict(stamp=stamp, rows=rows, ratios=rat))
    return rows


if __name__ == "__main__":
    main()
