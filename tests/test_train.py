"""The training loop (Algorithm 2): the recipe's config, reference and GPU backends agreeing step by step,
interrupt-and-resume continuing bit for bit, atomic checkpoints, the schedule and clipping as logged.

Tiny models are built here (a random ``LlamaConfig`` written to a tmp folder with safetensors and a byte-level
tokenizer), data are arithmetic question/answer pairs; nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import stat

import numpy as np
import pytest

from qlora_ref.data import Example, build_dataset
from qlora_ref.optim.schedule import get_lr, warmup_steps
from qlora_ref.train.checkpoint import STATE_FILE, latest_checkpoint, list_checkpoints, load_checkpoint
from qlora_ref.train.config import TrainConfig

VOCAB = 259  # 256 byte tokens + <pad> <s> </s>
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


# ---------------------------------------------------------------------------------------------- helpers
def write_tokenizer(folder) -> None:
    """A byte-level BPE tokenizer without merges (every byte one token) + <pad> <s> </s>, and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}))


def write_tiny_model(folder, arch: str = "llama", seed: int = 0, **overrides):
    """A random transformers causal LM (float32 safetensors) plus tokenizer in ``folder``; returns the model."""
    from model_helpers import make_hf_model

    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False, bos_token_id=257, eos_token_id=258,
                  pad_token_id=256)
    kwargs.update(overrides)
    model = make_hf_model(arch, seed=seed, **kwargs)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return model


def nudge_weights(folder) -> None:
    """Every weight of ``folder``'s model.safetensors times 1.01: another model of the same shapes and tokenizer."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    save_file({k: (v * np.float32(1.01)).astype(v.dtype) for k, v in tensors.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})


def qa_records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"instruction": f"what is {a} plus {b}", "output": str(a + b)} for a, b in rng.integers(0, 60, (n, 2))]


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def write_cli_run_files(root) -> None:
    """What the CLI tests train on: ``root/model`` (a tiny Llama, seed 5) and ``root/train.jsonl`` (40 records)."""
    write_tiny_model(root / "model", seed=5)
    write_jsonl(root / "train.jsonl", qa_records(40, seed=0))


def qa_dataset(tokenizer, n: int = 48, seed: int = 0):
    examples = [Example([{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}],
                        f"qa:{i}") for i, r in enumerate(qa_records(n, seed))]
    return build_dataset(examples, tokenizer, max_length=128)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, tokenizer, train dataset, held-out dataset) shared by this file's tests."""
    from qlora_ref.train.api import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny") / "model"
    write_tiny_model(folder)
    tok = load_tokenizer(folder)
    return folder, tok, qa_dataset(tok, 48, seed=0), qa_dataset(tok, 12, seed=1)


def small_config(**changes) -> TrainConfig:
    base = dict(lora_r=8, lora_alpha=16.0, lora_dropout=0.0, max_steps=20, micro_batch_size=2,
                gradient_accumulation_steps=2, learning_rate=1e-3, warmup_ratio=0.1, progress=False)
    base.update(changes)
    return TrainConfig(**base)


def run(folder, train_ds, config, backend="ref", **kwargs):
    from qlora_ref.train.api import make_trainer
    from qlora_ref.train.loop import train

    trainer, _ = make_trainer(folder, config, backend)
    return trainer, train(trainer, train_ds, config, **kwargs)


# ---------------------------------------------------------------------------------------------- config
def test_defaults_are_the_papers_recipe():
    c = TrainConfig()
    assert (c.lora_r, c.lora_alpha, c.lora_dropout, c.learning_rate) == (64, 16.0, 0.1, 2e-4)
    assert c.effective_batch_size == 16 and c.max_grad_norm == 0.3
    assert (c.optimizer, c.lr_scheduler, c.warmup_ratio) == ("paged_adamw", "constant", 0.03)
    assert (c.adam_beta2, c.weight_decay) == (0.999, 0.0)
    assert c.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert (c.quant_type, c.double_quant, c.blocksize, c.compute_dtype) == ("nf4", True, 64, "bfloat16")
    assert c.gradient_checkpointing and not c.train_on_inputs
    assert c.lora_config().scaling == 16 / 64


@pytest.mark.parametrize("field,value", [
    ("lora_r", -1), ("lora_alpha", 0.0), ("lora_dropout", 1.0), ("learning_rate", 0.0), ("learning_rate", float("nan")),
    ("micro_batch_size", 0), ("gradient_accumulation_steps", 1.5), ("max_steps", 0), ("max_grad_norm", -0.1),
    ("warmup_ratio", 1.5), ("lr_scheduler", "exponential"), ("optimizer", "sgd"), ("quant_type", "nf3"),
    ("compute_dtype", "float8"), ("blocksize", 48), ("target_modules", ("q_proj", "lm_head")), ("adam_beta2", 1.0),
    ("eval_fraction", 1.0), ("max_length", 1), ("adam_epsilon", 0.0), ("adam_epsilon", float("inf")),
    ("weight_decay", float("inf")), ("weight_decay", 1e4),
])
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError) as e:
        TrainConfig(**{field: value})
    msg = str(e.value)
    assert field in msg or repr(value) in msg or str(value) in msg


def test_config_json_round_trip_and_errors(tmp_path):
    c = TrainConfig(lora_r=8, target_modules=("q_proj", "v_proj"), optimizer="paged_adamw_32bit")
    assert c.optimizer == "paged_adamw"  # transformers' spelling is accepted and canonicalised
    p = tmp_path / "c.json"
    p.write_text(json.dumps(c.to_dict()))
    assert TrainConfig.from_json(p) == c
    p.write_text(json.dumps({"lora_r": 8, "lora_rank": 4}))
    with pytest.raises(ValueError, match="unknown TrainConfig fields.*lora_rank"):
        TrainConfig.from_json(p)
    for body, expected in ((b"{not json", "not valid JSON"), (b'{"lora_r": "\xff"}', "not valid JSON"),
                           (b"[8]", "expected a JSON object, got list")):
        p.write_bytes(body)
        with pytest.raises(ValueError, match=f"^{re.escape(str(p))}: {expected}"):
            TrainConfig.from_json(p)
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path))}: cannot be read"):
        TrainConfig.from_json(tmp_path)  # a folder, not a file


def test_adapter_config_errors_name_the_file(tmp_path):
    """adapter_config.json is read through the same reader: a broken, non-UTF-8 or non-object file is named (a
    non-UTF-8 file was an uncaught UnicodeDecodeError, a JSON list a TypeError deeper in)."""
    from qlora_ref.adapters import read_adapter_config

    path = tmp_path / "adapter_config.json"
    for body, expected in ((b"{not json", "not valid JSON"), (b'{"r": "\xff"}', "not valid JSON"),
                           (b"[8]", "expected a JSON object, got list")):
        path.write_bytes(body)
        with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: {expected}"):
            read_adapter_config(tmp_path)


def test_target_modules_given_twice_count_once_and_none_is_refused():
    """A module named twice is adapted once and recorded once, in the order first given (peft keeps a set); an
    empty list would train nothing and is refused naming the field."""
    assert TrainConfig(target_modules=("q_proj", "v_proj", "q_proj")).target_modules == ("q_proj", "v_proj")
    assert TrainConfig(target_modules=["v_proj", "v_proj"]).to_dict()["target_modules"] == ["v_proj"]
    for empty in ((), [], "", ","):
        with pytest.raises(ValueError, match="target_modules must name at least one of q_proj"):
            TrainConfig(target_modules=empty)


def test_target_modules_of_a_config_file_may_be_one_comma_separated_string(tmp_path):
    """As ``--target-modules`` takes them: "q_proj" is the module q_proj, not the letters q, _, p, r, o, j."""
    p = tmp_path / "c.json"
    for value, expected in (("q_proj", ("q_proj",)), ("q_proj, v_proj", ("q_proj", "v_proj")),
                            ("all-linear", TrainConfig().target_modules), (["k_proj"], ("k_proj",))):
        p.write_text(json.dumps({"target_modules": value}))
        assert TrainConfig.from_json(p).target_modules == expected, value
    for value in (5, [1, 2], {"q_proj": 1}, ["q_proj", None]):
        p.write_text(json.dumps({"target_modules": value}))
        with pytest.raises(ValueError, match=f"^{re.escape(str(p))}: target_modules must be a list of strings"):
            TrainConfig.from_json(p)


@pytest.mark.parametrize("alpha", [float("inf"), float("nan"), 0.0, -1.0])
def test_lora_alpha_must_be_finite_and_positive(alpha):
    with pytest.raises(ValueError, match="lora_alpha must be a finite positive number"):
        TrainConfig(lora_alpha=alpha)


# ---------------------------------------------------------------------------------------------- the loop
def test_schedule_clipping_and_accounting_in_the_log(tiny):
    folder, _, train_ds, eval_ds = tiny
    config = small_config(max_steps=6, warmup_ratio=0.5, max_grad_norm=0.05, eval_every=3,
                          lr_scheduler="constant_with_warmup")
    _, result = run(folder, train_ds, config, eval_data=eval_ds)
    log = result.log_history
    n_warm = warmup_steps(6, 0.5)
    assert [e["lr"] for e in log] == [get_lr("constant_with_warmup", s, 1e-3, 6, 0.5, n_warm) for s in range(6)]
    assert log[0]["lr"] == 0.0 and log[-1]["lr"] == 1e-3
    # the log's norm is the one before clipping: above the threshold, so clipping is in play (that it is applied:
    # test_the_reference_step_applies_the_gradient_clipped_to_max_grad_norm)
    assert all(e["grad_norm"] > 0.05 for e in log[1:])
    assert [("eval_loss" in e) for e in log] == [False, False, True, False, False, True]
    assert math.isclose(log[-1]["eval_perplexity"], math.exp(log[-1]["eval_loss"]))
    assert 0 < log[0]["tokens"] < log[1]["tokens"] < log[-1]["tokens"]  # cumulative non-padding tokens
    assert result.train_losses == [e["loss"] for e in log]


def _run_recording_optimizer_steps(tiny, config):
    """Train ``config`` on the reference backend, recording what the loop passes to each ``optimizer_step`` (the
    arguments, the gradients as accumulated, the adapters before and after, the returned norm); the step itself
    is the backend's own."""
    from qlora_ref.train.api import make_trainer
    from qlora_ref.train.loop import train

    folder, _, train_ds, _ = tiny
    trainer, _ = make_trainer(folder, config, "ref")
    optimizer_step, steps = trainer.optimizer_step, []

    def recording_optimizer_step(lr, max_grad_norm):
        seen = {"args": (lr, max_grad_norm), "grads": {k: g.copy() for k, g in trainer.grads.items()},
                "before": trainer.adapter_state()}
        seen["norm"] = optimizer_step(lr, max_grad_norm)
        seen["after"] = trainer.adapter_state()
        steps.append(seen)
        return seen["norm"]

    trainer.optimizer_step = recording_optimizer_step
    train(trainer, train_ds, config)
    return steps


def test_the_optimizer_is_given_the_scheduled_lr_and_the_clip_threshold(tiny):
    """The log's lr is the loop's own variable, and its grad_norm the pre-clip norm: neither shows what reached the
    optimizer. A constant lr (warmup and decay lost) or no clipping trained without any test noticing. Exact: the
    loop calls the same ``get_lr`` with the same arguments."""
    config = small_config(max_steps=4, warmup_ratio=0.5, max_grad_norm=0.05, lr_scheduler="cosine")
    steps = _run_recording_optimizer_steps(tiny, config)
    n_warm = warmup_steps(4, 0.5)
    expected = [(get_lr("cosine", s, 1e-3, 4, 0.5, n_warm), 0.05) for s in range(4)]
    assert [s["args"] for s in steps] == expected
    assert expected[0][0] == 0.0 and 0 < expected[-1][0] < 1e-3  # warmup from 0, then decay


def test_the_reference_step_applies_the_gradient_clipped_to_max_grad_norm(tiny):
    """Each step's adapters equal a fresh AdamW's, fed the step's accumulated gradients clipped by hand to the
    config's max_grad_norm at the scheduled lr. Exact: the same NumPy calls in the same order on the same arrays
    (``clip_grad_norm``'s float32 coefficient, then AdamW). Unclipped gradients differ from step 2 on, where the
    clip factors of the steps differ and so m/sqrt(v) changes."""
    from qlora_ref.optim import AdamW, grad_norm

    c = 0.05
    config = small_config(max_steps=4, warmup_ratio=0.5, max_grad_norm=c, lr_scheduler="cosine", optimizer="adamw")
    steps = _run_recording_optimizer_steps(tiny, config)
    n_warm = warmup_steps(4, 0.5)
    optimizer = AdamW(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                      weight_decay=config.weight_decay)
    params = {k: v.copy() for k, v in steps[0]["before"].items()}
    factors = []
    for s, seen in enumerate(steps):
        grads = seen["grads"]
        norm = grad_norm(grads)
        assert seen["norm"] == norm  # the pre-clip norm
        factor = min(np.float32(np.float32(c) / (np.float32(norm) + np.float32(1e-6))), np.float32(1.0))
        factors.append(float(factor))
        optimizer.lr = get_lr("cosine", s, config.learning_rate, 4, 0.5, n_warm)
        optimizer.step(params, {k: g * factor for k, g in grads.items()})
        assert params.keys() == seen["after"].keys()
        for name in params:
            np.testing.assert_array_equal(seen["after"][name], params[name], err_msg=f"step {s + 1}: {name}")
    assert len(set(factors[1:])) > 1 and max(factors[1:]) < 1  # clipping acted, by different factors


@pytest.mark.parametrize("backend", ["ref", "gpu"])
def test_a_non_finite_gradient_stops_the_run_before_it_reaches_the_adapters(tiny, backend):
    """One gradient element overflows at step 2 (the loss stays finite): the run stops naming the norm, and the
    adapters in memory are still step 1's (the step was applied before the check; clipping then scaled every
    gradient by inf * 0 and Adam moved the adapters with its old momentum, one of them to NaN)."""
    from qlora_ref.train.api import make_trainer
    from qlora_ref.train.loop import TrainingDivergedError, train

    folder, _, train_ds, _ = tiny
    config = small_config(max_steps=3)
    trainer, _ = make_trainer(folder, config, backend)
    forward_backward, optimizer_step, calls, before = trainer.forward_backward, trainer.optimizer_step, [], {}

    def overflowing(batch, num_items):
        loss = forward_backward(batch, num_items)
        calls.append(1)
        if len(calls) == 3:  # the first micro-batch of step 2
            if backend == "ref":
                next(iter(trainer.grads.values())).flat[0] = np.inf
            else:
                next(iter(trainer.params.values())).grad.view(-1)[0] = float("inf")
        return loss

    def step(lr, max_grad_norm):
        before.update(trainer.adapter_state())
        return optimizer_step(lr, max_grad_norm)

    trainer.forward_backward, trainer.optimizer_step = overflowing, step
    with pytest.raises(TrainingDivergedError, match=r"^step 2: training diverged \(the gradient norm is"):
        train(trainer, train_ds, config)
    after = trainer.adapter_state()
    assert after.keys() == before.keys()
    for name in after:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_training_lowers_the_loss(tiny):
    folder, _, train_ds, eval_ds = tiny
    from qlora_ref.train.loop import evaluate

    config = small_config(max_steps=15)
    trainer, _ = run(folder, train_ds, config.replace(max_steps=1), eval_data=None)  # only to build
    before = evaluate(trainer, eval_ds, 4)["eval_loss"]
    _, result = run(folder, train_ds, config, eval_data=eval_ds)
    assert result.eval["eval_loss"] < before - 0.5, (before, result.eval)


class _CountingBackend:
    """A backend whose held-out "loss" of a batch is the sum of its target label ids (integers, so every sum of
    them is exact in float64) with the batch's target count; it records the batches it is given."""

    def __init__(self, world=None):
        self.world, self.seen = world, []

    def eval_loss(self, batch):
        from qlora_ref.loss import count_targets

        self.seen.append(batch["labels"])
        targets = batch["labels"][:, 1:]
        return float(targets[targets != -100].sum()), count_targets(batch["labels"])


class _FakeRank:
    """Rank ``rank`` of 2 (the interface of ``loop.SingleProcess``), one process: ``sum`` records what this rank
    contributes and adds the other rank's ``theirs``, as an all-reduce would."""

    world_size = 2

    def __init__(self, rank, theirs):
        self.rank, self.theirs, self.mine = rank, theirs, None

    def sum(self, values):
        self.mine = list(values)
        return [a + b for a, b in zip(values, self.theirs, strict=True)]

    def barrier(self):
        pass


def test_sharded_evaluation_of_an_odd_number_of_batches_equals_one_process(tiny):
    """3 batches over 2 ranks: rank 1 runs a repeat of batch 0 to keep step with rank 0, and must not count it.
    Every other sharded test divides evenly, so counting the repeat went unnoticed (an eval_loss biased towards
    batch 0, too many eval_targets). Exact: integer-valued float sums."""
    from qlora_ref.train.loop import evaluate

    _, _, _, eval_ds = tiny
    batch_size = 5  # 12 examples: batches of 5, 5, 2
    single = evaluate(_CountingBackend(), eval_ds, batch_size)
    first = [_FakeRank(r, [0.0, 0]) for r in range(2)]  # what each rank contributes
    backends = [_CountingBackend(w) for w in first]
    for b in backends:
        evaluate(b, eval_ds, batch_size)
    assert [len(b.seen) for b in backends] == [2, 2]  # the same number of forward passes on every rank
    np.testing.assert_array_equal(backends[1].seen[1], backends[0].seen[0])  # rank 1's repeat of batch 0
    targets = [y[1:][y[1:] != -100] for y in eval_ds.labels]  # per example: independent of the batching
    expected = [float(sum(t.sum() for t in targets)), sum(t.size for t in targets)]
    assert [first[0].mine[k] + first[1].mine[k] for k in range(2)] == expected
    assert single["eval_targets"] == expected[1] and single["eval_loss"] == expected[0] / expected[1]
    results = [evaluate(_CountingBackend(_FakeRank(r, first[1 - r].mine)), eval_ds, batch_size) for r in range(2)]
    assert results == [single, single]


def test_evaluate_max_batches_counts_exactly_the_first_batches(tiny):
    """``max_batches`` (the recipe's eval_batches, ``qlora evaluate --max-batches``) takes the first N batches in
    file order, no more: with N+1 the held-out numbers silently covered another subset. The count is exact integer
    counting; the loss is bit-identical to evaluating just those examples (the same calls on the same batches)."""
    from dataclasses import replace

    from qlora_ref.train.api import make_trainer
    from qlora_ref.train.loop import evaluate

    folder, _, _, eval_ds = tiny
    trainer, _ = make_trainer(folder, small_config(max_steps=1), "ref")
    first_four = replace(eval_ds, input_ids=eval_ds.input_ids[:4], labels=eval_ds.labels[:4],
                         sources=eval_ds.sources[:4])
    result = evaluate(trainer, eval_ds, batch_size=2, max_batches=2)
    assert result["eval_targets"] == sum(int((y[1:] != -100).sum()) for y in eval_ds.labels[:4])
    assert result == evaluate(trainer, first_four, batch_size=2)
    more = evaluate(_CountingBackend(), eval_ds, batch_size=2, max_batches=3)["eval_targets"]
    assert result["eval_targets"] < more  # the third batch has targets: one batch too many would show


@pytest.mark.parametrize("compute_dtype,double_quant,rel_tol", [
    # float32 compute, NF4 without double quantization (then both backends' 4-bit weights are bit-identical):
    # the backends differ only in summation order inside matrix products, a few float32 ulps (2^-23 ≈ 1.2e-7)
    # per operation; over 20 steps of a 2-layer model we allow 1e-5 (≈ 80 ulps) of the loss.
    ("float32", False, 1e-5),
    # the paper's recipe, bfloat16 compute with NF4 + double quantization: a different summation order can flip
    # one bf16 rounding (2^-8 relative) of an activation, and bitsandbytes' CPU double quantization picks a few
    # absmax codes off the exact nearest (docs/divergences.md); the loss averages hundreds of targets, so we allow one
    # bf16 ulp of the loss itself, 2^-8 relative.
    ("bfloat16", True, 2.0**-8),
])
def test_ref_and_gpu_loss_curves_agree(tiny, compute_dtype, double_quant, rel_tol):
    """Same tiny model, data and seed: the reference and the GPU backend (on CPU) give the same loss curve for
    20 optimizer steps (NF4, paged AdamW, clipping, gradient accumulation, gradient checkpointing)."""
    folder, _, train_ds, eval_ds = tiny
    config = small_config(compute_dtype=compute_dtype, double_quant=double_quant)
    ref_trainer, ref = run(folder, train_ds, config, "ref", eval_data=eval_ds)
    gpu_trainer, gpu = run(folder, train_ds, config, "gpu", eval_data=eval_ds)
    a, b = np.array(ref.train_losses), np.array(gpu.train_losses)
    assert len(a) == len(b) == 20
    assert a[-1] < a[0] - 0.5  # the curves go somewhere: agreement is not trivial
    np.testing.assert_allclose(b, a, rtol=rel_tol, atol=0)
    assert math.isclose(gpu.eval["eval_loss"], ref.eval["eval_loss"], rel_tol=rel_tol)
    # the trained adapters agree too (B starts at zero: its values are entirely learned). Bound: AdamW's update
    # lr·m̂/√v̂ is invariant to the gradient's scale, so gradients that differ by a relative δ (rel_tol, the same
    # round-off as the loss) change each update by about δ·lr, times a factor of order one (larger only where m̂
    # changes sign); B is the sum of 20 such updates, |B| ≈ lr·steps = scale, so |ΔB| ≈ c·rel_tol·scale with c of
    # order one. Measured: c <= 2.07 (bfloat16; float32 less), so c = 4.
    ra, ga = ref_trainer.adapter_state(), gpu_trainer.adapter_state()
    for k in ra:
        scale = np.abs(ra[k]).max()
        assert np.abs(ra[k] - ga[k]).max() <= 4 * rel_tol * scale, k


# the "gpu" backend runs on the CPU here (conftest skips only tests *marked* gpu where CUDA is absent)
@pytest.mark.parametrize("backend", ["ref", "gpu"], ids=["reference", "torch_backend"])
def test_interrupt_and_resume_is_bit_identical(tiny, tmp_path, backend):
    """Stop after 3 of 6 steps (checkpoint written), resume in a fresh trainer: the losses, adapters and
    optimizer state equal an uninterrupted run's bit for bit — with LoRA dropout on, so the random state counts."""
    folder, _, train_ds, eval_ds = tiny
    config = small_config(max_steps=6, lora_dropout=0.1, eval_every=2)
    full_trainer, full = run(folder, train_ds, config, backend, eval_data=eval_ds, output_dir=tmp_path / "full")
    _, first = run(folder, train_ds, config, backend, eval_data=eval_ds, output_dir=tmp_path / "cut", stop_after=3)
    assert first.step == 3 and latest_checkpoint(tmp_path / "cut").name == "checkpoint-3"
    resumed_trainer, second = run(folder, train_ds, config, backend, eval_data=eval_ds, output_dir=tmp_path / "cut")
    assert second.step == 6 and len(second.train_losses) == 3
    assert first.train_losses + second.train_losses == full.train_losses  # exact float equality
    assert second.log_history == full.log_history
    fa, ra = full_trainer.adapter_state(), resumed_trainer.adapter_state()
    assert all(np.array_equal(fa[k], ra[k]) for k in fa)
    fo, ro = full_trainer.optimizer_state(), resumed_trainer.optimizer_state()
    assert fo.keys() == ro.keys() and all(np.array_equal(np.asarray(fo[k]), np.asarray(ro[k])) for k in fo)
    # and the files: the final adapters are byte-identical
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes()


@pytest.mark.parametrize("backend,change", [("ref", dict(gradient_checkpointing=False)),
                                            ("gpu", dict(gradient_checkpointing=False)),
                                            ("gpu", dict(activation_offload=True)),
                                            ("ref", dict(loss_chunk_size=5)), ("gpu", dict(loss_chunk_size=5))],
                         ids=["ref-no-checkpointing", "gpu-no-checkpointing", "gpu-offload", "ref-chunked-loss",
                              "gpu-chunked-loss"])
def test_a_run_resumes_with_another_way_to_spend_memory(tiny, tmp_path, backend, change):
    """A run that ran out of memory resumes with checkpointing, offload or a chunked loss switched: they change
    how memory is spent, not what is computed. Recomputation and offload give the same values, so the resumed
    run is the uninterrupted one bit for bit (dropout on); chunks of the loss sum in another order: within the
    reordering of a step's ~100 float32 target terms, 100·2⁻²⁴ ≈ 6e-6 relative (measured: 4e-8), carried by
    AdamW's normalised update into the next losses at the same relative size (the chunked loss is checked against
    the whole one in tests/test_chunked_loss.py)."""
    folder, _, train_ds, _ = tiny
    config = small_config(max_steps=4, lora_dropout=0.1, compute_dtype="float32")
    _, full = run(folder, train_ds, config, backend, output_dir=tmp_path / "full")
    _, first = run(folder, train_ds, config, backend, output_dir=tmp_path / "cut", stop_after=2)
    _, second = run(folder, train_ds, config.replace(**change), backend, output_dir=tmp_path / "cut")
    assert second.step == 4 and len(second.train_losses) == 2
    if "loss_chunk_size" in change:
        np.testing.assert_allclose(second.train_losses, full.train_losses[2:], rtol=1e-5)
    else:
        assert first.train_losses + second.train_losses == full.train_losses


def test_resume_refuses_a_different_recipe(tiny, tmp_path):
    folder, _, train_ds, _ = tiny
    run(folder, train_ds, small_config(max_steps=2), output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"different settings: learning_rate=0.001 \(now 0.002\)"):
        run(folder, train_ds, small_config(max_steps=4, learning_rate=2e-3), output_dir=tmp_path)
    # max_steps may grow: the run continues
    _, more = run(folder, train_ds, small_config(max_steps=4), output_dir=tmp_path)
    assert more.step == 4 and len(more.train_losses) == 2


def test_a_new_length_on_resume_warns_where_the_schedule_depends_on_it(tiny, tmp_path):
    """max_steps may grow on resume, but cosine (and any warmup) is a function of it: the learning rate jumps at the
    resumed step, which is said; the constant schedule does not depend on it and says nothing."""
    import warnings

    folder, _, train_ds, _ = tiny
    for schedule, warned in (("cosine", True), ("constant", False)):
        out = tmp_path / schedule
        run(folder, train_ds, small_config(max_steps=2, lr_scheduler=schedule), output_dir=out)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run(folder, train_ds, small_config(max_steps=4, lr_scheduler=schedule), output_dir=out)
        said = [str(w.message) for w in caught if "max_steps changed from 2 to 4" in str(w.message)]
        assert bool(said) is warned, (schedule, said)
        assert not said or "from step 3 on" in said[0]


def test_one_run_at_a_time_writes_a_folder(tiny, tmp_path):
    """A second run in a folder another holds is refused before it tidies or resumes anything, naming the holder;
    a lock file a killed run left (the kernel released its lock) is no obstacle, and a finished run removes it."""
    pytest.importorskip("fcntl", reason="advisory locks (flock) are POSIX; elsewhere runs go unlocked (documented)")
    from qlora_ref.train.checkpoint import LOCK_FILE, run_lock

    folder, _, train_ds, _ = tiny
    with run_lock(tmp_path):  # flock locks are per open file: this process's second open is refused too
        with pytest.raises(ValueError, match=rf"another qlora run is writing this folder \(process {os.getpid()}\)"):
            run(folder, train_ds, small_config(max_steps=1), output_dir=tmp_path)
        assert not list(tmp_path.glob("checkpoint-*"))
    assert not (tmp_path / LOCK_FILE).exists()
    (tmp_path / LOCK_FILE).write_text("12345")
    _, result = run(folder, train_ds, small_config(max_steps=1), output_dir=tmp_path)
    assert result.step == 1 and not (tmp_path / LOCK_FILE).exists()


def test_checkpoints_are_atomic_and_pruned(tiny, tmp_path, monkeypatch):
    folder, _, train_ds, _ = tiny
    config = small_config(max_steps=6, save_every=2, keep_checkpoints=2)
    run(folder, train_ds, config, output_dir=tmp_path)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 6]  # newest two kept
    ckpt = load_checkpoint(tmp_path)
    # 6 steps x 2 micro-batches = 12 of the epoch's 24 batches (48 examples, 2 per micro-batch)
    assert ckpt.step == 6 and ckpt.state["data_position"] == {"epoch": 0, "batch": 12}
    assert set(ckpt.optimizer_state) and all(k.startswith("model.layers.") for k in ckpt.optimizer_state)
    # readable as any folder and file its user makes (mkdtemp and mkstemp alone would make them owner-only)
    umask = os.umask(0)
    os.umask(umask)
    for path in (tmp_path / "checkpoint-6", *(tmp_path / "checkpoint-6").iterdir()):
        assert stat.S_IMODE(path.stat().st_mode) == (0o777 if path.is_dir() else 0o666) & ~umask, path

    # a crash while writing the next checkpoint leaves the previous ones intact and no partial folder behind
    import qlora_ref.train.checkpoint as cp

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(cp, "atomic_write_json", crash)
    with pytest.raises(OSError, match="disk full"):
        run(folder, train_ds, config.replace(max_steps=8), output_dir=tmp_path)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 6]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temporary folders removed
    assert (tmp_path / "checkpoint-6" / STATE_FILE).is_file()


def test_corrupt_checkpoint_gives_a_clear_error(tiny, tmp_path):
    folder, _, train_ds, _ = tiny
    run(folder, train_ds, small_config(max_steps=1), output_dir=tmp_path)
    (tmp_path / "checkpoint-1" / "optimizer.safetensors").write_bytes(b"garbage")
    # the marker's checksum names it first (before anything reads it), and says what to do
    with pytest.raises(ValueError, match=r"optimizer.safetensors: its content changed since it was written .* "
                                         r"Start afresh \(resume=False, --no-resume\) in another output folder"):
        run(folder, train_ds, small_config(max_steps=2), output_dir=tmp_path)


@pytest.mark.parametrize("backend", ["ref", "gpu"], ids=["reference", "torch_backend"])
def test_gradient_checkpointing_replays_the_dropout_masks(tiny, backend):
    """With LoRA dropout on, recomputing a checkpointed block must draw the same masks as its first forward pass:
    the gradients equal those without checkpointing (float32 compute: to round-off)."""
    from qlora_ref.data import collate
    from qlora_ref.train.api import make_trainer

    folder, _, train_ds, _ = tiny
    batch = collate(train_ds.input_ids[:2], train_ds.labels[:2], train_ds.pad_token_id)
    grads = []
    for gc in (False, True):
        config = small_config(lora_dropout=0.3, compute_dtype="float32", gradient_checkpointing=gc)
        trainer, _ = make_trainer(folder, config, backend)
        rng = np.random.default_rng(1)
        trainer.load_adapter_state({k: rng.standard_normal(v.shape).astype(np.float32) * 0.1
                                    for k, v in trainer.adapter_state().items()})
        trainer.forward_backward(batch, 10)
        if backend == "ref":
            grads.append({k: v.copy() for k, v in trainer.grads.items()})
        else:
            grads.append({k: p.grad.numpy().copy() for k, p in trainer.params.items()})
    for k in grads[0]:
        scale = np.abs(grads[0][k]).max()
        assert scale > 0 and np.abs(grads[0][k] - grads[1][k]).max() <= 1e-5 * scale, k


def test_backends_agree_on_a_stored_4bit_checkpoint(tiny, tmp_path):
    """A bitsandbytes 4-bit folder (``qlora quantize``) is used as stored by both backends — double-quantized
    constants included, so here the curves agree to float32 round-off even with double quantization."""
    from qlora_ref.export import quantize_hf_folder

    folder, _, train_ds, _ = tiny
    quantize_hf_folder(folder, tmp_path / "q4")
    config = small_config(max_steps=5, compute_dtype="float32")
    _, ref = run(tmp_path / "q4", train_ds, config, "ref")
    _, gpu = run(tmp_path / "q4", train_ds, config, "gpu")
    np.testing.assert_allclose(gpu.train_losses, ref.train_losses, rtol=1e-5, atol=0)


def test_progress_shows_loss_tokens_per_second_and_memory(tiny, capsys):
    """stderr captured is not a terminal: the figures come as plain lines, no carriage-return redraws."""
    folder, _, train_ds, _ = tiny
    _, result = run(folder, train_ds, small_config(max_steps=2, progress=True))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("finetune: step")]
    assert [line.split()[2] for line in lines] == ["1/2", "2/2"] and "\r" not in err
    for field in ("loss ", "lr ", "tok/s ", "mem ", "gnorm "):
        assert field in lines[-1], field
    assert result.tokens_per_second > 0


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _KernelStream(io.StringIO):  # a Jupyter kernel's stderr: not a TTY, yet it draws the bar in place
    __module__ = "ipykernel.iostream"


@pytest.mark.parametrize("stream", [_Terminal, _KernelStream])
def test_progress_on_a_terminal_is_a_redrawn_bar(stream):
    from qlora_ref.train.progress import Progress

    out = stream()
    with Progress(3, file=out) as bar:
        for step in (1, 2, 3):
            bar.update(step, loss=1.5, lr=2e-4, tokens=10, memory=2**20, grad_norm=0.1)
    text = out.getvalue()
    assert "\r" in text and "3/3" in text and "loss=1.5000" in text and "finetune: step" not in text


def test_progress_off_a_terminal_writes_a_line_every_interval_and_the_last_step(monkeypatch):
    """One step a second for 100 steps: the first step, then one line each ``LOG_INTERVAL_S`` (30 s), and the
    last step -- a log file gets 5 lines, not 100 redraws."""
    from qlora_ref.train import progress

    clock = iter(range(10_000))
    monkeypatch.setattr(progress.time, "perf_counter", lambda: float(next(clock)))
    out = io.StringIO()
    with progress.Progress(100, file=out) as bar:
        for step in range(1, 101):
            bar.update(step, loss=1.0, lr=1e-4, tokens=8)
    steps = [line.split()[2] for line in out.getvalue().splitlines()]
    assert steps == ["1/100", "31/100", "61/100", "91/100", "100/100"]
    with progress.Progress(5, file=io.StringIO(), enabled=False) as bar:  # off: nothing written, tokens/s kept
        bar.update(1, loss=1.0, lr=1e-4, tokens=8)
    assert bar.file.getvalue() == "" and bar.tokens_per_second > 0


@pytest.mark.parametrize("state, hint", [({"backend": "gpu"}, "resume with --backend gpu,"),
                                         ({"backend": "gpu-fsdp", "world_size": 4}, "--backend gpu --nproc 4")])
def test_a_checkpoint_from_another_backend_names_the_one_to_resume_with(state, hint):
    from qlora_ref.train.checkpoint import check_rng_backend

    check_rng_backend({"backend": "ref"}, "ref")  # its own backend resumes
    with pytest.raises(ValueError, match="comes from another backend") as e:
        check_rng_backend(state, "ref")
    assert hint in str(e.value)


# ---------------------------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("backend", ["ref", "gpu"], ids=["reference", "torch_backend"])
def test_accumulated_micro_batches_equal_one_big_batch(tiny, backend):
    """Gradient accumulation (loop.py: every micro-batch's summed loss divided by the *step's* number of targets,
    ``num_items``): the gradient that reaches the optimizer after k micro-batches with unequal numbers of targets
    equals the gradient of one batch holding all of them, normalised by the same count — and the logged loss equals
    that batch's mean loss. Normalising each micro-batch by its own count (the classic accumulation bug), or by
    k times its own count, is wrong by a factor n_step/n_b or n_step/(k n_b) per micro-batch: with the counts
    here (at least 2:1 apart) that is an error of tens of percent.

    Tolerance, derived: both sides are float32 computations of the same sum over the step's token rows, in a
    different grouping (k partial sums vs one; other batch shapes, so other BLAS blockings and softmax lengths).
    Reordering a float32 sum of n terms changes it by at most about n·2⁻²⁴ times the magnitude of its terms
    (Higham's γ_n); the longest reduction in any of these gradients is over the step's n = B·T token rows (∂L/∂B =
    Σ_rows (∂L/∂P)ᵀ H), so each tensor is allowed n·2⁻²⁴·max|g| (about 1e-5 relative here; measured: at most 5·2⁻²⁴
    ·max|g|), and the loss n·2⁻²⁴ relative. B starts non-zero so that ∂L/∂A is not identically zero."""
    from qlora_ref.data import Example, build_dataset
    from qlora_ref.train.api import make_trainer
    from qlora_ref.train.loop import train

    folder, tok, _, _ = tiny
    # six answers of very different lengths: grouped by length, the three micro-batches of two get unequal counts
    answers = ["7", "12", "one two three four", "a longer answer here", "x" * 40, "y" * 47]
    ds = build_dataset([Example([{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": a}],
                                f"t:{i}") for i, a in enumerate(answers)], tok, max_length=128)
    k, m = 3, 2
    config = small_config(max_steps=1, micro_batch_size=m, gradient_accumulation_steps=k, compute_dtype="float32",
                          double_quant=False, max_grad_norm=0.0)
    trainer, _ = make_trainer(folder, config, backend)
    rng = np.random.default_rng(0)
    state = trainer.adapter_state()
    trainer.load_adapter_state({name: (rng.standard_normal(v.shape) * 0.05).astype(np.float32)
                                if "lora_B" in name else v for name, v in state.items()})

    def grads_now():
        if backend == "ref":
            return {name: g.astype(np.float64) for name, g in trainer.grads.items()}
        return {name: p.grad.detach().double().numpy().copy() for name, p in trainer.params.items()}

    def zero_grads():
        if backend == "ref":
            for g in trainer.grads.values():
                g[...] = 0
        else:
            for p in trainer.params.values():
                p.grad = None

    micro, at_step = [], {}
    forward_backward = trainer.forward_backward

    def recording_forward_backward(batch, num_items):
        micro.append(batch)
        return forward_backward(batch, num_items)

    def capturing_optimizer_step(lr, max_grad_norm):  # the gradients as the optimizer would get them; no update
        at_step.update(grads_now())
        return 1.0

    trainer.forward_backward, trainer.optimizer_step = recording_forward_backward, capturing_optimizer_step
    result = train(trainer, ds, config)
    assert len(micro) == k
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in micro]  # next-token targets, counted here
    assert max(counts) >= 2 * min(counts) > 0, counts
    n_step = sum(counts)

    t = max(b["input_ids"].shape[1] for b in micro)  # one batch of all the examples, right-padded to the longest
    fills = {"input_ids": ds.pad_token_id, "attention_mask": 0, "labels": -100}
    big = {key: np.concatenate([np.pad(b[key], ((0, 0), (0, t - b[key].shape[1])), constant_values=fill)
                                for b in micro]) for key, fill in fills.items()}
    zero_grads()
    big_loss = forward_backward(big, n_step)
    expected = grads_now()

    n_rows = big["input_ids"].size
    assert abs(result.train_losses[0] - big_loss) <= n_rows * 2.0**-24 * abs(big_loss)
    assert expected.keys() == at_step.keys()
    assert any("lora_A" in name and np.abs(g).max() > 0 for name, g in expected.items())
    for name, g in expected.items():
        np.testing.assert_allclose(at_step[name], g, rtol=0, atol=n_rows * 2.0**-24 * np.abs(g).max(),
                                   err_msg=name)


def test_the_training_seed_is_bounded_so_every_backend_takes_it(capsys, monkeypatch):
    """A seed above 2**32-1 was accepted, and on the torch backend with dropout failed at the first step, after the
    model load ('Overflow when unpacking long long': seed x 1,000,003 left torch's 64 bits); it is refused at once,
    by the option's name."""
    from qlora_ref.cli import main
    from qlora_ref.model.config import LoraConfig
    from qlora_ref.model.linear import lora_seed

    assert TrainConfig(seed=2**32 - 1).seed == 2**32 - 1
    assert lora_seed(LoraConfig(seed=2**32 - 1), 10**6, "down_proj") < 2**64  # torch.Generator.manual_seed's range
    with pytest.raises(ValueError, match=r"seed must be an integer from 0 to 2\*\*32-1 = 4294967295, got 4294967296"):
        TrainConfig(seed=2**32)
    import qlora_ref.train.api as api

    monkeypatch.setattr(api, "make_trainer", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["finetune", "--model", "m", "--data", "d.jsonl", "--output-dir", "o", "--seed", str(2**63)]) == 2
    assert "--seed must be an integer from 0 to 2**32-1" in capsys.readouterr().err
