"""Per decoder block, the work its seven LoRA layers would each launch on their own, done once for the block
(host time at batch 1: a step waits on the host, which pays per operator launched, whatever its size;
docs/benchmarks.md). Installed on a ``QLoRAModel`` by ``qlora_gpu.fast.enable``:

- ``stage_layer``: the block's adapters cast to the compute dtype in one operator (when they lie in one buffer, as
  ``prepare_model`` builds them or ``qlora_gpu.optim`` binds them: ``flat_view``) where 14 casts would run, and its
  double-quantized scales decoded by two (``qlora_gpu.fast.block_scales``) where 14 (28 with their backward use)
  would; the dropout masks are the core's, drawn for the block at once (``qlora_gpu.model.draw_block_masks``);
- ``drop_shared_input``: the layers reading one input (q, k, v; gate, up) drop it out in one operator;
- ``LAST_LINEAR``: in the recomputation under checkpointing the block's last linear computes only what its
  backward pass saves.

The values are the ones each layer computes on its own (tests/test_stage_layer.py, bit for bit)."""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..lora import QLoRALinear
from ..lora_math import dropped, keep_scale
from ..model import CHECKPOINTED, ON_RECOMPUTE, lora_linears
from ..optim import flat_view
from .block_scales import BlockScales
from .layer import OUTPUT_UNUSED, stage, stage_dropped, unstage

#: the LoRA layers of a decoder block that read one input, by parent module (LLaMA, Mistral and Qwen2 name them alike)
SHARED_INPUTS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}
#: a block's last linear (parent module, name). In the recomputation under checkpointing its output feeds nothing
#: the backward pass needs — the residual addition after it saves nothing, and the block's output is the next
#: block's input, which that block's checkpoint keeps — so there it computes only what its backward pass saves:
#: no dequantization, frozen product, up-projection or addition (4 kernels per block and step; LLaMA, Mistral
#: and Qwen2 end their blocks alike). Both facts belong to transformers and torch; its output is NaN there, so a
#: change that reads it shows as a NaN loss
LAST_LINEAR = ("mlp", "down_proj")
#: on a decoder layer: the handles of the hooks ``install`` registered
HOOKS = "_qlora_fast_hooks"


def block_adapters(linears: list[QLoRALinear]) -> dict:
    """LoRA layer -> (A, B) in the compute dtype, cast in one operator for the whole block when its adapters lie in
    one buffer as the flat optimizer lays them out (``qlora_gpu.optim.flat_view``); nothing otherwise (each layer
    then casts its own, the same values)."""
    kinds = {m.compute_dtype for m in linears}
    if len(kinds) != 1:
        return {}
    cdt = getattr(torch, kinds.pop())
    params = [p for m in linears for p in (m.lora_A, m.lora_B)]
    found = None if params[0].dtype == cdt else flat_view(params)  # already the compute dtype: nothing to cast
    if found is None:
        return {}
    flat, starts = found
    flat = flat.to(cdt)  # the gaps between the adapters cast too
    cast = [flat[s:s + p.numel()].view(p.shape) for s, p in zip(starts, params, strict=True)]
    return {m: (cast[2 * i], cast[2 * i + 1]) for i, m in enumerate(linears)}


def block_scales(layer: nn.Module, linears: list[QLoRALinear], device: torch.device) -> dict:
    """LoRA layer -> (its double-quantized scales decoded to float32, whether its backward pass uses them too),
    decoded for the whole block by two operators (``qlora_gpu.fast.block_scales``); nothing for a layer that cannot
    share the block's buffer (it decodes its own, the same values). The backward pass uses them under gradient
    checkpointing only: there they are saved as nothing and decoded again by the recomputation, where without
    checkpointing they would stay in memory from the forward pass to the backward pass (a block's float32 absmax:
    13 MB at LLaMA-7B)."""
    scales = BlockScales.of(layer, linears)
    if scales is None or scales.codes.device != device:
        return {}
    for_backward = bool(layer.__dict__.get(CHECKPOINTED)) and layer.training
    return {m: (absmax, for_backward) for m, absmax in scales.decode().items()}


@torch.no_grad()
def stage_layer(layer: nn.Module, hidden: torch.Tensor) -> None:
    """Casts a decoder layer's adapters to the compute dtype and decodes its double-quantized scales for the whole
    block at once, then hands each LoRA layer its share (``qlora_gpu.fast.layer.stage``); ``hidden`` is the
    block's input. Per call of a LLaMA block: 1 cast instead of 14, 2 decoding operators instead of 14."""
    linears = lora_linears(layer)
    if not linears:
        return
    adapters = block_adapters(linears)
    scales = block_scales(layer, linears, hidden.device)
    for m in linears:
        stage(m, adapters.get(m), scales.get(m))


@torch.no_grad()
def drop_together(layers: list, x: torch.Tensor) -> None:
    """x ⊙ Mᵢ / (1 − p) for LoRA layers that all read the input ``x``, in one kernel (``x`` broadcast against
    their stacked masks) where each layer would launch its own, handed to each (``qlora_gpu.fast.layer.
    stage_dropped``). The same elementwise product as a layer's own, so the same bits. Only when every layer has a
    staged mask and the masks lie one after the other in one buffer, as ``qlora_gpu.model.draw_block_masks`` draws
    them (a view then stacks them); otherwise each layer computes its own."""
    keeps = [m.staged_mask() for m in layers]
    if len(layers) < 2 or any(k is None for k in keeps):
        return
    first, width = layers[0], layers[0].in_features
    rows = x.numel() // width if x.shape[-1] == width else 0
    step = rows * width
    stacked = rows > 0 and all(
        m.in_features == width and m.dropout == first.dropout and m.compute_dtype == first.compute_dtype
        and m.kernel == "bnb" and k.shape == (rows, width) and k.is_contiguous()
        and k.untyped_storage().data_ptr() == keeps[0].untyped_storage().data_ptr()
        and k.storage_offset() == keeps[0].storage_offset() + i * step
        for i, (m, k) in enumerate(zip(layers, keeps, strict=True)))
    if not stacked:
        return
    keep = keeps[0].as_strided((len(layers), rows, width), (step, width, 1))
    xc = x.reshape(-1, width).to(getattr(torch, first.compute_dtype))
    xd = dropped(xc.expand(len(layers), rows, width), keep, keep_scale(first.dropout))
    for m, k, d in zip(layers, keeps, xd.unbind(0), strict=True):
        stage_dropped(m, x, k, d)


def drop_shared_input(parent: nn.Module, names: tuple, x: torch.Tensor) -> None:
    """x ⊙ Mᵢ / (1 − p) for the LoRA layers ``names`` of ``parent`` that read the input ``x`` (q, k and v; gate
    and up), in one kernel for all of them where each layer would launch its own (``drop_together``)."""
    drop_together([m for m in (getattr(parent, n, None) for n in names) if isinstance(m, QLoRALinear)], x)


def skip_last_output(layer: nn.Module):
    """The layer's ``ON_RECOMPUTE`` (``qlora_gpu.model``): its last linear (``LAST_LINEAR``) returns NaN for its
    output in the recomputation (``qlora_gpu.fast.layer``), so that a library that starts reading it gives a NaN
    loss rather than silently wrong gradients; returns the undoing function."""
    last = getattr(getattr(layer, LAST_LINEAR[0], None), LAST_LINEAR[1], None)
    if not isinstance(last, QLoRALinear):
        return _nothing
    last.__dict__[OUTPUT_UNUSED] = True
    return functools.partial(last.__dict__.pop, OUTPUT_UNUSED, None)


def _nothing() -> None:
    pass


def _stage_hook(layer: nn.Module, norm: nn.Module, args: tuple) -> None:
    """Forward pre-hook on a block's ``input_layernorm``, after the core's mask hook (registered first): inside the
    checkpointed function in every transformers version, so the recomputation stages again and no cast is kept
    from forward to backward."""
    stage_layer(layer, args[0])


def _shared_input_hook(names: tuple, parent: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a block's attention and MLP modules (``SHARED_INPUTS``): their input, positional or
    transformers' ``hidden_states=``, goes to ``drop_shared_input``."""
    x = args[0] if args else kwargs.get("hidden_states")
    if isinstance(x, torch.Tensor):
        drop_shared_input(parent, names, x)


def _unstage_hook(layer: nn.Module, args: tuple, output) -> None:
    """Forward hook of a decoder layer: drops whatever ``stage_layer`` and ``drop_together`` left unused."""
    for m in lora_linears(layer):
        unstage(m)


def install(layer: nn.Module) -> None:
    """The hooks of this module on one decoder layer (once), and its ``ON_RECOMPUTE``."""
    if HOOKS in layer.__dict__:
        return
    handles = [layer.input_layernorm.register_forward_pre_hook(functools.partial(_stage_hook, layer)),
               layer.register_forward_hook(_unstage_hook)]
    for parent, names in SHARED_INPUTS.items():
        if isinstance(getattr(layer, parent, None), nn.Module):
            handles.append(getattr(layer, parent).register_forward_pre_hook(
                functools.partial(_shared_input_hook, names), with_kwargs=True))
    layer.__dict__[HOOKS] = handles
    layer.__dict__[ON_RECOMPUTE] = functools.partial(skip_last_output, layer)


def uninstall(layer: nn.Module) -> None:
    """Remove what ``install`` set on ``layer`` (and anything staged)."""
    for h in layer.__dict__.pop(HOOKS, []):
        h.remove()
    layer.__dict__.pop(ON_RECOMPUTE, None)
    for m in lora_linears(layer):
        unstage(m)
