"""Guards around what the checkpointed (and fast) training step assumes of transformers and torch, so that a change
on their side shows as a NaN loss or a refusal instead of silently wrong gradients: the recomputation's skipped
down_proj output is NaN (``qlora_gpu.fast.staging.LAST_LINEAR``), and attention dropout read from the config
still counts as a draw from torch's generators (``qlora_gpu.model.draws_global_rng``). The refusal of masks under
CUDA-graph capture is tested with the capture's CPU stand-in (tests/test_graphs.py)."""

from __future__ import annotations

import pytest
import test_graphs
import torch
from test_stage_layer import LAYERS, build, loss_of

from qlora_gpu.fast.graphs import check_capturable
from qlora_gpu.model import draws_global_rng


def test_the_recomputations_skipped_output_is_nan_and_unread():
    """In the recomputation down_proj's output is NaN, not uninitialised memory — and nothing reads it: the
    forward pass's outputs, the loss and every gradient are finite. Early stop off: torch recomputes the whole
    block, so the output exists (with early stop the recomputation ends inside down_proj, at its last saved
    tensor)."""
    m = build(0.1, checkpointing=True, bound=True)
    outputs = []
    for layer in m.hf.model.layers:
        layer.mlp.down_proj.register_forward_hook(lambda mod, args, out: outputs.append(out.detach().clone()))
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        loss = loss_of(m)
        forward, outputs[:] = list(outputs), []
        loss.backward()
    assert len(forward) == len(outputs) == LAYERS
    assert all(o.isfinite().all() for o in forward)
    assert all(o.isnan().all() for o in outputs)
    assert loss.isfinite() and all(g.isfinite().all() for g in m.lora_grads().values())


class _Stop(Exception):
    pass


def test_attention_dropout_on_the_config_only_counts_as_drawing(monkeypatch):
    """A transformers version that reads ``config.attention_dropout`` in ``forward`` (the attention module without
    the attribute) draws its masks from torch's generator: the blocks count as drawing, so their checkpoint
    preserves the generator's state (the recomputation draws the same masks) and CUDA-graph capture is refused."""
    m, _ = test_graphs.build(dropout=0.0)  # checkpointed, on SDPA (capturable but for the dropout)
    for layer in m.hf.model.layers:
        del layer.self_attn.attention_dropout
        assert layer.self_attn.config is m.hf.config
    assert not any(draws_global_rng(layer) for layer in m.hf.model.layers)
    m.hf.config.attention_dropout = 0.1
    assert all(draws_global_rng(layer) for layer in m.hf.model.layers)
    with pytest.raises(ValueError, match=r"decoder layers \[0, 1, 2\] draw from torch's own generators"):
        check_capturable(m, "cpu")
    preserved = []

    def checkpoint(fn, *args, preserve_rng_state, **kwargs):
        preserved.append(preserve_rng_state)
        raise _Stop

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", checkpoint)
    with pytest.raises(_Stop):
        loss_of(m)
    assert preserved == [True]
    m.eval()  # no dropout outside training
    assert not any(draws_global_rng(layer) for layer in m.hf.model.layers)
