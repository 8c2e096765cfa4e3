"""The plain core (``qlora_gpu.lora``, ``qlora_gpu.model``) and the fast path (``qlora_gpu.fast``) train alike.

Everything ``qlora_gpu.fast`` does computes the same operations on the same values as the plain core — the
adapters cast per block instead of per layer, the double-quantized scales decoded per block, one dropout of an
input shared by several layers, the last linear's output skipped where nothing reads it, the gradients widened and
accumulated into the flat buffer once per pass (AccumulateGrad's float32 ``grad += float32(g)``). Elementwise
operations on equal inputs give equal bits, and every matrix product is the same call on the same operands, so the
two paths must agree bit for bit: losses, LoRA gradients and adapters after several optimizer steps, with LoRA
dropout, gradient accumulation and gradient checkpointing (NF4 + double quantization, bfloat16 compute, the
float32 residual stream). Both draw the block's dropout masks by the same rule (``qlora_gpu.model.draw_block_masks``).
"""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qlora_gpu import fast
from qlora_gpu.fast import deferred_grads
from qlora_gpu.optim import make_optimizer
from qlora_gpu.prepare import prepare_model
from qlora_gpu.train import GpuTrainer, optimizer_step
from qlora_ref.model.config import LoraConfig, ModelConfig
from qlora_ref.train.config import TrainConfig

TINY = ModelConfig(model_type="llama", vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)
#: the architectures the fast path serves (``staging.SHARED_INPUTS``, ``LAST_LINEAR``): Qwen2 with its q/k/v biases,
#: Mistral with a sliding window shorter than the batch, Qwen3 with its query/key norms between q/k_proj and rope
ARCHS = {"llama": TINY, "qwen2": dataclasses.replace(TINY, model_type="qwen2", qkv_bias=True),
         "mistral": dataclasses.replace(TINY, model_type="mistral", sliding_window=8),
         "qwen3": dataclasses.replace(TINY, model_type="qwen3")}
STEPS, MICRO = 3, 2  # optimizer steps, micro-batches per step


class _Ops(TorchDispatchMode):
    """Counts the computing aten operators (views launch no kernel)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += not func.is_view
        return func(*args, **(kwargs or {}))


def _batch(i: int) -> torch.Tensor:
    return (torch.arange(20)[None] * (3 + 2 * i) + i) % TINY.vocab_size


def _train(use_fast: bool, checkpointing: bool, arch: str = "llama"):
    """(losses, LoRA gradients before each step, final adapters, operators per micro-batch) of a few steps."""
    m = prepare_model(ARCHS[arch], lora=LoraConfig(r=4, alpha=8.0, dropout=0.1), device="cpu", dtype="bfloat16",
                      gradient_checkpointing=checkpointing, progress=False, tokenizer=False, seed=3,
                      attn_implementation="eager", fast=use_fast)
    assert fast.is_enabled(m) == use_fast
    params = m.lora_parameters()
    opt = make_optimizer("paged_adamw", lr=1e-2, weight_decay=0.0)
    opt.bind(params)  # the flat buffer GpuTrainer binds: the fast path's gradients go there in one operation
    losses, grads, ops = [], [], collections.Counter()
    for step in range(STEPS):
        for micro in range(MICRO):
            ids = _batch(step * MICRO + micro)
            with _Ops() as counted:
                logits = m(ids)
                loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]) / MICRO
                with deferred_grads.allowed():  # as GpuTrainer's step: the fast path defers into the flat buffer
                    loss.backward()
            ops[micro] += counted.n
            losses.append(loss.detach())
        grads.append({k: p.grad.clone() for k, p in params.items()})
        optimizer_step(opt, params, lr=1e-2, max_grad_norm=0.3)
    return losses, grads, {k: p.detach().clone() for k, p in params.items()}, ops


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("checkpointing", [True, False])
def test_plain_core_and_fast_path_train_bit_for_bit_alike(checkpointing, arch):
    p_losses, p_grads, p_final, p_ops = _train(False, checkpointing, arch)
    f_losses, f_grads, f_final, f_ops = _train(True, checkpointing, arch)
    for i, (a, b) in enumerate(zip(p_losses, f_losses, strict=True)):
        assert torch.equal(a, b), f"micro-batch {i}: loss {a.item()} (plain) != {b.item()} (fast)"
    for step, (a, b) in enumerate(zip(p_grads, f_grads, strict=True)):
        assert any(g.abs().sum() > 0 for g in a.values())  # the comparison is not of zeros
        for k in a:
            assert torch.equal(a[k], b[k]), f"step {step}: gradient of {k}"
    for k in p_final:
        assert torch.equal(p_final[k], f_final[k]), k
    assert any(not torch.equal(p_final[k], p_grads[0][k]) for k in p_final)
    # the fast path is engaged: fewer operators per micro-batch (staging, deferred gradients, skipped output)
    assert all(f_ops[i] < p_ops[i] for i in range(MICRO)), (dict(p_ops), dict(f_ops))


def test_the_switch_and_its_defaults():
    """``prepare_model(fast=None)`` is off on the CPU (on on CUDA: ``qlora_gpu.model.fast_by_default``);
    ``enable``/``disable`` switch every layer and block; ``TrainConfig.fast`` decides for a trainer."""
    from qlora_gpu.fast import staging
    from qlora_gpu.model import fast_by_default

    assert fast_by_default("cuda") and fast_by_default("cuda:1") and not fast_by_default("cpu")
    m = prepare_model(TINY, lora=LoraConfig(r=4, alpha=8.0, dropout=0.1), device="cpu", progress=False,
                      tokenizer=False)
    layers = m.hf.model.layers
    assert not fast.is_enabled(m) and not any(staging.HOOKS in b.__dict__ for b in layers)
    assert fast.enable(m) is m and fast.is_enabled(m) and all(staging.HOOKS in b.__dict__ for b in layers)
    fast.enable(m)  # twice: the hooks once
    assert all(len(b.__dict__[staging.HOOKS]) == 4 for b in layers)
    assert "fast=True" in repr(m.hf.model.layers[0].self_attn.q_proj)
    fast.disable(m)
    assert not fast.is_enabled(m) and not any(staging.HOOKS in b.__dict__ for b in layers)
    assert not any(m.__dict__.get("_qlora_on_recompute") for m in layers)
    cfg = TrainConfig(lora_r=4, lora_alpha=8.0, max_steps=1, gradient_accumulation_steps=1, progress=False,
                      fast=True)
    GpuTrainer(m, cfg)
    assert fast.is_enabled(m)
    GpuTrainer(m, TrainConfig(lora_r=4, lora_alpha=8.0, max_steps=1, gradient_accumulation_steps=1, progress=False,
                              fast=False))
    assert not fast.is_enabled(m)
    with pytest.raises(ValueError, match="fast must be true, false or null"):
        TrainConfig(fast="yes")
