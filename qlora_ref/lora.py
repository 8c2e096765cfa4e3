r"""The QLoRA linear layer (paper, section 2 eq. 3 and section 3 eq. 5-6).

Symbols. The paper writes Y = XW; PEFT stores every matrix transposed, and this module uses PEFT's names and shapes:

    paper         seed Alg. 1    here (PEFT)
    W  (h × o)    W (h × o)      ``weight``ᵀ   (``weight`` is out × in)
    L1 (h × r)    A (h × r)      ``lora_A``ᵀ   (``lora_A`` is r × in)
    L2 (r × o)    B (r × o)      ``lora_B``ᵀ   (``lora_B`` is out × r)
    s             α / r          ``scaling``

Below, W, A and B are ``weight``, ``lora_A`` and ``lora_B`` in these PEFT shapes.

A frozen base weight stored in 4 bits, dequantized on the fly, plus a trainable low-rank update::

    y = x · dequant(W)ᵀ + b + s · (dropout(x) · Aᵀ) · Bᵀ          s = alpha / r   (alpha / √r with rsLoRA)

This is eq. 3, Y = XW + s X L1 L2, with the 4-bit weight of eq. 5-6 (which write X L1 L2, s absorbed into the adapters),
in PEFT's names and shapes (the table above); s = alpha / r is LoRA's (Hu et al. 2021) and PEFT's convention; the
dropout and the bias are PEFT's additions.
``A`` is Kaiming-uniform and ``B`` zero at the start, so the layer begins as exactly the frozen one. Only ``A`` and
``B`` are trained; the 4-bit weight and the bias never receive a gradient. Yet backpropagation still needs the weight:
the gradient with respect to the layer's input flows through it, so the backward pass dequantizes ``W`` a second time.

Gradients (the derivation, written out in docs/lora_backprop.md). Flatten the leading dimensions so that x is
(N, in); let G = ∂L/∂y (N, out), M the dropout keep-mask, x_d = x ⊙ M / (1-p) and H = x_d Aᵀ (N, r). Then
y = x Wᵀ + b + s H Bᵀ is affine in x and linear in A and in B, and the chain rule gives

    ∂L/∂B = s · Gᵀ H                      (out, r)    from y_ij = … + s Σ_k H_ik B_jk
    ∂L/∂H = s · G B                       (N, r)
    ∂L/∂A = (∂L/∂H)ᵀ x_d = s · Bᵀ Gᵀ x_d   (r, in)     from H_ik = Σ_l x_d,il A_kl
    ∂L/∂x = G W + ((∂L/∂H) A) ⊙ M / (1-p)             the frozen path plus the adapter path
    ∂L/∂W, ∂L/∂b: not computed (frozen; QLoRA never forms a weight gradient)

Precision (``compute_dtype``). QLoRA stores in NF4 and computes in bfloat16 (section 3: "storage data type" and
"computation data type"). With ``compute_dtype="bfloat16"`` the reference does what a bfloat16 PyTorch graph does,
operation by operation (each step rounds its float32 result once to bfloat16, as torch's bfloat16 kernels do,
products accumulating in float32)::

    x_c = bf16(x)   W_c = bf16(dequant(W))   A_c = bf16(A)   B_c = bf16(B)   b_c = bf16(b)
    base = bf16(x_c W_cᵀ + b_c)              one rounding after the bias, as torch.nn.functional.linear
    x_d  = bf16(x_c · M · f32(1/(1-p)))        torch's fused dropout on CUDA: one rounding of the float32 product
    H    = bf16(x_d A_cᵀ)    P = bf16(H B_cᵀ)    L = bf16(s · P)    y = bf16(base + L)

and the backward pass rounds the same way (G_c = bf16(G), G_s = bf16(s G_c), ∂B = bf16(G_sᵀ H), …). The master
copies of A and B stay float32 and so do their gradients (a bfloat16 gradient, widened). ``"float32"`` skips every
rounding: the layer is then the exact float32 function of the dequantized weight.

Two ways through the frozen weight, chosen by ``kernel`` (the option ``qlora_gpu.QLoRALinear`` names the same,
with its own values): ``"fused"`` (default) dequantizes tile by tile inside the matrix product
(``qlora_ref.fused_matmul``), ``"naive"`` dequantizes the whole weight first — the readable definition; they give
the same bits. ``set_kernel(model, kernel)`` switches every layer of a model. (``matmul=`` is the option's old
name: still accepted, with a ``DeprecationWarning``.)

The layer's argument rules, shared with ``qlora_gpu``, are ``qlora_ref.lora_checks``; what merging an adapter into
the 4-bit weight loses, ``qlora_ref.lora_merge``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from . import fused_matmul, lora_kernels
from .checks import FLOAT_DTYPES, check_float_input
from .dropout import draw_keep
from .dtypes import round_to, round_to_definition
from .lora_checks import (
    COMPUTE_DTYPES,
    KERNELS,
    MATMUL_RENAMED,
    check_adapter_shape,
    check_bias_shape,
    check_compute_dtype,
    check_dropout_mask,
    check_grad_shape,
    check_input_shape,
    check_kernel,
    check_lora_config,
    check_weight_shape,
    float_array,
    renamed_kernel,
)
from .quantize import Quantized4bit, dequantize_4bit, quantize_4bit

_NO_BIAS = np.empty(0, np.float32)  # placeholders for the kernels' optional arrays
_NO_KEEP = np.empty((0, 0), bool)


# --------------------------------------------------------------------------------------------------------------
# The LoRA update's scale and initialisation (LoRA, Hu et al. 2021; PEFT)
# --------------------------------------------------------------------------------------------------------------


def lora_scaling(alpha: float, r: int | None, use_rslora: bool = False) -> float:
    """Eq. 3's s: alpha / r (LoRA), or alpha / √r (rank-stabilised LoRA, Kalajdzievski 2023; PEFT's ``use_rslora``);
    0 for no adapter (``r`` None or 0). The one definition: ``QLoRALinear.scaling`` and ``LoraConfig.scaling`` use
    it."""
    if not r:
        return 0.0
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_a_init_bound(in_features: int) -> float:
    """PEFT initialises A with ``kaiming_uniform_(a=√5)``: U(-bound, bound) with bound = gain·√(3/fan_in),
    gain = √(2/(1+a²)) = √(1/3), so bound = 1/√in_features."""
    return 1.0 / math.sqrt(in_features)


def init_lora_weights(in_features: int, out_features: int, r: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) as PEFT initialises them — A Kaiming-uniform, B zeros — from a NumPy generator seeded by ``seed``.
    Both backends start from these arrays, so the same seed gives the same adapter everywhere."""
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[0])
    bound = lora_a_init_bound(in_features)
    a = rng.uniform(-bound, bound, size=(r, in_features)).astype(np.float32)
    return a, np.zeros((out_features, r), np.float32)


def dropout_scale(p: float) -> np.float32:
    """The factor a kept element is multiplied by (inverted dropout on the adapter input; the paper's LoRA dropout,
    Appendix A.1 and B.2): 1/(1-p) in float32, whatever the compute dtype; the product x · M · 1/(1-p) is then rounded
    once. That is torch's fused dropout on CUDA, where QLoRA runs, and peft's float32 adapters on any device; torch's
    CPU dropout of a bfloat16 tensor instead multiplies by bf16(1/(1-p)) (1.109375 for p = 0.1, 0.16 % short), which the
    reference does not copy (docs/lora_backprop.md, known divergences)."""
    return np.float32(np.float32(1.0) / np.float32(1.0 - p))


# --------------------------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------------------------


class QLoRALinear:
    """Frozen (4-bit or float32) weight + trainable LoRA adapter, with a hand-written backward pass (paper, section 3
    eq. 5-6, with eq. 3's s).

    Build it with ``from_weight`` (quantizes a float weight) or ``from_quantized`` (a stored ``Quantized4bit``).
    ``lora_A``/``lora_B`` are plain float32 arrays, assignable and updatable in place; ``parameters()`` returns
    them by name and ``grads`` holds their gradients under the same names. Gradients accumulate across
    ``backward`` calls, like torch's ``.grad``; ``zero_grad()`` resets them. ``r=None`` builds a frozen layer
    without adapter: no parameters, ``backward`` still returns the input gradient.
    """

    def __init__(self, weight, r: int | None, alpha: float = 1.0, *, dropout: float = 0.0, bias=None,
                 compute_dtype: str = "bfloat16", use_rslora: bool = False, seed: int = 0,
                 kernel: str = "fused", tile: int | None = None, matmul: str | None = None):
        check_lora_config(r, alpha, dropout)
        self.compute_dtype = check_compute_dtype(compute_dtype)
        self.kernel, self.tile = renamed_kernel(kernel, matmul), tile
        if isinstance(weight, Quantized4bit):
            self.out_features, self.in_features = check_weight_shape(weight.shape)
            self.weight = weight
            self._weight_c = None  # dequantized on the fly, in every forward and backward
        else:
            weight = float_array(weight, "weight")
            self.out_features, self.in_features = check_weight_shape(weight.shape)
            self.weight = weight.astype(np.float32)
            self._weight_c = round_to(self.weight, self.compute_dtype)  # frozen: round once
        self.bias = None
        if bias is not None:
            bias = float_array(bias, "bias")
            check_bias_shape(bias.shape, self.out_features)
            self.bias = bias.astype(np.float32)
        self.r = None
        self._attach(r, alpha, dropout, use_rslora, seed)
        self.grads: dict[str, np.ndarray] = {}
        self.training = True
        self._cache = None

    def _attach(self, r: int | None, alpha: float, dropout: float, use_rslora: bool, seed: int) -> None:
        """The adapter's settings and its initial ``lora_A``/``lora_B`` (none for ``r=None``)."""
        self.r, self.alpha, self.dropout = check_lora_config(r, alpha, dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(self.alpha, self.r, self.use_rslora)
        self.seed = seed
        self._lora_A = self._lora_B = None
        if self.r is not None:
            self._lora_A, self._lora_B = init_lora_weights(self.in_features, self.out_features, self.r, seed)
        self._dropout_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[1])

    def add_adapter(self, r: int, alpha: float = 1.0, dropout: float = 0.0, *, use_rslora: bool = False,
                    seed: int = 0) -> None:
        """Attach a fresh adapter (initialised as the constructor would) to a layer built without one (``r=None``):
        how ``load_adapter`` adapts a model loaded without LoRA."""
        if self.r is not None:
            raise ValueError(f"the layer already carries an adapter (r={self.r})")
        if r is None:
            raise ValueError("r must be a positive integer for add_adapter, got None")
        self._attach(r, alpha, dropout, use_rslora, seed)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_weight(cls, W, r: int | None, alpha: float = 1.0, dropout: float = 0.0, quant_type: str | None = "nf4",
                    blocksize: int = 64, double_quant: bool = True, bias=None, compute_dtype: str = "bfloat16",
                    seed: int = 0, *, use_rslora: bool = False, kernel: str = "fused",
                    tile: int | None = None, matmul: str | None = None) -> QLoRALinear:
        """Quantize ``W`` (out, in) with ``quant_type`` (``None`` keeps it float32) and attach an adapter."""
        W = float_array(W, "W")
        check_weight_shape(W.shape)
        if quant_type is not None and W.dtype.name not in FLOAT_DTYPES:  # the quantizer's check, naming W
            check_float_input("W", W.dtype.name, W.size, True)
        weight = W if quant_type is None else quantize_4bit(W, quant_type, blocksize, double_quant)
        return cls(weight, r, alpha, dropout=dropout, bias=bias, compute_dtype=compute_dtype, use_rslora=use_rslora,
                   seed=seed, kernel=renamed_kernel(kernel, matmul), tile=tile)

    @classmethod
    def from_quantized(cls, q: Quantized4bit, r: int | None, alpha: float = 1.0, dropout: float = 0.0, bias=None,
                       compute_dtype: str = "bfloat16", seed: int = 0, *, use_rslora: bool = False,
                       kernel: str = "fused", tile: int | None = None,
                       matmul: str | None = None) -> QLoRALinear:
        """Use a quantized weight as stored (e.g. read from a bitsandbytes checkpoint) and attach an adapter."""
        if not isinstance(q, Quantized4bit):
            raise ValueError(f"q must be a qlora_ref.Quantized4bit, got {type(q).__name__}")
        q.check()  # its fields may have been changed since it was made
        return cls(q, r, alpha, dropout=dropout, bias=bias, compute_dtype=compute_dtype, use_rslora=use_rslora,
                   seed=seed, kernel=renamed_kernel(kernel, matmul), tile=tile)

    @property
    def kernel(self) -> str:
        """The implementation of the frozen-weight products, one of ``KERNELS``; settable."""
        return self._kernel

    @kernel.setter
    def kernel(self, value: str) -> None:
        self._kernel = check_kernel(value)

    @property
    def matmul(self) -> str:
        """Deprecated name of ``kernel``."""
        warnings.warn(MATMUL_RENAMED, DeprecationWarning, stacklevel=2)
        return self.kernel

    @matmul.setter
    def matmul(self, value: str) -> None:
        warnings.warn(MATMUL_RENAMED, DeprecationWarning, stacklevel=2)
        self.kernel = value

    # ---------------------------------------------------------------- parameters
    @property
    def lora_A(self) -> np.ndarray | None:
        return self._lora_A

    @lora_A.setter
    def lora_A(self, value) -> None:
        self._lora_A = self._adapter("lora_A", value)

    @property
    def lora_B(self) -> np.ndarray | None:
        return self._lora_B

    @lora_B.setter
    def lora_B(self, value) -> None:
        self._lora_B = self._adapter("lora_B", value)

    def _adapter(self, name, value) -> np.ndarray:
        value = float_array(value, name)
        check_adapter_shape(name, value.shape, self.in_features, self.out_features, self.r)
        return np.ascontiguousarray(value, dtype=np.float32)

    def parameters(self) -> dict[str, np.ndarray]:
        """The trainable arrays (the live ones: an optimizer may update them in place)."""
        return {} if self.r is None else {"lora_A": self._lora_A, "lora_B": self._lora_B}

    def zero_grad(self) -> None:
        self.grads.clear()

    def train(self, mode: bool = True) -> QLoRALinear:
        """Training mode: dropout is active."""
        self.training = bool(mode)
        return self

    def eval(self) -> QLoRALinear:
        """Evaluation mode: dropout is the identity."""
        return self.train(False)

    def clear_cache(self) -> None:
        """Drop what ``forward`` kept for ``backward``."""
        self._cache = None

    @property
    def dropout_active(self) -> bool:
        return self.training and self.r is not None and self.dropout > 0.0

    # ---------------------------------------------------------------- the frozen weight
    def dequantized_weight(self) -> np.ndarray:
        """W as the layer computes with it (eq. 6's doubleDequant): dequantized and rounded to the compute dtype,
        float32 (out, in)."""
        if self._weight_c is not None:
            return self._weight_c
        return fused_matmul.dequantized_weight(self.weight, self.compute_dtype)

    def _x_wt(self, x: np.ndarray) -> np.ndarray:
        """x Wᵀ with float32 accumulation, x (N, in) already in the compute dtype."""
        if self._weight_c is not None:
            return x @ self._weight_c.T
        if self.kernel == "fused":
            return fused_matmul.fused_x_wt(x, self.weight, self.compute_dtype, self.tile)
        return fused_matmul.naive_x_wt(x, self.weight, self.compute_dtype)

    def _g_w(self, g: np.ndarray) -> np.ndarray:
        """G W (the input gradient of the frozen path), G (N, out) already in the compute dtype."""
        if self._weight_c is not None:
            return g @ self._weight_c
        if self.kernel == "fused":
            return fused_matmul.fused_g_w(g, self.weight, self.compute_dtype, self.tile)
        return fused_matmul.naive_g_w(g, self.weight, self.compute_dtype)

    # ---------------------------------------------------------------- forward / backward
    def forward(self, x, dropout_mask=None) -> np.ndarray:
        """y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ for x of shape (..., in) (eq. 5; s from eq. 3); returns float32
        (..., out).

        ``dropout_mask``: an explicit boolean keep-mask of x's shape (True keeps), used instead of the layer's
        generator — so that two implementations can be run with the same mask. Only while dropout is active.
        """
        x = float_array(x, "x")
        check_input_shape(x.shape, self.in_features)
        keep = None if self.r is None else self._dropout_keep(x.shape, dropout_mask)
        x2 = x.reshape(-1, self.in_features)
        y, cache = (self._forward_definition if self.kernel == "naive" else self._forward_fast)(x2, keep)
        self._cache = {"shape": x.shape, **cache}
        return y.reshape(*x.shape[:-1], self.out_features)

    __call__ = forward

    def backward(self, grad_y) -> np.ndarray:
        """Given ∂L/∂y (shape of the last output), accumulate ∂L/∂A and ∂L/∂B into ``grads`` and return ∂L/∂x.

        Paper section 3, the paragraph after eq. 6: only the adapters' ∂E/∂Lᵢ is computed, never ∂E/∂W, but the
        input gradient still goes through the dequantized W. The derivation is in docs/lora_backprop.md.
        """
        if self._cache is None:
            raise RuntimeError("backward() needs a forward() first (or the cache was cleared)")
        shape = self._cache["shape"]
        grad_y = float_array(grad_y, "grad_y")
        check_grad_shape(grad_y.shape, (*shape[:-1], self.out_features))
        g2 = grad_y.reshape(-1, self.out_features)
        gx, grads = (self._backward_definition if self.kernel == "naive" else self._backward_fast)(g2, self._cache)
        for name, grad in grads.items():
            self._accumulate(name, grad)
        return gx.reshape(shape)

    # The definition: every step a NumPy expression, rounded once to the compute dtype (ml_dtypes' bfloat16).
    def _forward_definition(self, x: np.ndarray, keep: np.ndarray | None) -> tuple[np.ndarray, dict]:
        rnd = self._round
        xc = rnd(x)

        # the frozen path: x Wᵀ + b, one rounding
        base = self._x_wt(xc)
        if self.bias is not None:
            base = base + rnd(self.bias)
        base = rnd(base)
        if self.r is None:
            return base, {}

        # the adapter path: s · dropout(x) Aᵀ Bᵀ
        scale = dropout_scale(self.dropout)
        if keep is not None:
            xd = rnd(xc * (keep * scale))
        else:  # kept for backward: a copy if it is still the caller's array, which the caller may change
            xd = xc.copy() if np.may_share_memory(xc, x) else xc
        a_c, b_c = rnd(self._lora_A), rnd(self._lora_B)
        h = rnd(xd @ a_c.T)
        lora = rnd(rnd(h @ b_c.T) * np.float32(self.scaling))
        y = rnd(base + lora)
        return y, {"xd": xd, "h": h, "keep": keep, "scale": scale, "A": a_c, "B": b_c}

    def _backward_definition(self, grad_y: np.ndarray, cache: dict) -> tuple[np.ndarray, dict]:
        rnd = self._round
        g = rnd(grad_y)
        gx = rnd(self._g_w(g))  # frozen path: ∂L/∂x = G W (no ∂L/∂W: the weight is frozen)
        if self.r is None:
            return gx, {}
        gs = rnd(g * np.float32(self.scaling))  # ∂L/∂P for P = H Bᵀ
        grad_b = rnd(gs.T @ cache["h"])  # ∂L/∂B = s Gᵀ H
        gh = rnd(gs @ cache["B"])  # ∂L/∂H = s G B
        grad_a = rnd(gh.T @ cache["xd"])  # ∂L/∂A = (∂L/∂H)ᵀ x_d
        gxd = rnd(gh @ cache["A"])  # ∂L/∂x_d = (∂L/∂H) A
        if cache["keep"] is not None:
            gxd = rnd(gxd * (cache["keep"] * cache["scale"]))  # through the dropout mask
        gx = rnd(gx + gxd)
        return gx, {"lora_A": grad_a, "lora_B": grad_b}

    def _round(self, a: np.ndarray) -> np.ndarray:
        return round_to_definition(a, self.compute_dtype)

    # The fast path: the same operations in the same order, the same BLAS calls, the elementwise steps fused into
    # the Numba kernels of ``lora_kernels`` and rounded in place; bit-identical to the definition
    # (tests/test_fast_paths.py).
    def _forward_fast(self, x: np.ndarray, keep: np.ndarray | None) -> tuple[np.ndarray, dict]:
        cd, bf16 = self.compute_dtype, self.compute_dtype == "bfloat16"
        xc = round_to(x, cd)
        y = self._x_wt(xc)  # a new array: the kernels below write into it
        bias_c = _NO_BIAS if self.bias is None else round_to(self.bias, cd)
        if self.r is None:
            lora_kernels.frozen_output(y, bias_c, self.bias is not None, bf16)
            return y, {}
        scale = dropout_scale(self.dropout)
        if keep is not None:
            xd = np.empty_like(xc)
            lora_kernels.dropout_input(xc, keep, scale, bf16, xd)
        else:
            xd = xc.copy() if np.may_share_memory(xc, x) else xc
        a_c, b_c = round_to(self._lora_A, cd), round_to(self._lora_B, cd)
        h = _rounded(xd @ a_c.T, cd)
        lora_kernels.adapter_output(y, bias_c, self.bias is not None, h @ b_c.T, np.float32(self.scaling), bf16)
        return y, {"xd": xd, "h": h, "keep": keep, "scale": scale, "A": a_c, "B": b_c}

    def _backward_fast(self, grad_y: np.ndarray, cache: dict) -> tuple[np.ndarray, dict]:
        cd, bf16 = self.compute_dtype, self.compute_dtype == "bfloat16"
        g = round_to(grad_y, cd)
        gx = self._g_w(g)  # a new array, rounded below
        if self.r is None:
            return _rounded(gx, cd), {}
        gs = np.empty_like(g)
        lora_kernels.scaled(g, np.float32(self.scaling), bf16, gs)
        grad_b = _rounded(gs.T @ cache["h"], cd)
        gh = _rounded(gs @ cache["B"], cd)
        grad_a = _rounded(gh.T @ cache["xd"], cd)
        keep = _NO_KEEP if cache["keep"] is None else cache["keep"]
        lora_kernels.input_grad(gx, gh @ cache["A"], keep, cache["keep"] is not None, cache["scale"], bf16)
        return gx, {"lora_A": grad_a, "lora_B": grad_b}

    def _accumulate(self, name: str, grad: np.ndarray) -> None:
        if name in self.grads:
            self.grads[name] += grad
        else:  # backward's gradients are new arrays: kept, not copied
            self.grads[name] = np.asarray(grad, dtype=np.float32)

    def _dropout_keep(self, x_shape, dropout_mask) -> np.ndarray | None:
        """The boolean keep-mask M (N, in) — explicit or drawn: P(keep) = 1 - p — or None when dropout is off."""
        active = self.dropout_active
        if dropout_mask is not None:
            dropout_mask = np.asarray(dropout_mask)
            check_dropout_mask(dropout_mask.shape, x_shape, active)
            keep = dropout_mask.astype(bool)
        elif active:
            keep = draw_keep(self._dropout_rng, x_shape, self.dropout)
        else:
            return None
        return keep.reshape(-1, self.in_features)

    # ---------------------------------------------------------------- merging
    def merge(self) -> np.ndarray:
        """The adapter folded into the weight: dequant(W) + s · B A, float32 (out, in) (eq. 3's W + s L1 L2 in PEFT's
        shapes; LoRA, Hu et al. 2021, section 4.1).

        A float32 (or bfloat16) merged weight reproduces the adapted layer; quantizing it again does not: see
        ``merged_layer(requantize=True)`` and docs/lora_backprop.md for how much is lost.
        """
        if isinstance(self.weight, Quantized4bit):
            w = dequantize_4bit(self.weight, "float32").astype(np.float32, copy=False)
        else:
            w = self.weight
        if self.r is None:
            return w.copy()
        return w + np.float32(self.scaling) * (self._lora_B @ self._lora_A)

    def merged_layer(self, requantize: bool = False) -> QLoRALinear:
        """A frozen layer (no adapter) whose weight is ``merge()`` — kept float32, or quantized again with this
        layer's data type, block size and double quantization (``requantize=True``; needs a quantized weight)."""
        merged = self.merge()
        if requantize:
            if not isinstance(self.weight, Quantized4bit):
                raise ValueError("requantize=True needs a quantized base weight (this layer's weight is float32)")
            q = self.weight
            merged = quantize_4bit(merged, q.quant_type, q.blocksize, q.double_quant)
        return QLoRALinear(merged, None, bias=self.bias, compute_dtype=self.compute_dtype, kernel=self.kernel,
                           tile=self.tile)

    def __repr__(self) -> str:
        kind = "float32" if self._weight_c is not None else f"{self.weight.quant_type}"
        return (f"QLoRALinear(in_features={self.in_features}, out_features={self.out_features}, weight={kind}, "
                f"r={self.r}, alpha={self.alpha}, dropout={self.dropout}, bias={self.bias is not None}, "
                f"compute_dtype={self.compute_dtype!r}, kernel={self.kernel!r})")


def set_kernel(model, kernel: str) -> int:
    """Set ``kernel`` (one of ``KERNELS``) on every ``QLoRALinear`` of ``model`` (a ``LlamaModel``, or a layer
    itself); returns how many layers were set. Checked first: a ValueError leaves the model unchanged.
    ``qlora_gpu.set_kernel`` is the same call with the GPU backend's kernels."""
    check_kernel(kernel)
    layers = [model] if isinstance(model, QLoRALinear) else list(model.named_linears().values())
    for m in layers:
        m.kernel = kernel
    return len(layers)


def __getattr__(name: str):
    if name == "MATMUL_PATHS":  # the old name of KERNELS
        warnings.warn("qlora_ref.lora.MATMUL_PATHS is now KERNELS", DeprecationWarning, stacklevel=2)
        return KERNELS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _rounded(a: np.ndarray, compute_dtype: str) -> np.ndarray:
    """``a`` (a new float32 array, e.g. a matrix product) rounded to the compute dtype in place."""
    return round_to(a, compute_dtype, out=a)


__all__ = [
    "COMPUTE_DTYPES",
    "KERNELS",
    "QLoRALinear",
    "dropout_scale",
    "init_lora_weights",
    "lora_a_init_bound",
    "lora_scaling",
    "set_kernel",
]
