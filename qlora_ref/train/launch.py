"""Launching a fine-tune over several processes: one per GPU, started by PyTorch's ``torchrun``, which gives each
its rank through the environment (``qlora_gpu.fsdp_train`` shards the model over them with FSDP2).

``qlora finetune --nproc N ...`` re-runs the same command under ``torchrun --standalone --nproc-per-node N`` on
this machine; several machines run ``torchrun`` themselves with a rendezvous (docs/sharded.md). Nothing here
imports torch: the reference runs without it.
"""

from __future__ import annotations

import os
import sys

#: the environment variables torchrun sets for each process it starts
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """Whether this process is one of those torchrun started (its environment says so)."""
    return all(k in os.environ for k in TORCHRUN_ENV)


def process_rank() -> int:
    """This process's rank among those torchrun started (0 when it was not started so)."""
    return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    """The command that runs ``qlora <args>`` as ``nproc`` processes on this machine: torchrun's module
    (``torch.distributed.run``) with ``--standalone`` (a rendezvous on a free local port) and ``python -m
    qlora_ref``, in this Python."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be a positive integer (processes, one per GPU), got {nproc!r}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "qlora_ref", *args]


def without_option(args: list[str], option: str, takes_value: bool = True) -> list[str]:
    """``args`` without ``option`` (``--nproc 2``, ``--nproc=2``; or a flag when not ``takes_value``)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == option:
            skip = takes_value
        elif not (takes_value and a.startswith(option + "=")):
            out.append(a)
    return out
