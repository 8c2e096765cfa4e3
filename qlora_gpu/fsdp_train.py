"""Sharded QLoRA training: ``ShardedTrainer``, the GPU backend's trainer over a model sharded with FSDP2
(``qlora_gpu.fsdp``), one process per GPU, launched by ``torchrun`` (or ``qlora finetune --nproc N``).

The loop is the one every backend shares (``qlora_ref.train.loop``); what changes with N processes:

- **data**: each optimizer step's micro-batches are the ones one process would draw (the same stream, a pure
  function of the seed); rank r trains on the r-th of N equal shares of them, so ``gradient_accumulation_steps``
  must be a multiple of N and the effective batch stays micro-batch × accumulation steps;
- **loss**: every rank divides its summed cross entropy by the number of response tokens of the *whole* step
  (all ranks' micro-batches: each rank counts them itself, the batches being known to all), and FSDP
  reduce-scatters the gradients as a sum — so the gradient is the one process's, up to the order of the
  float32 additions; the logged loss is summed over the ranks;
- **clipping**: the norm over all ranks' gradient shards, √(Σ over ranks of each rank's squared norm);
- **optimizer**: the recipe's optimizer (32-bit AdamW, paged or not) runs on each rank's shards of the adapters,
  so its states are sharded; ``state_dict`` gathers them into the one-process format (rank 0), and loading takes
  each rank's share — checkpoints are those of a single process, plus every rank's random state;
- **random state**: the LoRA dropout generators of rank r > 0 are seeded apart from rank 0's (rank 0 keeps the
  one-process seeds), and a checkpoint keeps all ranks' states: an exact resume needs the same number of ranks;
- **output**: the progress bar, the logs and every file come from rank 0, once (``qlora_ref.train.loop``).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.distributed as dist

from qlora_ref.train.checkpoint import OtherBackendError
from qlora_ref.train.config import TrainConfig
from qlora_ref.train.launch import SHARDABLE_OPTIMIZERS, TORCHRUN_ENV, check_sharded_recipe

from .fsdp import fsdp_api, full_tensor, shard_layer, shard_model, shard_of
from .model import QLoRAModel
from .optim import clip_grad_norm
from .train import GpuTrainer, build_optimizer

#: the random state's backend name in a sharded run's checkpoints (``GpuTrainer`` writes "gpu")
SHARDED_BACKEND = "gpu-fsdp"



class World:
    """The processes training together, as the loop sees them (``qlora_ref.train.loop.SingleProcess``'s
    interface): ``rank``, ``world_size``, ``sum`` of floats over all ranks, ``barrier``; plus the device mesh FSDP
    shards over and this process's device."""

    def __init__(self, mesh, device: torch.device):
        self.mesh, self.device = mesh, torch.device(device)
        self.group = mesh.get_group()
        self.rank, self.world_size = mesh.get_local_rank(), mesh.size()
        backend = str(dist.get_backend(self.group))
        # host tensors where the group has a host backend (gloo; the fake one of bench/fsdp_memory.py), else NCCL's
        self._host = "gloo" in backend or backend == "fake" or self.device.type == "cpu"

    def sum(self, values: list[float]) -> list[float]:
        """``values`` summed element by element over all ranks (float64)."""
        t = torch.tensor(values, dtype=torch.float64, device="cpu" if self._host else self.device)
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def barrier(self) -> None:
        """Wait for every rank (a summed zero)."""
        self.sum([0.0])

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order."""
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out


def init_distributed(device_type: str | None = None) -> World:
    """The ``World`` of this process from torchrun's environment (``TORCHRUN_ENV``): the default process group —
    NCCL for device tensors and gloo for host ones on a GPU machine, gloo alone without CUDA — unless one exists,
    this process's GPU (``cuda:LOCAL_RANK``), and the one-dimensional device mesh of all ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if not dist.is_initialized():
        missing = [k for k in TORCHRUN_ENV if k not in os.environ]
        if missing:
            raise ValueError(f"sharded training runs one process per GPU under torchrun (or `qlora finetune --nproc "
                             f"N`); this process's environment lacks {', '.join(missing)}")
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    return World(init_device_mesh(device_type, (dist.get_world_size(),)), device)


def rank_seed(seed: int, rank: int) -> int:
    """The LoRA dropout seed of a layer on ``rank``: the layer's own on rank 0 (a one-process run's masks), one
    apart from it on each other rank."""
    return seed if rank == 0 else (seed + rank * 2**40) % 2**63


class ShardedOptimizer:
    """A ``qlora_gpu.optim`` optimizer run on this rank's shards of FSDP-sharded parameters (their local tensors,
    which FSDP all-gathers from), so that its states are sharded as the parameters are. ``state_dict`` gathers the
    states whole — the one-process format, names and shapes — on rank 0 ({} elsewhere); ``load_state_dict``
    takes such a state on every rank and keeps each rank's share."""

    def __init__(self, inner, params: dict, world: World):
        self.inner, self.params, self.world = inner, dict(params), world
        self._local: dict[str, torch.Tensor] | None = None

    @property
    def lr(self) -> float:
        return self.inner.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self.inner.lr = value

    @torch.no_grad()
    def local_params(self) -> dict[str, torch.Tensor]:
        """This rank's shards, the same tensors at every step (FSDP settles them at its first forward pass)."""
        local = {k: p.to_local() for k, p in self.params.items()}
        if self._local is None:
            self._local = local
        elif any(t.data_ptr() != self._local[k].data_ptr() for k, t in local.items()):
            raise RuntimeError("FSDP moved a parameter shard after the optimizer was built over it")
        return self._local

    @torch.no_grad()
    def step(self, params, grads) -> None:
        """One step on the local shards; ``grads``: this rank's gradient shards by name."""
        self.inner.step(self.local_params(), grads)

    def zero_grad(self, params) -> None:
        for p in params.values():
            p.grad = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole state on rank 0 (a collective: every rank calls it), {} on the others."""
        local = self.inner.state_dict()
        out = {}
        for key, value in local.items():  # the same keys in the same order on every rank
            name, _, kind = key.rpartition(".")
            p = self.params[name]
            if kind == "step" or tuple(value.shape) != tuple(p.to_local().shape):
                out[key] = value.detach().cpu()
                continue
            whole = fsdp_api()[4].from_local(value, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                             stride=p.stride())
            out[key] = full_tensor(whole, self.world.device)
        return out if self.world.rank == 0 else {}

    def load_state_dict(self, state) -> None:
        """A one-process state (this backend's or the reference's keys): each rank keeps its share."""
        mine = {}
        for key, value in state.items():
            name, _, kind = key.rpartition(".")
            value = torch.as_tensor(np.asarray(value))
            p = self.params.get(name)
            if p is not None and kind != "step" and tuple(value.shape) == tuple(p.shape):
                value = shard_of(value, p)
            mine[key] = value
        self.inner.load_state_dict(mine)


class ShardedTrainer(GpuTrainer):
    """``GpuTrainer`` over a ``QLoRAModel`` sharded by ``qlora_gpu.fsdp.shard_model`` (module docstring); the
    loop reads its ``world``. Build it in every process with ``from_pretrained`` (or shard a model yourself)."""

    def __init__(self, model: QLoRAModel, config: TrainConfig, world: World, *, cpu_offload: bool = False):
        if not isinstance(model, fsdp_api()[1]):
            raise ValueError("the model is not sharded: build it with qlora_gpu.fsdp.shard_model first")
        check_sharded_recipe(config.optimizer, world.world_size)
        params = model.lora_parameters()
        for m in model.named_linears().values():  # dropout masks independent across ranks, rank 0's unchanged
            if m.r is not None:  # from the one-process seed, so that a second trainer on the model moves nothing
                m.one_process_seed = getattr(m, "one_process_seed", m.seed)
                m.seed = rank_seed(m.one_process_seed, world.rank)
                m._generators.clear()
        inner = build_optimizer(config, flat=False, paged=not cpu_offload)
        super().__init__(model, config, optimizer=ShardedOptimizer(inner, params, world))
        self.world, self.device, self.cpu_offload = world, world.device, cpu_offload

    @classmethod
    def from_pretrained(cls, path, config: TrainConfig, device=None, *, cpu_offload: bool = False,
                        world: World | None = None) -> ShardedTrainer:
        """Every rank builds the model block by block and keeps its shard of each as soon as it is built
        (``prepare_model``'s ``layer_hook``; a GGUF file is read whole on the host first), then shards the rest.
        The numerics of ``GpuTrainer.from_pretrained`` (the reference's): float32 embedding and stream, each
        linear's output rounded in the compute dtype (``residual_dtype=None``), eager attention."""
        from .prepare import load

        world = world or init_distributed(None if device is None else torch.device(device).type)

        def hook(layer):
            return shard_layer(layer, world.mesh, cpu_offload=cpu_offload)

        model = load(path, quant=config.quant_config(), lora=config.lora_config(), device=world.device,
                     dtype="float32", residual_dtype=None, attn_implementation="eager",
                     gradient_checkpointing=config.gradient_checkpointing, layer_hook=hook,
                     progress=world.rank == 0 and config.progress)
        shard_model(model, world.mesh, cpu_offload=cpu_offload)
        return cls(model, config, world, cpu_offload=cpu_offload)

    # ---------------------------------------------------------------------------------------- one step
    def _global_norm(self, local: torch.Tensor) -> torch.Tensor:
        """The gradients' norm over all ranks from this rank's: √(Σ over ranks of each squared)."""
        (squares,) = self.world.sum([float(local) ** 2])
        return torch.tensor(math.sqrt(squares), dtype=local.dtype, device=local.device)

    @torch.no_grad()
    def optimizer_step(self, lr: float, max_grad_norm: float) -> float:
        grads = {k: p.grad.to_local() for k, p in self.params.items() if p.grad is not None}
        norm = clip_grad_norm(grads, max_grad_norm if max_grad_norm > 0 else float("inf"),
                              combine=self._global_norm)
        self.optimizer.lr = lr
        if math.isfinite(norm):  # the global norm, the same on every rank: all step or none
            self.optimizer.step(self.params, grads)
        self.optimizer.zero_grad(self.params)
        self._pending_optimizer_state = None
        return norm

    def generate(self, input_ids, **kwargs) -> list[int]:
        raise ValueError("generation runs in one process: load the adapter this run writes into an unsharded model "
                         "(qlora generate --adapter)")

    # ---------------------------------------------------------------------------------------- state
    def adapter_state(self) -> dict[str, np.ndarray]:
        """The whole adapters on every rank (a collective)."""
        return {k: full_tensor(p, self.device).float().numpy() for k, p in self.params.items()}

    @torch.no_grad()
    def load_adapter_state(self, params) -> None:
        for key, value in params.items():
            name = key.removeprefix("base_model.model.")
            if name not in self.params:
                raise KeyError(f"no LoRA parameter named {key!r} in this model")
            p = self.params[name]
            p.to_local().copy_(shard_of(torch.as_tensor(np.asarray(value)), p))

    def rng_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """Every rank's generators (``GpuTrainer.rng_state``) as ``rank<r>.<name>``, and the number of ranks;
        marked as the sharded backend's (an unsharded run refuses them: ``GpuTrainer.set_rng_state``)."""
        state, arrays = super().rng_state()
        merged = {f"rank{r}.{k}": v for r, a in enumerate(self.world.gather_objects(arrays)) for k, v in a.items()}
        return {**state, "backend": SHARDED_BACKEND, "world_size": self.world.world_size}, merged

    def set_rng_state(self, state: dict, arrays) -> None:
        saved = state.get("world_size") if state.get("backend") == SHARDED_BACKEND else None
        if saved != self.world.world_size:
            # a refusal, not damage (OtherBackendError): resuming must not fall back to an older checkpoint
            raise OtherBackendError(f"the checkpoint's random state comes from {saved or 'one unsharded'} "
                                    f"process(es), this run has {self.world.world_size}: resume with the same "
                                    "number of processes")
        prefix = f"rank{self.world.rank}."
        mine = {k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)}
        super().set_rng_state({**state, "backend": "gpu"}, mine)


__all__ = ["SHARDABLE_OPTIMIZERS", "ShardedOptimizer", "ShardedTrainer", "World", "init_distributed", "rank_seed"]
