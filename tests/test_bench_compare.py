"""The issue-36 benchmark machinery on the CPU with tiny shapes: packed chatterbot data (bench/corpus.py), the result
stamp (bench/stamp.py), the interleaved speed comparison and the loss-curve comparison with their statistics
(bench/train_compare.py), the docs' tables from the JSON (bench/tables.py), and the GPU session's script."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import corpus
import gpu_scale
import numpy as np
import pytest
import stamp
import tables
import torch
import train_compare

pytestmark = [pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


# ---------------------------------------------------------------------------------------------- data
def test_the_shipped_corpus_is_chatterbots_english_conversations():
    convs = corpus.conversations()
    assert len({tuple(c) for c in convs}) == len(convs)  # the corpus's copies dropped (tech_support.yml: 10 x 105)
    if importlib.util.find_spec("chatterbot_corpus"):  # written from it by `python bench/corpus.py --write`
        from qlora_ref.data import load_chatterbot_corpus

        assert convs == [[m["content"] for m in e.messages] for e in load_chatterbot_corpus("english")]
    assert ["What is AI?", "Artificial Intelligence is the branch of engineering and science devoted to "
            "constructing machines that think."] in convs
    assert all(len(c) >= 2 and all(isinstance(t, str) and t for t in c) for c in convs)


def test_packed_rows_train_on_the_answers_only():
    ids, labels = corpus.packed(256, 6, seed=1)
    assert ids.shape == labels.shape == (6, 256) and ids.dtype == np.int64
    assert ids.max() < corpus.OFFSET + 256 and ids.min() >= 0  # bytes + 3: inside any LLaMA vocabulary
    kept = labels != corpus.IGNORE
    assert np.array_equal(labels[kept], ids[kept])  # a target is the token itself (the loss shifts)
    targets = bytes(int(t) - corpus.OFFSET for t in labels[kept] if t >= corpus.OFFSET).decode("utf-8", "replace")
    prompts = bytes(int(t) - corpus.OFFSET for t in ids[~kept] if t >= corpus.OFFSET).decode("utf-8", "replace")
    assert "### Human:" in prompts and "### Assistant:" in prompts
    assert "### Human:" not in targets and "### Assistant:" not in targets
    assert 0.2 < kept.mean() < 0.8
    again, _ = corpus.packed(256, 6, seed=1)
    other, _ = corpus.packed(256, 6, seed=2)
    assert np.array_equal(ids, again) and not np.array_equal(ids, other)
    with pytest.raises(ValueError, match="seq must be >= 2"):
        corpus.packed(1, 2)


def test_encode_marks_each_answer_and_the_eos():
    ids, labels = corpus.encode(["hi", "hello", "how are you", "fine"])
    text = bytes(t - corpus.OFFSET for t in ids[1:-1]).decode()
    assert text == "### Human: hi ### Assistant: hello ### Human: how are you ### Assistant: fine "
    answer = bytes(t - corpus.OFFSET for t in labels if t >= corpus.OFFSET).decode()
    assert answer == "hello fine " and labels[-1] == corpus.EOS and labels[0] == corpus.IGNORE


# ---------------------------------------------------------------------------------------------- stamp
def test_stamp_says_code_versions_and_host(tmp_path, monkeypatch):
    monkeypatch.setattr(stamp, "FROZEN", tmp_path / "FROZEN_STAMP.json")
    s = stamp.stamp(["bench/x.py", "--y"])
    assert s["command"] == "bench/x.py --y" and s["time_utc"].endswith("Z")
    assert {"torch", "transformers", "peft", "bitsandbytes", "python"} <= set(s["versions"])
    assert s["versions"]["torch"] == torch.__version__
    assert s["host"]["cores"] and s["host"]["hostname"]
    assert len(s["code"]["source_sha256"]) == 64
    assert s["gpu"] == ([] if not torch.cuda.is_available() else s["gpu"])
    if s["code"]["source"] == "git":  # this checkout
        assert len(s["code"]["commit"]) == 40 and isinstance(s["code"]["dirty"], bool)
        assert ("diff" in s["code"]) == s["code"]["dirty"]  # a dirty run keeps what differs
        clean = dict(s["code"], dirty=False)
        monkeypatch.setattr(stamp, "git_state", lambda: dict(clean))  # freezing needs a committed tree
        frozen = stamp.freeze()
        assert (tmp_path / "FROZEN_STAMP.json").exists() and frozen["code"]["commit"] == s["code"]["commit"]
        monkeypatch.setattr(stamp, "git_state", lambda: None)  # the GPU machine's copy: no .git
        there = stamp.stamp([])
        assert there["code"]["source"] == "frozen" and there["code"]["commit"] == s["code"]["commit"]
        assert there["code"]["matches_frozen"] is True


def test_results_must_name_code_that_can_be_checked_out_again(tmp_path, monkeypatch, capsys):
    """A dirty tree is not frozen; without .git, ``--check`` (which gpu_session.sh runs before issue 36's parts)
    fails until a frozen stamp of these very sources exists, and passes with one."""
    monkeypatch.setattr(stamp, "FROZEN", tmp_path / "FROZEN_STAMP.json")
    dirty = dict(commit="a" * 40, dirty=True, diff_sha256="b" * 64, source="git", status=[" M qlora_ref/x.py"],
                 diff="...", diff_truncated=False)
    monkeypatch.setattr(stamp, "git_state", lambda: dict(dirty))
    with pytest.raises(SystemExit, match=r"uncommitted changes \( M qlora_ref/x.py\): commit them first"):
        stamp.freeze()
    assert stamp.main(["--check"]) == 0  # a git checkout: its stamp keeps the diff
    monkeypatch.setattr(stamp, "git_state", lambda: None)  # the GPU machine's copy
    assert stamp.main(["--check"]) == 2 and "run `python bench/stamp.py --freeze`" in capsys.readouterr().out
    (tmp_path / "FROZEN_STAMP.json").write_text(json.dumps({"code": dict(dirty, dirty=False,
                                                                         source_sha256="0" * 64)}))
    assert stamp.main(["--check"]) == 2 and "the sources differ" in capsys.readouterr().out
    (tmp_path / "FROZEN_STAMP.json").write_text(json.dumps({"code": dict(dirty, dirty=False,
                                                                         source_sha256=stamp.source_sha256())}))
    assert stamp.main(["--check"]) == 0


def test_a_dirty_stamp_keeps_what_differs_untracked_files_included(tmp_path, monkeypatch):
    """A dirty tree's stamp holds its status, its diff and the text of files git does not track (no diff shows
    them), so the code that ran can be rebuilt from the commit; benchmark results are not the code."""
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "a.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    monkeypatch.setattr(stamp, "ROOT", tmp_path)
    monkeypatch.setattr(stamp, "RESULTS", tmp_path / "bench" / "results")
    assert stamp.git_state()["dirty"] is False and "diff" not in stamp.git_state()
    (tmp_path / "bench" / "a.py").write_text("x = 2\n")
    (tmp_path / "bench" / "new.py").write_text("y = 3\n")
    (tmp_path / "bench" / "results" / "r.json").write_text("{}")
    g = stamp.git_state()
    assert g["dirty"] is True and "+x = 2" in g["diff"] and g["untracked"] == {"bench/new.py": "y = 3\n"}
    assert not g["diff_truncated"] and not any("results" in line for line in g["status"])


def test_source_hash_changes_with_any_source_file(tmp_path):
    for d in stamp.SOURCE_DIRS:
        (tmp_path / d).mkdir()
        (tmp_path / d / "a.py").write_text("x = 1\n")
    first = stamp.source_sha256(tmp_path)
    assert stamp.source_sha256(tmp_path) == first
    (tmp_path / "bench" / "a.py").write_text("x = 2\n")
    assert stamp.source_sha256(tmp_path) != first


# ---------------------------------------------------------------------------------------------- statistics
def test_median_interval_is_the_order_statistic_interval_with_its_exact_coverage():
    """[x(k), x(n+1-k)] covers the median with probability 1 − 2·P(Bin(n, ½) < k): [min, max] of 5 covers 93.75 %,
    of 6 96.9 %; at 9 the second smallest and largest (96.1 %). Below 5 repeats there is no interval (the
    bootstrap it replaces gave a zero-width "95 %" interval from one repeat)."""
    iv = train_compare.median_interval([1.31, 1.45, 1.38, 1.52, 1.29])
    assert iv["median"] == pytest.approx(1.38) and (iv["low"], iv["high"]) == (1.29, 1.52)
    assert iv["coverage"] == pytest.approx(1 - 2 / 32)
    assert train_compare.median_interval(range(6))["coverage"] == pytest.approx(1 - 2 / 64)
    nine = train_compare.median_interval([5, 1, 9, 3, 7, 2, 8, 4, 6])
    assert (nine["low"], nine["high"]) == (2, 8) and nine["coverage"] == pytest.approx(1 - 2 * 10 / 512)
    for n in (1, 3, 4):
        iv = train_compare.median_interval([1.4] * n)
        assert iv["low"] is iv["high"] is iv["coverage"] is None and iv["median"] == pytest.approx(1.4)
    with pytest.raises(ValueError):
        train_compare.median_interval([])
    with pytest.raises(ValueError, match="NaN"):
        train_compare.median_interval([1.0, float("nan"), 2.0, 3.0, 4.0])
    many = train_compare.median_interval(np.arange(2001.0))  # 2**2001 is no float: the coverage stays exact
    assert many["median"] == 1000 and many["low"] < 1000 < many["high"] and 0.95 <= many["coverage"] < 0.96
    # the stated coverage holds for a skewed distribution (lognormal, median 1): 4000 samples of each size
    rng = np.random.default_rng(0)
    for n in (5, 9):
        samples = rng.lognormal(0.0, 0.5, (4000, n))
        ivs = [train_compare.median_interval(x) for x in samples]
        hit = np.mean([iv["low"] <= 1.0 <= iv["high"] for iv in ivs])
        assert abs(hit - ivs[0]["coverage"]) < 0.015  # binomial sd at 4000 draws: 0.004


def test_agreement_tells_noise_from_a_lag():
    rng = np.random.default_rng(0)
    base = np.linspace(3.0, 1.0, 200) + rng.normal(0, 0.05, 200)
    same = base + rng.normal(0, 0.05, 200)  # another dropout stream: noise only
    a = train_compare.agreement(same, base)
    assert a["agree"] and abs(a["z"]) < 3 and a["noise_sd"] == pytest.approx(0.05, rel=0.2)  # d's own noise
    lagging = same + np.linspace(0.3, 0.0, 200)  # the baseline pulls ahead early (issue 36's shape, smaller)
    b = train_compare.agreement(lagging, base)
    assert not b["agree"] and b["z"] > 10 and b["window_z"][0] > b["window_z"][-1]
    with pytest.raises(ValueError):
        train_compare.agreement([1, 2], [1, 2])


def test_bad_shapes_and_stacks_are_named():
    assert train_compare.parse_shapes("1x512, 4x2048") == [(1, 512), (4, 2048)]
    for bad in ("512", "0x512", "1x1", ""):
        with pytest.raises(SystemExit, match="--shapes"):
            train_compare.parse_shapes(bad)
    assert train_compare.parse_stacks("ours,baseline-paper") == ["ours", "baseline-paper"]
    for bad in ("ours", "baseline", "ours,peft"):
        with pytest.raises(SystemExit, match="--stacks"):
            train_compare.parse_stacks(bad)
    with pytest.raises(SystemExit, match="need a CUDA GPU"):
        if torch.cuda.is_available():
            raise SystemExit("need a CUDA GPU (skipped: CUDA present)")
        train_compare.main(["speed", "--model", "7b"])


# ---------------------------------------------------------------------------------------------- the runs
@pytest.fixture(scope="module")
def tiny_stacks():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gpu_scale.cpu_setup()
    stacks = train_compare.build_stacks(["ours", "baseline", "baseline-paper"], gpu_scale.TINY, "cpu",
                                        gpu_scale.recipe("tiny"))
    yield stacks
    torch.set_num_threads(threads)


def test_every_stack_starts_from_ours_adapters(tiny_stacks):
    ours = tiny_stacks["ours"].adapters
    for name in ("baseline", "baseline-paper"):
        named = dict(tiny_stacks[name].model.named_parameters())
        k = "model.layers.1.mlp.down_proj.lora_A.weight"
        theirs = named["base_model.model.model.layers.1.mlp.down_proj.lora_A.default.weight"]
        assert torch.equal(theirs, ours[k].to(theirs.dtype)), name
    assert named["base_model.model.model.layers.1.mlp.down_proj.lora_A.default.weight"].dtype == torch.bfloat16


def test_speed_interleaves_the_stacks_and_pairs_the_repeats(tiny_stacks):
    out = train_compare.run_speed(tiny_stacks, "cpu", [(1, 16), (2, 16)], repeats=3, micro=2, accum=16)
    assert out["repeats_done"] == 3 and set(out["results"]) == {"1x16", "2x16"}
    r = out["results"]["2x16"]["ours"]
    assert len(r["micro_s"]) == 3 and all(len(m) == 2 for m in r["micro_s"]) and len(r["update_s"]) == 3
    expect = 16 * 2 * 16 / (16 * np.median(r["micro_s"][0]) + r["update_s"][0])
    assert r["tokens_per_s"][0] == pytest.approx(expect)
    rat = out["ratios"]["2x16"]["baseline-paper"]
    ours, theirs = out["results"]["2x16"]["ours"]["tokens_per_s"], out["results"]["2x16"]["baseline-paper"]
    assert rat["ratios"] == pytest.approx([a / b for a, b in zip(ours, theirs["tokens_per_s"], strict=True)])
    assert rat["n"] == 3 and rat["low"] is None and rat["excludes_one"] is None  # 3 repeats: no interval
    assert rat["ratio_of_medians"] == pytest.approx(np.median(ours) / np.median(theirs["tokens_per_s"]))
    assert set(out["warmup_s"]) == {f"{s}/{n}" for s in ("1x16", "2x16") for n in tiny_stacks}
    text = tables.speed_tables(dict(out, model="tiny"))
    assert "| 2x16 | baseline-paper |" in text and "| 1x16 | ours |" in text and "none: 3 < 5 repeats | n/a |" in text
    stopped = train_compare.run_speed(tiny_stacks, "cpu", [(1, 16)], repeats=3, micro=1, accum=16, deadline=0.0)
    assert stopped["repeats_done"] == 0  # past the deadline: no repeat starts


def test_curves_feed_both_stacks_the_same_rows(tiny_stacks):
    seen = {}
    for name in ("ours", "baseline"):
        st = tiny_stacks[name]
        inner = st.micro

        def record(ids, labels, n, inner=inner, name=name):
            seen.setdefault(name, []).append((ids.copy(), labels.copy(), n))
            return inner(ids, labels, n)

        st.micro = record
    try:
        stacks = {k: tiny_stacks[k] for k in ("ours", "baseline")}
        out = train_compare.run_curves(stacks, "cpu", steps=6, shape=(1, 48), accum=2)
    finally:
        for name in ("ours", "baseline"):
            tiny_stacks[name].micro = tiny_stacks[name].micro.__defaults__[0]
    assert out["steps_done"] == 6 and len(out["losses"]["ours"]) == len(out["losses"]["baseline"]) == 6
    assert len(seen["ours"]) == len(seen["baseline"]) == 12
    for (a, la, na), (b, lb, nb) in zip(seen["ours"], seen["baseline"], strict=True):
        assert np.array_equal(a, b) and np.array_equal(la, lb) and na == nb
    assert all(np.isfinite(out["losses"]["ours"]))
    a = out["agreement"]["baseline"]
    assert a["steps"] == 6 and a["max_abs_diff"] < 0.05  # the same arithmetic (issue 36), 6 steps of tiny
    text = tables.curves_tables(dict(out, model="tiny", recipe=gpu_scale.recipe("tiny")))
    assert "| baseline | " in text and "| ours | " in text


def test_the_qlora_py_baseline_has_the_papers_dtypes(tiny_stacks):
    """bench/gpu_scale.qlora_py_casts: adapters, embedding and head bfloat16, norms float32, the 4-bit weights
    untouched (not floating point)."""
    m = tiny_stacks["baseline-paper"].model
    for name, p in m.named_parameters():
        if ".lora_" in name or "embed_tokens" in name or "lm_head" in name:
            assert p.dtype == torch.bfloat16, name
        elif "norm" in name:
            assert p.dtype == torch.float32, name
        else:
            assert p.dtype == torch.uint8, name  # the packed 4-bit codes
    base = tiny_stacks["baseline"].model
    assert base.base_model.model.model.embed_tokens.weight.dtype == torch.float32  # peft's own upcast


# ---------------------------------------------------------------------------------------------- scale and tables
def test_the_eviction_table_pairs_a_pressed_run_with_its_free_one():
    ok = dict(status="ok", build_s=1.0, peak_bytes=gpu_scale.GiB, paged_state_bytes=gpu_scale.GiB, first_loss=11.9,
              tokens_per_s=400.0, model="65b", stack="ours", losses=[11.9, 9.0, 6.0])
    rows = [dict(ok, leave_free_bytes=48 * 10**9, step_s=1.5, update_times_s=[0.30, 0.34, 0.32]),
            dict(ok, step_s=1.2, update_times_s=[0.10, 0.12, 0.11])]
    text = tables.scale_tables(dict(rows=rows))
    assert "| 65b | ours | 48 | 1.200 | 1.500 | 1.25 | 0.110 | 0.320 | 2.91 |" in text
    assert "| 65b | ours (48 GB left free) | 11.9000 |" in text


def test_leave_free_needs_cuda_and_append_keeps_rows(tmp_path):
    with pytest.raises(ValueError, match="CUDA"):
        gpu_scale.reserve(torch.device("cpu"), 10**9)
    assert gpu_scale.reserve(torch.device("cpu"), None) is None
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--leave-free-gb"):
            gpu_scale.main(["--tiny", "--leave-free-gb", "48", "--device", "cpu"])
    out = tmp_path / "s.json"
    args = ["--runs", "tiny:ours", "--device", "cpu", "--seq", "8", "--warmup", "0", "--steps", "1", "--no-isolate",
            "--no-progress", "--profile", "none", "--json", str(out)]
    gpu_scale.main(args)
    gpu_scale.main([*args, "--append"])
    payload = json.loads(out.read_text())
    assert len(payload["rows"]) == 2 and payload["stamp"]["code"]["source_sha256"]
    row = payload["rows"][0]
    assert len(row["losses"]) == 1 and 0 < row["update_times_s"][0] <= row["step_times_s"][0]


def test_tables_render_every_kind_of_file(tmp_path):
    (tmp_path / "old.json").write_text(json.dumps(dict(rows=[])))
    (tmp_path / "cut.json").write_text(json.dumps(dict(mode="speed", model="7b", status="building")))
    text = tables.render([str(tmp_path / "old.json"), str(tmp_path / "cut.json")])
    assert "no stamp" in text and "cut off at status 'building'" in text


def test_the_session_script_parses_and_lists_issue36s_parts():
    script = Path(__file__).resolve().parent.parent / "bench" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    for part in ("curves7b)", "speed7b)", "speed13b)", "free48)", "compile7b)", "issue36)"):
        assert part in text
    assert "--leave-free-gb 48" in text and "baseline-paper-compile" in text


def test_a_speed_run_cut_off_before_any_repeat_says_so(tmp_path):
    """A file whose repeats never ran (its deadline passed) has an empty ratio table: the rendering says it was
    cut off, instead of printing a table header with no rows."""
    import json

    payload = {"mode": "speed", "model": "tiny", "status": "running", "repeats_done": 0, "micro": 1, "accum": 16,
               "results": {}, "ratios": {"1x32": {"tokens_per_s": {}}}}
    (tmp_path / "r0.json").write_text(json.dumps(payload))
    assert "cut off at status 'running', before any result" in tables.render([str(tmp_path / "r0.json")])


def test_generated_doc_sections_are_their_result_files_rendered():
    """Every marked section of the docs equals its rendering from bench/results/ (bench/render_docs.py): no figure
    there is retyped, and a change to a renderer must be rendered into the docs."""
    import render_docs

    assert render_docs.stale() == []


def test_a_goal_is_met_only_when_the_rounds_interval_clears_it():
    """The tokens/s goal is judged on the per-round ratios' median interval: a median a hair above the line with
    rounds below it is "at the line", not met."""
    import model_step_report

    goal = {"value": 0.82, "goal": 0.8, "met": True}
    ref = [1.0] * 9

    def verdict(ratios):
        res = {"seconds": {"qlora_ref": ref, "peft float32": ratios}}
        return model_step_report._goal(res, "tokens_per_s_vs_peft_float32", goal, "x")

    assert verdict([0.82, 0.83, 0.79, 0.84, 0.78, 0.86, 0.81, 0.85, 0.80]).endswith("at the line, not clear of it)")
    assert verdict([0.90, 0.93, 0.91, 0.95, 0.92, 0.89, 0.94, 0.90, 0.96]).endswith("goal ≥ 0.8: met)")
    assert verdict([0.70, 0.73, 0.71, 0.75, 0.72, 0.69, 0.74, 0.70, 0.76]).endswith("goal ≥ 0.8: not met)")
    assert "too few rounds" in model_step_report._goal(
        {"seconds": {"qlora_ref": [1.0] * 3, "peft float32": [0.9] * 3}}, "tokens_per_s_vs_peft_float32", goal, "x")
