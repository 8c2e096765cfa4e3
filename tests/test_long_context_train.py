"""Packing, the chunked loss and activation offload inside the training loop, on both backends: a packed
micro-batch and the chunked loss give the trainer the loss and LoRA gradients of the plain path; packed training
resumes bit for bit; ``--packing`` / ``--loss-chunk-size`` reach the config from the command line.

Bounds as in tests/test_packing.py: float32 compute (``compute_dtype="float32"``, NF4 without double
quantization), so packed and plain differ in float32 summation order only — relative 1e-5 on the loss, 1e-4 on
the gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
from model_helpers import max_rel_err
from test_train import qa_dataset, qa_records, small_config, write_jsonl, write_tiny_model

from qlora_ref.data import batch_of, pack_examples
from qlora_ref.train.loop import n_targets, n_tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from qlora_ref.train.api import load_tokenizer

    folder = tmp_path_factory.mktemp("long") / "model"
    write_tiny_model(folder)
    tok = load_tokenizer(folder)
    return folder, qa_dataset(tok, 24, seed=0)


def grads_of(trainer) -> dict:
    if hasattr(trainer, "grads"):  # the reference sums micro-batches into its own float32 buffers
        return {k: v.copy() for k, v in trainer.grads.items()}
    return {k: g.detach().numpy().copy() for k, g in trainer.model.lora_grads().items()}


def one_micro_batch(folder, config, backend, batch, num_items):
    from qlora_ref.train.api import make_trainer

    trainer, _ = make_trainer(folder, config, backend)
    rng = np.random.default_rng(0)  # non-zero LoRA B, so every adapter gets a gradient
    trainer.load_adapter_state({k: rng.standard_normal(v.shape).astype(np.float32) * 0.05
                                for k, v in trainer.adapter_state().items()})
    loss = trainer.forward_backward(batch, num_items)
    return loss, grads_of(trainer), trainer


@pytest.mark.parametrize("backend", ["ref", "gpu"], ids=["reference", "torch_backend"])
def test_packed_and_chunked_micro_batches_give_the_plain_loss_and_gradients(tiny, backend):
    folder, data = tiny
    idx = list(range(8))
    plain = batch_of(data, idx)
    packs = pack_examples(data.lengths[idx], 128)
    packed = batch_of(data, [[idx[i] for i in p] for p in packs])
    assert packed["input_ids"].shape[0] < len(idx)  # several examples per row
    n = n_targets(plain)
    assert n_targets(packed) == n and n_tokens(packed) == n_tokens(plain)
    config = small_config(compute_dtype="float32", double_quant=False, lora_dropout=0.0)
    base_loss, base_grads, _ = one_micro_batch(folder, config, backend, plain, n)
    for name, cfg, batch in (("packed", config.replace(packing=True), packed),
                             ("chunked", config.replace(loss_chunk_size=7), plain),
                             ("packed+chunked", config.replace(packing=True, loss_chunk_size=5), packed)):
        loss, grads, _ = one_micro_batch(folder, cfg, backend, batch, n)
        assert abs(loss - base_loss) <= 1e-5 * base_loss, name
        for k in base_grads:
            assert max_rel_err(grads[k], base_grads[k]) <= 1e-4, (name, k)


def test_the_torch_backend_packs_through_variable_length_attention(tiny):
    from qlora_gpu.packing import VARLEN
    from qlora_ref.train.api import make_trainer

    folder, _ = tiny
    trainer, _ = make_trainer(folder, small_config(packing=True, activation_offload=True), "gpu")
    assert trainer.model.hf.config._attn_implementation == VARLEN
    assert trainer.model.activation_offload is not None


@pytest.mark.parametrize("pack_length", [None, 384])
def test_packed_training_resumes_bit_for_bit(tiny, tmp_path, pack_length):
    from qlora_ref.train.api import make_trainer
    from qlora_ref.train.loop import train

    folder, data = tiny
    config = small_config(max_steps=4, packing=True, loss_chunk_size=16, max_length=128, pack_length=pack_length)

    def run(out, **kw):
        trainer, _ = make_trainer(folder, config, "ref")
        return train(trainer, data, config, output_dir=out, **kw)

    full = run(tmp_path / "full")
    first = run(tmp_path / "cut", stop_after=2)
    second = run(tmp_path / "cut")
    assert first.train_losses + second.train_losses == full.train_losses
    # a step holds more examples than a padded one would: 2 rows of up to 128 (or 384) tokens per micro-batch
    assert full.log_history[0]["tokens"] > 2 * 2 * int(np.max(data.lengths)) * (3 if pack_length else 1)


def test_cli_options_reach_the_config(tmp_path, capsys, monkeypatch):
    from qlora_ref.cli import main
    from qlora_ref.train import api

    write_tiny_model(tmp_path / "model", seed=5)
    write_jsonl(tmp_path / "train.jsonl", qa_records(16, seed=0))
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.jsonl"),
                 "--output-dir", str(out), "--max-steps", "1", "--lora-r", "4", "--batch-size", "2", "--grad-accum",
                 "1", "--no-progress", "--packing", "--loss-chunk-size", "8", "--pack-length", "1024"]) == 0
    import json

    saved = json.loads((out / "train_config.json").read_text())
    assert saved["packing"] is True and saved["loss_chunk_size"] == 8 and saved["activation_offload"] is False
    assert saved["pack_length"] == 1024
    with monkeypatch.context() as m:  # refused before the model loads
        m.setattr(api, "make_trainer", lambda *a, **k: pytest.fail("the model was loaded"))
        assert main(["finetune", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.jsonl"),
                     "--output-dir", str(tmp_path / "r2"), "--max-steps", "1", "--no-progress",
                     "--activation-offload"]) == 2
    assert "--activation-offload is a GPU-backend feature" in capsys.readouterr().err
    # a field that a --no- option turns off is named as that option's absence, not as the option
    assert main(["finetune", "--backend", "gpu", "--model", str(tmp_path / "model"), "--data",
                 str(tmp_path / "train.jsonl"), "--output-dir", str(tmp_path / "r3"), "--max-steps", "1",
                 "--no-progress", "--activation-offload", "--no-gradient-checkpointing"]) == 2
    err = capsys.readouterr().err
    assert "--activation-offload" in err and "needs gradient checkpointing (drop --no-gradient-checkpointing)" in err
