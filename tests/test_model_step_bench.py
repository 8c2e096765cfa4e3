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


@pytest.mark.parametrize("name, batch", [("llama-gqa", 1), ("llama-tied-llama3", 2), ("qwen2", 1)])
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


def test_report_gives_every_implementation_its_share_of_sgemm_when_the_result_has_it():
    """The table of a result with per-implementation shares has that column in every row, and the products floor
    line; an older result (without them) renders as it did."""
    import json

    import model_step_report as report

    old = json.loads((BENCH / "results/2026-12-05-cpu-latenight/model_step.json").read_text())
    text = report.model_step_markdown(old)
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert {line.count("|") for line in rows} == {7} and "products alone" not in text
    new = dict(old, fraction_of_sgemm={n: {"median": 0.1 + i / 10, "min": 0.05, "max": 0.9}
                                       for i, n in enumerate(old["seconds"])},
               products_seconds=[0.5] * old["repeats"],
               products_fraction_of_sgemm={"median": 0.8, "min": 0.7, "max": 0.9},
               ref_over_products={"median": 2.5, "min": 2.0, "max": 3.0})
    text = report.model_step_markdown(new)
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert {line.count("|") for line in rows} == {8}
    for i, name in enumerate(old["seconds"]):
        assert f"| {0.1 + i / 10:.1%} (5.0%–90.0%) |" in next(r for r in rows if r.split("|")[1].strip(" *") == name)
    assert "products alone" in text and "0.50 s, 80.0% of sgemm (70.0%–90.0%)" in text and "2.50×" in text
