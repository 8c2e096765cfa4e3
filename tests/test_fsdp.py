"""Sharded QLoRA with FSDP2 (qlora_gpu.fsdp, qlora_gpu.fsdp_train) against one process, on the CPU: two processes
on one machine with the gloo backend train the same model as ``GpuTrainer`` does alone.

What the two runs share and what they do not, hence the tolerances:
- each micro-batch's forward and backward pass is the same computation on the same bits (the gathered 4-bit
  codes and scales are the stored bytes; the adapters are equal while the updates are);
- the gradient of a step is the sum of the micro-batches' gradients: one process adds them one after the other
  into ``.grad``, two ranks add their own and then each other's (the reduce-scatter). With one micro-batch per
  rank both compute fl(g0 + g1), and without clipping the update is elementwise (AdamW on each shard): the runs
  are then **bit-identical** — the first test, in the paper's bfloat16 compute with NF4 + double quantization;
- with two micro-batches per rank the order differs, ((g0 + g1) + g2) + g3 against (g0 + g1) + (g2 + g3), and the
  clipping norm is summed over shards: float32 roundings, one unit in the last place (2⁻²³ relative) per
  addition, three per gradient element and step and a few in the norm. AdamW's normalisation keeps a relative
  change of the gradient a relative change of the update of the same size, so after T = 10 steps of k = 4
  micro-batches the curves may differ by about T·k·2⁻²³ ≈ 5e-6 relative: we allow 1e-5 (as tests/test_train.py
  allows for a different summation order in the matrix products) in float32 compute, and the adapters 50 times
  that of their largest value (test_train.py's rule for trained adapters).
Resume after a rank is killed is exact (same number of ranks), bit for bit, LoRA dropout on.
"""

from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover
    pytest.skip("this torch has no torch.distributed", allow_module_level=True)

from fsdp_helpers import run_ranks, train_runs  # noqa: E402
from test_train import qa_dataset, small_config, write_tiny_model  # noqa: E402

from qlora_ref.adapters import read_adapter_files  # noqa: E402
from qlora_ref.train.checkpoint import list_checkpoints, load_checkpoint  # noqa: E402

#: one micro-batch per rank, no clipping, the paper's bfloat16 compute with NF4 + double quantization: exact
EXACT = dict(max_steps=10, micro_batch_size=2, gradient_accumulation_steps=2, max_grad_norm=0.0, eval_every=5,
             compute_dtype="bfloat16")
#: two micro-batches per rank and the paper's clipping at 0.3, float32 compute: float32 reordering only
CLIPPED = dict(max_steps=10, micro_batch_size=2, gradient_accumulation_steps=4, max_grad_norm=0.3,
               compute_dtype="float32", learning_rate=3e-3)
#: EXACT with the LM head and the loss in chunks of 5 positions: the embedding and head reached outside forward()
CHUNKED = dict(EXACT, loss_chunk_size=5)
#: EXACT at rank 1: every lora_A has one row, so rank 1's shard of it is empty (FSDP2 cuts as torch.chunk does)
NARROW = dict(EXACT, lora_r=1, lora_alpha=16.0, learning_rate=3e-3)
RTOL = 1e-5
#: LoRA dropout on (random state per rank), a checkpoint every 2 steps; rank 1 is killed before step 6
RESUMED = dict(max_steps=8, micro_batch_size=2, gradient_accumulation_steps=2, lora_dropout=0.1, save_every=2,
               eval_every=4)


@pytest.fixture(scope="module")
def one_thread():
    """The test process computes its references with one thread, as each rank does (the same GEMM blocking)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama (every linear's in_features a multiple of 64) and its data."""
    from qlora_ref.train.api import load_tokenizer

    folder = tmp_path_factory.mktemp("fsdp") / "model"
    write_tiny_model(folder, intermediate_size=128)
    tok = load_tokenizer(folder)
    return folder, qa_dataset(tok, 48, seed=0), qa_dataset(tok, 12, seed=1)


@pytest.fixture(scope="module")
def single(tiny, tmp_path_factory, one_thread):
    """One process (``GpuTrainer``) in the EXACT, CLIPPED, CHUNKED and NARROW settings: (output folder, result, its
    adapters)."""
    from qlora_ref.train.api import make_trainer
    from qlora_ref.train.loop import train

    folder, train_ds, eval_ds = tiny
    found = {}
    for name, fields in (("exact", EXACT), ("clipped", CLIPPED), ("chunked", CHUNKED), ("narrow", NARROW)):
        out = tmp_path_factory.mktemp(f"single_{name}")
        config = small_config(**fields)
        trainer, _ = make_trainer(folder, config, "gpu")
        found[name] = out, train(trainer, train_ds, config, eval_data=eval_ds, output_dir=out), trainer.adapter_state()
    return found


def without_norms(log: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "grad_norm"} for e in log]


@pytest.fixture(scope="module")
def sharded(tiny, tmp_path_factory, one_thread):
    """Five two-rank runs in one launch: EXACT, the same with CPU offload, CLIPPED, CHUNKED, NARROW."""
    folder = tiny[0]
    base = tmp_path_factory.mktemp("sharded")
    runs = {"exact": dict(config=small_config(**EXACT).to_dict()),
            "offload": dict(config=small_config(**EXACT).to_dict(), cpu_offload=True),
            "clipped": dict(config=small_config(**CLIPPED).to_dict()),
            "chunked": dict(config=small_config(**CHUNKED).to_dict()),
            "narrow": dict(config=small_config(**NARROW).to_dict())}
    for name, run in runs.items():
        run["out"] = str(base / name)
    run_ranks(train_runs, 2, str(folder), list(runs.values()))
    return {name: (base / name, json.loads((base / name / "result.json").read_text())) for name in runs}


@pytest.mark.parametrize("name", ["exact", "offload", "chunked", "narrow"])
def test_two_ranks_train_bit_for_bit_as_one_process(single, sharded, name):
    one_dir, one, _ = single["exact" if name == "offload" else name]
    out, two = sharded[name]
    assert len(two["losses"]) == 10 and one.train_losses[-1] < one.train_losses[0] - 0.5  # it learns something
    assert two["losses"] == one.train_losses  # exact float equality, every step
    assert two["eval"] == one.eval  # the held-out set, shared between the ranks, summed back
    # learning rates and token counts too; the logged gradient norm is summed over shards (float32 reordering)
    assert without_norms(two["log_history"]) == without_norms(one.log_history)
    np.testing.assert_allclose([e["grad_norm"] for e in two["log_history"]],
                               [e["grad_norm"] for e in one.log_history], rtol=RTOL)
    # the files rank 0 wrote: the adapter byte for byte, the last checkpoint's optimizer state array for array
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / f).read_bytes() == (one_dir / f).read_bytes(), f
    mine, theirs = load_checkpoint(one_dir).optimizer_state, load_checkpoint(out).optimizer_state
    assert mine.keys() == theirs.keys() and all(np.array_equal(mine[k], theirs[k]) for k in mine)
    assert load_checkpoint(out).state["rng"] == {"backend": "gpu-fsdp", "world_size": 2}


def test_two_ranks_with_accumulation_and_clipping_agree_within_float32_reordering(single, sharded):
    _, one, mine = single["clipped"]
    out, two = sharded["clipped"]
    a, b = np.array(one.train_losses), np.array(two["losses"])
    assert len(b) == 10 and a[-1] < a[0] - 0.5
    np.testing.assert_allclose(b, a, rtol=RTOL, atol=0)
    norms = [e["grad_norm"] for e in two["log_history"]]
    assert max(norms) > 0.3  # the pre-clip norm passes the threshold: the ranks' clipping is in play
    np.testing.assert_allclose(norms, [e["grad_norm"] for e in one.log_history], rtol=RTOL)
    theirs = read_adapter_files(out)[0]
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert np.abs(mine[k] - theirs[k]).max() <= 50 * RTOL * np.abs(mine[k]).max(), k


@pytest.mark.parametrize("name", ["exact", "clipped"])
def test_the_adapter_two_ranks_save_loads_in_peft(tiny, single, sharded, name):
    """peft reads the two-rank adapter (PeftModel.from_pretrained on the transformers model) and holds the
    one-process run's values: bit for bit in the exact setting, within the tolerance in the clipped one."""
    import peft
    import transformers

    out, _ = sharded[name]
    mine = single[name][2]
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tiny[0]), out)
    loaded = {k.removeprefix("base_model.model."): v.detach().numpy()
              for k, v in peft.get_peft_model_state_dict(model).items()}
    assert loaded.keys() == mine.keys() and len(mine) == 2 * 7 * 2
    bound = 0.0 if name == "exact" else 50 * RTOL
    for k in mine:
        assert np.abs(loaded[k] - mine[k]).max() <= bound * np.abs(mine[k]).max(), k


def test_a_killed_rank_resumes_to_the_uninterrupted_result(tiny, tmp_path):
    """Rank 1 dies abruptly before step 6 (the launch fails, the other rank is terminated); launched again, the
    run continues from checkpoint 4 and ends where an uninterrupted two-rank run ends, bit for bit."""
    folder = tiny[0]
    config = small_config(**RESUMED).to_dict()
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_ranks(train_runs, 2, str(folder), [dict(config=config, out=str(full))])
    with pytest.raises(torch.multiprocessing.ProcessExitedException, match="exit code 17"):
        run_ranks(train_runs, 2, str(folder), [dict(config=config, out=str(cut), die_at=6)])
    assert [s for s, _ in list_checkpoints(cut)] == [2, 4] and not (cut / "adapter_model.safetensors").exists()
    run_ranks(train_runs, 2, str(folder), [dict(config=config, out=str(cut))])
    a, b = (json.loads((d / "result.json").read_text()) for d in (full, cut))
    assert b["losses"] == a["losses"][4:] and b["log_history"] == a["log_history"]
    for f in ("adapter_model.safetensors", "adapter_config.json", "log_history.json"):
        assert (full / f).read_bytes() == (cut / f).read_bytes(), f
    mine, theirs = load_checkpoint(full).optimizer_state, load_checkpoint(cut).optimizer_state
    assert all(np.array_equal(mine[k], theirs[k]) for k in mine)


def test_ranks_given_different_data_refuse_instead_of_hanging(tiny, tmp_path):
    """Rank 1 holds out 10 examples where rank 0 holds out 12: their evaluations would enter different numbers of
    collectives (a hang until gloo's 30-minute timeout). Both refuse before the first step, naming the data."""
    config = small_config(max_steps=2).to_dict()
    with pytest.raises(torch.multiprocessing.ProcessRaisedException, match="read different held-out data: rank 1"):
        run_ranks(train_runs, 2, str(tiny[0]), [dict(config=config, out=str(tmp_path), sizes={1: (48, 10)})])
    assert not list_checkpoints(tmp_path)


def test_the_same_inputs_and_resume_step_on_every_rank():
    from qlora_ref.train.loop import check_same_inputs_on_every_rank, check_same_resume_on_every_rank

    a = {"examples": 48, "tokens": 900, "sha256": "a"}
    b = dict(a, sha256="b")
    check_same_inputs_on_every_rank([(a, None), (a, None)])
    with pytest.raises(ValueError, match="different training data: rank 2 has 48 examples, 900 tokens"):
        check_same_inputs_on_every_rank([(a, a), (a, a), (b, a)])
    with pytest.raises(ValueError, match="different held-out data: rank 1 has none"):
        check_same_inputs_on_every_rank([(a, a), (a, None)])
    check_same_resume_on_every_rank([4, 4])
    with pytest.raises(ValueError, match="rank 1 from a new run, rank 0 from checkpoint-4"):
        check_same_resume_on_every_rank([4, None])


# ---------------------------------------------------------------------------------------------- one process
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_float_storage_keeps_every_byte_and_every_output(quant_type, double_quant):
    """``to_float_storage`` turns a layer's 4-bit weight into bfloat16-stored parameters (codes, scales) and a
    record: the bytes bitsandbytes reads and the layer's outputs, gradients and merged weight are unchanged."""
    from qlora_gpu.fsdp import Stored4bit, to_float_storage
    from qlora_gpu.lora import SHARDED_STATE, QLoRALinear

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(48, 128, generator=g), torch.randn(5, 128, generator=g)
    lin = QLoRALinear.from_weight(w, r=4, alpha=8.0, quant_type=quant_type, double_quant=double_quant,
                                  compute_dtype="float32", seed=3)
    with torch.no_grad():
        lin.lora_B.normal_(generator=g)
    packed, state = (t.clone() for t in (lin.frozen_weight()[0], lin.frozen_weight()[1].absmax))
    y = lin(x)
    y.square().sum().backward()
    grads, merged = [lin.lora_A.grad.clone(), lin.lora_B.grad.clone()], lin.merge()
    lin.lora_A.grad = lin.lora_B.grad = None
    to_float_storage(lin)
    assert isinstance(lin.__dict__[SHARDED_STATE], Stored4bit) and lin.quantized and lin.quant_type == quant_type
    assert lin.weight.dtype == lin.weight_absmax.dtype == torch.bfloat16 and lin.weight.shape == (48 * 128 // 4, 1)
    assert not lin.weight.requires_grad and not lin.weight_absmax.requires_grad
    now_packed, now_state = lin.frozen_weight()
    assert torch.equal(now_packed, packed) and torch.equal(now_state.absmax, state)
    assert now_state.nested == double_quant
    y2 = lin(x)
    y2.square().sum().backward()
    assert torch.equal(y2, y) and torch.equal(lin.merge(), merged)
    assert torch.equal(lin.lora_A.grad, grads[0]) and torch.equal(lin.lora_B.grad, grads[1])
    with pytest.raises(ValueError, match="storage must be a float dtype"):
        to_float_storage(QLoRALinear.from_weight(w, r=4), torch.uint8)


def one_rank_world(monkeypatch, device: str):
    """This process as the one rank of a process group on ``device`` (torchrun's environment set by hand)."""
    from fsdp_helpers import free_port

    from qlora_gpu.fsdp_train import init_distributed

    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    return init_distributed(device)


@pytest.fixture
def cpu_world(monkeypatch):
    """A gloo group of one rank."""
    yield one_rank_world(monkeypatch, "cpu")
    dist.destroy_process_group()


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_a_sharded_model_computes_the_same_logits(tiny, cpu_world, quant):
    """One rank's FSDP model (4-bit codes and scales as parameters, or float32 weights made parameters) gives the
    unsharded model's logits bit for bit; outside forward its 4-bit weight is a shard, and asking for it says so."""
    from qlora_gpu.fsdp import is_sharded, shard_model
    from qlora_gpu.prepare import load
    from qlora_ref.model.config import LoraConfig, QuantConfig

    q = QuantConfig() if quant == "nf4" else None
    build = lambda: load(tiny[0], q, LoraConfig(r=8, alpha=16.0), dtype="float32")  # noqa: E731
    plain, sharded = build(), shard_model(build(), cpu_world.mesh)
    ids = np.array([tiny[1].input_ids[0][:24]])
    plain.eval(), sharded.eval()
    with torch.no_grad():
        assert torch.equal(sharded(ids), plain(ids))
    lin = sharded.hf.model.layers[0].mlp.down_proj
    assert is_sharded(lin.weight) and is_sharded(lin.lora_A)
    if quant == "nf4":
        with pytest.raises(RuntimeError, match="4-bit weight is sharded"):
            lin.frozen_weight()
    else:
        assert "weight" not in lin._buffers


def test_resume_refuses_a_checkpoint_of_another_process_count(tiny, cpu_world, tmp_path):
    """A one-process checkpoint does not resume sharded, nor a sharded one in one process: the random state of
    each rank is in it (adapters and optimizer states would move; the generators would not)."""
    from qlora_gpu.fsdp_train import ShardedTrainer
    from qlora_ref.train.api import make_trainer
    from qlora_ref.train.loop import train

    folder, train_ds, _ = tiny
    config = small_config(max_steps=1)
    one, _ = make_trainer(folder, config, "gpu")
    train(one, train_ds, config, output_dir=tmp_path / "one")
    sharded = ShardedTrainer.from_pretrained(folder, config.replace(max_steps=2), world=cpu_world)
    with pytest.raises(ValueError, match="comes from one unsharded process"):
        train(sharded, train_ds, config.replace(max_steps=2), output_dir=tmp_path / "one")
    train(sharded, train_ds, config, output_dir=tmp_path / "sharded", resume=False)
    with pytest.raises(ValueError, match="another backend"):
        train(one, train_ds, config.replace(max_steps=2), output_dir=tmp_path / "sharded")
    with pytest.raises(ValueError, match="cannot be sharded"):
        ShardedTrainer(sharded.model, config.replace(optimizer="paged_adamw_8bit"), cpu_world)


def test_a_sharded_trainer_starts_from_an_init_adapter(tiny, cpu_world, tmp_path):
    """``init_adapter`` into a sharded model: each rank keeps its shard of the adapter's tensors, gathered whole
    they are the file's, bit for bit."""
    from qlora_gpu.fsdp_train import ShardedTrainer
    from qlora_ref.train.api import make_trainer
    from qlora_ref.train.init_adapter import load_init_adapter
    from qlora_ref.train.loop import train

    folder, train_ds, _ = tiny
    config = small_config(max_steps=1)
    one, _ = make_trainer(folder, config, "gpu")
    train(one, train_ds, config, output_dir=tmp_path / "one")
    config = config.replace(init_adapter=str(tmp_path / "one"))
    sharded = ShardedTrainer.from_pretrained(folder, config, world=cpu_world)
    load_init_adapter(sharded, config)
    weights, _ = read_adapter_files(tmp_path / "one")
    state = sharded.adapter_state()
    assert len(state) == len(weights)
    for key, value in weights.items():
        np.testing.assert_array_equal(state[key.removeprefix("base_model.model.")], value)


# ---------------------------------------------------------------------------------------------- on a GPU
@pytest.fixture
def gpu_world(monkeypatch):
    """An NCCL group of one rank."""
    yield one_rank_world(monkeypatch, "cuda")
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.parametrize("cpu_offload", [False, True], ids=["on_device", "cpu_offload"])
def test_world_size_one_on_a_gpu_trains_as_the_unsharded_trainer(tiny, tmp_path, gpu_world, cpu_offload):
    """FSDP2 over one GPU (NCCL; the all-gathers are copies) against ``GpuTrainer``, the paper's clipping on.
    On the device every operation is the unsharded run's, so the losses are bit-identical (the norm over one
    rank's shards is the norm, √(x²) rounding back to x in float32); with CPU offload the optimizer steps on the
    host (bitsandbytes' CPU update, not its CUDA kernel: a few float32 roundings apart per step), hence CLIPPED's
    tolerance, float32 compute."""
    from qlora_gpu.fsdp_train import ShardedTrainer
    from qlora_ref.train.api import make_trainer
    from qlora_ref.train.loop import train

    folder, train_ds, eval_ds = tiny
    fields = dict(CLIPPED, compute_dtype="float32") if cpu_offload else dict(EXACT, max_grad_norm=0.3)
    config = small_config(**fields)
    one, _ = make_trainer(folder, config, "gpu")
    a = train(one, train_ds, config, eval_data=eval_ds)
    sharded = ShardedTrainer.from_pretrained(folder, config, cpu_offload=cpu_offload, world=gpu_world)
    b = train(sharded, train_ds, config, eval_data=eval_ds)
    assert a.train_losses[-1] < a.train_losses[0] - 0.5
    if cpu_offload:
        np.testing.assert_allclose(b.train_losses, a.train_losses, rtol=RTOL, atol=0)
    else:
        assert b.train_losses == a.train_losses and b.eval == a.eval


# ---------------------------------------------------------------------------------------------- the command line
def finetune_args(folder, data, out, *extra) -> list[str]:
    return ["finetune", "--backend", "gpu", "--model", str(folder), "--data", str(data), "--output-dir", str(out),
            "--batch-size", "2", "--grad-accum", "2", "--lora-r", "8", "--save-every", "2", "--no-progress", *extra]


def test_nproc_reruns_the_command_under_torchrun(tiny, tmp_path, monkeypatch, capsys):
    import subprocess
    import sys

    from qlora_ref.cli import main

    calls = []

    class Launched:  # torchrun, not started
        def __init__(self, cmd, **kwargs):
            calls.append(cmd)

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Launched)
    args = finetune_args(tiny[0], tmp_path / "d.jsonl", tmp_path / "out", "--max-steps", "3")
    assert main([*args[:1], "--nproc", "2", *args[1:]]) == 0
    assert main([*args, "--nproc=3", "--cpu-offload", "--grad-accum", "3"]) == 0
    assert main([*args, "--np", "2"]) == 0  # argparse's abbreviation of --nproc is taken out too
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    assert calls == [[*launcher, "--nproc-per-node=2", "-m", "qlora_ref", *args],
                     [*launcher, "--nproc-per-node=3", "-m", "qlora_ref", *args, "--cpu-offload", "--grad-accum", "3"],
                     [*launcher, "--nproc-per-node=2", "-m", "qlora_ref", *args]]
    assert "2 processes" in capsys.readouterr().err
    # refused before torchrun starts N processes that would each load the model and refuse alike
    for bad, message in ((["--nproc", "0"], "--nproc must be a positive integer"),
                         (["--nproc", "2", "--backend", "ref"], "add --backend gpu"),
                         (["--cpu-offload"], "--cpu-offload applies to a sharded"),
                         (["--nproc", "2", "--grad-accum", "3"], "--grad-accum=3 micro-batches per step cannot be "
                                                                 "shared equally by 2 processes"),
                         (["--nproc", "2", "--optimizer", "paged_adamw_8bit"], "'paged_adamw_8bit' cannot be "
                                                                               "sharded")):
        assert main([*args, *bad]) == 2
        assert message in capsys.readouterr().err
    assert len(calls) == 3  # none of them launched
    fresh = finetune_args(tiny[0], tmp_path / "d.jsonl", tmp_path / "fresh", "--nproc", "2", "--grad-accum", "3")
    assert main(fresh) == 2 and not (tmp_path / "fresh").exists()  # nor created the output folder
    for k, v in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)
    assert main([*args, "--nproc", "2"]) == 2
    assert "under torchrun leave it out" in capsys.readouterr().err


#: the launcher of ``--nproc`` with torchrun replaced by CHILD (argv: the test's folder), which says when it runs
#: and what stopped it
LAUNCHER = """
import sys
from qlora_ref.train import launch
launch.torchrun_command = lambda n, args: [sys.executable, "-c", CHILD, FOLDER]
from qlora_ref.cli import main
sys.exit(main(ARGS))
"""
CHILD = """
import os, signal, sys, time
from pathlib import Path
folder = Path(sys.argv[1])
def stopped(signum, frame):
    (folder / "stopped").write_text(signal.Signals(signum).name)
    sys.exit(0)
signal.signal(signal.SIGTERM, stopped)
(folder / "pid").write_text(str(os.getpid()))
time.sleep(120)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_launcher_stops_torchrun(tiny, tmp_path, signum):
    """``kill`` (SIGTERM) or Ctrl-C (SIGINT) reaching the ``--nproc`` launcher alone: torchrun (a stand-in here)
    receives SIGTERM, which it passes on to its processes, and the launcher ends with the shell's status, saying
    what the run kept (were: the launcher died, torchrun and the ranks trained on without it)."""
    import subprocess
    import sys
    import time

    args = [*finetune_args(tiny[0], tmp_path / "d.jsonl", tmp_path / "out"), "--nproc", "2"]
    script = LAUNCHER.replace("CHILD", repr(CHILD)).replace("FOLDER", repr(str(tmp_path))).replace("ARGS", repr(args))
    launcher = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "pid").exists():
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.stderr.read()
            time.sleep(0.1)
        launcher.send_signal(signum)
        assert launcher.wait(timeout=60) == 128 + signum
        assert (tmp_path / "stopped").read_text() == "SIGTERM"
        assert "interrupted: no checkpoint was written" in launcher.stderr.read()
    finally:
        launcher.kill()
        if (tmp_path / "pid").exists() and not (tmp_path / "stopped").exists():
            os.kill(int((tmp_path / "pid").read_text()), signal.SIGKILL)


#: torchrun's stand-in: runs ``python -m qlora_ref ARGS`` as each rank in turn, with torchrun's environment, and
#: exits as torchrun does: 1 if any process failed, whatever its status
FAKE_TORCHRUN = """
import os, subprocess, sys
codes = [subprocess.call([sys.executable, "-m", "qlora_ref", *sys.argv[2:]],
                         env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": sys.argv[1],
                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
         for r in range(int(sys.argv[1]))]
sys.exit(1 if any(codes) else 0)
"""


def test_nproc_exits_with_the_failed_ranks_status_not_torchruns(tiny, tmp_path):
    """torchrun exits 1 whatever its processes exited with; ``--nproc``'s launcher returns the lowest failed
    rank's own status, 2 for a model the loader refuses, as the same command without ``--nproc`` does (was 1)."""
    import json
    import shutil
    import subprocess
    import sys

    from qlora_ref.cli.finetune import failed_rank_status

    model = tmp_path / "gpt2"
    shutil.copytree(tiny[0], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    args = [*finetune_args(model, tmp_path / "d.jsonl", tmp_path / "out"), "--nproc", "2"]
    script = LAUNCHER.replace("[sys.executable, \"-c\", CHILD, FOLDER]",
                              "[sys.executable, \"-c\", STAND_IN, str(n), *args]")
    script = script.replace("STAND_IN", repr(FAKE_TORCHRUN)).replace("ARGS", repr(args))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("unknown architecture model_type='gpt2'") == 2  # each rank said why
    for left, expected in (({}, 1), ({"rank-0": "0", "rank-1": "2"}, 2), ({"rank-0": "3", "rank-1": "2"}, 3)):
        folder = tmp_path / f"statuses-{len(left)}-{expected}"
        folder.mkdir()
        for name, text in left.items():
            (folder / name).write_text(text)
        assert failed_rank_status(folder, 2, 1) == expected  # none left (killed): torchrun's own status
    assert failed_rank_status(tmp_path, 2, 0) == 0


def rank_pid(output_dir, rank: int) -> int:
    """The process id of the training process of ``rank`` writing to ``output_dir`` (Linux: /proc)."""
    from pathlib import Path

    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(output_dir).encode() in cmdline and f"RANK={rank}".encode() in environ and b"--nproc" not in cmdline:
            return int(proc.name)
    raise AssertionError(f"no rank {rank} process writes to {output_dir}")


@pytest.mark.slow
def test_nproc_two_killed_then_run_again_ends_as_an_uninterrupted_run(tiny, tmp_path):
    """``qlora finetune --nproc 2`` end to end (torchrun, two fresh Python processes, gloo): rank 1 killed with
    SIGKILL after the second checkpoint (torchrun ends rank 0 and fails), the same command again continues from
    the checkpoint and writes the adapter an uninterrupted run writes, byte for byte (LoRA dropout on); one
    report, from rank 0."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from test_train import qa_records, write_jsonl

    data = tmp_path / "data.jsonl"
    write_jsonl(data, qa_records(48))
    cmd = [sys.executable, "-m", "qlora_ref"]
    extra = ["--nproc", "2", "--max-steps", "24", "--lora-dropout", "0.1"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    done = subprocess.run([*cmd, *finetune_args(tiny[0], data, full, *extra)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained to step 24") == 1  # rank 0 reports, once
    job = subprocess.Popen([*cmd, *finetune_args(tiny[0], data, cut, *extra)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    while not (cut / "checkpoint-4").is_dir() and job.poll() is None:
        time.sleep(0.05)
    os.kill(rank_pid(cut, 1), signal.SIGKILL)  # torchrun then ends the other rank and fails
    assert job.wait() != 0
    assert not (cut / "adapter_model.safetensors").exists(), "the run ended before it was killed"
    again = subprocess.run([*cmd, *finetune_args(tiny[0], data, cut, *extra)], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    steps = int(again.stdout.split("(")[1].split(" steps in this run")[0])
    assert 0 < steps < 24  # it resumed
    for f in ("adapter_model.safetensors", "adapter_config.json", "log_history.json"):
        assert (full / f).read_bytes() == (cut / f).read_bytes(), f


@pytest.mark.slow
def test_two_nodes_of_one_process_each_train_as_nproc_two(tiny, tmp_path):
    """The multi-node launch of docs/sharded.md, simulated on one machine: two ``torchrun --nnodes 2
    --nproc-per-node 1`` with a c10d rendezvous, started at once on one output folder (each node's process has
    LOCAL_RANK 0; only global rank 0 writes). The adapter equals ``--nproc 2``'s byte for byte (dropout on), and
    one report comes, from the node with rank 0."""
    import subprocess
    import sys

    from fsdp_helpers import free_port
    from test_train import qa_records, write_jsonl

    data = tmp_path / "data.jsonl"
    write_jsonl(data, qa_records(48))
    extra = ["--max-steps", "6", "--lora-dropout", "0.1"]
    single = subprocess.run([sys.executable, "-m", "qlora_ref", *finetune_args(tiny[0], data, tmp_path / "one",
                                                                               "--nproc", "2", *extra)],
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{free_port()}", "--rdzv-id", "qlora-test",
            "-m", "qlora_ref", *finetune_args(tiny[0], data, tmp_path / "two", *extra)]
    jobs = [subprocess.Popen(node, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [j.communicate(timeout=600) for j in jobs]
    assert all(j.returncode == 0 for j in jobs), [e[-2000:] for _, e in outs]
    assert sum(o.count("trained to step 6") for o, _ in outs) == 1
    for f in ("adapter_model.safetensors", "adapter_config.json", "log_history.json"):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f


# ---------------------------------------------------------------------------------------------- bench/fsdp_memory.py
def test_bench_plan_and_its_memory_run_on_the_cpu():
    """bench/fsdp_memory.py's order (the goal first, the engine's cost, then the rest of the table) and one world
    size of its memory run, in this process under the fake process group (the tiny config: a smoke run)."""
    import sys
    from pathlib import Path

    bench = str(Path(__file__).resolve().parent.parent / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import fsdp_memory

    from qlora_ref.memory_sharded import estimate_sharded_memory

    args = fsdp_memory.parse_args(["--world-sizes", "1,2,4", "--offload", "2,4"])
    if not torch.cuda.is_available():
        assert args.model == args.throughput_model == "tiny" and args.seq == 64
    order = [(j["kind"], j.get("world_size"), j.get("cpu_offload")) for j in fsdp_memory.plan(args)]
    assert order == [("memory", 2, False), ("memory", 2, True), ("throughput", None, None), ("memory", 1, False),
                     ("memory", 4, False), ("memory", 4, True)]
    if torch.cuda.is_available():
        pytest.skip("the memory run under the fake process group runs on the CPU here; the GPU runs it as a bench")
    try:
        row = fsdp_memory.memory_run("tiny", 2, False, seq=32, warmup=0, steps=1)
    finally:
        dist.destroy_process_group()
    assert row["status"] == "ok" and row["world_size"] == 2 and row["step_s"] > 0
    assert row["stamp"]["versions"]["torch"] == torch.__version__ and row["stamp"]["device"]
    shape = row["predicted"]
    assert shape["gpus"] == 2 and shape["device_bytes"] > 0
    assert shape["shards"]["adapters"] == estimate_sharded_memory(
        fsdp_memory.prediction_shape("tiny"), 2, seq=32, r=8, lora_dropout=0.05, adapter_dtype="float32",
        unquantized_dtype="bfloat16", attention="flash").shards["adapters"]

# ---------------------------------------------------------------------------------------------- audit additions


def _build(folder, **lora):
    from qlora_gpu.prepare import load
    from qlora_ref.model.config import LoraConfig, QuantConfig

    return load(folder, QuantConfig(), LoraConfig(r=8, alpha=16.0, **lora), dtype="float32")


@pytest.mark.parametrize("reshard", [True, False])
def test_reshard_after_forward_is_applied_to_every_block(tiny, cpu_world, reshard):
    """``shard_model(..., reshard_after_forward=...)`` reaches every decoder block: between a training forward pass
    and its backward pass a block's parameters are shards (True: gathered again for backward) or stay gathered
    (False: ZeRO-2, no second all-gather); after backward they are shards either way."""
    from qlora_gpu.fsdp import is_sharded, shard_model

    model = shard_model(_build(tiny[0]), cpu_world.mesh, reshard_after_forward=reshard)
    model.train()
    ids = torch.as_tensor(np.array([tiny[1].input_ids[0][:24]]))
    logits = model(ids)
    for layer in model.hf.model.layers:
        lin = layer.mlp.down_proj
        assert is_sharded(lin.weight) == reshard and is_sharded(lin.lora_A) == reshard
    logits.float().square().mean().backward()
    for layer in model.hf.model.layers:
        assert is_sharded(layer.mlp.down_proj.weight) and is_sharded(layer.mlp.down_proj.lora_A)


def test_cpu_offload_reaches_every_unit_and_unpages_the_optimizer(tiny, cpu_world):
    """``cpu_offload=True``: every FSDP unit (each block and the root) has FSDP2's CPUOffloadPolicy, and the optimizer
    is the unpaged variant of the recipe's (states in host memory, not unified memory); without it, neither."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard

    from qlora_gpu.fsdp_train import ShardedTrainer

    config = small_config(max_steps=1)  # optimizer "paged_adamw"
    for offload in (False, True):
        trainer = ShardedTrainer.from_pretrained(tiny[0], config, cpu_offload=offload, world=cpu_world)
        units = [m for m in trainer.model.modules() if isinstance(m, FSDPModule)]
        assert len(units) == 1 + len(trainer.model.hf.model.layers)
        for unit in units:
            policy = fully_shard.state(unit)._fsdp_param_group.offload_policy
            assert isinstance(policy, CPUOffloadPolicy) == offload, unit.__class__.__name__
        assert ("Paged" in trainer.optimizer.inner._cls.__name__) == (not offload)


def test_lora_dropout_seeds_rank_zero_as_one_process_other_ranks_apart(tiny, cpu_world):
    """Rank 0's LoRA dropout seeds are the one-process run's (its masks are a one-process run's), every other rank's
    are apart from them and from each other, a generator drawn before sharding does not keep the old seed, and a
    second trainer built on the same model keeps them."""
    from qlora_gpu.fsdp import shard_model
    from qlora_gpu.fsdp_train import ShardedTrainer, rank_seed

    config = small_config(max_steps=1, lora_dropout=0.1)
    one = {k: m.seed for k, m in _build(tiny[0], dropout=0.1).named_linears().items() if m.r is not None}
    assert len(set(one.values())) == len(one) > 1
    for s in one.values():
        assert rank_seed(s, 0) == s
    by_rank = [{rank_seed(s, r) for s in one.values()} for r in range(8)]
    assert len(set().union(*by_rank)) == 8 * len(one)  # no rank shares a seed with another, in no layer
    for rank in (0, 1, 3):
        model = shard_model(_build(tiny[0], dropout=0.1), cpu_world.mesh)
        lins = {k: m for k, m in model.named_linears().items() if m.r is not None}
        for m in lins.values():  # a generator made already (a forward pass before training), seeded the old way
            m._generator(torch.device("cpu"))
        cpu_world.rank = rank  # the seeds are all ShardedTrainer reads of the rank
        try:
            ShardedTrainer(model, config, cpu_world)
            ShardedTrainer(model, config, cpu_world)  # a second trainer on the model: the seeds stay (rank 2r's else)
        finally:
            cpu_world.rank = 0
        for k, m in lins.items():
            assert m.seed == rank_seed(one[k], rank) and (m.seed == one[k]) == (rank == 0), k
            assert m._generator(torch.device("cpu")).initial_seed() == m.seed, k


def test_a_non_finite_gradient_norm_leaves_the_adapters_and_optimizer_untouched(tiny, cpu_world):
    """As ``GpuTrainer``: a non-finite global norm skips the step on every rank (the loop then stops with the
    adapters of the last step, which a diverged run's message points back to)."""
    from qlora_gpu.fsdp_train import ShardedTrainer
    from qlora_ref.train.loop import batch_of

    folder, train_ds, _ = tiny
    config = small_config(max_steps=1)
    trainer = ShardedTrainer.from_pretrained(folder, config, world=cpu_world)
    batch = batch_of(train_ds, [0, 1])
    trainer.forward_backward(batch, 10)
    assert math.isfinite(trainer.optimizer_step(1e-3, 0.3))  # one good step: the optimizer has states
    before, states = trainer.adapter_state(), trainer.optimizer_state()
    trainer.forward_backward(batch, 10)
    next(iter(trainer.params.values())).grad.to_local()[0].fill_(float("nan"))
    assert not math.isfinite(trainer.optimizer_step(1e-3, 0.3))
    after = trainer.adapter_state()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    now = trainer.optimizer_state()
    assert now.keys() == states.keys() and all(np.array_equal(states[k], now[k]) for k in states)
    assert all(p.grad is None for p in trainer.params.values())


def test_the_optimizer_state_is_gathered_on_rank_zero_only(tiny, cpu_world):
    """``ShardedOptimizer.state_dict``: the whole state on rank 0, {} on the other ranks (each rank would otherwise
    hold a full copy of the optimizer states the sharding exists to split)."""
    from qlora_gpu.fsdp_train import ShardedTrainer
    from qlora_ref.train.loop import batch_of

    folder, train_ds, _ = tiny
    trainer = ShardedTrainer.from_pretrained(folder, small_config(max_steps=1), world=cpu_world)
    trainer.forward_backward(batch_of(train_ds, [0, 1]), 10)
    trainer.optimizer_step(1e-3, 0.3)
    assert trainer.optimizer.state_dict()
    cpu_world.rank = 1
    try:
        assert trainer.optimizer.state_dict() == {}
    finally:
        cpu_world.rank = 0


def _shards_as_fsdp_cuts(rank: int, shapes: list) -> None:
    """Under two ranks: for each shape, FSDP2's shard of a parameter, ``shard_of`` of the whole tensor and
    ``full_tensor`` of the shard agree (rank 1's shard of a one-row tensor is empty)."""
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    from qlora_gpu.fsdp import full_tensor, shard_of
    from qlora_gpu.fsdp_train import init_distributed

    world = init_distributed("cpu")
    for shape in shapes:
        whole = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape) + 0.5
        holder = nn.Module()
        holder.p = nn.Parameter(whole.clone())
        fully_shard(holder, mesh=world.mesh)
        local = holder.p.to_local()
        mine = shard_of(whole, holder.p)
        assert mine.shape == local.shape and torch.equal(mine, local), (rank, shape)
        assert (local.shape[0] == 0) == (shape[0] == 1 and rank == 1), (rank, shape)
        assert torch.equal(full_tensor(holder.p, world.device), whole), (rank, shape)


def test_shard_of_cuts_as_fsdp_on_every_rank(one_thread):
    """``shard_of`` (loading an optimizer state, an init adapter, a resumed adapter) on two ranks: each rank's own
    rows, the empty shard past the last chunk included (lora_A of rank 1, as NARROW trains but never resumes)."""
    run_ranks(_shards_as_fsdp_cuts, 2, [(1, 64), (8, 64), (5, 3), (64, 8)])


def test_a_killed_rank_resumes_exactly_with_an_empty_shard(tiny, tmp_path):
    """The resume of test_a_killed_rank_resumes_to_the_uninterrupted_result with lora_r=1: rank 1's shard of every
    lora_A (and of its optimizer states) is empty, and loading the checkpoint must give it the empty share."""
    import json

    from qlora_ref.train.checkpoint import list_checkpoints

    config = small_config(**dict(RESUMED, lora_r=1, lora_alpha=16.0, max_steps=6, eval_every=3)).to_dict()
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_ranks(train_runs, 2, str(tiny[0]), [dict(config=config, out=str(full))])
    with pytest.raises(torch.multiprocessing.ProcessExitedException, match="exit code 17"):
        run_ranks(train_runs, 2, str(tiny[0]), [dict(config=config, out=str(cut), die_at=4)])
    assert [s for s, _ in list_checkpoints(cut)] == [2]
    run_ranks(train_runs, 2, str(tiny[0]), [dict(config=config, out=str(cut))])
    a, b = (json.loads((d / "result.json").read_text()) for d in (full, cut))
    assert b["losses"] == a["losses"][2:] and b["log_history"] == a["log_history"]
    assert (full / "adapter_model.safetensors").read_bytes() == (cut / "adapter_model.safetensors").read_bytes()


def test_a_sharded_checkpoint_resumes_only_with_its_number_of_ranks(tiny, cpu_world):
    """The random state of a sharded checkpoint holds each of its ranks' generators: a run with another number of
    ranks refuses it (OtherBackendError, a ValueError), whichever the numbers; the same number restores it."""
    from qlora_gpu.fsdp_train import SHARDED_BACKEND, ShardedTrainer
    from qlora_ref.train.checkpoint import OtherBackendError

    trainer = ShardedTrainer.from_pretrained(tiny[0], small_config(max_steps=1, lora_dropout=0.1), world=cpu_world)
    state, arrays = trainer.rng_state()
    assert state["backend"] == SHARDED_BACKEND and state["world_size"] == 1 and arrays
    assert all(k.startswith("rank0.") for k in arrays)
    first = torch.rand(4)
    trainer.set_rng_state(state, arrays)  # the same number of ranks: the streams continue from the checkpoint
    assert torch.equal(torch.rand(4), first)
    for other in (2, 4):
        with pytest.raises(OtherBackendError, match=f"comes from {other} process"):
            trainer.set_rng_state({**state, "world_size": other}, {**arrays, **{f"rank1.{k[6:]}": v
                                                                                for k, v in arrays.items()}})


def _train_recording_writers(rank: int, folder: str, runs: list[dict], record: str) -> None:
    """``train_runs``, with every call of the checkpoint and adapter writers recorded as a line '<rank> <what>'."""
    import qlora_ref.adapters as adapters
    import qlora_ref.train.loop as loop

    def recorded(what, fn):
        def wrapper(*args, **kwargs):
            with open(record, "a") as f:
                f.write(f"{rank} {what}\n")
            return fn(*args, **kwargs)
        return wrapper

    loop.save_checkpoint = recorded("checkpoint", loop.save_checkpoint)
    adapters.write_adapter_files = recorded("adapter", adapters.write_adapter_files)
    train_runs(rank, folder, runs)


def test_only_rank_zero_writes_checkpoints_and_the_adapter(tiny, tmp_path):
    """Two ranks, a checkpoint every 2 of 4 steps: rank 0 writes each checkpoint and the adapter, once; rank 1
    writes nothing (two writers of one folder race on its files and on the deletion of old checkpoints)."""
    config = small_config(max_steps=4, save_every=2).to_dict()
    record = tmp_path / "writers.txt"
    run_ranks(_train_recording_writers, 2, str(tiny[0]), [dict(config=config, out=str(tmp_path / "out"))],
              str(record))
    assert record.read_text().splitlines() == ["0 checkpoint", "0 checkpoint", "0 adapter"]
