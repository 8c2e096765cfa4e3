"""bench/long_context.py on the CPU: the search (bracket by doubling or halving, bisect to the tolerance, stop
where a try would overrun the time slice), its cleanup after an out-of-memory error on the real tiny stacks, the
FLOP count, the plan; the whole command end to end (``--tiny``) is ``slow``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import long_context as lc  # noqa: E402  (bench/long_context.py)


class FakeStack:
    """Trains up to ``limit`` tokens; a step takes ``per_token`` seconds a token (a clock the search reads)."""

    def __init__(self, limit, per_token=0.0):
        self.config, self.device, self.limit, self.per_token = lc.model_config("tiny"), torch.device("cpu"), limit, \
            per_token
        self.cleared = 0

    def step(self, seq):
        if seq > self.limit:
            raise torch.OutOfMemoryError(f"{seq} > {self.limit}")
        return 1.0

    def clear(self):
        self.cleared += 1


def run_search(stack, start, budget=60.0, tolerance=0.05, only=None):
    reports = []
    result = lc.search(stack, start, budget, tolerance, 64, only, None, lambda r: reports.append(len(r["tries"])))
    return result, reports


@pytest.mark.parametrize("start", [64, 640, 9000])
def test_search_brackets_then_bisects_to_the_tolerance(start):
    stack = FakeStack(limit=3000)
    result, reports = run_search(stack, start)
    assert result["status"] == "converged"
    lo, hi = result["longest_ok"], result["shortest_oom"]
    assert lo <= 3000 < hi and hi <= lo * 1.05 + 64
    assert all(t["seq"] % 64 == 0 for t in result["tries"])
    assert stack.cleared == len(result["tries"])  # cleaned up after every try, OOM or not
    assert reports[:-1] == list(range(1, len(result["tries"]) + 1))  # reported after every try
    oks = [t["seq"] for t in result["tries"] if t["status"] == "ok"]
    ooms = [t["seq"] for t in result["tries"] if t["status"] == "OOM"]
    assert max(oks) == lo and min(ooms) == hi and all("error" in t for t in result["tries"] if t["status"] == "OOM")


def test_search_stops_before_a_try_that_would_overrun_the_slice(monkeypatch):
    """Tries take as long as the FLOP count says (measured time of the last try, scaled): doubling from 640 tokens
    overruns a slice that holds the first try and not the next, so the result is a lower bound."""
    clock = [0.0]
    monkeypatch.setattr(lc.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(lc.time, "perf_counter", lambda: clock[0])

    class Timed(FakeStack):
        def step(self, seq):
            clock[0] += lc.step_flops(self.config, seq) / 1e9  # 1 GFLOP/s
            return super().step(seq)

    monkeypatch.setitem(lc.ASSUMED_FLOPS, "cpu", 1e9)
    first = lc.step_flops(lc.model_config("tiny"), 640) / 1e9
    result, _ = run_search(Timed(limit=10**6), 640, budget=2.5 * first)
    assert result["status"] == "time-limited" and result["longest_ok"] == 640 and result["shortest_oom"] is None
    assert result["next_untried"]["seq"] == 1280 and result["next_untried"]["predicted_s"] > 1.5 * first


def test_search_at_one_length_and_nothing_fits():
    result, _ = run_search(FakeStack(limit=1000), 0, only=896)
    assert result["status"] == "done" and result["longest_ok"] == 896 and len(result["tries"]) == 1
    result, _ = run_search(FakeStack(limit=10), 640)
    assert result["status"] == "nothing fits" and result["longest_ok"] is None


def test_step_flops_by_hand():
    c = lc.model_config("tiny")  # d 128, f 256, 4 heads x 32, 2 kv heads, vocab 512, 2 blocks
    linear = 128 * (2 * 128 + 2 * 64) + 3 * 128 * 256
    seq = 100
    assert lc.step_flops(c, seq) == 2 * (6 * linear * seq + 4.5 * 2 * seq * seq * 128) + 6 * 512 * 128 * seq


def test_llama31_configs_match_the_calculator():
    from qlora_ref.memory import load_model_shape

    for name in ("8b", "70b"):
        c, s = lc.model_config(name), load_model_shape(f"llama-3.1-{name}")
        assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_key_value_heads, c.vocab_size) == (
            s.hidden_size, s.intermediate_size, s.num_layers, s.num_kv_heads, s.vocab_size)
    # the calculator's prediction for an 80 GB card: the baseline's float32 logits bind long before ours
    assert lc.predicted_limit("8b", "baseline", 79 * 10**9, 8192) < lc.predicted_limit("8b", "ours", 79 * 10**9, 8192)


@pytest.mark.parametrize("stack", lc.STACKS)
def test_real_tiny_stack_trains_after_an_out_of_memory_error(stack):
    """The real stacks on the tiny model: a step, an OOM mid-step (raised from inside the forward pass), the
    cleanup, and another step that trains: nothing of the failed step is left (no gradient)."""
    from gpu_scale import cpu_setup

    cpu_setup()
    s = lc.Stack("tiny", stack, torch.device("cpu"), loss_chunk=40, host_fraction=0.5)
    assert s.step(64) > 0
    s.clear()
    layer = (s.model.hf if stack == "ours" else s.model.base_model.model).model.layers[1]
    handle = layer.register_forward_hook(lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("simulated")))
    with pytest.raises(torch.OutOfMemoryError):
        s.step(128)
    handle.remove()
    s.clear()
    assert all(p.grad is None or not p.grad.any() for p in s.params)
    assert s.step(128) > 0


@pytest.mark.slow
def test_tiny_command_end_to_end(tmp_path):
    rows = lc.main(["--tiny", "--budget", "240", "--json", str(tmp_path / "r.json")])
    assert [r["stack"] for r in rows] == ["ours", "baseline"]
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["summary"]["tiny"]["ours"]["status"] == "converged"
    assert saved["rows"][0]["stamp"]["code"]["commit"]
