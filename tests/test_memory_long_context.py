"""The memory calculator's long-context terms (qlora_ref.memory): packing's useful tokens, the chunked loss's
logits, activation offload's host bytes, the residual stream's dtype — each against figures derived by hand here,
exactly (integer bytes), and the offloaded bytes against what qlora_gpu's offload moves."""

from __future__ import annotations

import json

import pytest

from qlora_ref.cli import main
from qlora_ref.memory import (
    OFFLOAD_RESIDENT_BLOCKS,
    ModelShape,
    estimate_memory,
    load_model_shape,
    logits_bytes,
    offloaded_bytes,
    step_tokens,
)

L8B = load_model_shape("llama-3.1-8b")
T = 131072  # 128k tokens


def test_llama31_shapes_are_metas():
    """Parameter counts of Meta's released Llama-3.1-8B and -70B (their safetensors index's total size / 2)."""
    assert L8B.n_params == 8_030_261_248
    assert load_model_shape("llama-3.1-70b").n_params == 70_553_706_496
    assert (L8B.num_kv_heads, L8B.vocab_size, L8B.head_dim) == (8, 128256, 128)


def test_logits_by_hand():
    # unchunked: float32 logits and float32 log-softmax of every token: 2 x 131,072 x 128,256 x 4 bytes
    assert logits_bytes(L8B, T) == 2 * 131072 * 128256 * 4 == 134_486_163_456
    # chunks of 4,096: one chunk's logits and softmax, and one float32 log-sum-exp per token
    assert logits_bytes(L8B, T, 4096) == 2 * 4096 * 128256 * 4 + 131072 * 4 == 4_203_216_896
    assert logits_bytes(L8B, 100, 4096) == 2 * 100 * 128256 * 4 + 400  # a chunk larger than the tokens


def test_offloaded_by_hand():
    # 32 blocks x 131,072 tokens x 4,096 hidden x 4 bytes (a float32 stream) = 68.72 GB; a bfloat16 one, 34.36 GB
    assert offloaded_bytes(L8B, T, 4) == 32 * 131072 * 4096 * 4 == 68_719_476_736
    assert offloaded_bytes(L8B, T, 2) == 32 * 131072 * 4096 * 2 == 34_359_738_368


def test_step_tokens_by_hand():
    assert step_tokens(4, 128) == (512, 512)
    assert step_tokens(4, 128, example_length=50) == (512, 200)  # one example and 78 padding slots a row
    assert step_tokens(4, 128, packing=True, example_length=50) == (512, 400)  # two whole examples a row
    with pytest.raises(ValueError, match="example_length"):
        step_tokens(1, 64, example_length=65)


def test_estimate_moves_exactly_these_bytes():
    common = dict(seq=T, r=32, attention="flash", lora_dropout=0.0)
    plain = estimate_memory(L8B, "qlora", **common)
    chunked = estimate_memory(L8B, "qlora", loss_chunk=4096, **common)
    both = estimate_memory(L8B, "qlora", loss_chunk=4096, offload=True, **common)
    assert plain.logits == 134_486_163_456 and chunked.logits == 4_203_216_896
    assert plain.activations - chunked.activations == 134_486_163_456 - 4_203_216_896
    # offload: all 32 block inputs (float32 residual stream by default) to the host, 2 of them back on the device
    resident = OFFLOAD_RESIDENT_BLOCKS * T * 4096 * 4
    assert both.offloaded == 68_719_476_736
    assert chunked.activations - both.activations == 68_719_476_736 - resident
    assert chunked.total_bytes - both.total_bytes == 68_719_476_736 - resident  # the host bytes are not in the total
    assert both.total_bytes == sum(both.parts.values())
    # nothing else moves
    for part in ("weights", "quant_constants", "adapters", "gradients", "optimizer_states"):
        assert getattr(plain, part) == getattr(both, part)


def test_residual_stream_dtype_by_hand():
    """A float32 stream against a bfloat16 one, 2 more bytes per value of: each block's input (the checkpoint, L h),
    the MLP's norm input and its float32 gate, SiLU and up outputs in the layer being recomputed (h + 3f), the
    final norm's input (h); without checkpointing the stream's values of every layer (2h + 3f each) and the final
    norm's input."""
    common = dict(seq=T, r=32, attention="flash", lora_dropout=0.0, loss_chunk=4096)
    wide = estimate_memory(L8B, "qlora", **common)
    narrow = estimate_memory(L8B, "qlora", residual_dtype="bfloat16", **common)
    assert wide.settings["residual_dtype"] == "float32" and narrow.settings["residual_dtype"] == "bfloat16"
    L, h, f = 32, 4096, 14336
    assert wide.activations_checkpointing - narrow.activations_checkpointing == T * 2 * (L * h + h + 3 * f + h)
    assert wide.activations_no_checkpointing - narrow.activations_no_checkpointing == T * 2 * (L * (2 * h + 3 * f) + h)
    off_wide, off_narrow = (estimate_memory(L8B, "qlora", offload=True, residual_dtype=d, **common)
                            for d in ("float32", "bfloat16"))
    assert (off_wide.offloaded, off_narrow.offloaded) == (68_719_476_736, 34_359_738_368)
    # on the device: 2 resident block inputs, the layer being recomputed, the final norm's input
    assert off_wide.activations - off_narrow.activations == T * 2 * (2 * h + h + 3 * f + h)
    with pytest.raises(ValueError, match="residual_dtype must be one of float32, bfloat16, float16"):
        estimate_memory(L8B, "qlora", residual_dtype="int8")


@pytest.mark.parametrize("residual_dtype,stream", [("float32", "float32"), (None, "bfloat16")])
def test_offloaded_bytes_are_what_qlora_gpu_offloads(residual_dtype, stream):
    """One forward and backward pass of a qlora_gpu model built as a run builds it (``prepare_model``: NF4,
    bfloat16 compute and head; its default float32 residual stream, or ``residual_dtype=None``: the stream in
    bfloat16) with activation offload: the bytes it sends to the host are the calculator's ``offloaded``, exactly,
    for the same shape, tokens and stream dtype."""
    import torch

    from qlora_gpu.offload import ActivationOffload
    from qlora_gpu.prepare import prepare_model
    from qlora_ref.model.config import LoraConfig

    shape = ModelShape(name="tiny", hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, num_kv_heads=2,
                       vocab_size=96)
    model = prepare_model(shape.config, lora=LoraConfig(r=4, alpha=8, dropout=0.0), device="cpu", progress=False,
                          tokenizer=False, residual_dtype=residual_dtype)
    offload = ActivationOffload()
    model.activation_offload = offload
    batch, seq = 2, 11
    ids = torch.randint(0, shape.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    model(ids).float().square().mean().backward()
    expected = estimate_memory(shape, "qlora", batch=batch, seq=seq, offload=True, residual_dtype=stream).offloaded
    assert offload.stats.packed == shape.num_layers
    stream_bytes = 4 if stream == "float32" else 2
    assert offload.stats.bytes_to_host == expected == offloaded_bytes(shape, batch * seq, stream_bytes)


def test_packing_needs_an_example_length():
    """``packing`` alone counts nothing (every slot is useful without an example length): refused, naming both."""
    with pytest.raises(ValueError, match="packing=True needs example_length=N"):
        estimate_memory("llama-7b", "qlora", packing=True)


def test_default_estimate_is_unchanged_by_the_new_terms():
    """Without the new settings the logits are the unchunked ones, nothing is offloaded, every slot is useful."""
    b = estimate_memory("llama-65b", "qlora")
    assert b.logits == logits_bytes(load_model_shape("llama-65b"), 512)
    assert b.offloaded == 0 and b.tokens == b.useful_tokens == 512


def test_packing_counts_useful_tokens_not_memory():
    unpacked = estimate_memory("llama-7b", "qlora", batch=4, seq=128, example_length=50)
    packed = estimate_memory("llama-7b", "qlora", batch=4, seq=128, example_length=50, packing=True)
    assert packed.total_bytes == unpacked.total_bytes  # the same 512 slots
    assert (unpacked.useful_tokens, packed.useful_tokens) == (200, 400)


@pytest.mark.parametrize("kwargs,message", [
    (dict(loss_chunk=-1), "loss_chunk must be a non-negative integer"),
    (dict(offload=True, gradient_checkpointing=False), "needs gradient checkpointing"),
    (dict(example_length=0), "example_length must be a positive integer"),
])
def test_bad_long_context_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        estimate_memory("llama-7b", "qlora", **kwargs)


def test_cli_long_context_options(capsys):
    argv = ["memory", "--model", "llama-3.1-8b", "--seq", str(T), "--r", "32", "--attention", "flash",
            "--loss-chunk", "4096", "--offload", "--lora-dropout", "0"]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["logits_bytes"] == 4_203_216_896 and out["offloaded_bytes"] == 68_719_476_736
    assert out["settings"]["loss_chunk"] == 4096 and out["settings"]["offload"] is True
    assert out["settings"]["residual_dtype"] == "float32"
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "host: offloaded" in table and "68.72 GB" in table and "loss in chunks of 4,096 tokens" in table
    assert "(float32 residual stream)" in table
    assert main([*argv, "--residual-dtype", "bfloat16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["offloaded_bytes"] == 34_359_738_368
    assert main(["memory", "--seq", "128", "--batch", "4", "--example-length", "50", "--packing"]) == 0
    assert "examples of 50 tokens, packed: 400 useful of 512 token slots" in capsys.readouterr().out
    assert main(["memory", "--offload", "--no-gradient-checkpointing"]) == 2
    assert "needs gradient checkpointing" in capsys.readouterr().err
    # --packing alone changed nothing, silently: now refused, naming both options
    assert main(["memory", "--seq", "1000", "--packing"]) == 2
    assert "--packing needs --example-length=N" in capsys.readouterr().err
