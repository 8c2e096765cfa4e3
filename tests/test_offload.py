"""Activation offload (qlora_gpu.offload): the checkpointed block inputs go to host memory in the forward pass and
come back, one block ahead, for the recomputation. On the CPU it is functionally a no-op — the same loss and
LoRA gradients bit for bit — and the hooks fire once per block and pass, on exactly the block inputs; on CUDA
(``gpu`` marker) the peak device memory falls by about the block inputs and the gradients stay the same."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_helpers import small_hf_model

from qlora_gpu.model import QLoRAModel
from qlora_gpu.offload import ActivationOffload
from qlora_ref.model import LoraConfig


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("offload")
    small_hf_model("llama-tied-llama3").save_pretrained(path)
    return path


def model_at(path, device="cpu", **kwargs):
    return QLoRAModel.from_pretrained(path, quant=None, lora=LoraConfig(r=4, alpha=8, dropout=0.2, seed=3),
                                      gradient_checkpointing=True, device=device, tokenizer=False, **kwargs)


def steps(model, ids, n=2):
    """n forward/backward passes (dropout on: the recomputation must replay the masks); losses and gradients."""
    out = []
    for _ in range(n):
        model.zero_grad(set_to_none=True)
        loss = model(ids).square().mean()
        loss.backward()
        out.append((loss.item(), {k: g.clone() for k, g in model.lora_grads().items()}))
    return out


def test_offload_is_a_no_op_on_the_cpu_and_the_hooks_fire(checkpoint):
    ids = torch.randint(0, 61, (2, 13), generator=torch.Generator().manual_seed(0))
    plain = steps(model_at(checkpoint), ids)
    model = model_at(checkpoint)
    offload = ActivationOffload()
    model.activation_offload = offload
    assert model.activation_offload is offload
    offloaded = steps(model, ids)
    for (loss_a, grads_a), (loss_b, grads_b) in zip(plain, offloaded, strict=True):
        assert loss_a == loss_b
        assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    layers, (b, t), d = model.config.num_hidden_layers, ids.shape, model.config.hidden_size
    s = offload.stats
    # per pass: each block's input (b, t, d) float32 out and back; all but the first block's return prefetched
    assert (s.packed, s.unpacked, s.prefetched, s.kept) == (2 * layers, 2 * layers, 2 * (layers - 1), 0)
    assert s.bytes_to_host == s.bytes_to_device == 2 * layers * b * t * d * 4


def test_offload_leaves_small_tensors_within_a_host_budget_and_can_be_switched_off(checkpoint):
    ids = torch.randint(0, 61, (1, 5), generator=torch.Generator().manual_seed(1))
    model = model_at(checkpoint)
    model.activation_offload = ActivationOffload(min_bytes=10**9)
    steps(model, ids, 1)
    assert model.activation_offload.stats.kept == model.config.num_hidden_layers
    assert model.activation_offload.stats.packed == 0
    layers = model.config.num_hidden_layers
    one_input = 5 * model.config.hidden_size * 4
    model.activation_offload = ActivationOffload(max_host_bytes=2 * one_input)  # room for two block inputs a step
    steps(model, ids, 2)
    s = model.activation_offload.stats
    assert (s.packed, s.kept, s.bytes_to_host) == (2 * 2, 2 * (layers - 2), 2 * 2 * one_input)
    model.activation_offload = None
    assert model.activation_offload is None
    assert all("_activation_offload" not in layer.__dict__ for layer in model.hf.model.layers)


def test_offload_needs_gradient_checkpointing(checkpoint):
    from qlora_ref.train.config import TrainConfig

    model = model_at(checkpoint)
    model.gradient_checkpointing = False
    with pytest.raises(ValueError, match="needs gradient checkpointing"):
        model.activation_offload = True
    with pytest.raises(ValueError, match="activation_offload .* needs gradient_checkpointing=True"):
        TrainConfig(activation_offload=True, gradient_checkpointing=False)
    model.gradient_checkpointing = True
    model.activation_offload = True
    with pytest.raises(ValueError, match="switch it off first"):  # the other order: offload would do nothing
        model.gradient_checkpointing = False
    assert model.gradient_checkpointing and model.activation_offload


def test_reference_trainer_refuses_offload(tmp_path):
    from qlora_ref.model import load_model
    from qlora_ref.train.config import TrainConfig
    from qlora_ref.train.reference import RefTrainer

    small_hf_model("llama-gqa").save_pretrained(tmp_path)
    config = TrainConfig(lora_r=4, activation_offload=True)
    model = load_model(tmp_path, lora=config.lora_config())
    with pytest.raises(ValueError, match="activation_offload is a GPU-backend feature"):
        RefTrainer(model, config)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned host memory, streams)")
def test_offload_lowers_peak_device_memory_on_cuda(tmp_path):
    """A 12-block model at 4,096 tokens: the block inputs (12 x 4,096 x 256 x 4 bytes = 50 MB) leave the device
    in the forward pass; the peak falls by at least half of them, and the gradients are the same bits."""
    from model_helpers import make_hf_model

    make_hf_model("llama", vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=12,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096).save_pretrained(tmp_path)
    ids = torch.randint(0, 256, (1, 4096), generator=torch.Generator().manual_seed(0)).cuda()
    peaks, grads = {}, {}
    for name in ("plain", "offload"):
        model = model_at(tmp_path, device="cuda", attn_implementation="sdpa")
        if name == "offload":
            model.activation_offload = True
        steps(model, ids, 1)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        (_, grads[name]), = steps(model, ids, 1)
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
        del model
    block_inputs = 12 * 4096 * 256 * 4
    assert peaks["plain"] - peaks["offload"] >= 0.5 * block_inputs, (peaks, block_inputs)
    assert all(torch.equal(grads["plain"][k], grads["offload"][k]) for k in grads["plain"])
    assert np.isfinite([g.float().sum().item() for g in grads["offload"].values()]).all()
