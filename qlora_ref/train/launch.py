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


#: optimizers whose update is elementwise over 32-bit states: the same on a shard as on the whole tensor
#: (bitsandbytes' 8-bit states are quantized in blocks of 256 per tensor: sharding would change their arithmetic)
SHARDABLE_OPTIMIZERS = ("adamw", "paged_adamw")


def check_nproc(nproc) -> int:
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be a positive integer (processes, one per GPU), got {nproc!r}")
    return nproc


def check_sharded_recipe(optimizer: str, world_size: int, gradient_accumulation_steps: int | None = None) -> None:
    """What sharding over ``world_size`` processes needs of a recipe, checked before any process starts: a
    shardable optimizer and micro-batches that the processes can share equally. (An adapter of fewer rows than
    processes is fine: FSDP2 gives the processes beyond its rows an empty shard, tests/test_fsdp.py.)"""
    from ..optim import canonical_optimizer_name

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"the number of processes must be a positive integer, got {world_size!r}")
    try:
        name = canonical_optimizer_name(optimizer)
    except ValueError:  # not one training takes at all (sgd, which qlora memory also estimates)
        name = optimizer
    if name not in SHARDABLE_OPTIMIZERS:
        why = ("8-bit states are quantized per tensor, in blocks of 256, which a shard would change"
               if "8bit" in str(name) else "sharded training steps with AdamW")
        raise ValueError(f"optimizer {optimizer!r} cannot be sharded ({why}); use one of "
                         f"{', '.join(SHARDABLE_OPTIMIZERS)}")
    if gradient_accumulation_steps is not None and gradient_accumulation_steps % world_size:
        raise ValueError(f"gradient_accumulation_steps={gradient_accumulation_steps} micro-batches per step cannot "
                         f"be shared equally by {world_size} processes: make it a multiple of {world_size}")


def without_option(args: list[str], option: str, takes_value: bool = True, shortest: int | None = None
                   ) -> list[str]:
    """``args`` without ``option`` (``--nproc 2``, ``--nproc=2``; or a flag when not ``takes_value``), also as
    argparse's abbreviations of it down to ``shortest`` characters (``--np 2`` is ``--nproc 2`` to argparse)."""
    names = {option[:k] for k in range(shortest or len(option), len(option) + 1)}
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in names:
            skip = takes_value
        elif not (takes_value and "=" in a and a.split("=", 1)[0] in names):
            out.append(a)
    return out


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    """The command that runs ``qlora <args>`` as ``nproc`` processes on this machine: torchrun's module
    (``torch.distributed.run``) with ``--standalone`` (a rendezvous on a free local port) and ``python -m
    qlora_ref``, in this Python."""
    check_nproc(nproc)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "qlora_ref", *args]
