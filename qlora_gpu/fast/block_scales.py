"""A decoder block's double-quantized scales, decoded once per block call (host time at batch 1,
docs/benchmarks.md).

With double quantization (QLoRA section 3, "Double Quantization") each 4-bit weight's quantization constants
c₂ — one float32 absmax per block of 64 weights — are themselves stored as 8-bit codes, with a float32 constant
c₁ per 256 of them and the offset the 8-bit quantization subtracted: absmax = code₈[c] · c₁[⌊i/256⌋] + offset
(``qlora_ref.quantize.dequantize_4bit``). bitsandbytes decodes them inside every use of the weight, two kernels
each time — the 8-bit dequantization, then the offset's addition — so a LLaMA block's seven linears decode them
42 times per training step under gradient checkpointing (forward, recomputation, backward).

``BlockScales`` keeps the 8-bit codes of a block's LoRA linears in one buffer instead, each layer's padded to a
whole number of 256-blocks, and decodes all of them with one dequantization and one addition per block call. Each
layer then hands bitsandbytes its float32 absmax as it would for a weight stored without double quantization:
the same values, so the same products to the bit, four kernels per block and step where there were 42. The
layers' ``QuantState``\\ s point into the buffer, so nothing is stored twice. ``prepare_model`` lays each block out
as it builds it (the per-layer tensors freed then are reused by the next blocks' allocations; freed at the first
step, a GPU's caching allocator would keep them: 1 GB at 65B); a layer whose state no longer points into the
buffer (a new weight, the model moved to another device) makes ``of`` lay the block out again.
"""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import torch
from torch import nn

BLOCK2 = 256  # the second quantization's block (bitsandbytes' double quantization always uses 256)


def _nested_state(m: nn.Module):
    """``m``'s bitsandbytes ``QuantState`` if it is double-quantized as bitsandbytes does it, else None."""
    state = getattr(m.weight, "quant_state", None)
    if state is None or not state.nested:
        return None
    s2 = state.state2
    fits = (s2.blocksize == BLOCK2 and state.absmax.dtype == torch.uint8 and s2.absmax.dtype == torch.float32
            and s2.absmax.numel() == -(-state.absmax.numel() // BLOCK2))
    return state if fits else None


class BlockScales:
    """The 8-bit absmax codes of ``linears`` (``QLoRALinear``\\ s with double-quantized 4-bit weights on one device,
    sharing one 8-bit code book) in one buffer, each layer's ``QuantState`` re-pointed at its share (bitsandbytes'
    absmax is one-dimensional)."""

    def __init__(self, linears: list[nn.Module]):
        states = [_nested_state(m) for m in linears]
        self.linears = list(linears)
        first = states[0]
        device = first.absmax.device
        sizes = [s.absmax.numel() for s in states]
        blocks = [-(-n // BLOCK2) for n in sizes]
        self.codes = torch.zeros(sum(blocks) * BLOCK2, dtype=torch.uint8, device=device)
        self.c1 = torch.empty(sum(blocks), dtype=torch.float32, device=device)
        self.offsets = torch.empty(sum(blocks), dtype=torch.float32, device=device)
        self.code = first.state2.code
        self.sizes = []  # the decoded buffer's split: each layer's absmax, then its padding
        start = block = 0
        for s, n, b in zip(states, sizes, blocks, strict=True):
            codes, c1 = self.codes[start:start + n], self.c1[block:block + b]
            codes.copy_(s.absmax.reshape(-1))
            c1.copy_(s.state2.absmax)
            self.offsets[block:block + b] = torch.as_tensor(s.offset, dtype=torch.float32, device=device)
            self.sizes += [n, b * BLOCK2 - n]
            s.absmax, s.state2.absmax = codes, c1
            start, block = start + b * BLOCK2, block + b
        self.offsets = self.offsets[:, None]  # one per row of BLOCK2 decoded values
        self._views = [(s.absmax, s.state2.absmax) for s in states]

    @classmethod
    def of(cls, layer: nn.Module, linears: list[nn.Module]) -> BlockScales | None:
        """The block's laid-out scales, laid out on the first call and again whenever a layer's state moved; None
        when fewer than two of ``linears`` can share a buffer (nothing to save)."""
        cached = layer.__dict__.get("_qlora_block_scales")
        if cached is not None and cached.current():
            return cached
        shared = _shareable(linears)
        found = cls(shared) if len(shared) >= 2 else None
        layer.__dict__["_qlora_block_scales"] = found  # not a submodule or buffer: no state-dict entry
        return found

    def current(self) -> bool:
        """Whether every layer's ``QuantState`` still points into this buffer."""
        for m, (codes, c1) in zip(self.linears, self._views, strict=True):
            s = getattr(m.weight, "quant_state", None)
            if s is None or s.absmax is not codes or s.state2 is None or s.state2.absmax is not c1:
                return False
        return True

    def decode(self) -> dict:
        """Layer -> its absmax in float32: code₈[c] · c₁ + offset, the rounding bitsandbytes does per layer
        (``dequantize_4bit``: a float32 product, then a float32 addition of the offset). Two kernels and two
        views for the block."""
        state = bnbf.QuantState(absmax=self.c1, code=self.code, blocksize=BLOCK2, dtype=torch.float32)
        absmax = bnbf.dequantize_blockwise(self.codes, state)
        absmax.view(-1, BLOCK2).add_(self.offsets)
        return dict(zip(self.linears, absmax.split(self.sizes)[::2], strict=True))


def _shareable(linears: list[nn.Module]) -> list[nn.Module]:
    """Those of ``linears`` that can share the first double-quantized one's buffer: same device and 8-bit code
    book (compared once, when the block is laid out)."""
    found = [(m, s) for m in linears if (s := _nested_state(m)) is not None]
    return [m for m, s in found if _same_book(s, found[0][1])]


def _same_book(state, first) -> bool:
    a, b = state.state2.code, first.state2.code
    if state.absmax.device != first.absmax.device or a.device != b.device:
        return False
    return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))
