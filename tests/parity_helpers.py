"""Training the same tiny QLoRA model twice — ``qlora_gpu``'s training path and transformers + peft + bitsandbytes as
HF Trainer drives them — on the same data, seed, adapters and dropout masks (tests/test_training_parity.py, issue 36).

Ours is what a GPU run uses: ``prepare_model`` (layer-by-layer build, bfloat16 embedding and head, float32 residual
stream, fused RMSNorm and rotary embedding, per-block staging of dropout masks, adapter casts and scales, gradient
checkpointing that replays the masks), ``GpuTrainer`` (the flat paged AdamW buffer, deferred gradients) and the shared
loop ``qlora_ref.train.loop.train`` (data order, gradient accumulation, the learning-rate schedule, clipping).

The baseline is ``bench/gpu_scale.py``'s (transformers' ``LlamaForCausalLM`` with bitsandbytes ``Linear4bit`` holding
the same 4-bit bytes, ``prepare_model_for_kbit_training``, ``get_peft_model``) trained as ``transformers.Trainer``
trains with ``bf16=True``, ``optim="paged_adamw_32bit"``, ``lr_scheduler_type="constant"``: each micro-batch's loss
is the model's own (transformers' ``ForCausalLMLoss`` with ``num_items_in_batch``: the summed cross entropy over the
whole optimizer step's targets), under ``torch.autocast(bfloat16)``; then ``clip_grad_norm_``, bitsandbytes'
``PagedAdamW``, the scheduler ``transformers.get_scheduler`` returns, gradients set to None.

What is made equal on purpose, so that only the arithmetic differs: the 4-bit weights (bit for bit), the adapters'
initial values (peft draws lora_A from torch's generator: ours are copied in), the batches (``BatchStream``: the same
order) and the LoRA dropout masks (peft's ``nn.Dropout`` draws from torch's generator: each layer's is replaced by
one applying the mask our layer drew in the same micro-batch, with nn.Dropout's arithmetic x · M / (1 − p)).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import gpu_scale  # noqa: E402  (bench/gpu_scale.py: the baseline's build)

from qlora_ref.data.pipeline import TokenizedDataset  # noqa: E402
from qlora_ref.loss import IGNORE_INDEX  # noqa: E402
from qlora_ref.model.config import ModelConfig  # noqa: E402
from qlora_ref.optim.schedule import warmup_steps  # noqa: E402
from qlora_ref.train.config import TrainConfig  # noqa: E402
from qlora_ref.train.loop import BatchStream, n_targets  # noqa: E402

#: a 2-block Llama; every in_features a multiple of 64 (the blocksize)
CONFIG = ModelConfig(model_type="llama", vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, head_dim=32, rms_norm_eps=1e-6,
                     max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
#: the std of every drawn weight. A linear's frozen output is then about std·√in = 2.3 times its input's size
#: (LLaMA drawn with transformers' 0.02: 1.3 at 7B, 1.8 at 65B): the ratio that decides whether an adapter's first
#: updates survive a bfloat16 rounding against the frozen output (docs/training.md)
INIT_STD = 0.2


def recipe_config(**overrides) -> TrainConfig:
    """The paper's recipe (r 64, alpha 16, dropout 0.1, lr 2e-4, constant schedule with warmup_ratio 0.03, max grad
    norm 0.3, paged AdamW 32-bit, no weight decay) at 4 micro-batches of 2 per optimizer step."""
    base = dict(micro_batch_size=2, gradient_accumulation_steps=4, max_steps=50, seed=3, progress=False)
    return TrainConfig(**{**base, **overrides})


def dataset(n: int = 24, seed: int = 0) -> TokenizedDataset:
    """Instruction-like examples: a prompt of 8–20 random tokens, then a response (the loss's targets) that is a
    fixed function of the prompt (each token + 1, reversed), 8–20 tokens; labels -100 on the prompt."""
    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for _ in range(n):
        prompt = rng.integers(3, CONFIG.vocab_size - 1, int(rng.integers(8, 21)))
        response = (prompt[::-1] + 1)[: int(rng.integers(8, 21))]
        seq = np.concatenate([[CONFIG.bos_token_id], prompt, response, [CONFIG.eos_token_id]]).astype(np.int64)
        lab = seq.copy()
        lab[: 1 + len(prompt)] = IGNORE_INDEX
        ids.append(seq)
        labels.append(lab)
    return TokenizedDataset(input_ids=ids, labels=labels, sources=["synthetic"] * n, max_length=64, pad_token_id=0)


def build_ours(config: TrainConfig, model_config: ModelConfig = CONFIG, **prepare_kwargs):
    from qlora_gpu.prepare import prepare_model

    kwargs = dict(dtype="bfloat16", attn_implementation="sdpa", seed=0, init_std=INIT_STD, progress=False,
                  tokenizer=False, gradient_checkpointing=config.gradient_checkpointing)
    kwargs.update(prepare_kwargs)
    return prepare_model(model_config, quant=config.quant_config(), lora=config.lora_config(), device="cpu", **kwargs)


class MaskRecorder:
    """Forward pre-hooks on our LoRA layers recording, per layer, the dropout mask each call uses (staged by its
    block, ``qlora_gpu.model.draw_block_masks``): with checkpointing two calls per micro-batch, the forward pass and the
    recomputation, which must use the same mask."""

    def __init__(self, model):
        self.calls: dict[str, list[torch.Tensor]] = {}
        for name, m in model.named_linears().items():
            if m.r is not None and m.dropout > 0:
                m.register_forward_pre_hook(self._hook(name))

    def _hook(self, name):
        def hook(module, args):
            keep = module.staged_mask()
            if keep is not None and module.training:
                self.calls.setdefault(name, []).append(keep.clone())
        return hook


def train_ours(config: TrainConfig, data, record_masks: bool = True, stop_after: int | None = None,
               model_config: ModelConfig = CONFIG, **prepare_kwargs):
    """(per-step losses, log history, initial adapters, masks per layer and call) of ``qlora_gpu``'s training on
    ``data`` (``stop_after``: that many optimizer steps of the run, as an interruption would end it)."""
    from qlora_gpu.train import GpuTrainer
    from qlora_ref.train.loop import train

    torch.manual_seed(0)
    built = build_ours(config, model_config, **prepare_kwargs)
    recorder = MaskRecorder(built) if record_masks else None
    init = {k: v.detach().clone() for k, v in built.lora_parameters().items()}
    trainer = GpuTrainer(built, config)
    result = train(trainer, data, config, stop_after=stop_after)
    return dict(losses=np.array(result.train_losses), log=result.log_history, init=init,
                masks=recorder.calls if recorder else None, trainer=trainer)


class _ReplayedDropout(torch.nn.Module):
    """peft's ``lora_dropout`` with a given mask: x · M / (1 − p) in x's dtype, as ``nn.Dropout`` computes it."""

    def __init__(self, p: float, masks: list[torch.Tensor], clock: list[int], round_first: bool = False):
        super().__init__()
        self.scale, self.masks, self.clock, self.round_first = 1.0 / (1.0 - p), masks, clock, round_first

    def forward(self, x):
        if not self.training:
            return x
        keep = self.masks[self.clock[0]].view(x.shape)
        if self.round_first:  # ours' rounding: x to bfloat16 first, the product rounded again
            x = x.to(torch.bfloat16)
        return x * keep.to(x.dtype) * self.scale


def train_baseline(config: TrainConfig, data, init: dict, masks: dict | None, autocast: bool = True,
                   round_dropout_input: bool = False, model_config: ModelConfig = CONFIG):
    """Per-step losses of transformers + peft + bitsandbytes trained as HF Trainer trains (module docstring), from
    the adapters ``init`` (ours' names) and with ``masks`` (layer -> one mask per micro-batch) for dropout."""
    import bitsandbytes as bnb
    from transformers import get_scheduler

    rec = dict(gpu_scale.recipe("tiny"), r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
               lr=config.learning_rate, max_grad_norm=config.max_grad_norm)
    model, params, _ = gpu_scale.build_baseline(model_config, "cpu", rec, progress=False, init_std=INIT_STD)
    if not config.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    named = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in init.items():  # peft's name of our model.layers.0.self_attn.q_proj.lora_A.weight
            peft_name = "base_model.model." + k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.",
                                                                                                ".lora_B.default.")
            named[peft_name].copy_(v)
    clock = [0]
    if config.lora_dropout > 0:
        for name, module in model.named_modules():
            if hasattr(module, "lora_dropout") and "default" in module.lora_dropout:
                key = name.removeprefix("base_model.model.")
                module.lora_dropout["default"] = _ReplayedDropout(config.lora_dropout, masks[key], clock,
                                                                   round_dropout_input)
    opt = bnb.optim.PagedAdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                               eps=config.adam_epsilon, weight_decay=config.weight_decay)
    scheduler = get_scheduler(config.lr_scheduler, opt, num_warmup_steps=warmup_steps(config.max_steps,
                                                                                    config.warmup_ratio),
                              num_training_steps=config.max_steps)
    stream = BatchStream(data, config.micro_batch_size, config.seed)
    model.train()
    losses = []
    for _ in range(config.max_steps):
        micro = [stream.next() for _ in range(config.gradient_accumulation_steps)]
        num_items = sum(n_targets(b) for b in micro)
        total = 0.0
        for b in micro:
            t = {k: torch.from_numpy(v) for k, v in b.items()}
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], labels=t["labels"],
                             num_items_in_batch=num_items, use_cache=False).loss
            loss.backward()
            total += float(loss.detach())
            clock[0] += 1
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        opt.step()
        scheduler.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return np.array(losses)


def first_calls(calls: dict[str, list[torch.Tensor]], per_micro: int) -> dict[str, list[torch.Tensor]]:
    """Each layer's mask of the forward pass of every micro-batch (``per_micro`` calls each: 2 with checkpointing)."""
    return {k: v[::per_micro] for k, v in calls.items()}


__all__ = ["CONFIG", "INIT_STD", "dataset", "first_calls", "recipe_config", "train_baseline", "train_ours"]
