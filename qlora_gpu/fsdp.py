"""A ``QLoRAModel`` sharded over many GPUs with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 splits every parameter of a module along its first dimension across the processes of a device mesh (a
``DTensor`` with a ``Shard(0)`` placement; the rows are cut as ``torch.chunk`` cuts them), all-gathers a unit's
parameters before its forward pass and again before its backward pass, frees them after each, and
reduce-scatters the gradients. Each decoder block is one unit; the embeddings, the final norm and the LM head
make the root unit (``shard_model``). What that means for QLoRA (docs/sharded.md):

- **The frozen 4-bit weights.** bitsandbytes keeps a 4-bit weight as a ``Params4bit`` of packed uint8 codes whose
  ``quant_state`` attribute holds the per-block scales. FSDP replaces every parameter by a new one and carries no
  attribute across, so before a block is sharded each 4-bit weight becomes two frozen parameters in a float
  *storage dtype* (``to_float_storage``): ``weight``, the packed codes in bitsandbytes' ``quant_storage`` layout
  (the bytes viewed as bfloat16, shape (bytes / 2, 1)), and ``weight_absmax``, the first-level scales (uint8
  codes under double quantization, float32 without), viewed alike. All-gathering moves bytes, so the gathered
  tensors are the originals bit for bit; inside forward and backward the layer rebuilds its ``QuantState``
  around them (``QLoRALinear.frozen_weight``). What stays on the layer, replicated, is a few numbers and the
  second level of double quantization (one float32 per 256 scales, the offset, the two code tables:
  ``Stored4bit``). Why a float dtype though FSDP2 in torch 2.13 also gathers uint8 (it falls back to bytes when a
  unit mixes dtypes, and its mixed-precision cast skips integer parameters): it is the layout bitsandbytes,
  transformers (``bnb_4bit_quant_storage``), peft and Answer.AI's fsdp_qlora share, FSDP1's flat parameters accept
  nothing else ("Cannot flatten integer dtype tensors"), and a ``MixedPrecisionPolicy`` whose ``param_dtype`` is
  the storage dtype then casts nothing — any other float ``param_dtype`` would corrupt the codes, so
  ``shard_model`` takes none.
- **The LoRA adapters** are sharded like any parameter; their gradients are reduce-scattered as a *sum* (the loss
  of each rank is already divided by the global number of targets, ``qlora_ref.train.loop``), and the optimizer
  runs on each rank's shards (``qlora_gpu.fsdp_train``), so its states are sharded too.
- A float32 frozen weight (``quant_type="none"``) is a buffer of its layer, which FSDP would replicate; it becomes a
  frozen parameter and is sharded like the rest.
- Optional CPU offload (FSDP2's ``CPUOffloadPolicy``): the shards of every parameter and gradient live in host
  memory, are copied to the GPU for each all-gather, and the optimizer steps on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import bitsandbytes.functional as bnbf
import torch
from torch import nn

from .lora import SHARDED_STATE, QLoRALinear

#: the storage dtype of the 4-bit codes and scales by default: bfloat16, the compute dtype (the peers' advice:
#: transformers' ``bnb_4bit_quant_storage`` equal to ``torch_dtype``)
DEFAULT_STORAGE = torch.bfloat16


def fsdp_api():
    """``(fully_shard, FSDPModule, CPUOffloadPolicy, OffloadPolicy, DTensor)`` from torch; a clear error where this
    torch has no FSDP2 (it is public from torch 2.6)."""
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard
        from torch.distributed.tensor import DTensor
    except ImportError as e:  # pragma: no cover - torch >= 2.6 has it
        raise ImportError(f"sharded training needs PyTorch's FSDP2 (torch >= 2.6), torch {torch.__version__} lacks "
                          f"it ({e})") from e
    return fully_shard, FSDPModule, CPUOffloadPolicy, OffloadPolicy, DTensor


def is_sharded(t) -> bool:
    """Whether ``t`` is a tensor FSDP keeps sharded (a ``DTensor``)."""
    return isinstance(t, fsdp_api()[4])


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor, one-dimensional (a view)."""
    return t.view(torch.uint8).reshape(-1)


def _in_storage(data: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    """uint8 ``data`` as a (bytes / itemsize, 1) tensor of ``storage`` — bitsandbytes' ``quant_storage`` layout —
    zero-padded to a whole element, in memory of its own (the tensor it came from can be freed)."""
    size = storage.itemsize
    out = torch.zeros(-(-data.numel() // size) * size, dtype=torch.uint8, device=data.device)
    out[: data.numel()] = data
    return out.view(storage).reshape(-1, 1)


@dataclass
class Stored4bit:
    """What a sharded 4-bit weight keeps on its layer besides its two parameters ``weight`` (the packed codes) and
    ``weight_absmax`` (the first-level scales): the metadata of bitsandbytes' ``QuantState`` and the second level
    of double quantization, replicated on every rank (one float32 per 256 scales: 4 bytes per 16,384 weights)."""

    quant_type: str
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    code: torch.Tensor
    packed_bytes: int
    absmax_dtype: torch.dtype
    absmax_numel: int
    offset: torch.Tensor | None = None
    state2: bnbf.QuantState | None = None

    def unpack(self, layer: nn.Module) -> tuple[torch.Tensor, bnbf.QuantState]:
        """(the packed codes as bitsandbytes reads them, shape (bytes, 1); the ``QuantState``), views of the
        layer's gathered parameters: valid while FSDP holds them gathered, inside forward and backward."""
        weight, absmax = layer.weight, layer.weight_absmax
        if is_sharded(weight) or is_sharded(absmax):
            raise RuntimeError("this layer's 4-bit weight is sharded (FSDP gathers it only inside forward and "
                               "backward): call the model, or model.unshard() first")
        packed = _bytes(weight)[: self.packed_bytes].view(-1, 1)
        scales = _bytes(absmax)[: self.absmax_numel * self.absmax_dtype.itemsize].view(self.absmax_dtype)
        state = bnbf.QuantState(absmax=scales, shape=self.shape, code=self.code, blocksize=self.blocksize,
                                quant_type=self.quant_type, dtype=self.dtype, offset=self.offset, state2=self.state2)
        return packed, state


@torch.no_grad()
def to_float_storage(layer: QLoRALinear, storage: torch.dtype = DEFAULT_STORAGE) -> None:
    """Make ``layer``'s frozen weight shardable by FSDP, in place (module docstring): a 4-bit weight becomes the
    parameters ``weight`` and ``weight_absmax`` in ``storage`` plus a ``Stored4bit``; a float32 weight (a buffer)
    becomes a frozen parameter. The values are unchanged: the layer computes the same bits."""
    if not storage.is_floating_point:
        raise ValueError(f"storage must be a float dtype (bitsandbytes' quant_storage), got {storage}")
    if SHARDED_STATE in layer.__dict__:
        return
    weight, state = layer.frozen_weight()
    if state is None:  # a float32 weight, registered as a buffer
        w = layer._buffers.pop("weight")
        layer.weight = nn.Parameter(w, requires_grad=False)
        return
    absmax = state.absmax.contiguous().reshape(-1)
    state2 = None
    if state.nested:  # its own copy: the block's scale buffer (qlora_gpu.fast.block_scales) is let go
        s2 = state.state2
        state2 = bnbf.QuantState(absmax=s2.absmax.clone(), code=s2.code, blocksize=s2.blocksize, dtype=s2.dtype)
    stored = Stored4bit(quant_type=state.quant_type, shape=torch.Size(state.shape), dtype=state.dtype,
                        blocksize=state.blocksize, code=state.code, packed_bytes=_bytes(weight.data).numel(),
                        absmax_dtype=absmax.dtype, absmax_numel=absmax.numel(),
                        offset=None if state.offset is None else torch.as_tensor(state.offset).clone(),
                        state2=state2)
    packed = _in_storage(_bytes(weight.data), storage)
    scales = _in_storage(_bytes(absmax), storage)
    del layer.weight  # the Params4bit
    layer.weight = nn.Parameter(packed, requires_grad=False)
    layer.weight_absmax = nn.Parameter(scales, requires_grad=False)
    layer.__dict__[SHARDED_STATE] = stored


def _offload_policy(cpu_offload: bool, mesh):
    """FSDP2's ``CPUOffloadPolicy`` (host memory pinned for the copies, where there is a GPU to copy to) or none."""
    _, _, CPUOffloadPolicy, OffloadPolicy, _ = fsdp_api()
    return CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu") if cpu_offload else OffloadPolicy()


def shard_layer(layer: nn.Module, mesh, *, cpu_offload: bool = False, storage: torch.dtype = DEFAULT_STORAGE,
                reshard_after_forward: bool = True) -> nn.Module:
    """One decoder block as one FSDP unit: its ``QLoRALinear``\\ s' weights to ``storage`` (``to_float_storage``),
    then ``fully_shard`` over ``mesh``. Each rank then keeps 1/N of the block; ``prepare_model`` calls this as
    it builds each block (its ``layer_hook``), so that no rank ever holds more than one whole block."""
    fully_shard, FSDPModule, *_ = fsdp_api()
    if isinstance(layer, FSDPModule):
        return layer
    for m in layer.modules():
        if isinstance(m, QLoRALinear):
            to_float_storage(m, storage)
    layer.__dict__.pop("_qlora_block_scales", None)  # the block's scale buffer: each layer now gathers its own
    fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward,
                offload_policy=_offload_policy(cpu_offload, mesh))
    return layer


def shard_model(model: nn.Module, mesh, *, cpu_offload: bool = False, storage: torch.dtype = DEFAULT_STORAGE,
                reshard_after_forward: bool = True) -> nn.Module:
    """Shard a ``QLoRAModel`` with FSDP2 over the one-dimensional device ``mesh``: each decoder block not sharded
    yet (``shard_layer``), then the model itself as the root unit (embeddings, final norm, LM head). Gradients
    are reduce-scattered as a sum, not FSDP's default mean (the loss is normalised over all ranks already).
    ``cpu_offload``: FSDP2's ``CPUOffloadPolicy`` (parameters, gradients and optimizer states in host memory).
    Returns the model, sharded in place."""
    fully_shard, FSDPModule, *_ = fsdp_api()
    if mesh.ndim != 1:
        raise ValueError(f"mesh must be one-dimensional (FSDP over all ranks), got {mesh.ndim} dimensions")
    for layer in model.hf.model.layers:
        shard_layer(layer, mesh, cpu_offload=cpu_offload, storage=storage,
                    reshard_after_forward=reshard_after_forward)
    if not isinstance(model, FSDPModule):
        fully_shard(model, mesh=mesh, offload_policy=_offload_policy(cpu_offload, mesh))
        # FSDP gathers the root unit only around forward(); the chunked loss reaches the embedding and the head
        # through its own method, which must be gathered alike
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(model, "chunked_nll_sum")
    for m in model.modules():
        if isinstance(m, FSDPModule):
            sum_gradients(m)
    return model


def sum_gradients(unit) -> None:
    """Make FSDP unit ``unit`` reduce its gradients as a sum over ranks: divide factor 1, and (where this torch has
    the switch) a plain SUM collective rather than NCCL's pre-multiplied sum, which gloo lacks."""
    unit.set_gradient_divide_factor(1.0)
    if hasattr(unit, "set_force_sum_reduction_for_comms"):
        unit.set_force_sum_reduction_for_comms(True)


# ---------------------------------------------------------------------------------------------- whole tensors
def full_tensor(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The whole of a sharded tensor, on the host; a collective, every rank calls it (a plain tensor is returned
    as it is, on the host). The shard is gathered from ``device``: NCCL gathers device tensors, and under CPU
    offload the shards live on the host."""
    DTensor = fsdp_api()[4]
    if not isinstance(t, DTensor):
        return t.detach().cpu()
    local = t.to_local().detach().to(device)
    whole = DTensor.from_local(local, t.device_mesh, t.placements, run_check=False, shape=t.shape,
                               stride=t.stride())
    return whole.full_tensor().cpu()


def shard_of(full: torch.Tensor, like) -> torch.Tensor:
    """This rank's share of ``full`` as FSDP cuts ``like`` (a sharded tensor of the same shape: rows cut as
    ``torch.chunk`` cuts them, ranks past the last chunk empty), on ``like``'s device, with its dtype."""
    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(f"a tensor of shape {tuple(full.shape)} cannot be sharded like one of {tuple(like.shape)}")
    local = like.to_local()
    (dim,) = [p.dim for p in like.placements]
    chunks = torch.as_tensor(full).chunk(like.device_mesh.size(), dim=dim)
    rank = like.device_mesh.get_local_rank()
    mine = chunks[rank] if rank < len(chunks) else full.narrow(dim, 0, 0)
    if tuple(mine.shape) != tuple(local.shape):  # FSDP cut it otherwise: a bug here if reached
        raise RuntimeError(f"rank {rank}'s shard has shape {tuple(local.shape)}, torch.chunk gives {tuple(mine.shape)}")
    return mine.to(device=local.device, dtype=local.dtype)


__all__ = ["DEFAULT_STORAGE", "Stored4bit", "full_tensor", "is_sharded", "shard_layer", "shard_model", "shard_of",
           "sum_gradients", "to_float_storage"]
