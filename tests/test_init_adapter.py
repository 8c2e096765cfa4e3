"""Training that starts from a trained adapter (``TrainConfig.init_adapter``, ``qlora finetune --init-adapter``):
on the same backend, across backends (reference -> gpu), through a resume, and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_train import qa_records, write_cli_run_files, write_jsonl

from qlora_ref.adapters import read_adapter_files
from qlora_ref.cli import main
from qlora_ref.model.config import LINEAR_MODULES
from qlora_ref.train.api import evaluate_model, finetune, make_trainer
from qlora_ref.train.config import TrainConfig
from qlora_ref.train.init_adapter import load_init_adapter

RECIPE = dict(lora_r=4, lora_alpha=8.0, micro_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-3,
              quant_type="nf4", progress=False, eval_fraction=0.0)
BACKENDS = ["ref", pytest.param("gpu", marks=pytest.mark.filterwarnings("ignore::UserWarning"))]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model, its data, one record of it alone, and an adapter the reference trained on it for 3 steps."""
    root = tmp_path_factory.mktemp("init")
    write_cli_run_files(root)
    write_jsonl(root / "one.jsonl", qa_records(1, seed=3))
    finetune(root / "model", root / "train.jsonl", TrainConfig(**RECIPE, max_steps=3), output_dir=root / "adapter")
    return root


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_adapters_start_as_the_init_adapters_weights(trained, backend):
    config = TrainConfig(**RECIPE, init_adapter=str(trained / "adapter"))
    trainer, _ = make_trainer(trained / "model", config, backend)
    fresh = trainer.adapter_state()
    load_init_adapter(trainer, config)
    weights, _ = read_adapter_files(trained / "adapter")
    loaded = trainer.adapter_state()
    assert set(loaded) == {k.removeprefix("base_model.model.") for k in weights}
    for key, value in weights.items():  # float32 on both sides: copied bit for bit
        np.testing.assert_array_equal(loaded[key.removeprefix("base_model.model.")], value)
    assert any(not np.array_equal(fresh[k], loaded[k]) for k in loaded)  # not LoRA's own init (B = 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_first_step_trains_from_the_init_adapter(trained, tmp_path, backend):
    """One example, one micro-batch, no dropout: the first step's loss is that example's loss under the model the
    step starts from — the base model with the init adapter (``evaluate_model``'s), not the base model alone."""
    one = dict(RECIPE, micro_batch_size=1, gradient_accumulation_steps=1, lora_dropout=0.0,
               gradient_checkpointing=False)
    config = TrainConfig(**one, max_steps=1, init_adapter=str(trained / "adapter"))
    run = finetune(trained / "model", trained / "one.jsonl", config, backend=backend, output_dir=tmp_path / "run")
    with_adapter = evaluate_model(trained / "model", trained / "one.jsonl", TrainConfig(**one),
                                  adapter=trained / "adapter", backend=backend)["eval_loss"]
    base = evaluate_model(trained / "model", trained / "one.jsonl", TrainConfig(**one), backend=backend)["eval_loss"]
    assert run.result.train_losses[0] == pytest.approx(with_adapter, rel=1e-6)
    assert abs(with_adapter - base) > 1e-3  # the two differ enough to tell them apart
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["init_adapter"] == str(trained / "adapter")


def test_a_resumed_run_continues_from_its_checkpoint_not_the_init_adapter(trained, tmp_path):
    config = TrainConfig(**RECIPE, max_steps=4, init_adapter=str(trained / "adapter"))
    whole = finetune(trained / "model", trained / "train.jsonl", config, output_dir=tmp_path / "whole")
    finetune(trained / "model", trained / "train.jsonl", config, output_dir=tmp_path / "cut", stop_after=2)
    resumed = finetune(trained / "model", trained / "train.jsonl", config, output_dir=tmp_path / "cut")
    assert resumed.result.train_losses == whole.result.train_losses[2:]
    a, _ = read_adapter_files(tmp_path / "whole")
    b, _ = read_adapter_files(tmp_path / "cut")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_the_command_takes_the_adapters_shape_and_continues_on_the_gpu_backend(trained, tmp_path, capsys):
    out = tmp_path / "gpu-run"
    assert main(["finetune", "--backend", "gpu", "--model", str(trained / "model"), "--data",
                 str(trained / "train.jsonl"), "--output-dir", str(out), "--max-steps", "1", "--init-adapter",
                 str(trained / "adapter"), "--batch-size", "2", "--grad-accum", "2", "--no-progress"]) == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["lora_r"], saved["lora_alpha"]) == (4, 8.0)  # the adapter's, not the paper's 64 and 16
    assert saved["init_adapter"] == str((trained / "adapter").resolve())
    assert "trained to step 1" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--lora-r", "8"], "--lora-r=4 (the recipe: 8)"),
    (["--target-modules", "q_proj,v_proj"],
     f"the adapter has --target-modules={','.join(LINEAR_MODULES)} (the recipe: q_proj,v_proj)"),
])
def test_an_adapter_of_another_shape_is_refused_before_the_model_loads(trained, tmp_path, capsys, monkeypatch,
                                                                       extra, message):
    import qlora_ref.train.api as api

    monkeypatch.setattr(api, "make_trainer", lambda *a, **k: pytest.fail("the model was loaded"))
    code = main(["finetune", "--model", str(trained / "model"), "--data", str(trained / "train.jsonl"),
                 "--output-dir", str(tmp_path / "run"), "--init-adapter", str(trained / "adapter"), "--no-progress",
                 *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "--init-adapter" in err


def test_a_missing_init_adapter_is_named_by_its_option(trained, tmp_path, capsys):
    code = main(["finetune", "--model", str(trained / "model"), "--data", str(trained / "train.jsonl"),
                 "--output-dir", str(tmp_path / "run"), "--init-adapter", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == 2 and "--init-adapter" in err and "nowhere" in err
    assert not (tmp_path / "run").exists()  # refused before the output folder is made


def test_the_library_refuses_a_recipe_of_another_rank(trained):
    config = TrainConfig(**dict(RECIPE, lora_r=8), init_adapter=str(trained / "adapter"))
    with pytest.raises(ValueError, match=r"lora_r=4 \(the recipe: 8\)"):
        finetune(trained / "model", trained / "train.jsonl", config)


def _finetune_cli(trained, out, *extra) -> list[str]:
    return ["finetune", "--model", str(trained / "model"), "--data", str(trained / "train.jsonl"), "--output-dir",
            str(out), "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3", "--quant-type", "nf4",
            "--eval-fraction", "0", "--no-progress", *extra]


def test_a_config_file_and_the_option_name_the_start_adapter_alike(trained, tmp_path, capsys, monkeypatch):
    """The --config file's lora_r that differs from the adapter's is refused as the same --lora-r is (it was
    replaced by the adapter's without a word); init_adapter in the file takes the adapter's shape where nothing
    sets it (it was refused naming --init-adapter, which the user never typed) and is read relative to the file's
    folder, recorded absolute."""
    import shutil

    import qlora_ref.train.api as api

    monkeypatch.setattr(api, "make_trainer", lambda *a, **k: pytest.fail("the model was loaded"))
    recipe = tmp_path / "recipes" / "r.json"
    recipe.parent.mkdir()
    shutil.copytree(trained / "adapter", tmp_path / "recipes" / "start")
    recipe.write_text(json.dumps({"lora_r": 8}))
    assert main(_finetune_cli(trained, tmp_path / "a", "--config", str(recipe), "--init-adapter",
                              str(trained / "adapter"))) == 2
    assert "lora_r=4 (the recipe: 8)" in capsys.readouterr().err.replace("--lora-r", "lora_r")
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)  # not the file's folder
    recipe.write_text(json.dumps({"init_adapter": "start", "max_steps": 1}))
    assert main(_finetune_cli(trained, tmp_path / "b", "--config", str(recipe))) == 0
    saved = json.loads((tmp_path / "b" / "train_config.json").read_text())
    assert (saved["lora_r"], saved["lora_alpha"]) == (4, 8.0)
    assert saved["init_adapter"] == str((tmp_path / "recipes" / "start").resolve())
    recipe.write_text(json.dumps({"init_adapter": "gone"}))
    assert main(_finetune_cli(trained, tmp_path / "c", "--config", str(recipe))) == 2
    assert f"{recipe}: init_adapter: " in capsys.readouterr().err


def test_a_run_from_an_adapter_resumes_after_the_adapter_is_gone(trained, tmp_path, capsys):
    """The documented resume (the same command again) no longer needs the start adapter: the checkpoint holds
    the adapters and the recipe (it was refused: 'adapter folder does not exist')."""
    import shutil

    start = tmp_path / "start"
    shutil.copytree(trained / "adapter", start)
    command = _finetune_cli(trained, tmp_path / "run", "--init-adapter", str(start), "--save-every", "1")
    assert main([*command, "--max-steps", "1"]) == 0
    shutil.rmtree(start)
    capsys.readouterr()
    assert main([*command, "--max-steps", "2"]) == 0
    assert "trained to step 2 (1 step in this run)" in capsys.readouterr().out
    assert main(_finetune_cli(trained, tmp_path / "new", "--init-adapter", str(start), "--max-steps", "1")) == 2
    assert "adapter folder does not exist" in capsys.readouterr().err  # a new run still needs it


def test_the_output_folder_is_neither_the_start_adapter_nor_another_adapter(trained, tmp_path, capsys, monkeypatch):
    """--init-adapter DIR --output-dir DIR resumed DIR's own run (its optimizer and schedule) instead of starting
    from its adapter; a folder that holds an adapter and no checkpoint (peft's, a copy, a run whose checkpoints
    were deleted) was overwritten without a word. Both are refused before the model loads, the folder untouched."""
    import shutil

    import qlora_ref.train.api as api

    monkeypatch.setattr(api, "make_trainer", lambda *a, **k: pytest.fail("the model was loaded"))
    run = tmp_path / "run"
    shutil.copytree(trained / "adapter", run)
    assert main(_finetune_cli(trained, run, "--init-adapter", str(run), "--max-steps", "4")) == 2
    assert "is the output folder: a run there would resume that folder's own run" in capsys.readouterr().err
    for checkpoint in run.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(_finetune_cli(trained, run, "--lora-r", "8", "--max-steps", "1")) == 2
    assert f"{run}: holds an adapter (adapter_config.json) and no checkpoint" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
