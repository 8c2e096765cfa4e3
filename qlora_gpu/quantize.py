"""The quantization core over torch tensors, through ``bitsandbytes.functional`` (CPU and CUDA).

Same names, arguments and ``Quantized4bit`` layout as ``qlora_ref.quantize`` (torch tensors inside); checks and
the state-dict format are imported from the reference, never copied.
"""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import numpy as np
import torch

from qlora_ref import quantize as ref
from qlora_ref.checks import BLOCKSIZES_8BIT, check_blocksize, check_float_input, check_quant_type
from qlora_ref.dtypes import dtype_name


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


class Quantized8bit(ref.Quantized8bit):
    """``qlora_ref.Quantized8bit`` holding torch tensors."""


class Quantized4bit(ref.Quantized4bit):
    """``qlora_ref.Quantized4bit`` holding torch tensors; converts to and from bitsandbytes' ``QuantState``."""

    @staticmethod
    def _to_numpy(a) -> np.ndarray:
        return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)

    @staticmethod
    def _from_numpy(a: np.ndarray) -> torch.Tensor:
        if isinstance(a, torch.Tensor):
            return a
        return torch.from_numpy(np.array(a))  # a writable copy: torch refuses read-only buffers

    @classmethod
    def _build(cls, packed, absmax, shape, dtype, blocksize, quant_type, code, offset=None, state2=None):
        t = cls._from_numpy
        if state2 is not None:
            state2 = Quantized8bit(t(state2.codes), t(state2.absmax), t(state2.code), state2.blocksize,
                                   state2.shape, state2.dtype)
            absmax = state2.codes
        return cls(t(packed), t(absmax), tuple(shape), dtype, blocksize, quant_type, t(code), offset, state2)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def to(self, device) -> Quantized4bit:
        """The same state on another device."""
        s2 = self.state2
        if s2 is not None:
            s2 = Quantized8bit(s2.codes.to(device), s2.absmax.to(device), s2.code.to(device), s2.blocksize,
                               s2.shape, s2.dtype)
        return Quantized4bit(self.packed.to(device), (s2.codes if s2 else self.absmax.to(device)), self.shape,
                             self.dtype, self.blocksize, self.quant_type, self.code.to(device), self.offset, s2)

    def codes(self) -> torch.Tensor:
        flat = self.packed.reshape(-1)
        return torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)[: self.numel]

    def absmax_float32(self) -> torch.Tensor:
        if self.state2 is None:
            return self.absmax
        return bnbf.dequantize_blockwise(self.absmax, self._bnb_state2()) + self.offset

    def _bnb_state2(self) -> bnbf.QuantState:
        s2 = self.state2
        return bnbf.QuantState(absmax=s2.absmax, code=s2.code, blocksize=s2.blocksize, dtype=_torch_dtype(s2.dtype))

    def to_bnb(self) -> bnbf.QuantState:
        """bitsandbytes' ``QuantState`` for this weight (for ``dequantize_4bit``, ``matmul_4bit``, ``Params4bit``)."""
        nested = self.state2 is not None
        return bnbf.QuantState(
            absmax=self.absmax, shape=torch.Size(self.shape), code=self.code, blocksize=self.blocksize,
            quant_type=self.quant_type, dtype=_torch_dtype(self.dtype),
            offset=torch.tensor(self.offset, dtype=torch.float32, device=self.device) if nested else None,
            state2=self._bnb_state2() if nested else None,
        )

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, state: bnbf.QuantState) -> Quantized4bit:
        """Wrap bitsandbytes' packed data and ``QuantState``."""
        state2 = None
        offset = None
        if state.nested:
            s2 = state.state2
            state2 = Quantized8bit(state.absmax, s2.absmax, s2.code, s2.blocksize, tuple(state.absmax.shape),
                                   dtype_name(s2.dtype))
            offset = float(state.offset)
        return cls(packed.view(torch.uint8).reshape(-1, 1), state.absmax, tuple(state.shape), dtype_name(state.dtype),
                   state.blocksize, state.quant_type, state.code, offset, state2)


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every element of ``x`` is finite, in one reduction: a NaN or an infinity reaches the minimum or
    the maximum (torch's min/max propagate NaN). ``torch.isfinite(x).all()`` would allocate |x| and three
    boolean masks (10 bytes per float32 weight, measured on an H200), above the build's one-linear transient."""
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _check_input(x, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor (float32, float16 or bfloat16), got {type(x).__name__}")
    dname = str(x.dtype).removeprefix("torch.")
    finite = x.numel() == 0 or dname not in ("float32", "float16", "bfloat16") or _all_finite(x)
    check_float_input(name, dname, x.numel(), finite)


def quantize_4bit(
    x: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True
) -> Quantized4bit:
    """``qlora_ref.quantize_4bit`` on torch tensors, by ``bitsandbytes.functional.quantize_4bit``."""
    _check_input(x)
    check_quant_type(quant_type)
    check_blocksize(blocksize)
    packed, state = bnbf.quantize_4bit(x, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
    return Quantized4bit.from_bnb(packed, state)


def dequantize_4bit(q: Quantized4bit, dtype=None) -> torch.Tensor:
    """``qlora_ref.dequantize_4bit`` on torch tensors, by ``bitsandbytes.functional.dequantize_4bit``."""
    if not isinstance(q, Quantized4bit):
        q = Quantized4bit.from_state_dict(q.state_dict())
    state = q.to_bnb()
    if dtype is not None:
        state.dtype = _torch_dtype(dtype_name(dtype))
    if q.packed.shape[0] == 1:
        # bitsandbytes transposes the output when the packed data has one row (a "BC shim" for an old layout),
        # which breaks tensors of one or two elements; ask for a flat result and reshape it ourselves
        state.shape = torch.Size([q.numel])
    return bnbf.dequantize_4bit(q.packed, state).reshape(q.shape)


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = 256) -> Quantized8bit:
    """``qlora_ref.quantize_blockwise_8bit`` on torch tensors (bitsandbytes' kernel and its signed dynamic map)."""
    _check_input(x)
    check_blocksize(blocksize, BLOCKSIZES_8BIT)
    codes, state = bnbf.quantize_blockwise(x, blocksize=blocksize)
    return Quantized8bit(codes, state.absmax, state.code, blocksize, tuple(x.shape), dtype_name(x.dtype))


def dequantize_blockwise_8bit(q: Quantized8bit) -> torch.Tensor:
    state = bnbf.QuantState(absmax=q.absmax, code=q.code, blocksize=q.blocksize, dtype=torch.float32)
    return bnbf.dequantize_blockwise(q.codes, state).reshape(q.shape)
