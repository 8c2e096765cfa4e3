"""``qlora_gpu.fast.block_scales``: a decoder block's double-quantized scales decoded once per block call, where
bitsandbytes decodes them in every use of every weight (host time at batch 1, docs/benchmarks.md). Checked on CPU
with a tiny model (CUDA twins gpu-marked): loss and gradients bit for bit against each layer decoding its own,
the decodings counted exactly, the layout (one buffer, nothing stored twice, the weights unchanged), and a block
laid out again when a layer's state no longer points into it."""

from __future__ import annotations

import gc
import weakref

import bitsandbytes.functional as bnbf
import pytest
import torch
from test_stage_layer import IDS, LAYERS, TINY, build, step

from qlora_gpu.fast.block_scales import BLOCK2, BlockScales
from qlora_gpu.model import lora_linears
from qlora_gpu.quantize import quantize_4bit
from qlora_ref.model.config import LINEAR_MODULES, LoraConfig, QuantConfig

PER_BLOCK = len(LINEAR_MODULES)


def _each_layer_decodes(monkeypatch) -> None:
    """The behaviour without this module: no block is laid out, every use decodes its own scales."""
    monkeypatch.setattr(BlockScales, "of", classmethod(lambda cls, layer, linears: None))


def _blocks(m) -> list:
    return list(m.hf.model.layers)


@pytest.mark.usefixtures("bitsandbytes_dequantize")  # operator counts: the CUDA step's kernel mix
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_block_decodes_once_per_call_with_the_same_bits(checkpointing, device, monkeypatch):
    """One decoding per block call (bitsandbytes' ``dequantize_blockwise``), where the backward pass decoded once
    per linear; under checkpointing the backward pass uses the recomputation's, without checkpointing it decodes
    its own (nothing kept from forward to backward). Loss and every gradient are the same bits.

    On CUDA with 2,048 rows: above 1,536 bitsandbytes' 4-bit product always takes its unfused path, which decodes
    as the reference does (docs/quantization.md); below, it may pick a fused kernel that decodes inside."""
    ids = IDS if device == "cpu" else (torch.arange(2048) * 7 % TINY.vocab_size)[None]
    on = build(0.1, checkpointing, bound=True, device=device)
    loss, grads, fwd, bwd = step(on, ids)
    with monkeypatch.context() as mp:
        _each_layer_decodes(mp)
        off_loss, off_grads, off_fwd, off_bwd = step(build(0.1, checkpointing, bound=True, device=device), ids)
    assert torch.equal(loss, off_loss)
    for k in grads:
        assert torch.equal(grads[k], off_grads[k]), k
    decode = "dequantize_blockwise"
    # the backward pass dequantizes a weight for each input gradient: all but the first block's q, k and v (their
    # input, the frozen embedding's normalized output, needs none)
    uses = PER_BLOCK * LAYERS - 3
    assert off_fwd[decode] == 0  # inside bitsandbytes' 4-bit product, one per linear (not an operator of its own)
    assert off_bwd[decode] == uses
    assert fwd[decode] == LAYERS
    assert bwd[decode] == (LAYERS if checkpointing else uses)
    assert all(isinstance(BlockScales.of(b, lora_linears(b)), BlockScales) for b in _blocks(on))


def test_the_layout_holds_each_code_once_and_changes_no_weight():
    """Laid out (again: each layer's codes moved to their own tensors first, as ``.to(device)`` would), every LoRA
    linear's 8-bit codes and second-level constants are views of the block's buffers, each padded to whole blocks
    of 256, and the tensors they replace are freed (nothing stored twice); the dequantized weights are the ones
    before, and the block's decoding is each layer's own, bit for bit."""
    m = build(0.1, bound=True)
    linears = [lin for b in _blocks(m) for lin in lora_linears(b)]
    for lin in linears:
        state = lin.weight.quant_state
        state.absmax, state.state2.absmax = state.absmax.clone(), state.state2.absmax.clone()
    before = [bnbf.dequantize_4bit(lin.weight, lin.weight.quant_state) for lin in linears]
    own = [bnbf.dequantize_blockwise(lin.weight.quant_state.absmax, lin.weight.quant_state.state2)
           + lin.weight.quant_state.offset for lin in linears]
    replaced = [weakref.ref(t) for lin in linears for t in (lin.weight.quant_state.absmax,
                                                             lin.weight.quant_state.state2.absmax)]
    step(m)
    gc.collect()
    assert all(r() is None for r in replaced)
    for i, lin in enumerate(linears):
        assert torch.equal(bnbf.dequantize_4bit(lin.weight, lin.weight.quant_state), before[i])
    for b in _blocks(m):
        scales = BlockScales.of(b, lora_linears(b))
        counts = [lin.weight.quant_state.absmax.numel() for lin in lora_linears(b)]
        assert scales.codes.numel() == sum(-(-n // BLOCK2) * BLOCK2 for n in counts)
        assert any(n % BLOCK2 for n in counts)  # the tiny widths exercise the padding
        for lin in lora_linears(b):
            state = lin.weight.quant_state
            assert state.absmax.untyped_storage().data_ptr() == scales.codes.untyped_storage().data_ptr()
            assert state.state2.absmax.untyped_storage().data_ptr() == scales.c1.untyped_storage().data_ptr()
        decoded = scales.decode()
        for lin in lora_linears(b):
            assert torch.equal(decoded[lin], own[linears.index(lin)])


def test_prepare_model_lays_each_block_out_as_it_builds_it():
    """``prepare_model`` lays a block's scales out right after building its linears (the per-layer tensors it
    frees are then reused by the next blocks' allocations instead of staying cached on a GPU); the first step
    finds them laid out and keeps that layout."""
    m = build(0.1, bound=True)
    layouts = [b.__dict__.get("_qlora_block_scales") for b in _blocks(m)]
    assert all(isinstance(s, BlockScales) and s.current() for s in layouts)
    step(m)
    assert all(BlockScales.of(b, lora_linears(b)) is s for b, s in zip(_blocks(m), layouts, strict=True))


def test_a_new_weight_lays_the_block_out_again(monkeypatch):
    """A layer given a new weight after the first step, and another whose codes moved (as ``.to(device)`` moves
    them): the next block call lays the block out again and computes with the new weight — the same bits as
    layers decoding their own."""
    def run(m):
        step(m)
        for b in _blocks(m):
            BlockScales.of(b, lora_linears(b))
        w = torch.randn(TINY.hidden_size, TINY.hidden_size, generator=torch.Generator().manual_seed(9)) * 0.05
        q = quantize_4bit(w)
        layer0, layer1 = _blocks(m)[0], _blocks(m)[1]
        state = layer0.self_attn.q_proj.weight.quant_state
        layer0.self_attn.q_proj.weight = type(layer0.self_attn.q_proj.weight)(
            q.packed, requires_grad=False, quant_state=q.to_bnb(), blocksize=q.blocksize, compress_statistics=True,
            quant_type=q.quant_type, bnb_quantized=True)
        assert state is not layer0.self_attn.q_proj.weight.quant_state
        moved = layer1.mlp.up_proj.weight.quant_state
        moved.absmax = moved.absmax.clone()
        m.zero_grad()
        return step(m)[:2]

    loss, grads = run(build(0.1, bound=True))
    with monkeypatch.context() as mp:
        _each_layer_decodes(mp)
        off_loss, off_grads = run(build(0.1, bound=True))
    assert torch.equal(loss, off_loss)
    for k in grads:
        assert torch.equal(grads[k], off_grads[k]), k


def test_weights_without_double_quantization_are_not_laid_out():
    """Single quantization stores float32 scales: nothing to decode, nothing laid out, no decoding anywhere."""
    from qlora_gpu.prepare import prepare_model

    m = prepare_model(TINY, quant=QuantConfig(double_quant=False), lora=LoraConfig(r=3, alpha=8.0, dropout=0.1),
                      device="cpu", dtype="bfloat16", gradient_checkpointing=True, progress=False, tokenizer=False,
                      seed=3)
    _, _, fwd, bwd = step(m)
    assert fwd["dequantize_blockwise"] == bwd["dequantize_blockwise"] == 0
    assert all(BlockScales.of(b, lora_linears(b)) is None for b in _blocks(m))
