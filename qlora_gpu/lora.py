"""The QLoRA linear layer on PyTorch + bitsandbytes: ``qlora_ref.lora.QLoRALinear`` as a ``torch.nn.Module``.

The frozen weight is a bitsandbytes ``Params4bit``; the frozen path runs through ``bitsandbytes.matmul_4bit``;
the adapter ``lora_A`` (r, in) and ``lora_B`` (out, r) are ``nn.Parameter``\\ s with PEFT's names, shapes and
initialisation. Forward and backward are one autograd function, ``QLoRALinearFunction``, of the input x, the
4-bit weight and its state, A, B, the dropout mask and scale, and the scaling (docs/lora_backprop.md). It keeps,
for the backward pass, only the (dropped-out) input, the dropout mask, the adapter and ``H = x_d Aᵀ`` (N, r) —
r/in of the input's memory — plus a reference to the 4-bit weight, which is dequantized again in backward and
never stored dequantized.

The arithmetic is the reference's, operation for operation: with ``compute_dtype="bfloat16"`` every step is a
bfloat16 torch operation (float32 accumulation, one rounding), so the two backends differ only by the summation
order inside matrix products. The rules — argument checks (``qlora_ref.lora_checks``), scaling, initialisation, the
dropout factor (``qlora_ref.lora``) — are imported from the reference.

``qlora_gpu.fast`` computes the same values in fewer kernels (host time at batch 1, docs/benchmarks.md): a layer
with ``fast`` set (``qlora_gpu.fast.enable`` sets it on a model's layers) or ``kernel="triton"`` (the fused
Triton kernels, ``qlora_gpu.fast.triton_kernels``: opt-in, 4-bit weights only, docs/fused_kernels.md) hands
its forward call to ``qlora_gpu.fast.layer`` — the one place where this module reaches into ``qlora_gpu.fast``.
The arithmetic both paths share is ``qlora_gpu.lora_math``.
"""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import numpy as np
import torch
from torch import nn

from qlora_ref import lora as ref
from qlora_ref import lora_checks as rules
from qlora_ref.checks import FLOAT_DTYPES, QUANT_TYPES_4BIT, check_float_input
from qlora_ref.quantize import Quantized4bit as RefQuantized4bit

from .lora_math import (
    adapter_forward,
    adapter_grads,
    add_adapter,
    draw_keep,
    dropped,
    frozen_product,
    frozen_weight_as,
    keep_scale,
    mm,
    widened,
)
from .quantize import Quantized4bit, quantize_4bit

#: the implementations of the layer's arithmetic (see the module docstring); "bnb" is the default
KERNELS = ("bnb", "triton")
#: where a layer sharded under FSDP keeps what is left of its 4-bit weight's state (``qlora_gpu.fsdp``)
SHARDED_STATE = "_sharded_4bit"
#: where a layer keeps the dropout mask its decoder block drew for its next forward call (``stage_mask``)
STAGED_MASK = "_staged_mask"


class QLoRALinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s · (x ⊙ M/(1-p)) Aᵀ Bᵀ for x (N, in) in the compute dtype (docs/lora_backprop.md).

    Inputs: x; the frozen weight and its bitsandbytes ``QuantState`` (None: a float32 weight); A and B in any
    dtype (cast to x's here: their gradients come back in the compute dtype and autograd widens them, the cast's
    own backward); the bias (compute dtype) or None; the dropout mask ``keep`` (None: no dropout) and its scale
    1/(1-p); the LoRA scaling s; ``out_dtype``, the output's dtype (None: x's; wider: ``add_adapter``)."""

    @staticmethod
    def forward(ctx, x, weight, quant_state, lora_a, lora_b, bias, keep, scale, scaling, out_dtype):
        ctx.compute_dtype = x.dtype
        ctx.weight, ctx.quant_state, ctx.scaling, ctx.keep_scale = weight, quant_state, scaling, scale
        base = frozen_product(x, weight, quant_state, bias)
        if lora_a is None:
            return widened(base, out_dtype)
        lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        xd, h = adapter_forward(x, keep, scale, lora_a)
        ctx.save_for_backward(xd, keep, lora_a, lora_b, h)  # the input (dropped out), the adapter: nothing (N, out)
        return add_adapter(base, h @ lora_b.t(), scaling, out_dtype)

    @staticmethod
    def backward(ctx, grad_y):
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        grad_y = grad_y.to(ctx.compute_dtype)  # a widened output's gradient: rounded once, as autocast's cast's
        grad_x = grad_a = grad_b = None
        saved = ctx.saved_tensors  # read once: checkpointing's saved-tensor hooks allow a single unpack
        if need_x:  # the frozen path: ∂L/∂x = G W, dequantizing the weight again
            grad_x = mm(grad_y, frozen_weight_as(ctx.weight, ctx.quant_state, grad_y.dtype))
        if saved:
            xd, keep, lora_a, lora_b, h = saved
            gh, grad_a, grad_b = adapter_grads(grad_y, xd, lora_a, lora_b, h, ctx.scaling, need_a, need_b)
            if need_x:  # ∂L/∂x_d = (∂L/∂H) A, through the mask
                grad_x = grad_x + dropped(mm(gh, lora_a), keep, ctx.keep_scale)
        return grad_x, None, None, grad_a, grad_b, None, None, None, None, None


def fast_forward():
    """``qlora_gpu.fast.layer.forward``: imported on first use, where a layer is switched to the fast path (module
    docstring) — the core's one import of ``qlora_gpu.fast``, which itself imports the core."""
    from .fast.layer import forward

    return forward


class QLoRALinear(nn.Module):
    """Frozen bitsandbytes 4-bit (or float32) weight + trainable LoRA adapter; see ``qlora_ref.lora``.

    ``forward(x, dropout_mask=None)`` takes x (..., in) of any float dtype, computes in ``compute_dtype`` and
    returns x's dtype — or ``out_dtype`` where set (e.g. ``"float32"`` for a layer writing into a float32 residual
    stream: the frozen product widened and the adapter's output added to it in that dtype, as peft adds it,
    ``add_adapter``). ``r=None`` builds a frozen layer without adapter. ``kernel``: ``"bnb"`` (default, bitsandbytes'
    unfused path) or ``"triton"`` (the fused kernels of ``qlora_gpu.fast.triton_kernels``: 4-bit weights only;
    opt-in — module docstring); settable later through the ``kernel`` attribute or ``set_kernel``. ``fast``: the
    same values through ``qlora_gpu.fast`` (set for a whole model by ``qlora_gpu.fast.enable``).
    """

    def __init__(self, weight, r: int | None, alpha: float = 1.0, *, dropout: float = 0.0, bias=None,
                 compute_dtype: str = "bfloat16", use_rslora: bool = False, seed: int = 0, device=None,
                 kernel: str = "bnb", out_dtype: str | None = None):
        super().__init__()
        rules.check_lora_config(r, alpha, dropout)  # before any work on the weight
        self.compute_dtype = rules.check_compute_dtype(compute_dtype)
        self.out_dtype = out_dtype
        if isinstance(weight, RefQuantized4bit):
            if not isinstance(weight, Quantized4bit):  # a NumPy state: through the shared state-dict format
                weight = Quantized4bit.from_state_dict(weight.state_dict())
            self.out_features, self.in_features = rules.check_weight_shape(weight.shape)
            weight = (weight.to(device) if device is not None else weight).for_matmul_4bit()
            self.weight = bnb.nn.Params4bit(
                weight.packed, requires_grad=False, quant_state=weight.to_bnb(), blocksize=weight.blocksize,
                compress_statistics=weight.double_quant, quant_type=weight.quant_type, bnb_quantized=True,
            )
        else:
            weight = _float_tensor(weight, "weight", device)
            self.out_features, self.in_features = rules.check_weight_shape(weight.shape)
            self.register_buffer("weight", weight.float())
        if bias is not None:
            bias = _float_tensor(bias, "bias", device)
            rules.check_bias_shape(tuple(bias.shape), self.out_features)
            bias = bias.float()
        self.register_buffer("bias", bias)
        self.register_parameter("lora_A", None)
        self.register_parameter("lora_B", None)
        self._attach(r, alpha, dropout, use_rslora, seed)
        self.fast = False
        self.kernel = kernel
        self._initialized = True

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_weight(cls, W, r: int | None, alpha: float = 1.0, dropout: float = 0.0, quant_type: str | None = "nf4",
                    blocksize: int = 64, double_quant: bool = True, bias=None, compute_dtype: str = "bfloat16",
                    seed: int = 0, *, use_rslora: bool = False, device=None, kernel: str = "bnb",
                    out_dtype: str | None = None) -> QLoRALinear:
        """Quantize ``W`` (out, in) with bitsandbytes (``quant_type=None`` keeps it float32), attach an adapter."""
        if quant_type is not None and isinstance(W, np.ndarray | torch.Tensor):  # before any conversion: the
            # quantizer's dtype check, naming this argument (a float64 array was converted silently, the reference
            # refuses it)
            dname = W.dtype.name if isinstance(W, np.ndarray) else str(W.dtype).removeprefix("torch.")
            if dname not in FLOAT_DTYPES:
                check_float_input("W", dname, 1, True)
        W = _float_tensor(W, "W", device)
        rules.check_weight_shape(W.shape)
        check_kernel(kernel, quant_type)  # before quantizing: a bad choice fails fast
        weight = W if quant_type is None else quantize_4bit(W, quant_type, blocksize, double_quant)
        return cls(weight, r, alpha, dropout=dropout, bias=bias, compute_dtype=compute_dtype, use_rslora=use_rslora,
                   seed=seed, device=device, kernel=kernel, out_dtype=out_dtype)

    @classmethod
    def from_quantized(cls, q, r: int | None, alpha: float = 1.0, dropout: float = 0.0, bias=None,
                       compute_dtype: str = "bfloat16", seed: int = 0, *, use_rslora: bool = False,
                       device=None, kernel: str = "bnb", out_dtype: str | None = None) -> QLoRALinear:
        """Use a quantized weight as stored (a ``Quantized4bit`` of either backend)."""
        if not isinstance(q, RefQuantized4bit):
            raise ValueError(f"q must be a Quantized4bit (qlora_ref or qlora_gpu), got {type(q).__name__}")
        q.check()  # its fields may have been changed since it was made
        return cls(q, r, alpha, dropout=dropout, bias=bias, compute_dtype=compute_dtype, use_rslora=use_rslora,
                   seed=seed, device=device, kernel=kernel, out_dtype=out_dtype)

    def add_adapter(self, r: int, alpha: float = 1.0, dropout: float = 0.0, *, use_rslora: bool = False,
                    seed: int = 0) -> None:
        """Attach a fresh adapter (initialised as the constructor would, on the weight's device) to a layer built
        without one (``r=None``); see ``qlora_ref.lora.QLoRALinear.add_adapter``."""
        if self.r is not None:
            raise ValueError(f"the layer already carries an adapter (r={self.r})")
        if r is None:
            raise ValueError("r must be a positive integer for add_adapter, got None")
        self._attach(r, alpha, dropout, use_rslora, seed)

    def _attach(self, r: int | None, alpha: float, dropout: float, use_rslora: bool, seed: int) -> None:
        """The adapter's settings and its initial ``lora_A``/``lora_B`` on the weight's device (none for
        ``r=None``), as ``qlora_ref.lora.QLoRALinear._attach``; a fresh dropout generator."""
        self.r, self.alpha, self.dropout = rules.check_lora_config(r, alpha, dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = ref.lora_scaling(self.alpha, self.r, self.use_rslora)
        self.seed = seed
        if self.r is not None:
            a, b = ref.init_lora_weights(self.in_features, self.out_features, self.r, seed)
            self.lora_A = nn.Parameter(torch.from_numpy(a).to(self.weight.device))
            self.lora_B = nn.Parameter(torch.from_numpy(b).to(self.weight.device))
        self._generators: dict[torch.device, torch.Generator] = {}

    def __setattr__(self, name, value):
        if name in ("lora_A", "lora_B") and self.__dict__.get("_initialized") and value is not None:
            rules.check_adapter_shape(name, tuple(value.shape), self.in_features, self.out_features, self.r)
        if name == "kernel":
            value = check_kernel(value, self.quant_type)
        if name in ("kernel", "fast"):  # the forward call's path, chosen here rather than at every call
            fast = value if name == "fast" else self.__dict__.get("fast", False)
            kernel = value if name == "kernel" else self.__dict__.get("kernel", "bnb")
            self.__dict__["_accelerated"] = fast_forward() if (fast or kernel != "bnb") else None
        if name == "out_dtype":
            value = check_out_dtype(value)
            self.__dict__["_out_torch_dtype"] = None if value is None else getattr(torch, value)
        super().__setattr__(name, value)

    @property
    def quantized(self) -> bool:
        return self.quant_type is not None

    @property
    def quant_type(self) -> str | None:
        """The 4-bit data type of the frozen weight ("nf4", "fp4"), None for a float32 weight."""
        stored = self.__dict__.get(SHARDED_STATE)
        if stored is not None:
            return stored.quant_type
        return self.weight.quant_type if isinstance(self.weight, bnb.nn.Params4bit) else None

    def frozen_weight(self) -> tuple[torch.Tensor, bnbf.QuantState | None]:
        """The frozen weight as bitsandbytes reads it and its ``QuantState`` (None for a float32 weight). Sharded
        under FSDP (``qlora_gpu.fsdp``) the 4-bit weight is a plain parameter in a float storage dtype, and its
        ``QuantState`` is rebuilt around the gathered tensors: only while FSDP has them gathered (in forward and
        backward)."""
        stored = self.__dict__.get(SHARDED_STATE)
        if stored is not None:
            return stored.unpack(self)
        return self.weight, (self.weight.quant_state if isinstance(self.weight, bnb.nn.Params4bit) else None)

    @property
    def out_torch_dtype(self) -> torch.dtype | None:
        """``out_dtype`` as a torch dtype (None: the input's dtype)."""
        return self.__dict__["_out_torch_dtype"]

    @property
    def dropout_active(self) -> bool:
        return self.training and self.r is not None and self.dropout > 0.0

    def extra_repr(self) -> str:
        kind = self.quant_type or "float32"
        return (f"in_features={self.in_features}, out_features={self.out_features}, weight={kind}, r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout}, bias={self.bias is not None}, "
                f"compute_dtype={self.compute_dtype!r}, kernel={self.kernel!r}"
                + (", fast=True" if self.fast else "")
                + (f", out_dtype={self.out_dtype!r}" if self.out_dtype is not None else ""))

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        rules.check_input_shape(tuple(x.shape), self.in_features)
        cdt = getattr(torch, self.compute_dtype)
        xc = x.reshape(-1, self.in_features).to(cdt)
        keep = self._dropout_keep(x, xc, dropout_mask)
        out_dtype = self.out_torch_dtype
        accelerated = self.__dict__["_accelerated"]
        if accelerated is not None:  # qlora_gpu.fast: the same values in fewer kernels
            y = accelerated(self, x, xc, keep)
        else:
            weight, quant_state = self.frozen_weight()
            bias = None if self.bias is None else self.bias.to(cdt)
            y = QLoRALinearFunction.apply(xc, weight, quant_state, self.lora_A, self.lora_B, bias, keep,
                                          keep_scale(self.dropout), self.scaling, out_dtype)
        return (y if out_dtype is not None else y.to(x.dtype)).reshape(*x.shape[:-1], self.out_features)

    def _dropout_keep(self, x: torch.Tensor, xc: torch.Tensor,
                     dropout_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The dropout mask (N, in) of a forward call with input ``x`` (..., in), ``xc`` (N, in) in the compute
        dtype: ``dropout_mask`` (shaped as x) if given, else
        (in training, with dropout) the one its decoder block drew for it (``stage_mask``) if that fits the input,
        else one drawn from the layer's own generator (``draw_keep``); None without dropout. Consumes the staged
        mask."""
        staged = self.__dict__.pop(STAGED_MASK, None)
        if dropout_mask is not None:
            rules.check_dropout_mask(tuple(dropout_mask.shape), tuple(x.shape), self.dropout_active)
            return dropout_mask.reshape(-1, self.in_features).to(device=xc.device, dtype=torch.bool)
        if not self.dropout_active:
            return None
        if staged is not None and staged.shape == xc.shape and staged.device == xc.device:
            return staged
        return draw_keep(xc.shape, self.dropout, self._generator(xc.device), xc.device)

    def stage_mask(self, keep: torch.Tensor | None) -> None:
        """The dropout mask (N, in) for the next forward call, drawn for the whole decoder block
        (``qlora_gpu.model.draw_block_masks``); an explicit ``dropout_mask`` still wins, and a call whose input
        it does not fit (rows, device) draws its own."""
        self.__dict__[STAGED_MASK] = keep  # not through nn.Module.__setattr__: host time, 7 per block call

    def staged_mask(self) -> torch.Tensor | None:
        """The dropout mask ``stage_mask`` left for the next forward call, if any."""
        return self.__dict__.get(STAGED_MASK)

    def unstage(self) -> None:
        """Drop a mask that ``stage_mask`` left and no forward call used."""
        self.__dict__.pop(STAGED_MASK, None)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    # ---------------------------------------------------------------- merging
    @torch.no_grad()
    def merge(self) -> torch.Tensor:
        """dequant(W) + s · B A in float32 (out, in); see ``qlora_ref.lora.QLoRALinear.merge``."""
        weight, quant_state = self.frozen_weight()
        w = frozen_weight_as(weight, quant_state, torch.float32) if quant_state is not None else weight.clone()
        if self.r is not None:
            w += self.scaling * (self.lora_B.float() @ self.lora_A.float())
        return w


def check_kernel(kernel, quant_type: str | None) -> str:
    """``kernel`` is one of ``KERNELS``; ``"triton"`` only with a 4-bit (nf4/fp4) weight (``quant_type``)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "triton" and quant_type not in QUANT_TYPES_4BIT:
        raise ValueError(f"kernel='triton' needs a 4-bit weight (quant_type 'nf4' or 'fp4'), got quant_type "
                         f"{quant_type!r}; use kernel='bnb' for a float32 base weight")
    return kernel


def check_out_dtype(out_dtype) -> str | None:
    """``out_dtype`` of a ``QLoRALinear``: None (the input's dtype) or a float dtype's name."""
    if out_dtype is None:
        return None
    name = str(out_dtype).removeprefix("torch.")
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"out_dtype must be None (the input's dtype), 'float32', 'bfloat16' or 'float16', "
                         f"got {out_dtype!r}")
    return name


def set_kernel(model: nn.Module, kernel: str) -> int:
    """Set ``kernel`` (one of ``KERNELS``) on every ``QLoRALinear`` in ``model`` (itself included); returns how many
    layers were set. All layers are checked first, so a ValueError (``"triton"`` with a float32 base weight)
    leaves the model unchanged."""
    layers = [m for m in model.modules() if isinstance(m, QLoRALinear)]
    for m in layers:
        check_kernel(kernel, m.quant_type)
    for m in layers:
        m.kernel = kernel
    return len(layers)


def _float_tensor(a, name: str, device=None) -> torch.Tensor:
    """``a`` (tensor or NumPy array) as a float torch tensor on ``device`` (default: where it is)."""
    if isinstance(a, np.ndarray):
        if a.dtype.kind != "f" and a.dtype.name != "bfloat16":
            raise ValueError(f"{name} must be a float array, got dtype {a.dtype}")
        a = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    if not isinstance(a, torch.Tensor) or not a.is_floating_point():
        raise ValueError(f"{name} must be a float torch.Tensor or NumPy array, got {getattr(a, 'dtype', type(a))}")
    return a.to(device) if device is not None else a


__all__ = ["KERNELS", "QLoRALinear", "QLoRALinearFunction", "draw_keep", "set_kernel"]
