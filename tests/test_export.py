"""``qlora merge`` (``qlora_ref.export.merge_adapter``) end to end on a tiny model built here, and the modes of the
files and folders every export and checkpoint writes.

Oracles: ``merge_and_export`` on the model the adapter was trained with (the merge must use the storage
``train_config.json`` records), peft's ``merge_and_unload`` on the float32 base (what merging into the original
weights means), transformers loading the folder, and the umask (what ``open`` and ``mkdir`` would give).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from test_adapters import IDS, hf_logits, randomize_adapters, rel_err
from test_train import write_tiny_model

from qlora_ref.adapters import read_adapter_files, save_adapter
from qlora_ref.cli import main
from qlora_ref.dtypes import to_numpy_dtype
from qlora_ref.export import TOKENIZER_FILES, merge_and_export
from qlora_ref.files import atomic_save_safetensors, atomic_write_bytes, temporary_folder
from qlora_ref.model import LoraConfig, QuantConfig, load_model
from qlora_ref.quantize import dequantize_4bit
from qlora_ref.train.config import TrainConfig

U = 2.0**-24  # float32's unit roundoff
#: the storage the adapter below is trained with: not the paper's, so that a merge ignoring train_config.json fails
TRAINED = dict(quant_type="fp4", blocksize=128, double_quant=False, compute_dtype="float32")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(base folder, adapter folder as ``qlora finetune`` leaves it, the adapted model)"""
    root = tmp_path_factory.mktemp("merge")
    base = root / "model"
    write_tiny_model(base, seed=7)
    model = load_model(base, quant=QuantConfig(**TRAINED), lora=LoraConfig(r=4, alpha=16.0, dropout=0.0))
    randomize_adapters(model, seed=4)
    adapter = root / "run"
    save_adapter(model, adapter, base_model_name_or_path=str(base))
    (adapter / "train_config.json").write_text(json.dumps(TrainConfig(lora_r=4, **TRAINED).to_dict()))
    return base, adapter, model


def test_merge_uses_the_storage_the_adapter_was_trained_with(run, tmp_path, capsys):
    base, adapter, model = run
    assert main(["merge", "--adapter", str(adapter), "--output-dir", str(tmp_path / "m")]) == 0
    text = capsys.readouterr().out
    assert "into fp4 weights (blocksize 128) of" in text and "train_config.json" in text
    merge_and_export(model, tmp_path / "expected")  # the model the adapter was trained in, merged directly
    got, want = load_file(tmp_path / "m" / "model.safetensors"), load_file(tmp_path / "expected" / "model.safetensors")
    assert got.keys() == want.keys() and all(got[k].dtype.name == "bfloat16" for k in got)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # the paper's NF4 is not what this adapter saw: a merge that ignored train_config.json would write other weights
    assert main(["merge", "--adapter", str(adapter), "--output-dir", str(tmp_path / "nf4"), "--quant-type", "nf4"]) == 0
    nf4 = load_file(tmp_path / "nf4" / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not np.array_equal(nf4[q], got[q])
    # transformers loads the folder, without peft, and computes what the adapted 4-bit model computes
    import transformers

    assert main(["merge", "--adapter", str(adapter), "--output-dir", str(tmp_path / "f32"), "--dtype", "float32"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "f32", dtype=torch.float32).eval()
    assert rel_err(hf_logits(hf, IDS), model.eval().forward(IDS)) < 1e-4
    assert (tmp_path / "f32" / "tokenizer.json").is_file()


def test_merge_into_the_original_weights_is_pefts_merge_and_unload(run, tmp_path):
    """``--quant-type none`` merges into the weights as stored, which is what peft's ``merge_and_unload`` does on a
    16-bit base; the default merge differs from it by the quantization error, W_q - W (docs/training.md)."""
    import peft
    import transformers

    base, adapter, model = run
    assert main(["merge", "--adapter", str(adapter), "--output-dir", str(tmp_path / "orig"), "--quant-type", "none",
                 "--dtype", "float32"]) == 0
    assert main(["merge", "--adapter", str(adapter), "--output-dir", str(tmp_path / "q"), "--dtype", "float32"]) == 0
    ours, merged_q = load_file(tmp_path / "orig" / "model.safetensors"), load_file(tmp_path / "q" / "model.safetensors")
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    unloaded = peft.PeftModel.from_pretrained(hf, adapter).merge_and_unload()
    theirs = {k: v.numpy() for k, v in unloaded.state_dict().items()}
    original = load_file(base / "model.safetensors")
    weights, cfg = read_adapter_files(adapter)
    s = cfg["lora_alpha"] / cfg["r"]
    assert ours.keys() == theirs.keys()
    n_adapted = 0
    for k in ours:
        layer = k.removesuffix(".weight")
        if f"{layer}.lora_A.weight" not in weights:
            np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
            continue
        n_adapted += 1
        a, b, w = weights[f"{layer}.lora_A.weight"], weights[f"{layer}.lora_B.weight"], original[k]
        # W + s (B A) in float32 both ways; BLAS orders the r products as it likes: r + 2 roundings per element
        bound = (cfg["r"] + 2) * U * (np.abs(w) + s * (np.abs(b) @ np.abs(a)))
        assert np.all(np.abs(ours[k] - theirs[k]) <= bound), k
        # the documented difference: merging into the trained-against weights moves each by its quantization error
        w_q = dequantize_4bit(model.named_linears()[layer].weight, "float32")
        moved = merged_q[k] - ours[k]  # exact (Sterbenz) where the two are close; else one more rounding
        assert np.all(np.abs(moved - (w_q - w)) <= 4 * U * (np.abs(merged_q[k]) + np.abs(ours[k]))), k
        assert np.abs(w_q - w).max() > 0
    assert n_adapted == 14


@pytest.mark.parametrize("argv, message", [
    (["--quant-type", "nf3"], "--quant-type must be one of trained, none, nf4"),
    (["--dtype", "int8"], "dtype must be 'bfloat16', 'float16' or 'float32'"),
    (["--model", "/nonexistent/model"], "/nonexistent/model: no such model file or folder (--model)"),
])
def test_merge_refuses_bad_arguments_before_loading(run, tmp_path, capsys, argv, message):
    _, adapter, _ = run
    out = tmp_path / "m"
    assert main(["merge", "--adapter", str(adapter), "--output-dir", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_merge_needs_a_base_it_can_find_and_a_fresh_folder(run, tmp_path, capsys):
    base, adapter, _ = run
    moved = tmp_path / "elsewhere"  # an adapter whose base_model_name_or_path is not a path on this machine
    moved.mkdir()
    for name in ("adapter_model.safetensors", "train_config.json"):
        (moved / name).write_bytes((adapter / name).read_bytes())
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps(dict(cfg, base_model_name_or_path="org/some-hub-model")))
    assert main(["merge", "--adapter", str(moved), "--output-dir", str(tmp_path / "m")]) == 2
    assert "'org/some-hub-model', which is not a path on this machine; give the base model (--model)" in (
        capsys.readouterr().err)
    assert main(["merge", "--adapter", str(moved), "--model", str(base), "--output-dir", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    # not into a folder that holds something, unless --overwrite; never into the base model or the adapter
    assert main(["merge", "--adapter", str(adapter), "--output-dir", str(tmp_path / "m")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    for target in (base, adapter):
        assert main(["merge", "--adapter", str(adapter), "--output-dir", str(target), "--overwrite"]) == 2
        assert "must differ from" in capsys.readouterr().err


def test_overwrite_leaves_nothing_of_the_old_model(run, tmp_path):
    """A stale shard index would make transformers load the old weights; stale tokenizer files would be read with
    the new model's."""
    import transformers

    base, adapter, model = run
    out = tmp_path / "m"
    out.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model.safetensors.index.json", "merges.txt", "notes.md"):
        (out / name).write_text("{}")
    assert main(["merge", "--adapter", str(adapter), "--output-dir", str(out), "--overwrite", "--dtype",
                 "float32"]) == 0
    tokenizer = {n for n in TOKENIZER_FILES if (base / n).is_file()}  # copied from the base folder
    assert {"tokenizer.json", "generation_config.json"} <= tokenizer and "merges.txt" not in tokenizer
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "notes.md", *tokenizer}
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert rel_err(hf_logits(hf, IDS), model.eval().forward(IDS)) < 1e-4


def test_overwrite_refuses_an_adapter_or_run_folder(run, tmp_path, capsys):
    """``qlora merge --adapter run/checkpoint-4 --output-dir run --overwrite`` deleted the run's final
    adapter_model.safetensors and left adapter_config.json beside the merged weights (transformers then takes the
    folder for an adapter whose weights are gone); such folders are refused, untouched."""
    import shutil

    base, adapter, _ = run
    folder = tmp_path / "run"
    shutil.copytree(adapter, folder)
    shutil.copytree(adapter, folder / "checkpoint-4")
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert main(["merge", "--adapter", str(folder / "checkpoint-4"), "--model", str(base), "--output-dir",
                 str(folder), "--overwrite"]) == 2
    assert f"{folder}: the output folder holds adapter_config.json" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    runs = tmp_path / "runs"  # a run folder whose adapter files are not written yet: its checkpoints
    (runs / "checkpoint-2").mkdir(parents=True)
    assert main(["merge", "--adapter", str(adapter), "--output-dir", str(runs), "--overwrite"]) == 2
    assert "holds checkpoint folders (a qlora finetune run)" in capsys.readouterr().err


def test_a_merge_stopped_midway_leaves_no_loadable_folder(run, tmp_path, monkeypatch):
    """config.json goes last: a write killed after the new weights left them under the old folder's config.json,
    which transformers loaded without a word (relative error 0.46); now the folder has no config.json."""
    import qlora_ref.export as export

    base, adapter, _ = run
    out = tmp_path / "m"
    assert main(["merge", "--adapter", str(adapter), "--output-dir", str(out), "--dtype", "float32"]) == 0
    old = (out / "config.json").read_text()
    written = []

    def stop_at_config(path, obj):  # the process dies as config.json would be written
        if Path(path).name == "config.json":
            raise KeyboardInterrupt
        written.append(Path(path).name)
        return atomic_write_json(path, obj)

    atomic_write_json = export.atomic_write_json
    monkeypatch.setattr(export, "atomic_write_json", stop_at_config)
    cfg = json.loads(old)
    monkeypatch.setattr(export.ModelConfig, "to_hf_dict", lambda self: dict(cfg, rms_norm_eps=0.5))
    with pytest.raises(KeyboardInterrupt):
        export.merge_and_export(load_model(base), out, "float32", tokenizer_source=base)
    assert (out / "model.safetensors").is_file() and not (out / "config.json").exists()
    with pytest.raises(ValueError, match="Unrecognized model"):  # transformers finds no config.json to read
        __import__("transformers").AutoModelForCausalLM.from_pretrained(out)
    with pytest.raises(ValueError, match="no config.json"):
        load_model(out)


def test_merge_on_the_torch_backend_writes_the_same_folder(run, tmp_path):
    base, adapter, _ = run
    for backend in ("ref", "gpu"):
        assert main(["merge", "--adapter", str(adapter), "--output-dir", str(tmp_path / backend), "--backend",
                     backend, "--quant-type", "none"]) == 0
    ref, gpu = load_file(tmp_path / "ref" / "model.safetensors"), load_file(tmp_path / "gpu" / "model.safetensors")
    assert ref.keys() == gpu.keys()
    for k in ref:  # bfloat16 of W + s B A: the float32 sums may differ in order, so by one bfloat16 rounding at most
        a, b = ref[k].astype(np.float32), gpu[k].astype(np.float32)
        assert np.all(np.abs(a - b) <= 2.0**-8 * np.abs(a)), k


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_written_files_and_folders_get_the_umask_mode(tmp_path, umask_027):
    """``mkstemp`` and ``mkdtemp`` make owner-only files and folders; what we write gets what ``open`` and ``mkdir``
    would give (here 0o640 and 0o750), so a model folder on a shared disk is readable by the group."""
    atomic_write_bytes(tmp_path / "a.json", b"{}")
    atomic_save_safetensors({"x": np.zeros(3, to_numpy_dtype("float32"))}, tmp_path / "t.safetensors")
    folder = temporary_folder(tmp_path, prefix=".ckpt.", suffix=".tmp")
    with open(tmp_path / "plain", "w"):
        pass
    (tmp_path / "plain_dir").mkdir()
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "a.json") == mode(tmp_path / "t.safetensors") == mode(tmp_path / "plain") == 0o640
    assert mode(folder) == mode(tmp_path / "plain_dir") == 0o750
    np.testing.assert_array_equal(load_file(tmp_path / "t.safetensors")["x"], np.zeros(3, np.float32))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp") and p != folder]  # nothing left behind


def test_safetensors_metadata_is_written_in_sorted_order(tmp_path):
    """safetensors writes ``__metadata__`` from a hash map whose order changes between processes, so two writes of
    the same adapter (its format and base-model fingerprint) differed in bytes; ours sorts the keys in place. Six
    keys: a random order is the sorted one once in 720 writes."""
    import json
    import struct

    from safetensors import safe_open

    meta = {k: f"value {k}" for k in ("format", "qlora.base_model_fingerprint", "b", "a", "é", "z")}
    path = tmp_path / "m.safetensors"
    atomic_save_safetensors({"w": np.arange(4, dtype=np.float32), "v": np.ones(2, np.float32)}, path, metadata=meta)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert list(json.loads(raw[8:8 + n])["__metadata__"]) == sorted(meta)
    with safe_open(str(path), framework="numpy") as f:  # still a valid file with the same content
        assert f.metadata() == meta and f.get_tensor("w").tolist() == [0, 1, 2, 3]


def test_a_failed_merge_or_quantize_leaves_no_empty_folder(run, tmp_path, capsys):
    """docs/reliability.md: a run refused or failed before it wrote anything leaves no empty output folder — the
    folders the call created are removed again (as ``qlora finetune`` does); a folder that existed is kept."""
    import shutil

    base, adapter, _ = run
    bad = tmp_path / "bad"
    shutil.copytree(base, bad)
    (bad / "config.json").write_text("{bad")  # refused when the model loads, after the output folder was checked
    backends = ["ref"] + (["gpu"] if _has_bitsandbytes() else [])
    for backend in backends:
        out = tmp_path / "new" / backend / "m"
        assert main(["merge", "--adapter", str(adapter), "--model", str(bad), "--output-dir", str(out),
                     "--backend", backend, "--no-progress"]) == 2
        assert f"{bad / 'config.json'}: not valid JSON" in capsys.readouterr().err
        assert not (tmp_path / "new").exists(), backend
    kept = tmp_path / "kept"
    kept.mkdir()
    assert main(["merge", "--adapter", str(adapter), "--model", str(bad), "--output-dir", str(kept)]) == 2
    assert kept.is_dir()
    # quantize: an already quantized folder is refused after OUT_DIR was checked
    assert main(["quantize", str(base), str(tmp_path / "q")]) == 0
    capsys.readouterr()
    assert main(["quantize", str(tmp_path / "q"), str(tmp_path / "new" / "q2")]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert main(["quantize", str(bad), str(tmp_path / "new" / "q3")]) == 2
    assert f"{bad / 'config.json'}: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def test_merge_progress_follows_no_progress_and_the_log_file_rule(run, tmp_path, capsys):
    """``--no-progress`` hides every bar, the GPU loader's too; otherwise, where stderr is not a terminal (here:
    captured), progress comes as plain lines with the total, as training's does (docs/training.md), never as
    tqdm's carriage-return bars."""
    _, adapter, _ = run
    assert main(["merge", "--adapter", str(adapter), "--output-dir", str(tmp_path / "quiet"), "--backend", "gpu",
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "quantizing layers" not in err and "merge:" not in err
    n = len(load_file(tmp_path / "quiet" / "model.safetensors"))
    for backend in ("ref", "gpu"):
        assert main(["merge", "--adapter", str(adapter), "--output-dir", str(tmp_path / backend), "--backend",
                     backend]) == 0
        err = capsys.readouterr().err
        assert "\r" not in err
        assert f"merge: tensor 1/{n} (" in err and f"merge: tensor {n}/{n} (" in err, err
        assert "quantizing layers: layer 2/2 (" in err, err  # the loader's bar, on either backend


def test_merge_bar_on_a_terminal_has_a_total(run, tmp_path, monkeypatch):
    import io
    import sys

    _, _, model = run

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    merge_and_export(model, tmp_path / "m", progress=True)
    n = len(load_file(tmp_path / "m" / "model.safetensors"))
    assert f"| {n}/{n} [" in term.getvalue(), term.getvalue()
