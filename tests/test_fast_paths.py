"""The reference's fast paths against their definitions, bit for bit (issue 34).

- ``dtypes.round_to`` (integer arithmetic on the float32 bits, one Numba pass) against ``round_to_definition``
  (ml_dtypes' bfloat16 round trip): every class of float32 — ties, subnormals, the overflow to infinity, NaN;
- the dequantize-matmul's tile (``fused_matmul._dequantize_tile``) against ``dequantized_weight`` for any rows and
  columns, and ``fused_x_wt`` / ``fused_g_w`` against ``naive_x_wt`` / ``naive_g_w`` when one tile covers the weight
  (the same BLAS call); with smaller tiles BLAS may block the sums differently (the float32 bound of
  ``tests/test_lora_ref.py``);
- each fused kernel of ``lora_kernels`` against the NumPy expression it replaces, and ``QLoRALinear``'s fast path
  (``kernel="fused"``) against its definition (``kernel="naive"``): outputs, input gradients, adapter gradients;
- the in-place forms of RoPE, softmax and the SwiGLU backward against the expressions they replace.
- the gradient clipping's in-place 2-norm against the general p-norm expression.

Values are compared as bit patterns (``view(uint32)``), so -0.0 against +0.0 counts as a difference; the only
exemption is NaN against NaN where the inputs make NaN (inf · 0), whose sign and payload x86 leaves to the
instruction.
"""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qlora_ref
from qlora_ref import fused_matmul, lora_kernels
from qlora_ref.dtypes import bf16_bits, round_to, round_to_definition
from qlora_ref.lora import QLoRALinear
from qlora_ref.model.attention import softmax
from qlora_ref.model.mlp import SwiGLU
from qlora_ref.model.rope import RotaryEmbedding, apply_rope, apply_rope_backward, rotate_half

#: float32 bit patterns at the edges of bfloat16 rounding
EDGE_BITS = np.array([
    0x00000000, 0x80000000,  # ±0
    0x00000001, 0x00007FFF, 0x00008000, 0x00008001, 0x00018000, 0x0000FFFF, 0x007FFFFF,  # subnormals, ties
    0x00800000, 0x3F800000, 0x3F808000, 0x3F818000, 0x3F80C000, 0x3F807FFF, 0xBF808000,  # ties to even, both ways
    0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0xFF7FFFFF,  # the largest values: round down, or overflow to infinity
    0x7F800000, 0xFF800000,  # ±inf
    0x7F800001, 0x7FC00000, 0x7FFFFFFF, 0xFF800001, 0xFFC00000, 0x7F80FFFF,  # NaNs: signalling, quiet, payloads
], dtype=np.uint32)


def bits(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def assert_same_bits(a, b, nan_ok: bool = False):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape
    same = bits(a) == bits(b)
    if nan_ok:
        same |= np.isnan(a) & np.isnan(b)
    assert same.all(), f"{(~same).sum()} of {same.size} differ; first at {np.argwhere(~same)[0]}"


def edge_array(draw, shape, scale=None):
    """float32 values of ``shape``: normal ones at a drawn scale, with edge bit patterns (no NaN) sprinkled in."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1e-40, 1e-3, 1.0, 3e38])) if scale is None else scale
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    finite = EDGE_BITS[(EDGE_BITS & 0x7FFFFFFF) <= 0x7F800000].view(np.float32)
    mask = rng.random(shape) < 0.2
    x[mask] = rng.choice(finite, size=int(mask.sum()))
    return x


# ---------------------------------------------------------------------------------------------- bfloat16 rounding
def test_round_to_bf16_edges_match_ml_dtypes():
    x = EDGE_BITS.view(np.float32)
    with np.errstate(invalid="ignore"):
        expected = round_to_definition(x, "bfloat16")
    assert np.array_equal(bits(round_to(x, "bfloat16")), bits(expected))  # NaN sign kept, payload quieted
    # the uint16 pattern is ml_dtypes' own
    with np.errstate(invalid="ignore"):
        ref16 = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    assert [int(bf16_bits(v)) for v in x] == ref16.tolist()


@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=300))
def test_round_to_bf16_any_bit_pattern(patterns):
    x = np.array(patterns, dtype=np.uint32).view(np.float32)
    with np.errstate(invalid="ignore"):
        expected = round_to_definition(x, "bfloat16")
    assert np.array_equal(bits(round_to(x, "bfloat16")), bits(expected))


@pytest.mark.slow
def test_round_to_bf16_every_float32():
    """All 2³² float32 bit patterns, 2²⁴ at a time (about a minute)."""
    step = 1 << 24
    for start in range(0, 1 << 32, step):
        x = np.arange(start, start + step, dtype=np.uint64).astype(np.uint32).view(np.float32)
        with np.errstate(invalid="ignore"):
            expected = round_to_definition(x, "bfloat16")
        assert np.array_equal(bits(round_to(x, "bfloat16")), bits(expected)), hex(start)


@given(st.data())
def test_round_to_in_place_views_and_other_dtypes(data):
    shape = data.draw(st.tuples(st.integers(1, 9), st.integers(1, 9)))
    x = edge_array(data.draw, shape)
    for dtype in ("bfloat16", "float16", "float32"):
        with np.errstate(over="ignore"):
            expected = round_to_definition(x, dtype)
            assert_same_bits(round_to(x, dtype), expected)
            assert_same_bits(round_to(x.T, dtype), expected.T)  # a non-contiguous input
            y = x.copy()
            assert round_to(y, dtype, out=y) is y
            assert_same_bits(y, expected)
    x64 = x.astype(np.float64) * (1 + 2.0**-30)  # float64 input: to float32 first, then to bfloat16
    assert_same_bits(round_to(x64, "bfloat16"), round_to_definition(x64, "bfloat16"))


def test_round_to_rejects_a_bad_out():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="out must be a C-contiguous float32 array of shape"):
        round_to(x, "bfloat16", out=np.empty((3, 2), np.float32))
    with pytest.raises(ValueError, match="out must be"):
        round_to(x, "bfloat16", out=np.empty((2, 3), np.float64))


# ---------------------------------------------------------------------------------------------- dequantize-matmul
@st.composite
def quantized(draw, max_out=40, max_in=150):
    out_f, in_f = draw(st.integers(1, max_out)), draw(st.integers(1, max_in))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w = (rng.standard_normal((out_f, in_f)) * draw(st.sampled_from([1e-30, 0.02, 1.0, 1e30]))).astype(np.float32)
    q = qlora_ref.quantize_4bit(w, draw(st.sampled_from(["nf4", "fp4", "int4"])), draw(st.sampled_from([32, 64, 128])),
                                draw(st.booleans()))
    return q, rng


@given(quantized(), st.data())
def test_dequantized_tile_equals_the_definition(qr, data):
    """Any block of rows and columns: starts in a high or low nibble, spans that cross quantization blocks and rows."""
    q, _ = qr
    out_f, in_f = q.shape
    r0 = data.draw(st.integers(0, out_f - 1))
    r1 = data.draw(st.integers(r0 + 1, out_f))
    c0 = data.draw(st.integers(0, in_f - 1))
    c1 = data.draw(st.integers(c0 + 1, in_f))
    for compute_dtype in ("bfloat16", "float32"):
        tile = np.full((r1 - r0) * (c1 - c0), np.nan, np.float32)
        fused_matmul._dequantize_tile(*fused_matmul._kernel_args(q), in_f, r0, r1, c0, c1,
                                      compute_dtype == "bfloat16", np.empty(16, np.float32), tile)
        expected = fused_matmul.dequantized_weight(q, compute_dtype)[r0:r1, c0:c1]
        assert_same_bits(tile.reshape(r1 - r0, c1 - c0), expected)
        assert_same_bits(expected, round_to_definition(qlora_ref.dequantize_4bit(q, "float32")[r0:r1, c0:c1],
                                                       compute_dtype))


@given(st.integers(1, 12), st.integers(1, 4), st.sampled_from([32, 64, 128]), st.sampled_from(["nf4", "fp4"]),
       st.booleans(), st.data())
def test_dequantized_whole_blocks_equal_the_definition(out_f, blocks_per_row, blocksize, quant_type, dq, data):
    """The shorter loop for whole quantization blocks (every layer of a real model): whole rows, one contiguous run,
    and block-aligned columns, row by row."""
    in_f = blocks_per_row * blocksize
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    q = qlora_ref.quantize_4bit(rng.standard_normal((out_f, in_f)).astype(np.float32), quant_type, blocksize, dq)
    r0 = data.draw(st.integers(0, out_f - 1))
    r1 = data.draw(st.integers(r0 + 1, out_f))
    b0 = data.draw(st.integers(0, blocks_per_row - 1))
    b1 = data.draw(st.integers(b0 + 1, blocks_per_row))
    for c0, c1 in ((0, in_f), (b0 * blocksize, b1 * blocksize)):
        for compute_dtype in ("bfloat16", "float32"):
            tile = np.full((r1 - r0) * (c1 - c0), np.nan, np.float32)
            fused_matmul._dequantize_tile(*fused_matmul._kernel_args(q), in_f, r0, r1, c0, c1,
                                          compute_dtype == "bfloat16", np.empty(16, np.float32), tile)
            assert_same_bits(tile.reshape(r1 - r0, c1 - c0),
                             round_to_definition(qlora_ref.dequantize_4bit(q, "float32")[r0:r1, c0:c1], compute_dtype))


@given(quantized(max_out=300, max_in=300))
def test_double_quantized_absmax_equals_the_definition(qr):
    q, _ = qr
    assert_same_bits(fused_matmul._absmax(q), q.absmax_float32())


@given(quantized(), st.integers(1, 40), st.sampled_from(["bfloat16", "float32"]))
def test_fused_products_equal_the_naive_ones_with_one_tile(qr, n, compute_dtype):
    q, rng = qr
    out_f, in_f = q.shape
    x = round_to(rng.standard_normal((n, in_f)).astype(np.float32), compute_dtype)
    g = round_to(rng.standard_normal((n, out_f)).astype(np.float32), compute_dtype)
    y = fused_matmul.fused_x_wt(x, q, compute_dtype)
    gx = fused_matmul.fused_g_w(g, q, compute_dtype)
    assert y.flags.c_contiguous and gx.flags.c_contiguous
    assert_same_bits(y, fused_matmul.naive_x_wt(x, q, compute_dtype))
    assert_same_bits(gx, fused_matmul.naive_g_w(g, q, compute_dtype))


# ---------------------------------------------------------------------------------------------- the layer's kernels
@given(st.data())
def test_lora_kernels_equal_their_numpy_expressions(data):
    n, m = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 70))
    to_bf16 = data.draw(st.booleans())
    rnd = (lambda a: round_to_definition(a, "bfloat16")) if to_bf16 else (lambda a: np.asarray(a, np.float32))
    xw, p, g = (edge_array(data.draw, (n, m)) for _ in range(3))
    bias = rnd(edge_array(data.draw, (m,)))  # the kernels take the bias already rounded (b_c)
    keep = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).random((n, m)) < 0.7
    s = np.float32(data.draw(st.sampled_from([0.25, 16.0 / 64, 2.0, 1e-3, 3.0])))
    scale = np.float32(data.draw(st.sampled_from([1.0 / 0.9, 1.0 / 0.5, 1.0])))
    with np.errstate(over="ignore", invalid="ignore"):
        for has_bias in (True, False):
            out = xw.copy()
            lora_kernels.frozen_output(out, bias, has_bias, to_bf16)
            assert_same_bits(out, rnd(xw + bias) if has_bias else rnd(xw), nan_ok=True)
            out = xw.copy()
            lora_kernels.adapter_output(out, bias, has_bias, p, s, to_bf16)
            base = rnd(xw + bias) if has_bias else rnd(xw)
            assert_same_bits(out, rnd(base + rnd(rnd(p) * s)), nan_ok=True)
        out = np.empty_like(xw)
        lora_kernels.dropout_input(xw, keep, scale, to_bf16, out)
        assert_same_bits(out, rnd(xw * (keep * scale)), nan_ok=True)
        lora_kernels.scaled(g, s, to_bf16, out)
        assert_same_bits(out, rnd(g * s), nan_ok=True)
        for has_keep in (True, False):
            out = xw.copy()
            lora_kernels.input_grad(out, p, keep, has_keep, scale, to_bf16)
            t = rnd(rnd(p) * (keep * scale)) if has_keep else rnd(p)
            assert_same_bits(out, rnd(rnd(xw) + t), nan_ok=True)


@st.composite
def layers(draw):
    out_f, in_f = draw(st.integers(1, 48)), draw(st.integers(1, 96))
    r = draw(st.one_of(st.none(), st.integers(1, 12)))
    p = draw(st.sampled_from([0.0, 0.1, 0.5]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w = (rng.standard_normal((out_f, in_f)) * 0.1).astype(np.float32)
    bias = rng.standard_normal(out_f).astype(np.float32) if draw(st.booleans()) else None
    layer = QLoRALinear.from_weight(w, r, draw(st.sampled_from([1.0, 16.0])), dropout=p,
                                    quant_type=draw(st.sampled_from(["nf4", "fp4", None])), bias=bias,
                                    compute_dtype=draw(st.sampled_from(["bfloat16", "float32"])),
                                    use_rslora=draw(st.booleans()), blocksize=draw(st.sampled_from([32, 64])))
    if r is not None:
        layer.lora_B = (rng.standard_normal((out_f, r)) * 0.3).astype(np.float32)
    lead = draw(st.sampled_from([(), (1,), (5,), (2, 3)]))
    return layer, lead, rng


@given(layers())
def test_layer_fast_path_equals_its_definition(args):
    """Two forward + backward passes (gradients accumulate), dropout on, the same masks."""
    layer, lead, rng = args
    x = (rng.standard_normal((*lead, layer.in_features)) * 3).astype(np.float32)
    gy = rng.standard_normal((*lead, layer.out_features)).astype(np.float32)
    out = {}
    for kernel in ("naive", "fused"):
        layer.kernel = kernel
        layer.zero_grad()
        layer._dropout_rng = np.random.default_rng(7)  # the same masks drawn on both paths
        ys, gxs = [], []
        for _ in range(2):
            ys.append(layer.forward(x))
            gxs.append(layer.backward(gy))
        out[kernel] = ys, gxs, {k: v.copy() for k, v in layer.grads.items()}
    (y0, g0, a0), (y1, g1, a1) = out["naive"], out["fused"]
    for a, b in zip(y0 + g0, y1 + g1, strict=True):
        assert_same_bits(b, a)
    assert a0.keys() == a1.keys()
    for k in a0:
        assert_same_bits(a1[k], a0[k])
    assert y1[0].shape == (*lead, layer.out_features) and g1[0].shape == x.shape


@pytest.mark.parametrize("kernel", ["fused", "naive"])
def test_layer_keeps_the_callers_input_for_the_gradient_of_A(kernel):
    """In float32 the rounded input is the caller's array: the fast path copies it before keeping it for backward.
    The kept input x_d enters only ∂L/∂A = (s G B)ᵀ x_d (∂L/∂B = s Gᵀ H reads H, a new array, and cannot show it):
    changing the caller's x between forward and backward must not change ∂L/∂A. All ones and
    s = α/r = 1/2: ∂L/∂H = s · G B = ½ · 4 = 2 per entry, so ∂L/∂A = 2 · (3 tokens) · 1 = 6 exactly (30 with the
    changed x)."""
    layer = QLoRALinear.from_weight(np.ones((4, 8), np.float32), 2, 1.0, quant_type=None, compute_dtype="float32",
                                    kernel=kernel)
    layer.lora_B = np.ones((4, 2), np.float32)
    x = np.ones((3, 8), np.float32)
    layer.forward(x)
    x[...] = 5.0
    layer.backward(np.ones((3, 4), np.float32))
    assert np.array_equal(layer.grads["lora_A"], np.full((2, 8), 6.0, np.float32))


# ---------------------------------------------------------------------------------------------- attention, MLP
@given(st.data())
def test_rope_and_softmax_in_place_equal_the_expressions(data):
    T, half = data.draw(st.integers(1, 20)), data.draw(st.integers(1, 16))
    x = edge_array(data.draw, (2, 3, T, 2 * half), scale=data.draw(st.sampled_from([1e-40, 1.0, 1e30])))
    cos, sin = RotaryEmbedding(2 * half).cos_sin(np.arange(T) + data.draw(st.integers(0, 5000)))
    with np.errstate(over="ignore", invalid="ignore"):
        for v in (x, x.swapaxes(1, 2).copy().swapaxes(1, 2)):  # contiguous, and a transposed view
            assert_same_bits(apply_rope(v, cos, sin), v * cos + rotate_half(v) * sin, nan_ok=True)
            assert_same_bits(apply_rope_backward(v, cos, sin), v * cos - rotate_half(v * sin), nan_ok=True)
    s = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).standard_normal((3, T, T)).astype(np.float32)
    s *= np.float32(data.draw(st.sampled_from([1.0, 50.0])))
    s[..., np.triu(np.ones((T, T), bool), k=1)] = -np.inf  # causal: the diagonal and below stay finite
    e = s - np.max(s, axis=-1, keepdims=True)
    np.exp(e, out=e)
    expected = e / np.sum(e, axis=-1, keepdims=True)
    assert_same_bits(softmax(s), expected)
    assert softmax(s, out=s) is s
    assert_same_bits(s, expected)


class _Identity:
    """A linear layer stand-in whose forward and backward pass values through unchanged (a copy)."""

    def forward(self, x):
        return np.array(x)

    def backward(self, g):
        return np.array(g)


@given(st.data())
def test_swiglu_backward_equals_the_expression(data):
    """The fused Numba pass (float32) and the NumPy fallback (float64) against the expression."""
    shape = data.draw(st.sampled_from([(data.draw(st.integers(1, 40)),), (2, 3, 5)]))
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    g, u, dh = (edge_array(data.draw, shape, scale=data.draw(st.sampled_from([1e-3, 1.0, 30.0]))).astype(dtype)
                for _ in range(3))
    mlp = SwiGLU(_Identity(), _Identity(), _Identity())
    with np.errstate(over="ignore", invalid="ignore"):
        s = 1 / (1 + np.exp(-g))
        a = g * s
        mlp._cache = (g, u, s, a)
        dx = mlp.backward(dh)
        assert_same_bits(dx, dh * u * (s * (1 + g * (1 - s))) + dh * a, nan_ok=True)


def test_grad_norm_2_equals_the_general_expression():
    """The 2-norm's in-place square against ``sum(|g|**2)`` (the general p-norm expression), float32 and float64."""
    from qlora_ref.optim.clip import _power_sum

    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        g = (rng.standard_normal(1000) * 10.0 ** rng.integers(-20, 20, 1000)).astype(dtype)
        kept = g.copy()
        assert _power_sum(g, 2.0) == np.sum(np.abs(g.astype(np.float64)) ** 2.0)
        assert (g == kept).all()  # the gradient is left alone

