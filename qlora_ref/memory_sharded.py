"""How much memory one GPU needs when QLoRA is sharded over several with FSDP2 (``qlora_gpu.fsdp``; issue 33).

FSDP2 cuts each parameter's rows across the GPUs; a 4-bit weight travels as two parameters in a float storage
dtype (its packed codes and its first-level scales), so it is cut like any other. This module counts one rank's
share of the tensors ``qlora_ref.memory`` counts for one GPU, the constants every rank keeps whole, what is
all-gathered at once, and the reduce-scatter's buffers. Pure integer arithmetic on the model's shape, like
``qlora_ref.memory``; docs/sharded.md explains the terms and sets them beside measured peaks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .memory import (
    DTYPE_BYTES,
    OPTIMIZERS,
    ModelShape,
    check_positive_int,
    estimate_memory,
    load_model_shape,
    quantized_tensor_bytes,
    resolve_targets,
)

#: how many decoder blocks FSDP2 holds all-gathered at once: the one computing and the next one, whose all-gather
#: is issued while the first computes (forward), or the previous one (backward)
FSDP_GATHERED_BLOCKS = 2


def shard_bytes(rows: int, row_bytes: int, gpus: int) -> int:
    """Bytes one GPU holds of a tensor of ``rows`` rows of ``row_bytes`` bytes sharded over ``gpus``: FSDP2 cuts
    the first dimension in ``gpus`` chunks as ``torch.chunk`` does and pads every rank's chunk to the largest,
    ceil(rows / gpus) rows."""
    return math.ceil(rows / gpus) * row_bytes


def sharded_tensors(shape: ModelShape, *, r: int = 64, targets: str | Sequence[str] = "all", blocksize: int = 64,
                    double_quant: bool = True, adapter_dtype: str = "bfloat16", unquantized_dtype: str = "bfloat16",
                    storage_dtype: str = "bfloat16") -> dict[str, list[tuple[str, int, int]]]:
    """The parameters FSDP shards in a QLoRA model, as ``(part, rows, row_bytes)``, by FSDP unit: ``"root"`` (the
    embeddings, the LM head unless tied, the final norm) and ``"block"`` (one decoder block; every block alike).

    The parts are ``MemoryBreakdown``'s: each 4-bit weight is two parameters in ``storage_dtype``
    (``qlora_gpu.fsdp``): its packed codes (``weights``) and its first-level scales (``quant_constants``), each
    padded to a whole element of the storage dtype and laid out as (elements, 1); LoRA ``A`` (r, in) and ``B``
    (out, r) (``adapters``); the unquantized embeddings and norms (``weights``). The second level of double
    quantization stays on every rank (``replicated_quant_bytes``)."""
    targets = resolve_targets(targets)
    storage = DTYPE_BYTES[storage_dtype]
    a = DTYPE_BYTES[adapter_dtype]
    u = DTYPE_BYTES[unquantized_dtype]
    h = shape.hidden_size
    block: list[tuple[str, int, int]] = [("weights", h, u), ("weights", h, u)]  # the two RMSNorm weights
    for name, (n_out, n_in) in shape.linear_shapes().items():
        n = n_in * n_out
        blocks = math.ceil(n / blocksize)
        codes = math.ceil(n / 2)
        scales = blocks if double_quant else 4 * blocks
        block += [("weights", math.ceil(codes / storage), storage),
                  ("quant_constants", math.ceil(scales / storage), storage)]
        if name in targets:
            block += [("adapters", r, n_in * a), ("adapters", n_out, r * a)]
    root = [("weights", shape.vocab_size, h * u)] * (1 if shape.tie_word_embeddings else 2) + [("weights", h, u)]
    return {"root": root, "block": block}


def replicated_quant_bytes(shape: ModelShape, blocksize: int = 64, double_quant: bool = True) -> int:
    """What each rank keeps whole of the quantization constants: per 4-bit weight, the quantization constants
    ``quantized_tensor_bytes`` counts less its first-level scales — with double quantization the second-level
    scales, the offset and the two code tables, without it the 4-bit code table."""
    total = 0
    for n_out, n_in in shape.linear_shapes().values():
        n = n_in * n_out
        blocks = math.ceil(n / blocksize)
        total += quantized_tensor_bytes(n, 4, blocksize, double_quant)[1] - blocks * (1 if double_quant else 4)
    return shape.num_layers * total


@dataclass(frozen=True)
class ShardedMemory:
    """Memory of one GPU (one rank) training QLoRA sharded over ``gpus`` GPUs with FSDP2, in bytes.

    ``shards``: this rank's share of each persistent part (``MemoryBreakdown.PARTS`` less activations), on the
    GPU — or in host memory with ``cpu_offload``; ``replicated``: the constants every rank keeps whole;
    ``gathered``: the parameters all-gathered at once (the root unit for the whole step, and
    ``FSDP_GATHERED_BLOCKS`` blocks); ``reduce_scatter``: one block's whole adapter gradients and the
    reduce-scatter's input buffer; ``activations``: those of one GPU's micro-batch (``estimate_memory``: FSDP does
    not shard them); ``paged``: the share of the optimizer states in paged memory (without offload).
    """

    PARTS = ("shards", "replicated", "gathered", "reduce_scatter", "activations")

    model: str
    gpus: int
    cpu_offload: bool
    settings: dict
    shards: dict
    replicated: int
    gathered: int
    reduce_scatter: int
    activations: int
    paged: int

    @property
    def shard_bytes(self) -> int:
        return sum(self.shards.values())

    @property
    def device_bytes(self) -> int:
        """What the GPU holds at the step's peak."""
        on_device = 0 if self.cpu_offload else self.shard_bytes
        return on_device + self.replicated + self.gathered + self.reduce_scatter + self.activations

    @property
    def device_min_bytes(self) -> int:
        """The GPU's share when every page of paged optimizer states is out."""
        return self.device_bytes - self.paged

    @property
    def host_bytes(self) -> int:
        """Host memory of the rank's shards under CPU offload (0 without)."""
        return self.shard_bytes if self.cpu_offload else 0

    def to_dict(self) -> dict:
        return {"model": self.model, "gpus": self.gpus, "cpu_offload": self.cpu_offload,
                "settings": dict(self.settings), "device_bytes": self.device_bytes,
                "device_min_bytes": self.device_min_bytes, "host_bytes": self.host_bytes,
                "shards": dict(self.shards), "shard_bytes": self.shard_bytes, "replicated": self.replicated,
                "gathered": self.gathered, "reduce_scatter": self.reduce_scatter, "activations": self.activations,
                "paged": self.paged}


def estimate_sharded_memory(shape: ModelShape | str | Path, gpus: int, *, cpu_offload: bool = False,
                            storage_dtype: str = "bfloat16", **kwargs) -> ShardedMemory:
    """The memory of one GPU when QLoRA is sharded over ``gpus`` GPUs with FSDP2 (``qlora_gpu.fsdp``; each decoder
    block one unit, the embeddings, final norm and LM head the root unit). ``kwargs`` are ``estimate_memory``'s
    (the recipe; ``batch`` is each GPU's micro-batch); ``storage_dtype`` holds the 4-bit codes and scales.

    Per GPU: 1/``gpus`` of the weights, quantization constants, adapters, gradients and optimizer states
    (``shard_bytes`` of each tensor of ``sharded_tensors``; with ``cpu_offload`` they live in host memory), the
    replicated constants, the all-gathered parameters — the root unit, kept gathered through the step (FSDP2 does
    not reshard its root after forward), and ``FSDP_GATHERED_BLOCKS`` blocks — the reduce-scatter of one block's
    adapter gradients (the gradients whole, then its input buffer: twice a block's adapter bytes), and the
    activations of one micro-batch, which sharding leaves whole. Transients the single-GPU estimate does not
    count either (a weight dequantized for its product, the allocator's rounding) are not counted here."""
    check_positive_int("gpus", gpus)
    if storage_dtype not in DTYPE_BYTES:
        raise ValueError(f"storage_dtype must be one of {', '.join(DTYPE_BYTES)}, got {storage_dtype!r}")
    base = estimate_memory(shape, "qlora", **kwargs)
    s = base.settings
    shape = load_model_shape(shape)
    tensors = sharded_tensors(shape, r=s["r"], targets=s["targets"], blocksize=s["blocksize"],
                              double_quant=s["double_quant"], adapter_dtype=s["adapter_dtype"],
                              unquantized_dtype=s["unquantized_dtype"], storage_dtype=storage_dtype)
    state_bytes, paged_states = OPTIMIZERS[s["optimizer"]]
    shards = dict.fromkeys(("weights", "quant_constants", "adapters", "gradients", "optimizer_states"), 0)
    for unit, count in (("root", 1), ("block", shape.num_layers)):
        for part, rows, row_bytes in tensors[unit]:
            shards[part] += count * shard_bytes(rows, row_bytes, gpus)
            if part == "adapters":  # a gradient per adapter element, in its dtype; the optimizer's states
                shards["gradients"] += count * shard_bytes(rows, row_bytes, gpus)
                elements = row_bytes // DTYPE_BYTES[s["adapter_dtype"]]
                shards["optimizer_states"] += count * math.ceil(math.ceil(rows / gpus) * elements * state_bytes)

    def whole(unit: str, part: str | None = None) -> int:  # gathered: every rank's padded shard
        return sum(gpus * shard_bytes(rows, b, gpus) for p, rows, b in tensors[unit] if part in (None, p))

    return ShardedMemory(
        model=shape.name, gpus=gpus, cpu_offload=bool(cpu_offload), settings={**s, "storage_dtype": storage_dtype},
        shards=shards, replicated=replicated_quant_bytes(shape, s["blocksize"], s["double_quant"]),
        gathered=whole("root") + FSDP_GATHERED_BLOCKS * whole("block"),
        reduce_scatter=2 * whole("block", "adapters"), activations=base.activations,
        paged=shards["optimizer_states"] if paged_states and not cpu_offload else 0)
