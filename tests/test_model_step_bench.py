"""bench/model_step.py's arithmetic: the FLOPs it divides by (against torch's own counter of a transformers + peft
step) and the products floor it times."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from model_helpers import small_hf_model

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import model_step as ms  # noqa: E402  (bench/model_step.py)

from qlora_ref.model.config import LINEAR_MODULES, ModelConfig  # noqa: E402


@pytest.mark.parametrize("name, batch", [("llama-gqa", 1), ("llama-tied-llama3", 2)])
def test_step_flops_are_torch_flop_counters(name, batch):
    """A LoRA step of transformers + peft computes the products the reference's step does: every frozen product
    forward and for its input gradient (the embedding's output made to require one, as the reference's backward
    goes down to it), four adapter products backward, six per key/value head. torch's ``FlopCounterMode`` counts
    what it runs; the count of ``step_products`` must be the same number (it was 3× the adapters' forward for their
    backward until 2026-12-06, which this catches)."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode

    hf = small_hf_model(name)
    config = ModelConfig.from_hf_dict(hf.config.to_dict())
    hf.train()
    hf.enable_input_require_grads()
    rank, seq = 4, 19
    model = get_peft_model(hf, LoraConfig(r=rank, lora_alpha=8, lora_dropout=0.1, target_modules=list(LINEAR_MODULES),
                                          bias="none", task_type="CAUSAL_LM"))
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    assert ms.step_flops(config, seq, rank, batch) == counter.get_total_flops()


def test_products_floor_times_each_shape_once_and_counts_its_calls(monkeypatch):
    """Each distinct shape is timed (best of the repeats) once and weighted by how often the step calls it."""
    products = [("a", 3, 1, 4, 5, 6), ("b", 2, 1, 4, 5, 6), ("c", 1, 2, 3, 4, 5)]
    clock = iter([0.5, 0.25, 0.75, 2.0, 1.0, 3.0])  # (4, 5, 6): best 0.25; (2 stacked 3 x 4 x 5): best 1.0
    calls = []
    monkeypatch.setattr(ms, "_timed", lambda fn: (calls.append(fn()), next(clock))[1])
    assert ms.products_seconds(products, repeats=3) == 5 * 0.25 + 1 * 1.0
    assert [c.shape for c in calls] == [(4, 6)] * 3 + [(2, 3, 5)] * 3
    assert ms.products_flops(products) == 2 * (5 * 4 * 5 * 6 + 2 * 3 * 4 * 5)
