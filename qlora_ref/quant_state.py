"""The quantized tensors (``Quantized4bit``, ``Quantized8bit``) and the on-disk layout of a 4-bit weight: exactly
the keys and tensors that transformers writes for a bitsandbytes ``Linear4bit`` (``QuantState.as_dict(packed=True)``),
so checkpoints move between the two backends and the Hugging Face ecosystem. ``qlora_ref.quantize`` makes them.

    <prefix>weight                                   uint8 packed codes, shape ((n + 1) // 2, 1)
    <prefix>weight.absmax                            float32 per block, or uint8 codes when double-quantized
    <prefix>weight.quant_map                         float32[16], the data type
    <prefix>weight.nested_absmax                     float32, second-level constants     (double quantization)
    <prefix>weight.nested_quant_map                  float32[256], the dynamic 8-bit map  (double quantization)
    <prefix>weight.quant_state.bitsandbytes__nf4     uint8: UTF-8 JSON of quant_type, blocksize, dtype, shape
                                                     (+ nested_blocksize, nested_dtype, nested_offset)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import blockwise
from .checks import BLOCKSIZES_8BIT, QUANT_TYPES_4BIT, check_blocksize, check_quant_type
from .codebooks import codebook
from .dtypes import dtype_name

_PACKED_KEY = "quant_state.bitsandbytes__"


@dataclass
class Quantized8bit:
    """Blockwise dynamic 8-bit quantization of a tensor (used for the absmax constants and optimizer states).

    ``codes`` holds one uint8 index into ``code`` per element (shape ``shape``), ``absmax`` one float32 scale per
    block of ``blocksize`` elements of the flattened tensor.
    """

    codes: np.ndarray
    absmax: np.ndarray
    code: np.ndarray
    blocksize: int
    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass
class Quantized4bit:
    """A 4-bit quantized tensor in bitsandbytes' layout (``bitsandbytes.functional.QuantState`` plus the data).

    - ``packed``: uint8, shape ((n + 1) // 2, 1); element 2i in the high nibble of byte i, 2i+1 in the low one
    - ``absmax``: one float32 constant per block — or, double-quantized, one uint8 code per block (bitsandbytes'
      name for it; the same codes as ``state2.codes``)
    - ``code``: the 16 values of the data type (``quant_map``)
    - ``offset`` and ``state2``: with double quantization, the mean subtracted from the absmax and the
      ``Quantized8bit`` state of (absmax - offset); None otherwise
    - ``shape``, ``dtype`` (name of the original float type), ``blocksize``, ``quant_type``

    In the paper's symbols (section 3, eq. 5-6): W^NF4 is ``packed``; c2^FP32, the first-level constants, are
    ``absmax`` without double quantization; with it, c2^FP8 (the paper's c2^k-bit) is ``absmax`` (uint8), c1^FP32,
    the second-level constants (one per 256), is ``state2.absmax``, and ``offset`` is the mean that the paper's
    prose subtracts and eq. 6 leaves out.
    """

    packed: np.ndarray
    absmax: np.ndarray
    shape: tuple[int, ...]
    dtype: str
    blocksize: int
    quant_type: str
    code: np.ndarray
    offset: float | None = None
    state2: Quantized8bit | None = field(default=None, repr=False)

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """A ValueError naming the field whose size does not fit the others (a hand-built, edited or mutated
        state): the Numba kernels index without bounds checks, so such a state would otherwise be read past the
        end of ``packed`` or leave outputs unwritten. Every reader calls it; construction does too."""
        if not (isinstance(self.shape, tuple | list)
                and all(isinstance(s, int | np.integer) and not isinstance(s, bool) and s >= 0 for s in self.shape)):
            raise ValueError(f"shape must be a tuple of non-negative integers, got {self.shape!r}")
        blocksize = check_blocksize(self.blocksize)
        n = self.numel
        nblocks = -(-n // blocksize)
        sizes = [("packed", self.packed, (n + 1) // 2, f"two 4-bit codes per byte of {n} elements"),
                 ("absmax", self.absmax, nblocks, f"one per block of {blocksize} of {n} elements"),
                 ("code", self.code, 16, "the 16 values of the data type")]
        if self.state2 is not None:
            s2 = self.state2
            sizes += [("state2.codes", s2.codes, nblocks, "one per block"),
                      ("state2.absmax", s2.absmax, -(-nblocks // s2.blocksize),
                       f"one per {s2.blocksize} blocks of {nblocks}"),
                      ("state2.code", s2.code, 256, "the dynamic 8-bit map")]
        for name, a, want, why in sizes:
            if _size(a) != want:
                raise ValueError(f"{name} has {_size(a)} elements, shape {tuple(self.shape)} needs {want} ({why})")

    @property
    def double_quant(self) -> bool:
        return self.state2 is not None

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def absmax_float32(self) -> np.ndarray:
        """The float32 per-block constants c2^FP32, double quantization undone: dyn8[c2 code] · c1 + mean (the
        inner dequant of eq. 6, plus the mean that eq. 6 leaves out)."""
        if self.state2 is None:
            return self.absmax
        s2 = self.state2  # the 8-bit codes of (absmax - mean), one per block: eq. 2 with the dynamic map
        centred = blockwise.dequantize_codes(s2.codes.reshape(-1), s2.absmax, s2.code, s2.blocksize)
        return centred + np.float32(self.offset)

    def codes(self) -> np.ndarray:
        """One 4-bit code (uint8) per element of the flattened tensor."""
        return blockwise.unpack_nibbles(self.packed, self.numel)

    def bits_per_parameter(self) -> float:
        """Storage cost per weight: 4 bits plus the constants (0.5 bits plain, ~0.127 with double quantization
        at blocksize 64: the arithmetic of section 3), the mean included; the per-tensor maps (``code``, the 8-bit
        map) are not counted, as in ``memory.quant_constant_bits_per_param``; ``memory``'s ``MemoryBreakdown``
        counts them too."""
        total_bits = 8 * _size(self.packed) + 32 * (self.state2 is None) * _size(self.absmax)
        if self.state2 is not None:
            total_bits += 8 * _size(self.absmax) + 32 * _size(self.state2.absmax) + 32
        return total_bits / self.numel

    def state_dict(self, prefix: str = "") -> dict:
        """The tensors transformers writes for a bitsandbytes ``Linear4bit`` weight, under ``prefix``.

        Keys: ``weight``, ``weight.absmax``, ``weight.quant_map``, with double quantization
        ``weight.nested_absmax`` and ``weight.nested_quant_map``, and ``weight.quant_state.bitsandbytes__<type>``
        holding the non-tensor fields as UTF-8 JSON bytes.
        """
        return {k: self._from_numpy(v) for k, v in to_state_dict(self, prefix, self._to_numpy).items()}

    @classmethod
    def from_state_dict(cls, d: dict, prefix: str = "") -> Quantized4bit:
        """Read a quantized weight back from ``state_dict`` output (ours, transformers' or bitsandbytes')."""
        fields = from_state_dict({k: cls._to_numpy(v) for k, v in d.items()}, prefix)
        return cls._build(**fields)

    @classmethod
    def _build(cls, packed, absmax, shape, dtype, blocksize, quant_type, code, offset=None, state2=None):
        """Construct from NumPy arrays (a backend subclass converts them to its own arrays here)."""
        return cls(packed, absmax, tuple(shape), dtype, blocksize, quant_type, code, offset, state2)

    @staticmethod
    def _to_numpy(a) -> np.ndarray:
        return np.asarray(a)

    @staticmethod
    def _from_numpy(a: np.ndarray):
        return a


def to_state_dict(q, prefix: str, to_numpy: Callable) -> dict[str, np.ndarray]:
    """NumPy arrays under bitsandbytes' keys for a ``Quantized4bit`` (the JSON fields in bitsandbytes' order, so
    the bytes equal those transformers writes)."""
    if q.quant_type not in QUANT_TYPES_4BIT:
        raise ValueError(f"only nf4 and fp4 have a bitsandbytes storage format, this weight is {q.quant_type!r}")
    w = prefix + "weight"
    meta = {"quant_type": q.quant_type, "blocksize": q.blocksize, "dtype": q.dtype, "shape": list(q.shape)}
    d = {w: to_numpy(q.packed), w + ".absmax": to_numpy(q.absmax), w + ".quant_map": to_numpy(q.code)}
    if q.state2 is not None:
        d[w + ".nested_absmax"] = to_numpy(q.state2.absmax)
        d[w + ".nested_quant_map"] = to_numpy(q.state2.code)
        meta.update(nested_blocksize=q.state2.blocksize, nested_dtype=q.state2.dtype, nested_offset=float(q.offset))
    d[w + "." + _PACKED_KEY + q.quant_type] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8).copy()
    return d


def _size(a) -> int:
    """Elements of a NumPy array or a torch tensor, from its shape (no copy to the host)."""
    return int(np.prod(tuple(np.shape(a) if isinstance(a, np.ndarray) else a.shape), dtype=np.int64))


def _check_scales(key: str, a: np.ndarray) -> np.ndarray:
    """Stored absmax constants are finite and non-negative (an absmax is |x|'s maximum)."""
    if a.size and not (np.isfinite(a).all() and (a >= 0).all()):
        raise ValueError(f"{key!r} must hold finite, non-negative scales (an edited or damaged file)")
    return a


def _finite_float32(value: int | float) -> bool:
    """Whether a JSON number is finite in float32 (an integer beyond float64's range is not: no OverflowError)."""
    try:
        with np.errstate(over="ignore"):
            return bool(np.isfinite(np.float32(float(value))))
    except OverflowError:
        return False


def _require(d: dict, key: str, dtype, size: int | None = None) -> np.ndarray:
    if key not in d:
        raise ValueError(f"state dict has no {key!r} (keys present: {sorted(d)})")
    a = np.asarray(d[key])
    if a.dtype != dtype:
        raise ValueError(f"{key!r} must be {np.dtype(dtype).name}, got {a.dtype}")
    if size is not None and a.size != size:
        raise ValueError(f"{key!r} must have {size} elements, got {a.size}")
    return a


def from_state_dict(d: dict[str, np.ndarray], prefix: str) -> dict:
    """The fields of a ``Quantized4bit`` from a state dict, each key and size checked against the JSON metadata."""
    w = prefix + "weight"
    meta_keys = [k for k in d if k.startswith(w + "." + _PACKED_KEY)]
    if len(meta_keys) != 1:
        raise ValueError(
            f"state dict must hold exactly one {w + '.' + _PACKED_KEY}<nf4|fp4> entry, found {meta_keys or 'none'}"
        )
    meta_key = meta_keys[0]
    try:
        meta = json.loads(bytes(np.asarray(d[meta_key], dtype=np.uint8).reshape(-1)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta_key!r} is not UTF-8 JSON: {e}") from e
    for k in ("quant_type", "blocksize", "dtype", "shape"):
        if k not in meta:
            raise ValueError(f"{meta_key!r} lacks the field {k!r}")
    quant_type = check_quant_type(meta["quant_type"])
    if meta_key != w + "." + _PACKED_KEY + quant_type:
        raise ValueError(f"{meta_key!r} disagrees with its quant_type {quant_type!r}")
    blocksize = check_blocksize(meta["blocksize"])
    shape = meta["shape"]
    if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise ValueError(f"{meta_key!r}: shape must be a list of non-negative integers, got {shape!r}")
    shape = tuple(shape)
    n = math.prod(shape)  # Python ints: a damaged shape beyond int64 is a size mismatch below, not an OverflowError
    nblocks = -(-n // blocksize)
    packed = _require(d, w, np.uint8, (n + 1) // 2).reshape(-1, 1)
    code = _require(d, w + ".quant_map", np.float32, 16)
    if not np.array_equal(code, codebook(quant_type)):  # bitsandbytes' kernels use their own table, not this one
        raise ValueError(f"{w + '.quant_map'!r} is not the {quant_type} table (bitsandbytes' kernels would use "
                         "their built-in one and the reference the stored one): an edited or damaged file")
    nested = "nested_offset" in meta
    if nested != (w + ".nested_absmax" in d):
        raise ValueError(
            f"{meta_key!r} and the presence of {w + '.nested_absmax'!r} disagree about double quantization"
        )
    fields = dict(packed=packed, shape=shape, dtype=dtype_name(meta["dtype"]), blocksize=blocksize,
                  quant_type=quant_type, code=code)
    if not nested:
        fields["absmax"] = _check_scales(w + ".absmax", _require(d, w + ".absmax", np.float32, nblocks))
        return fields
    nested_blocksize = check_blocksize(meta.get("nested_blocksize"), BLOCKSIZES_8BIT, "nested_blocksize")
    codes = _require(d, w + ".absmax", np.uint8, nblocks)
    nested_absmax = _check_scales(w + ".nested_absmax",
                                  _require(d, w + ".nested_absmax", np.float32, -(-nblocks // nested_blocksize)))
    nested_code = _require(d, w + ".nested_quant_map", np.float32, 256)
    fields["absmax"] = codes
    offset = meta["nested_offset"]
    if isinstance(offset, bool) or not isinstance(offset, int | float) or not _finite_float32(offset):
        raise ValueError(f"{meta_key!r}: nested_offset must be a finite number, got {repr(offset)[:40]}")
    fields["offset"] = float(np.float32(offset))
    fields["state2"] = Quantized8bit(codes, nested_absmax, nested_code, nested_blocksize, (nblocks,),
                                     dtype_name(meta.get("nested_dtype", "float32")))
    return fields
