"""Sharded training in several processes on one machine, for tests/test_fsdp.py: the gloo backend on the CPU, the
processes forked from a server that imported torch, bitsandbytes and transformers once (a fresh Python per
process would spend most of a test importing them)."""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as tmp

PRELOAD = ["torch", "bitsandbytes", "transformers.models.llama.modeling_llama", "qlora_gpu.fsdp_train",
           "fsdp_helpers"]


#: how long a rank waits in a collective for the others (a training step here takes well under a second)
RANK_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, world_size: int, *args) -> None:
    """``fn(rank, *args)`` in ``world_size`` processes with torchrun's environment set (so that
    ``qlora_gpu.fsdp_train.init_distributed`` finds it); raises ``ProcessRaisedException`` /
    ``ProcessExitedException`` when a rank fails (the others are then terminated)."""
    multiprocessing.set_forkserver_preload(PRELOAD)
    tmp.start_processes(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size,
                        start_method="forkserver")


def _entry(rank: int, world_size: int, port: int, fn, args) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # as the test process computes its references: the same GEMM blocking
    # the group init_distributed then finds, with a collective timeout of minutes, not gloo's 30: ranks that
    # disagree (a bug under test) fail the test instead of holding CI
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=RANK_TIMEOUT_S))
    try:
        fn(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train_runs(rank: int, folder: str, runs: list[dict]) -> None:
    """Each run, on the CPU (gloo) on any machine: ``config`` (``TrainConfig`` fields), ``out`` (output folder),
    optional ``cpu_offload``, ``die_at`` (rank 1 exits abruptly when it is about to take that optimizer step, as a
    killed process would), ``sizes`` (rank -> numbers of training and held-out examples: 48 and 12 where not given).
    Rank 0 writes ``result.json`` (losses, held-out result, log) into ``out``."""
    from test_train import qa_dataset

    from qlora_gpu.fsdp_train import ShardedTrainer
    from qlora_ref.train.api import load_tokenizer
    from qlora_ref.train.config import TrainConfig
    from qlora_ref.train.loop import train

    tok = load_tokenizer(folder)
    for run in runs:
        n_train, n_eval = run.get("sizes", {}).get(rank, (48, 12))
        train_ds, eval_ds = qa_dataset(tok, n_train, seed=0), qa_dataset(tok, n_eval, seed=1)
        config = TrainConfig(**run["config"])
        trainer = ShardedTrainer.from_pretrained(folder, config, "cpu", cpu_offload=run.get("cpu_offload", False))
        die_at = run.get("die_at")
        if die_at is not None and rank == 1:
            step_once, done = trainer.optimizer_step, []

            def dying_step(lr, max_grad_norm, step_once=step_once, done=done, die_at=die_at):
                if len(done) + 1 == die_at:
                    os._exit(17)
                done.append(1)
                return step_once(lr, max_grad_norm)

            trainer.optimizer_step = dying_step
        result = train(trainer, train_ds, config, eval_data=eval_ds, output_dir=run["out"])
        if rank == 0:
            Path(run["out"], "result.json").write_text(json.dumps(
                {"losses": result.train_losses, "eval": result.eval, "log_history": result.log_history}))
