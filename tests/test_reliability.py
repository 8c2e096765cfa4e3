"""The hostile-input audit of issue 37, case by case: each failure it found, reproduced on a tiny Llama folder and a
small JSONL built here, now gives a clear error (naming the file, tensor or option) or the correct behaviour.

Sections follow the audit: checkpoint rotation, lying safetensors headers, output locations, NaN, resume edge
cases, generation and argument validation. docs/reliability.md states the promises these tests hold.
"""

from __future__ import annotations

import json
import shutil
import struct
import warnings

import numpy as np
import pytest
from test_train import run, small_config, write_cli_run_files

from qlora_ref.cli import main
from qlora_ref.model.loading import CheckpointError, load_model
from qlora_ref.train.checkpoint import list_checkpoints, load_checkpoint

FAST = ["--lora-r", "4", "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-3", "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Llama folder (context 128 tokens), 40 training records, and the tokenized training set."""
    from test_train import qa_dataset

    from qlora_ref.train.api import load_tokenizer

    root = tmp_path_factory.mktemp("audit")
    write_cli_run_files(root)
    tok = load_tokenizer(root / "model")
    return {"root": root, "model": root / "model", "data": root / "train.jsonl", "tok": tok,
            "ds": qa_dataset(tok, 24, seed=0)}


def finetune_args(files, out, *extra):
    return ["finetune", "--model", str(files["model"]), "--data", str(files["data"]), "--output-dir", str(out),
            *FAST, *extra]


def copy_model(files, dst):
    shutil.copytree(files["model"], dst)
    return dst


# ---------------------------------------------------------------------------------------------- safetensors
def read_header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_safetensors_raw(path, header, data: bytes, header_len: int | None = None) -> None:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if header_len is None else header_len) + h + data)


def mutate_header(folder, mutate):
    path = folder / "model.safetensors"
    header, data = read_header(path)
    header = mutate(header)
    write_safetensors_raw(path, header, data)
    return path


def _short_offsets(h):
    start, _ = h["model.norm.weight"]["data_offsets"]
    h["model.norm.weight"]["data_offsets"] = [start, start + 128]  # shape [64] in F32 needs 256 bytes
    return h


def _overlap(h):
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight"
    h[b]["data_offsets"] = list(h[a]["data_offsets"])
    return h


def _no_dtype(h):
    del h["model.norm.weight"]["dtype"]
    return h


@pytest.mark.parametrize("mutate,expected", [
    (_short_offsets, r"tensor 'model.norm.weight'.*hold 128 bytes, but shape \(64,\) in F32 needs 256"),
    (_overlap, r"tensors 'model.layers.0.input_layernorm.weight' and 'model.layers.1.input_layernorm.weight' overlap"),
    (_no_dtype, r"tensor 'model.norm.weight': header entry has no 'dtype'"),
    (lambda h: list(h), r"the safetensors header must be a JSON object, got list"),
], ids=["offsets-shorter-than-shape", "overlapping-offsets", "missing-dtype", "list-header"])
def test_a_lying_header_is_refused_naming_file_and_tensor(files, tmp_path, mutate, expected):
    folder = copy_model(files, tmp_path / "m")
    path = mutate_header(folder, mutate)
    with pytest.raises(CheckpointError, match=expected) as e:
        load_model(folder)
    assert str(path) in str(e.value)


def test_quantize_refuses_a_lying_header_instead_of_writing_it_out(files, tmp_path, capsys):
    folder = copy_model(files, tmp_path / "m")
    mutate_header(folder, _short_offsets)
    assert main(["quantize", str(folder), str(tmp_path / "q")]) == 2
    assert "'model.norm.weight'" in capsys.readouterr().err
    assert not (tmp_path / "q" / "model.safetensors").exists()


def test_a_huge_header_length_is_refused(files, tmp_path):
    folder = copy_model(files, tmp_path / "m")
    header, data = read_header(folder / "model.safetensors")
    write_safetensors_raw(folder / "model.safetensors", header, data, header_len=2**62)
    with pytest.raises(CheckpointError, match=r"model.safetensors: header length 4611686018427387904 is larger"):
        load_model(folder)


def test_integer_weights_are_refused_not_cast(files, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = copy_model(files, tmp_path / "m")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.norm.weight"] = np.arange(64, dtype=np.int64)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.norm.weight' is stored as I64"):
        load_model(folder)


def test_a_shard_path_in_the_index_may_not_leave_the_model_folder(files, tmp_path):
    """An index naming ``../outside.safetensors`` (a real, readable file) is refused, not followed."""
    folder = copy_model(files, tmp_path / "m")
    shutil.move(folder / "model.safetensors", tmp_path / "outside.safetensors")
    header, _ = read_header(tmp_path / "outside.safetensors")
    weight_map = {k: "../outside.safetensors" for k in header if k != "__metadata__"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"shard '../outside.safetensors' lies outside the model folder"):
        load_model(folder)


def test_the_torch_backend_reads_headers_through_the_same_checks(files, tmp_path):
    from qlora_gpu.prepare import load

    folder = copy_model(files, tmp_path / "m")
    mutate_header(folder, _overlap)
    with pytest.raises(CheckpointError, match="overlap"):
        load(folder, quant=None, lora=None, device="cpu")


@pytest.mark.parametrize("backend", ["ref", "gpu"])
def test_a_malformed_config_json_is_named_by_every_command_on_both_backends(files, tmp_path, capsys, backend):
    """``--backend gpu`` reads config.json through the reference's reader: the file is named, as on ``ref``."""
    folder = copy_model(files, tmp_path / "badm")
    (folder / "config.json").write_text("{bad")
    expected = f"{folder / 'config.json'}: not valid JSON (Expecting property name enclosed in double quotes"
    model, data, out = str(folder), str(files["data"]), str(tmp_path / "out")
    for argv in (["evaluate", "--model", model, "--data", data, "--no-progress"],
                 ["generate", "--model", model, "--prompt", "hi", "--max-new-tokens", "1"],
                 ["finetune", "--model", model, "--data", data, "--output-dir", out, "--max-steps", "1", *FAST]):
        assert main([*argv, "--backend", backend]) == 2, argv[0]
        err = capsys.readouterr().err
        assert expected in err, (argv[0], err)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- rotation
def test_rotation_never_deletes_a_foreign_checkpoint(files, tmp_path, capsys):
    """A Hugging Face Trainer's ``checkpoint-500`` (it has a trainer_state.json) survives rotation with
    keep_checkpoints=1, with and without --no-resume, and is never picked up for resuming."""
    out = tmp_path / "out"
    hf = out / "checkpoint-500"
    hf.mkdir(parents=True)
    (hf / "trainer_state.json").write_text(json.dumps({"global_step": 500}))
    (hf / "pytorch_model.bin").write_bytes(b"the user's weights")
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"save_every": 1, "keep_checkpoints": 1}))
    for extra in (["--no-resume"], []):
        assert main(finetune_args(files, out, "--max-steps", "3", "--config", str(cfg), *extra)) == 0
        assert (hf / "pytorch_model.bin").read_bytes() == b"the user's weights"
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-500"]
    capsys.readouterr()


def test_a_foreign_checkpoint_at_a_step_this_run_writes_is_an_error_before_training(files, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    with pytest.raises(ValueError, match=r"checkpoint-2 would be replaced by this run's checkpoints but were not "
                                         r"written by it"):
        run(files["model"], files["ds"], small_config(max_steps=4, save_every=2), output_dir=out)
    assert (out / "checkpoint-2" / "trainer_state.json").read_text() == "{}"
    assert not (out / "checkpoint-4").exists() and not (out / "adapter_model.safetensors").exists()


def test_a_new_run_over_an_older_runs_checkpoints_keeps_both(files, tmp_path):
    """Run A leaves checkpoint-5/-10; run B (resume=False) rotates only its own; resuming continues B, the
    newest run; a new run that would write over A's checkpoint-5 is refused before its first step."""
    out, ds, model = tmp_path / "out", files["ds"], files["model"]
    run(model, ds, small_config(max_steps=10, save_every=5, keep_checkpoints=2), output_dir=out)
    run(model, ds, small_config(max_steps=4, save_every=2, keep_checkpoints=1), output_dir=out, resume=False)
    assert [s for s, _ in list_checkpoints(out)] == [4, 5, 10]
    _, resumed = run(model, ds, small_config(max_steps=6, save_every=2, keep_checkpoints=1), output_dir=out)
    assert resumed.step == 6 and len(resumed.train_losses) == 2  # continued B from 4, not A from 10
    assert [s for s, _ in list_checkpoints(out)] == [5, 6, 10]
    with pytest.raises(ValueError, match="checkpoint-5 would be replaced"):
        run(model, ds, small_config(max_steps=5, save_every=5), output_dir=out, resume=False)
    assert [s for s, _ in list_checkpoints(out)] == [5, 6, 10]


# ---------------------------------------------------------------------------------------------- outputs
def _no_model_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the output location was checked")

    import qlora_ref.model.loading
    import qlora_ref.train.api

    monkeypatch.setattr(qlora_ref.train.api, "make_trainer", refuse)
    monkeypatch.setattr(qlora_ref.model.loading, "read_checkpoint", refuse)


def test_a_new_run_over_a_finished_one_is_refused_before_the_model_loads(files, tmp_path, capsys, monkeypatch):
    """``--no-resume`` in a folder whose checkpoint-3 another run wrote: the same refusal as in the loop, but
    before the model is loaded (seconds, not a model load), and nothing changed."""
    out = tmp_path / "out"
    assert main(finetune_args(files, out, "--max-steps", "3")) == 0
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    _no_model_load(monkeypatch)
    assert main(finetune_args(files, out, "--max-steps", "3", "--no-resume")) == 2
    assert "checkpoint-3 would be replaced by this run's checkpoints" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.parametrize("where,message", [
    ("file", "exists and is not a folder"),
    ("under-file", "is a file, so no folder can be made under it"),
    ("unwritable", "cannot create the folder"),
])
def test_output_dir_is_checked_before_the_model_is_loaded(files, tmp_path, capsys, monkeypatch, where, message):
    (tmp_path / "f").write_text("a file")
    if where == "unwritable" and not __import__("os").path.isdir("/proc/self"):
        pytest.skip("needs Linux's /proc (a folder no one, root included, can create entries in)")
    out = {"file": tmp_path / "f", "under-file": tmp_path / "f" / "out", "unwritable": "/proc/qlora-out"}[where]
    with pytest.raises(ValueError, match=message):  # the training loop itself: before its first step
        run(files["model"], files["ds"], small_config(max_steps=1), output_dir=out)
    _no_model_load(monkeypatch)
    assert main(finetune_args(files, out, "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert f"--output-dir {out}: " in err and message in err
    assert main(["demo", "--output-dir", str(out)]) == 2
    assert message in capsys.readouterr().err
    from qlora_ref.train.api import finetune

    with pytest.raises(ValueError, match=message):
        finetune(files["model"], files["data"], small_config(max_steps=1), output_dir=out)


def test_plot_and_json_into_a_missing_folder_fail_before_the_work(files, tmp_path, capsys, monkeypatch):
    missing = tmp_path / "missing"
    assert main(["memory", "--plot", str(missing / "m.png")]) == 2
    assert f"--plot {missing / 'm.png'}: its folder {missing} does not exist" in capsys.readouterr().err
    _no_model_load(monkeypatch)
    for option in ("--plot", "--json"):
        assert main(["reproduce", "table2", "--model", str(files["model"]), option, str(missing / "t")]) == 2
        assert f"{option} {missing / 't'}: its folder {missing} does not exist" in capsys.readouterr().err
    assert not missing.exists()


# ---------------------------------------------------------------------------------------------- NaN
def test_a_diverging_run_stops_naming_the_step_and_keeps_the_good_adapter(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(finetune_args(files, out, "--max-steps", "2")) == 0
    good = (out / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(finetune_args(files, out, "--max-steps", "6", "--no-resume", "--lr", "1e30", "--max-grad-norm",
                              "0")) == 2
    err = capsys.readouterr().err
    assert "training diverged" in err and "step " in err and "no checkpoint of this run was written" in err
    assert (out / "adapter_model.safetensors").read_bytes() == good
    assert [s for s, _ in list_checkpoints(out)] == [2]
    load_checkpoint(out / "checkpoint-2")  # intact and finite


def test_divergence_keeps_the_last_good_checkpoint(files, tmp_path):
    from qlora_ref.train.loop import TrainingDivergedError

    out = tmp_path / "out"
    with pytest.raises(TrainingDivergedError, match=r"^step (\d+): training diverged") as e:
        run(files["model"], files["ds"], small_config(max_steps=8, save_every=1, keep_checkpoints=2,
                                                      learning_rate=1e30, max_grad_norm=0.0), output_dir=out)
    step = int(e.value.args[0].split(":")[0].split()[1])
    saved = [s for s, _ in list_checkpoints(out)]
    assert saved and saved[-1] == step - 1 and f"the last good checkpoint is {out / f'checkpoint-{step - 1}'}" in str(
        e.value)
    for s in saved:
        load_checkpoint(out / f"checkpoint-{s}")  # every checkpoint left is finite and readable
    assert not (out / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("backend", ["ref", "gpu"], ids=["reference", "torch_backend"])
def test_a_non_finite_adapter_is_refused_on_load(files, tmp_path, capsys, backend):
    from safetensors.numpy import load_file, save_file

    out = tmp_path / "out"
    assert main(finetune_args(files, out, "--max-steps", "1")) == 0
    weights = load_file(str(out / "adapter_model.safetensors"))
    name = sorted(weights)[0]
    weights[name][0, 0] = np.nan
    save_file(weights, str(out / "adapter_model.safetensors"))
    capsys.readouterr()
    assert main(["generate", "--model", str(files["model"]), "--adapter", str(out), "--prompt", "hi",
                 "--backend", backend]) == 2
    err = capsys.readouterr().err
    assert "adapter_model.safetensors" in err and name.removeprefix("base_model.model.") in err and "NaN" in err


# ---------------------------------------------------------------------------------------------- resume
def test_leftovers_of_interrupted_saves_are_cleaned_and_nothing_else(files, tmp_path):
    out = tmp_path / "out"
    run(files["model"], files["ds"], small_config(max_steps=2), output_dir=out)
    (out / ".checkpoint-5.k2j4.tmp").mkdir()
    (out / ".checkpoint-5.k2j4.tmp" / "optimizer.safetensors").write_bytes(b"half")
    (out / ".adapter_model.safetensors.x1y2.tmp").write_bytes(b"half")
    (out / ".keepme").mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.warns(UserWarning, match="removed .checkpoint-5.k2j4.tmp"):
        run(files["model"], files["ds"], small_config(max_steps=3), output_dir=out)
    names = sorted(p.name for p in out.iterdir())
    assert ".checkpoint-5.k2j4.tmp" not in names and ".adapter_model.safetensors.x1y2.tmp" not in names
    assert ".keepme" in names and (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("left", ["new-and-old", "old-only"])
def test_a_kill_between_the_two_renames_resumes_instead_of_restarting(files, tmp_path, left):
    """keep_checkpoints=1: re-saving checkpoint-2 moves it to ``.checkpoint-2.old`` and renames the new one in;
    killed between the two renames, the next run puts a complete one back and continues from step 2."""
    out, config = tmp_path / "out", small_config(max_steps=2, keep_checkpoints=1)
    run(files["model"], files["ds"], config, output_dir=out)
    shutil.copytree(out / "checkpoint-2", out / ".checkpoint-2.old")
    (out / "checkpoint-2").rename(out / ".checkpoint-2.a8b7.tmp")
    if left == "old-only":  # the new one was still being written: no marker yet
        (out / ".checkpoint-2.a8b7.tmp" / "qlora_checkpoint.json").unlink()
    with pytest.warns(UserWarning, match="restored checkpoint-2 from"):
        _, result = run(files["model"], files["ds"], config.replace(max_steps=4), output_dir=out)
    assert result.step == 4 and len(result.train_losses) == 2
    assert [s for s, _ in list_checkpoints(out)] == [4]
    assert not [p for p in out.iterdir() if p.name.startswith(".checkpoint")]


def test_resuming_with_other_data_is_refused_clearly(files, tmp_path):
    from test_train import qa_dataset

    out = tmp_path / "out"
    run(files["model"], files["ds"], small_config(max_steps=2), output_dir=out)
    for other in (qa_dataset(files["tok"], 10, seed=0), qa_dataset(files["tok"], 24, seed=7)):  # smaller; same size
        with pytest.raises(ValueError, match=r"cannot resume, the training data differ from the checkpoint's: it was "
                                             r"trained on 24 examples"):
            run(files["model"], other, small_config(max_steps=4), output_dir=out)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(files, tmp_path):
    """checkpoint-4's optimizer file is garbage: resume warns, continues from checkpoint-2, and the run is still
    exactly the uninterrupted one."""
    config = small_config(max_steps=6, save_every=2, keep_checkpoints=2)
    _, full = run(files["model"], files["ds"], config, output_dir=tmp_path / "full")
    out = tmp_path / "cut"
    run(files["model"], files["ds"], config, output_dir=out, stop_after=4)
    (out / "checkpoint-4" / "optimizer.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match=r"checkpoint-4 is unreadable .* resuming from the one before it, "
                                         r"checkpoint-2"):
        _, resumed = run(files["model"], files["ds"], config, output_dir=out)
    assert resumed.step == 6 and resumed.train_losses == full.train_losses[2:]


def _edit_safetensors(path, edit):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _edit_json(path, edit):
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def _drop_a_state(t):
    del t[next(k for k in sorted(t) if not k.endswith(".step"))]


#: (backend, file of checkpoint-3 damaged, how): each reads, but does not fit together or this model
DAMAGE = {
    "optimizer-key-missing": ("ref", "optimizer.safetensors", lambda f: _edit_safetensors(f, _drop_a_state)),
    "optimizer-key-extra": ("ref", "optimizer.safetensors", lambda f: _edit_safetensors(
        f, lambda t: t.update({"bogus.weight.exp_avg": np.zeros(3, np.float32)}))),
    "dropout-rng-missing": ("ref", "trainer_state.json", lambda f: _edit_json(
        f, lambda d: d["rng"].update(lora_dropout={}))),
    "rng-file-missing": ("ref", "rng.safetensors", lambda f: f.unlink()),
    "step-edited": ("ref", "trainer_state.json", lambda f: _edit_json(f, lambda d: d.update(step=1))),
    "run-id-edited": ("ref", "trainer_state.json", lambda f: _edit_json(f, lambda d: d.update(run_id="x"))),
    "torch-rng-file-missing": ("gpu", "rng.safetensors", lambda f: f.unlink()),
    "torch-rng-file-empty": ("gpu", "rng.safetensors", lambda f: _edit_safetensors(f, lambda t: t.clear())),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(files, tmp_path, case):
    """checkpoint-3's files read but do not fit (a missing or extra optimizer state, a missing random state, a
    step or run id that disagrees with the marker): one warning naming the file, then the run continues from
    checkpoint-2 exactly as the uninterrupted run did."""
    backend, name, damage = DAMAGE[case]
    config = small_config(max_steps=4, save_every=1, keep_checkpoints=2, lora_dropout=0.1)
    _, full = run(files["model"], files["ds"], config, backend, output_dir=tmp_path / "full")
    out = tmp_path / "cut"
    run(files["model"], files["ds"], config, backend, output_dir=out, stop_after=3)
    _edit_json(out / "checkpoint-3" / "qlora_checkpoint.json", lambda d: d.pop("sha256"))  # the checks that do
    damage(out / "checkpoint-3" / name)  # not rely on checksums (a checkpoint written before them) catch each
    with pytest.warns(UserWarning, match=rf"checkpoint-3 is (damaged|unreadable) \(\S*checkpoint-3/{name}: .*\); "
                                         r"resuming from the one before it, checkpoint-2"):
        _, resumed = run(files["model"], files["ds"], config, backend, output_dir=out)
    assert resumed.step == 4 and resumed.train_losses == full.train_losses[2:]


def _flip_last_bit(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # the last byte of a safetensors file is tensor data: the file still reads
    path.write_bytes(bytes(data))


#: (file of checkpoint-3 changed, how): each still reads and fits, so only the marker's checksums can tell
CHANGED = {
    "adapter-bit": ("adapter_model.safetensors", _flip_last_bit),
    "optimizer-bit": ("optimizer.safetensors", _flip_last_bit),
    "tokens-edited": ("trainer_state.json", lambda f: _edit_json(f, lambda d: d.update(tokens_seen=1))),
    "alpha-edited": ("adapter_config.json", lambda f: _edit_json(f, lambda d: d.update(lora_alpha=3.0))),
}


@pytest.mark.parametrize("case", list(CHANGED))
def test_a_changed_checkpoint_file_is_caught_by_its_checksum(files, tmp_path, case):
    """A bit flipped inside a tensor, or a number edited, reads and fits like the original: the SHA-256 the marker
    recorded at the save names the file, and the run continues from checkpoint-2 exactly as the uninterrupted
    one did."""
    from safetensors.numpy import load_file

    name, change = CHANGED[case]
    config = small_config(max_steps=4, save_every=1, keep_checkpoints=2)
    _, full = run(files["model"], files["ds"], config, output_dir=tmp_path / "full")
    out = tmp_path / "cut"
    run(files["model"], files["ds"], config, output_dir=out, stop_after=3)
    before = (out / "checkpoint-3" / name).read_bytes()
    change(out / "checkpoint-3" / name)
    assert (out / "checkpoint-3" / name).read_bytes() != before
    if name.endswith(".safetensors"):  # still a readable file of the same tensors
        assert load_file(str(out / "checkpoint-3" / name)).keys() == load_file(
            str(tmp_path / "full" / "checkpoint-3" / name)).keys()
    with pytest.warns(UserWarning, match=rf"checkpoint-3 is unreadable \(\S*checkpoint-3/{name}: its content "
                                         r"changed since it was written \(sha256 \w+\.\.\., qlora_checkpoint.json "
                                         r"recorded \w+\.\.\.\).*\); resuming from the one before it, checkpoint-2"):
        _, resumed = run(files["model"], files["ds"], config, output_dir=out)
    assert resumed.step == 4 and resumed.train_losses == full.train_losses[2:]


def test_checkpoints_without_checksums_still_resume_exactly(files, tmp_path):
    """Markers written before checksums existed have none: such a checkpoint is read unchecked and resumes to the
    uninterrupted result. A checksum table naming a file outside the checkpoint makes the marker damaged."""
    config = small_config(max_steps=4, save_every=2)
    _, full = run(files["model"], files["ds"], config, output_dir=tmp_path / "full")
    out = tmp_path / "cut"
    run(files["model"], files["ds"], config, output_dir=out, stop_after=2)
    marker = out / "checkpoint-2" / "qlora_checkpoint.json"
    assert set(json.loads(marker.read_text())["sha256"]) == {
        "adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "rng.safetensors",
        "trainer_state.json"}
    _edit_json(marker, lambda d: d["sha256"].update({"../x": "0"}))
    with pytest.raises(ValueError, match=r"damaged checkpoint marker \(its sha256 is not a table of "), \
            pytest.warns(UserWarning, match="damaged checkpoint marker"):
        run(files["model"], files["ds"], config, output_dir=out)
    _edit_json(marker, lambda d: d.pop("sha256"))
    _, resumed = run(files["model"], files["ds"], config, output_dir=out)
    assert resumed.step == 4 and resumed.train_losses == full.train_losses[2:]


def test_a_damaged_marker_is_reported_as_damaged_not_as_another_runs(files, tmp_path):
    """A truncated qlora_checkpoint.json: the folder is still never replaced, but the error says the marker is
    damaged and how to go on; deleting that checkpoint resumes from the one before."""
    config = small_config(max_steps=4, save_every=1, keep_checkpoints=2)
    out = tmp_path / "out"
    run(files["model"], files["ds"], config, output_dir=out, stop_after=3)
    marker = out / "checkpoint-3" / "qlora_checkpoint.json"
    marker.write_text(marker.read_text()[:20])
    with pytest.raises(ValueError, match=r"checkpoint-3/qlora_checkpoint.json: damaged checkpoint marker "
                                         r"\(unreadable .*\).* delete checkpoint-3"), \
            pytest.warns(UserWarning, match=r"checkpoint-3/qlora_checkpoint.json: damaged checkpoint marker "
                                            r"\(unreadable .*\); not resumed from"):
        run(files["model"], files["ds"], config, output_dir=out)
    shutil.rmtree(out / "checkpoint-3")
    _, resumed = run(files["model"], files["ds"], config, output_dir=out)
    assert resumed.step == 4 and len(resumed.train_losses) == 2


def _interrupt_at_save(monkeypatch, n: int, exc: type[BaseException]):
    """Raise ``exc`` when the run's ``n``-th checkpoint is about to be saved (Ctrl-C, or a kill's stand-in)."""
    import qlora_ref.train.loop as loop

    calls, save = [], loop.save_checkpoint

    def save_or_stop(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise exc()
        return save(*a, **k)

    monkeypatch.setattr(loop, "save_checkpoint", save_or_stop)


def test_rerunning_a_killed_no_resume_run_says_to_drop_no_resume(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    args = finetune_args(files, out, "--max-steps", "4", "--save-every", "1", "--no-resume")
    _interrupt_at_save(monkeypatch, 3, SystemExit)  # stopped with checkpoint-1 and -2 written
    with pytest.raises(SystemExit):
        main(args)
    monkeypatch.undo()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "(an earlier run's with these same settings)" in err
    assert "to continue that run, run the same command without --no-resume" in err
    assert main([a for a in args if a != "--no-resume"]) == 0
    assert "(2 steps in this run)" in capsys.readouterr().out


@pytest.mark.parametrize("resume", [True, False], ids=["resume", "no-resume"])
def test_ctrl_c_is_one_line_naming_the_checkpoint_kept_and_how_to_resume(files, tmp_path, capsys, monkeypatch,
                                                                          resume):
    out = tmp_path / "out"
    args = finetune_args(files, out, "--max-steps", "4", "--save-every", "1", *([] if resume else ["--no-resume"]))
    _interrupt_at_save(monkeypatch, 3, KeyboardInterrupt)
    try:
        rc = main(args)
    except KeyboardInterrupt:  # not caught: the traceback a user would see
        rc = "KeyboardInterrupt"
    assert rc == 130
    err = capsys.readouterr().err.strip()
    hint = "" if resume else " without --no-resume"
    assert err == (f"qlora finetune: interrupted: the newest checkpoint is {out / 'checkpoint-2'}; run the same "
                   f"command{hint} to resume from it")
    monkeypatch.undo()
    assert main([a for a in args if a != "--no-resume"]) == 0
    assert "(2 steps in this run)" in capsys.readouterr().out


def _no_space(monkeypatch, where):
    import errno
    import os

    import safetensors.numpy
    from safetensors import SafetensorError

    if where == "safetensors":
        def full(*a, **k):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(safetensors.numpy, "save_file", full)
    else:
        def full(*a, **k):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", full)


@pytest.mark.parametrize("where", ["safetensors", "fsync"])
def test_a_full_disk_is_one_line_naming_the_file_and_the_free_space(files, tmp_path, capsys, monkeypatch, where):
    out = tmp_path / "out"
    _no_space(monkeypatch, where)
    try:
        rc = main(finetune_args(files, out, "--max-steps", "2", "--save-every", "1"))
    except Exception as e:  # not caught: the traceback a user would see
        rc = repr(e)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, (rc, err)
    assert err.startswith(f"qlora finetune: error: {out}/.checkpoint-1.")
    assert "adapter_model.safetensors: could not be written (No space left on device; " in err
    assert " MiB free there)" in err
    assert not out.exists()  # nothing half-written left behind: the folder the run made is removed again


def test_the_next_commands_printed_paste_into_a_shell(files, tmp_path, capsys):
    """Paths with spaces and quotes come out shell-quoted: each printed command splits back into the paths."""
    import shlex

    out = tmp_path / "my run's out"
    assert main(finetune_args(files, out, "--max-steps", "1")) == 0
    lines = capsys.readouterr().out.split("next:\n")[1].splitlines()
    commands = [shlex.split(line) for line in lines]
    assert commands[0] == ["qlora", "plot", str(out)]
    assert commands[1] == ["qlora", "evaluate", "--adapter", str(out), "--data", str(files["data"]), "--split",
                           "held-out"]
    assert commands[2] == ["qlora", "merge", "--adapter", str(out), "--output-dir", f"{out}-merged"]


# ---------------------------------------------------------------------------------------------- generation
def _no_generate_model_load(monkeypatch):
    import qlora_ref.model.loading

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(qlora_ref.model.loading, "load_model", refuse)


@pytest.mark.parametrize("extra,message", [
    (["--max-new-tokens", "-5"], "--max-new-tokens must be a positive integer, got -5"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer, got 0"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "2"], "--top-p must be in (0, 1]"),
    (["--top-p", "nan"], "--top-p must be in (0, 1]"),
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "  \n"], "--prompt is empty"),
])
@pytest.mark.parametrize("backend", ["ref", "gpu"], ids=["reference", "torch_backend"])
def test_generate_arguments_are_checked_before_loading(files, capsys, monkeypatch, extra, message, backend):
    _no_generate_model_load(monkeypatch)
    args = ["generate", "--model", str(files["model"]), "--prompt", "hi", "--backend", backend]
    assert main([*args, *extra]) == 2
    assert message in capsys.readouterr().err


def test_generate_without_a_question_on_stdin_says_so(files, capsys, monkeypatch):
    import io

    _no_generate_model_load(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["generate", "--model", str(files["model"])]) == 2
    assert "no question on stdin: give --prompt" in capsys.readouterr().err


@pytest.fixture(scope="module")
def both_models(files):
    from qlora_gpu.prepare import load

    return {"ref": load_model(files["model"]), "gpu": load(files["model"], quant=None, lora=None, device="cpu")}


@pytest.mark.parametrize("backend", ["ref", "gpu"], ids=["reference", "torch_backend"])
@pytest.mark.parametrize("kwargs,message", [
    (dict(input_ids=[1] * 100, max_new_tokens=40), r"the prompt \(100 tokens\) and max_new_tokens \(40\) exceed the "
                                                   r"model's context of 128 tokens"),
    (dict(input_ids=[], max_new_tokens=4), "the prompt is empty"),
    (dict(input_ids=[1], max_new_tokens=-5), "max_new_tokens must be a positive integer"),
    (dict(input_ids=[1], temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(input_ids=[1], temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(input_ids=[1], temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(input_ids=[1], temperature=1.0, top_p=2.0), r"top_p must be in \(0, 1\]"),
])
def test_both_backends_check_generation_the_same_way(both_models, backend, kwargs, message):
    with pytest.raises(ValueError, match=message):
        both_models[backend].generate(**kwargs)


def test_a_prompt_longer_than_the_context_is_an_error(files, capsys):
    assert main(["generate", "--model", str(files["model"]), "--prompt", "x" * 200, "--raw"]) == 2
    assert "exceed the model's context of 128 tokens" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["ref", "gpu"], ids=["reference", "torch_backend"])
@pytest.mark.parametrize("alpha", [0.0, -16.0, float("nan"), float("inf")])
def test_qlora_linear_refuses_alpha_that_is_not_positive(backend, alpha):
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    if backend == "ref":
        from qlora_ref.lora import QLoRALinear

        make = lambda: QLoRALinear(w, 4, alpha)  # noqa: E731
    else:
        from qlora_gpu.lora import QLoRALinear

        make = lambda: QLoRALinear.from_weight(w, 4, alpha, quant_type=None)  # noqa: E731
    with pytest.raises(ValueError, match="alpha must be a finite positive number"):
        make()


def test_memory_blocksize_must_be_a_power_of_two(capsys):
    assert main(["memory", "--blocksize", "3"]) == 2
    assert "blocksize must be a power of two from 32 to 4096, got 3" in capsys.readouterr().err


@pytest.mark.parametrize("window,message", [
    ("100000", "--window must be at most the model's context of 128 tokens"),
    ("1", "--window must be an integer of at least 2 tokens, got 1"),
])
def test_reproduce_window_is_bounded_by_the_context(files, capsys, window, message):
    assert main(["reproduce", "table2", "--model", str(files["model"]), "--window", window]) == 2
    assert message in capsys.readouterr().err


def test_help_texts_promise_only_what_holds(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ".json/" not in text and "prompt/response" not in text and "truncated" not in text
    assert "longer examples are dropped whole" in text and "a .jsonl file" in text
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    assert "--overwrite" in capsys.readouterr().out


def test_quantize_into_a_non_empty_folder_needs_overwrite_and_leaves_nothing_stale(files, tmp_path, capsys):
    fresh, out = tmp_path / "fresh", tmp_path / "out"
    assert main(["quantize", str(files["model"]), str(fresh)]) == 0
    out.mkdir()
    stale = {"model-00001-of-00002.safetensors": b"old shard", "model.safetensors.index.json": b"{}",
             "chat_template.jinja": b"{{ 'stale' }}"}
    for name, data in stale.items():
        (out / name).write_bytes(data)
    capsys.readouterr()
    assert main(["quantize", str(files["model"]), str(out)]) == 2
    assert "OUT_DIR exists and is not empty" in capsys.readouterr().err
    assert all((out / name).read_bytes() == data for name, data in stale.items())  # untouched
    assert main(["quantize", str(files["model"]), str(out), "--overwrite"]) == 0
    assert not any((out / name).exists() for name in stale)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in fresh.iterdir())
    assert (out / "model.safetensors").read_bytes() == (fresh / "model.safetensors").read_bytes()
    load_model(out)


def model_with_template(files, folder, template):
    copy_model(files, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(cfg, chat_template=template)))
    return folder


def test_a_chat_template_that_never_ends_is_stopped(files, tmp_path, capsys):
    folder = model_with_template(files, tmp_path / "m", "{% for i in range(100000) %}{% for j in range(100000) %}"
                                                         "{% endfor %}{% endfor %}")
    assert main(["generate", "--model", str(folder), "--prompt", "hi"]) == 2
    assert "the chat template ran more than 1,000,000 loop iterations" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["finetune", "--model", str(folder), "--data", str(files["data"]), "--output-dir",
                     str(tmp_path / "o"), *FAST]) == 2
    assert "the chat template ran more than" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- what already held
class _Trap:
    """A pickle that, if ever unpickled, creates the file named by its argument."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_no_pickle_is_ever_loaded(files, tmp_path, capsys):
    import pickle

    sprung = tmp_path / "sprung"
    payload = pickle.dumps(_Trap(sprung))
    model = copy_model(files, tmp_path / "m")
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(payload)
    with pytest.raises(CheckpointError, match="no model.safetensors.* \\(pytorch_model.bin: PyTorch's pickle format, "
                                              "never unpickled here: unpickling can run code; safetensors only"):
        load_model(model)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.bin").write_bytes(payload)
    for config in (False, True):  # the reason is given with or without an adapter_config.json beside the pickle
        if config:
            (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
        assert main(["generate", "--model", str(files["model"]), "--adapter", str(adapter), "--prompt", "hi"]) == 2
        assert ("adapter_model.bin is PEFT's old pickle format, never unpickled here: unpickling can run code; "
                "safetensors only") in capsys.readouterr().err
    assert not sprung.exists()


def test_chat_templates_stay_sandboxed(files, tmp_path, capsys):
    folder = model_with_template(files, tmp_path / "m", "{{ ''.__class__.__mro__[1].__subclasses__() }}")
    assert main(["generate", "--model", str(folder), "--prompt", "hi"]) == 2
    assert "the chat template failed: SecurityError" in capsys.readouterr().err
