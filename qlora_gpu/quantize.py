"""The quantization core over torch tensors, through ``bitsandbytes.functional`` (CPU and CUDA).

Same names, arguments and ``Quantized4bit`` layout as ``qlora_ref.quantize`` (torch tensors inside); checks and
the state-dict format are imported from the reference, never copied.

bitsandbytes' CPU dequantization is checked before it is trusted: its AVX-512 kernel (0.50.2) scales by the wrong
absmax when the last dimension is not a multiple of the block size, changing weights by O(1) (docs/divergences.md).
At the first CPU dequantization a small probe compares bitsandbytes' kernel with the numerical contract's
definition (``dequantize_4bit_spec``), separately for aligned and ragged last dimensions; where it disagrees, every
CPU dequantization of ``qlora_gpu`` takes ``dequantize_4bit_spec`` instead (``cpu_dequantize_status`` says which).
"""

from __future__ import annotations

import copy
import functools
import math

import bitsandbytes.functional as bnbf
import numpy as np
import torch

from qlora_ref import quantize as ref
from qlora_ref.checks import (
    BLOCKSIZES_8BIT,
    QUANT_TYPES_4BIT,
    check_blocksize,
    check_bool,
    check_float_input,
    check_quant_type,
    double_quant_overflow_error,
)
from qlora_ref.codebooks import codebook
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

    def for_matmul_4bit(self) -> Quantized4bit:
        """This weight in a form bitsandbytes' ``matmul_4bit`` computes: itself, or where its scales are
        double-quantized in blocks other than the 256 that bitsandbytes writes (a size the format allows and the
        reference reads; bitsandbytes 0.50's ``matmul_4bit`` raises ``NotImplementedError`` for it at the first
        forward), the same weight with those scales decoded once to float32 — the values bitsandbytes'
        ``dequantize_4bit`` decodes, so the layer computes the same weight."""
        if self.state2 is None or self.state2.blocksize == ref.DOUBLE_QUANT_BLOCKSIZE:
            return self
        return Quantized4bit(self.packed, self.absmax_float32(), self.shape, self.dtype, self.blocksize,
                             self.quant_type, self.code)

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, state: bnbf.QuantState) -> Quantized4bit:
        """Wrap bitsandbytes' packed data and ``QuantState``."""
        state2 = None
        offset = None
        if state.nested:
            s2 = state.state2
            state2 = Quantized8bit(state.absmax, s2.absmax, s2.code, s2.blocksize, tuple(state.absmax.shape),
                                   dtype_name(s2.dtype))
            offset = float(state.offset.detach()) if isinstance(state.offset, torch.Tensor) else float(state.offset)
        return cls(packed.view(torch.uint8).reshape(-1, 1), state.absmax, tuple(state.shape), dtype_name(state.dtype),
                   state.blocksize, state.quant_type, state.code, offset, state2)


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every element of ``x`` is finite, in one reduction: a NaN or an infinity reaches the minimum or
    the maximum (torch's min/max propagate NaN). ``torch.isfinite(x).all()`` would allocate |x| and three
    boolean masks (docs/benchmarks.md), above the build's one-linear transient."""
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
    blocksize = check_blocksize(blocksize)
    double_quant = check_bool(double_quant, "double_quant")
    packed, state = bnbf.quantize_4bit(x, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
    if double_quant and not math.isfinite(float(state.offset)):  # else every weight would dequantize to NaN
        raise ValueError(f"x: double quantization overflows in bitsandbytes: it averages the {state.absmax.numel()} "
                         "block scales in float32, and their sum exceeds the float32 maximum (3.4e38; the largest "
                         f"|x| is {float(torch.abs(x).max()):.3g}); qlora_ref, which averages in float64, does not. "
                         "Quantize with double_quant=False, or scale x down")
    if double_quant and not torch.isfinite(decode_absmax(state)).all():  # a finite mean, a scale rebuilt past the max
        raise double_quant_overflow_error(float(torch.abs(x).max()))
    return Quantized4bit.from_bnb(packed, state)


def dequantize_4bit(q: Quantized4bit, dtype=None) -> torch.Tensor:
    """``qlora_ref.dequantize_4bit`` on torch tensors, by ``bitsandbytes.functional.dequantize_4bit`` (on the CPU
    by ``dequantize_4bit_spec`` where bitsandbytes' kernel fails its probe)."""
    if not isinstance(q, ref.Quantized4bit):
        raise ValueError(f"q must be a Quantized4bit (quantize_4bit's result), got {type(q).__name__}")
    q.check()  # its fields may have been changed since it was made
    if not isinstance(q, Quantized4bit):  # the reference's (NumPy arrays): converted through its state dict
        q = Quantized4bit.from_state_dict(q.state_dict())
    state = q.to_bnb()
    if dtype is not None:
        state.dtype = _torch_dtype(dtype_name(dtype))
    return dequantize_packed(q.packed, state).reshape(q.shape)


def dequantize_packed(packed: torch.Tensor, state: bnbf.QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A bitsandbytes 4-bit weight (packed data and ``QuantState``) in ``dtype`` (default: the state's), shaped as
    the state says: bitsandbytes' kernel, or on the CPU ``dequantize_4bit_spec`` where that kernel is wrong for
    this shape (``cpu_dequantize_trusted``). Reads nothing back to the host on CUDA."""
    dtype = state.dtype if dtype is None else dtype
    shape = tuple(state.shape)
    numel = int(np.prod(shape))
    if packed.device.type == "cpu" and not cpu_dequantize_trusted(shape, state.blocksize):
        return dequantize_4bit_spec(packed, decode_absmax(state), state.code, state.blocksize, shape, dtype)
    state = copy.copy(state)  # a shallow copy that asks for dtype: the caller's state is left as it was
    state.dtype = dtype
    if packed.shape[0] == 1:
        # bitsandbytes transposes the output when the packed data has one row (a "BC shim" for an old layout),
        # which breaks tensors of one or two elements; ask for a flat result and reshape it ourselves
        state.shape = torch.Size([numel])
    return bnbf.dequantize_4bit(packed, state).reshape(shape)


def decode_absmax(quant_state) -> torch.Tensor:
    """The float32 per-block scales of a bitsandbytes ``QuantState``: plain, or with double quantization (paper,
    section 3, "Double Quantization") code2[c] · absmax2[block of ``state2.blocksize``] + offset, float32, two
    roundings. Decoded by bitsandbytes' own ``dequantize_blockwise`` and ``+= offset``, as its ``dequantize_4bit``
    does for the unfused path: two kernels (a gather-and-multiply in torch took seven launches, and at batch 1 a
    step's time goes by the number of launches). A small tensor (numel/blocksize values), decoded once per kernel
    call; the kernels then read one float per block."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    absmax = bnbf.dequantize_blockwise(quant_state.absmax, quant_state.state2)
    absmax += quant_state.offset
    return absmax.float()


def dequantize_4bit_spec(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                         shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """The numerical contract's dequantization (paper, eq. 2; docs/quantization.md) in torch operators:
    ``float32(code[nibble] · absmax[block])`` rounded once to ``dtype``; element i of the flattened tensor lies in
    the high nibble of byte i // 2 when i is even and in block i // blocksize — blocks run across rows."""
    numel = int(np.prod(shape))
    flat = packed.reshape(-1).view(torch.uint8)
    nibbles = torch.stack((flat >> 4, flat & 0x0F), dim=1).reshape(-1)[:numel].long()
    scales = absmax.float().repeat_interleave(blocksize)[:numel]
    return (code.float()[nibbles] * scales).reshape(shape).to(dtype)


#: how qlora_gpu dequantizes on the CPU: "auto" (bitsandbytes where its probe passes), "bitsandbytes", "spec"
_CPU_DEQUANTIZE = {"mode": "auto"}
CPU_DEQUANTIZE_MODES = ("auto", "bitsandbytes", "spec")


def set_cpu_dequantize(mode: str) -> None:
    """Choose qlora_gpu's CPU dequantization: ``"auto"`` (default: bitsandbytes' kernel where it passes its probe,
    ``dequantize_4bit_spec`` elsewhere), ``"bitsandbytes"`` (always its kernel: to reproduce its results, bugs
    included) or ``"spec"`` (always ``dequantize_4bit_spec``)."""
    if mode not in CPU_DEQUANTIZE_MODES:
        raise ValueError(f"mode must be one of {CPU_DEQUANTIZE_MODES}, got {mode!r}")
    _CPU_DEQUANTIZE["mode"] = mode


def _ragged(shape: tuple, blocksize: int) -> bool:
    return len(shape) == 0 or shape[-1] % blocksize != 0


def cpu_dequantize_trusted(shape: tuple, blocksize: int) -> bool:
    """Whether qlora_gpu dequantizes a CPU weight of ``shape`` by bitsandbytes' kernel (see ``set_cpu_dequantize``):
    under ``"auto"``, whether that kernel passed ``probe_dequantize_4bit`` for the class of ``shape`` (last
    dimension a multiple of the block size, or ragged)."""
    mode = _CPU_DEQUANTIZE["mode"]
    if mode != "auto":
        return mode == "bitsandbytes"
    return bitsandbytes_cpu_dequantize_correct(shape, blocksize)


def bitsandbytes_cpu_dequantize_correct(shape: tuple, blocksize: int) -> bool:
    """Whether bitsandbytes' own CPU dequantization passed ``probe_dequantize_4bit`` on this machine for weights
    like ``shape`` (last dimension a multiple of ``blocksize``, or ragged); probed once per class and process."""
    return _bnb_cpu_kernel_correct(_ragged(tuple(shape), blocksize))


@functools.cache
def _bnb_cpu_kernel_correct(ragged: bool) -> bool:
    return probe_dequantize_4bit(bnbf.dequantize_4bit, ragged)


#: the probe's cases (shape, block size): last dimensions a multiple of the block size, and ragged ones (even and
#: odd: bitsandbytes' AVX-512 kernel hands odd widths to its generic code)
_PROBE_SHAPES = {False: [((3, 128), 64), ((2, 256), 128), ((64,), 64)],
                 True: [((40, 96), 64), ((3, 100), 64), ((5, 33), 32), ((70,), 64)]}


def probe_dequantize_4bit(dequantize, ragged: bool) -> bool:
    """Whether ``dequantize`` (``bitsandbytes.functional.dequantize_4bit``'s signature) equals
    ``dequantize_4bit_spec`` on small random CPU weights whose last dimension is ragged (or not) for the block
    size — NF4 and FP4, float32 / bfloat16 / float16 outputs. Values compare as numbers (bitsandbytes' CPU kernel
    writes FP4's zero as -0.0, docs/divergences.md). Any exception counts as a failure."""
    g = torch.Generator().manual_seed(0)
    try:
        for shape, blocksize in _PROBE_SHAPES[ragged]:
            numel = int(np.prod(shape))
            packed = torch.randint(0, 256, ((numel + 1) // 2, 1), dtype=torch.uint8, generator=g)
            absmax = torch.rand(-(-numel // blocksize), generator=g) + 0.5
            for quant_type in QUANT_TYPES_4BIT:
                code = torch.from_numpy(codebook(quant_type).copy())
                for dtype in (torch.float32, torch.bfloat16, torch.float16):
                    state = bnbf.QuantState(absmax=absmax, shape=torch.Size(shape), code=code, blocksize=blocksize,
                                            quant_type=quant_type, dtype=dtype)
                    theirs = dequantize(packed, state)
                    ours = dequantize_4bit_spec(packed, absmax, code, blocksize, shape, dtype)
                    if theirs.dtype != dtype or not torch.equal(theirs.reshape(shape), ours):
                        return False
    except Exception:  # noqa: BLE001 - a kernel that cannot even run the probe is not trusted
        return False
    return True


def cpu_dequantize_status() -> dict[str, str]:
    """Which CPU dequantization qlora_gpu uses, per class of shape (for ``qlora doctor`` and bug reports)."""
    mode = _CPU_DEQUANTIZE["mode"]
    out = {}
    for ragged, name in ((False, "last dim a multiple of the block size"), (True, "ragged last dim")):
        if mode != "auto":
            out[name] = f"{mode} (forced by set_cpu_dequantize)"
        elif _bnb_cpu_kernel_correct(ragged):
            out[name] = "bitsandbytes (its kernel passed the probe)"
        else:
            out[name] = "spec (bitsandbytes' kernel failed the probe: worked around)"
    return out


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = 256) -> Quantized8bit:
    """``qlora_ref.quantize_blockwise_8bit`` on torch tensors (bitsandbytes' kernel and its signed dynamic map)."""
    _check_input(x)
    blocksize = check_blocksize(blocksize, BLOCKSIZES_8BIT)
    codes, state = bnbf.quantize_blockwise(x, blocksize=blocksize)
    return Quantized8bit(codes, state.absmax, state.code, blocksize, tuple(x.shape), dtype_name(x.dtype))


def dequantize_blockwise_8bit(q: Quantized8bit) -> torch.Tensor:
    """``qlora_ref.dequantize_blockwise_8bit`` on torch tensors; the reference's state (NumPy arrays) is converted."""
    if not isinstance(q, ref.Quantized8bit):
        raise ValueError(f"q must be a Quantized8bit (quantize_blockwise_8bit's result), got {type(q).__name__}")
    if not isinstance(q.codes, torch.Tensor):
        t = Quantized4bit._from_numpy
        q = Quantized8bit(t(q.codes), t(q.absmax), t(q.code), int(q.blocksize), tuple(q.shape), q.dtype)
    state = bnbf.QuantState(absmax=q.absmax, code=q.code, blocksize=q.blocksize, dtype=torch.float32)
    return bnbf.dequantize_blockwise(q.codes, state).reshape(q.shape)
