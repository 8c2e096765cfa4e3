"""qlora_ref.QLoRALinear and qlora_gpu.QLoRALinear agree: outputs and every gradient, for random shapes, ranks,
alphas, dropout masks, biases, weight formats and both compute dtypes, within the bound of tests/lora_helpers.py
(float32: round-off; bfloat16: derived from bfloat16's precision and the reduction lengths)."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lora_helpers import assert_within_bound, bf16_stepwise_oracle, magnitudes, small_integer_layer_inputs

import qlora_gpu
import qlora_ref
from qlora_gpu.lora import QLoRALinear as GpuLinear
from qlora_ref.dtypes import round_to
from qlora_ref.lora import QLoRALinear as RefLinear
from qlora_ref.lora import dropout_scale


@st.composite
def layer_cases(draw):
    out_f = draw(st.integers(1, 48))
    in_f = draw(st.integers(1, 96))
    lead = draw(st.sampled_from([(), (1,), (5,), (2, 3)]))
    r = draw(st.one_of(st.none(), st.integers(1, 12)))
    alpha = draw(st.sampled_from([1.0, 8.0, 16.0, 32.0, 0.5]))
    quant = draw(st.sampled_from([None, "nf4", "fp4"]))
    blocksize = draw(st.sampled_from([32, 64, 128]))
    double_quant = draw(st.booleans())
    p = draw(st.sampled_from([0.0, 0.05, 0.1, 0.5]))
    return dict(
        out_f=out_f, in_f=in_f, lead=lead, r=r, alpha=alpha, quant=quant, blocksize=blocksize,
        double_quant=double_quant, p=p, use_rslora=draw(st.booleans()), has_bias=draw(st.booleans()),
        compute_dtype=draw(st.sampled_from(["float32", "bfloat16"])), seed=draw(st.integers(0, 2**32 - 1)),
        w_scale=draw(st.sampled_from([0.02, 1.0])),
    )


def build_pair(c, rng):
    """The same layer in both backends (one quantized state, loaded by both), a non-zero B, and the inputs."""
    W = (rng.standard_normal((c["out_f"], c["in_f"])) * c["w_scale"]).astype(np.float32)
    bias = rng.standard_normal(c["out_f"]).astype(np.float32) if c["has_bias"] else None
    kw = dict(dropout=c["p"], bias=bias, compute_dtype=c["compute_dtype"], seed=c["seed"] % 1000,
              use_rslora=c["use_rslora"])
    if c["quant"] is None:
        ref = RefLinear.from_weight(W, c["r"], c["alpha"], quant_type=None, **kw)
        gpu = GpuLinear.from_weight(W, c["r"], c["alpha"], quant_type=None, **kw)
    else:
        q = qlora_ref.quantize_4bit(W, c["quant"], c["blocksize"], c["double_quant"])
        ref = RefLinear.from_quantized(q, c["r"], c["alpha"], **kw)
        gpu = GpuLinear.from_quantized(q, c["r"], c["alpha"], **kw)
    if c["r"] is not None:
        B = (rng.standard_normal((c["out_f"], c["r"])) * 0.1).astype(np.float32)
        ref.lora_B = B
        gpu.lora_B = torch.nn.Parameter(torch.from_numpy(B.copy()))
    return ref, gpu


@given(layer_cases())
def test_backends_agree_on_outputs_and_gradients(c):
    rng = np.random.default_rng(c["seed"])
    ref, gpu = build_pair(c, rng)
    x = rng.standard_normal((*c["lead"], c["in_f"])).astype(np.float32)
    gy = rng.standard_normal((*c["lead"], c["out_f"])).astype(np.float32)
    mask = None
    if c["p"] > 0 and c["r"] is not None:
        mask = rng.random(x.shape) >= c["p"]  # a seeded mask, given to both

    y_ref = ref.forward(x, dropout_mask=mask)
    gx_ref = ref.backward(gy)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    y_gpu = gpu(xt, dropout_mask=None if mask is None else torch.from_numpy(mask))
    y_gpu.backward(torch.from_numpy(gy.copy()))

    # magnitudes of the exact computation on absolute values, from the inputs both backends round identically
    cd = c["compute_dtype"]
    n = int(np.prod(c["lead"], dtype=np.int64))
    x2 = round_to(x.reshape(n, c["in_f"]), cd)
    g2 = round_to(gy.reshape(n, c["out_f"]), cd)
    ks = None
    if mask is not None:
        ks = mask.reshape(n, c["in_f"]) * dropout_scale(c["p"])
    a_c = None if c["r"] is None else round_to(ref.lora_A, cd)
    b_c = None if c["r"] is None else round_to(ref.lora_B, cd)
    m = magnitudes(x2, ref.dequantized_weight(), ref.bias, a_c, b_c, g2, ref.scaling, ks)
    dims = (cd, n, c["in_f"], c["out_f"], c["r"])

    assert y_gpu.dtype == torch.float32 and tuple(y_gpu.shape) == y_ref.shape
    assert_within_bound("y", y_ref, y_gpu.detach().numpy(), m["y"], *dims)
    assert_within_bound("x", gx_ref, xt.grad.numpy(), m["x"], *dims)
    if c["r"] is None:
        assert ref.grads == {} and ref.parameters() == {}
        assert [n for n, p in gpu.named_parameters() if p.requires_grad] == []
    else:
        assert np.array_equal(ref.lora_A, gpu.lora_A.detach().numpy())  # the same seed, the same initial A
        assert_within_bound("lora_A", ref.grads["lora_A"], gpu.lora_A.grad.numpy(), m["lora_A"], *dims)
        assert_within_bound("lora_B", ref.grads["lora_B"], gpu.lora_B.grad.numpy(), m["lora_B"], *dims)
    assert gpu.weight.grad is None  # frozen


def test_ragged_in_features_agree():
    """Also on a CPU whose bitsandbytes kernel gets ragged rows wrong: qlora_gpu routes around it
    (tests/test_bnb_cpu_kernels.py)."""
    rng = np.random.default_rng(0)
    c = dict(out_f=8, in_f=96, lead=(4,), r=4, alpha=8.0, quant="nf4", blocksize=64, double_quant=True, p=0.0,
             use_rslora=False, has_bias=False, compute_dtype="float32", seed=0, w_scale=1.0)
    ref, gpu = build_pair(c, rng)
    x = rng.standard_normal((4, 96)).astype(np.float32)
    np.testing.assert_allclose(ref.forward(x), gpu(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_torch_cpu_bfloat16_matmul_accumulates_in_float32():
    """The bound's premise: torch's CPU bfloat16 GEMM (every operand layout qlora_gpu uses) sums in float32 and rounds
    once, and F.linear adds the bias before that rounding. A bfloat16 accumulator would be ~40x further off."""
    torch.manual_seed(0)
    m, k, n = 32, 2048, 48
    u = 2.0**-8
    a, b = torch.randn(m, k).bfloat16(), torch.randn(k, n).bfloat16()
    exact = a.double() @ b.double()
    sum_abs = a.double().abs() @ b.double().abs()
    layouts = {"row-row": (a, b), "row-col": (a, b.t().contiguous().t()), "col-row": (a.t().contiguous().t(), b)}
    for name, (a_, b_) in layouts.items():
        c = (a_ @ b_).double()
        assert torch.all((c - exact).abs() <= u * exact.abs() + k * 2.0**-24 * sum_abs), name
    bias = torch.randn(n).bfloat16()
    linear = torch.nn.functional.linear(a, b.t().contiguous(), bias)
    once = (a.float() @ b.float() + bias.float()).bfloat16()
    assert (linear != once).float().mean() < 0.01  # one rounding after the bias (up to summation order)


def test_same_seed_same_initial_adapter_and_dropout_semantics():
    W = np.random.default_rng(1).standard_normal((6, 10)).astype(np.float32)
    ref = RefLinear.from_weight(W, 3, 6.0, seed=7)
    gpu = GpuLinear.from_weight(torch.from_numpy(W), 3, 6.0, seed=7)
    assert np.array_equal(ref.lora_A, gpu.lora_A.detach().numpy())
    assert not gpu.lora_B.detach().any() and not ref.lora_B.any()
    assert ref.scaling == gpu.scaling == 2.0
    # eval mode: dropout is the identity, and an explicit mask is refused in both
    gpu.eval()
    ref.eval()
    x = np.ones((2, 10), np.float32)
    for call in (lambda: ref.forward(x, dropout_mask=np.ones_like(x, bool)),
                 lambda: gpu(torch.from_numpy(x), dropout_mask=torch.ones(2, 10, dtype=torch.bool))):
        with pytest.raises(ValueError, match="dropout_mask"):
            call()


def test_gpu_backward_saves_no_dequantized_weight():
    """The custom autograd function keeps the input, the mask, the adapter and H = x_d Aᵀ; never an (out, in)
    tensor."""
    out_f, in_f, n, r = 96, 128, 5, 4
    W = torch.randn(out_f, in_f)
    layer = GpuLinear.from_weight(W, r, 8.0, dropout=0.1, compute_dtype="bfloat16")
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    x = torch.randn(n, in_f, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert (out_f, in_f) not in [s for s, _ in saved] and (in_f, out_f) not in [s for s, _ in saved]
    assert layer.lora_A.grad is not None and layer.weight.grad is None
    big = [s for s, _ in saved if np.prod(s) > r * max(in_f, out_f)]
    # the dropped-out input (bfloat16) and the keep mask (bool): what backward needs, nothing more
    assert sorted(big) == [(n, in_f), (n, in_f)], saved
    assert ((n, r), torch.bfloat16) in saved  # H, kept rather than recomputed (r/in of x_d)


def test_gpu_bad_input_gives_value_errors():
    W = torch.randn(6, 10)
    layer = GpuLinear.from_weight(W, 2, 4.0, dropout=0.1)
    with pytest.raises(ValueError, match="in_features=10"):
        layer(torch.randn(3, 11))
    with pytest.raises(ValueError, match=r"lora_A must have shape"):
        layer.lora_A = torch.nn.Parameter(torch.zeros(2, 11))
    with pytest.raises(ValueError, match=r"lora_B must have shape"):
        layer.lora_B = torch.nn.Parameter(torch.zeros(7, 2))
    for r in (0, -1):
        with pytest.raises(ValueError, match="positive integer"):
            GpuLinear.from_weight(W, r, 4.0)
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\)"):
            GpuLinear.from_weight(W, 2, 4.0, dropout=p)
    with pytest.raises(ValueError, match="dropout_mask must have the input's shape"):
        layer(torch.randn(3, 10), dropout_mask=torch.ones(3, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="compute_dtype"):
        GpuLinear.from_weight(W, 2, 4.0, compute_dtype="float16")
    with pytest.raises(ValueError, match="no adapter"):
        GpuLinear.from_weight(W, None).lora_A = torch.nn.Parameter(torch.zeros(1, 10))


def test_gpu_merge_matches_reference_merge():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((16, 64)).astype(np.float32)
    q = qlora_ref.quantize_4bit(W)
    ref = RefLinear.from_quantized(q, 4, 8.0)
    gpu = GpuLinear.from_quantized(qlora_gpu.Quantized4bit.from_state_dict(q.state_dict()), 4, 8.0)
    B = rng.standard_normal((16, 4)).astype(np.float32)
    ref.lora_B = B
    gpu.lora_B = torch.nn.Parameter(torch.from_numpy(B.copy()))
    np.testing.assert_allclose(ref.merge(), gpu.merge().numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("alpha", [8.0, 12.0])  # s = 2 (inside the products) and s = 3 (a multiplication of its own)
@pytest.mark.parametrize("fast", [False, True])
def test_gpu_bfloat16_rounding_steps_are_bit_exact_against_a_stepwise_oracle(fast, alpha, device, monkeypatch):
    """The torch backend rounds where the reference does (test_lora_ref's test of the same name): the stepwise
    oracle of ``lora_helpers`` on small-integer inputs, every float32 sum exact in any order, so bit for bit on any
    CPU or GPU. The bound of test_backends_agree_on_outputs_and_gradients allows several bfloat16 roundings and
    could not see a dropped one (∂L/∂A from an unrounded ∂L/∂H moved 65 of 160 elements and passed it)."""
    if device == "cuda":  # cuBLAS may otherwise reduce split-K partial sums in bfloat16
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)
    n, d_in, d_out, r = 6, 40, 24, 4
    W, x, gy, A, B, keep = small_integer_layer_inputs(n, d_in, d_out, r)
    layer = GpuLinear.from_weight(torch.from_numpy(W), r, alpha, dropout=0.5, quant_type=None,
                                  compute_dtype="bfloat16").to(device)
    layer.fast = fast
    with torch.no_grad():
        layer.lora_A.copy_(torch.from_numpy(A))
        layer.lora_B.copy_(torch.from_numpy(B))
    xt = torch.from_numpy(x).to(device).requires_grad_(True)
    y = layer(xt, dropout_mask=torch.from_numpy(keep).to(device))
    y.backward(torch.from_numpy(gy).to(device))
    y_o, gx_o, ga_o, gb_o = bf16_stepwise_oracle(x, W, A, B, gy, keep, alpha / r, dropout_scale(0.5))
    for got, want in ((y, y_o), (xt.grad, gx_o), (layer.lora_A.grad, ga_o), (layer.lora_B.grad, gb_o)):
        np.testing.assert_array_equal(got.detach().float().cpu().numpy(), want)


@pytest.mark.gpu
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_cuda_layer_agrees_with_reference(compute_dtype, monkeypatch):
    # the bound assumes float32 accumulation; cuBLAS may otherwise reduce split-K partial sums in bfloat16
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)
    rng = np.random.default_rng(0)
    c = dict(out_f=256, in_f=512, lead=(3, 7), r=16, alpha=32.0, quant="nf4", blocksize=64, double_quant=True,
             p=0.1, use_rslora=False, has_bias=True, compute_dtype=compute_dtype, seed=0, w_scale=0.02)
    ref, gpu = build_pair(c, rng)
    gpu = gpu.to("cuda")
    x = rng.standard_normal((3, 7, 512)).astype(np.float32)
    gy = rng.standard_normal((3, 7, 256)).astype(np.float32)
    mask = rng.random(x.shape) >= 0.1
    y_ref = ref.forward(x, dropout_mask=mask)
    gx_ref = ref.backward(gy)
    xt = torch.from_numpy(x).cuda().requires_grad_(True)
    y = gpu(xt, dropout_mask=torch.from_numpy(mask).cuda())
    y.backward(torch.from_numpy(gy).cuda())
    ks = mask.reshape(21, 512) * dropout_scale(0.1)
    m = magnitudes(round_to(x.reshape(21, 512), compute_dtype), ref.dequantized_weight(), ref.bias,
                   round_to(ref.lora_A, compute_dtype), round_to(ref.lora_B, compute_dtype),
                   round_to(gy.reshape(21, 256), compute_dtype), ref.scaling, ks)
    dims = (compute_dtype, 21, 512, 256, 16)
    assert_within_bound("y", y_ref, y.detach().cpu().numpy(), m["y"], *dims)
    assert_within_bound("x", gx_ref, xt.grad.cpu().numpy(), m["x"], *dims)
    assert_within_bound("lora_A", ref.grads["lora_A"], gpu.lora_A.grad.cpu().numpy(), m["lora_A"], *dims)
    assert_within_bound("lora_B", ref.grads["lora_B"], gpu.lora_B.grad.cpu().numpy(), m["lora_B"], *dims)


# --------------------------------------------------------------------------------------------------------------
# The torch backend's hand-written backward on its own: torch autograd and finite differences
# --------------------------------------------------------------------------------------------------------------


#: the two hand-written autograd functions of the layer: the plain core's and the fast path's (qlora_gpu.fast)
FUNCTIONS = ("plain", "fast")


def _apply(function: str, x, a, b, bias, keep, ks, s, weight, state):
    """y of ``qlora_gpu.lora.QLoRALinearFunction`` ("plain") or ``qlora_gpu.fast.layer.FastQLoRAFunction``
    ("fast", nothing staged), each with its own argument order."""
    if function == "plain":
        from qlora_gpu.lora import QLoRALinearFunction

        return QLoRALinearFunction.apply(x, weight, state, a, b, bias, keep, ks, s, None)
    from qlora_gpu.fast.layer import FastQLoRAFunction

    return FastQLoRAFunction.apply(x, a, b, bias, keep, ks, s, weight, state)


def _function_inputs(dtype, quantized: bool, seed: int = 0, scaling: float = 2.5, device: str = "cpu"):
    """Inputs of ``_apply``: x (N, in), A, B, bias, keep mask, keep scale, scaling, the frozen weight (a float
    tensor, or bitsandbytes' 4-bit state) and the float weight it stands for."""
    from qlora_gpu.quantize import dequantize_packed as _dequantize

    g = torch.Generator().manual_seed(seed)
    n, in_f, out_f, r = 6, 40, 24, 3
    x = torch.randn(n, in_f, generator=g, dtype=dtype)
    a = torch.randn(r, in_f, generator=g, dtype=dtype) * 0.3
    b = torch.randn(out_f, r, generator=g, dtype=dtype) * 0.3
    bias = torch.randn(out_f, generator=g, dtype=dtype)
    keep = torch.rand(n, in_f, generator=g) >= 0.25
    W = torch.randn(out_f, in_f, generator=g) * 0.5
    if quantized:
        q = GpuLinear.from_weight(W, None, quant_type="nf4", blocksize=32, double_quant=True).weight
        weight, state, dense = q, q.quant_state, _dequantize(q, q.quant_state, dtype)
    else:
        weight, state, dense = W.to(dtype), None, W.to(dtype)
    if device != "cpu":
        x, a, b, bias, keep, weight, dense = (t.to(device) for t in (x, a, b, bias, keep, weight, dense))
        if state is not None:
            state.to(device)
    return x, a, b, bias, keep, 1.0 / 0.75, scaling, weight, state, dense


@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("scaling", [2.5, 0.25])  # a multiplication of its own; inside the products (exact_scale)
def test_gpu_function_backward_passes_finite_differences(scaling, function):
    """torch.autograd.gradcheck in float64 (central differences against the hand-written backward) for x, A, B,
    with dropout and bias; the unquantized frozen path (bitsandbytes' 4-bit kernels have no float64)."""
    x, a, b, bias, keep, ks, s, weight, state, _ = _function_inputs(torch.float64, quantized=False, scaling=scaling)
    inputs = tuple(t.clone().requires_grad_() for t in (x, a, b))
    assert torch.autograd.gradcheck(
        lambda x_, a_, b_: _apply(function, x_, a_, b_, bias, keep, ks, s, weight, state), inputs,
        eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("scaling", [2.5, 0.25])
@pytest.mark.parametrize("quantized", [False, True])
def test_gpu_function_backward_matches_torch_autograd(quantized, scaling, function):
    """The hand-written backward against torch autograd on the same graph, y = x Wᵀ + b + s · ((x ⊙ M) · k) Aᵀ Bᵀ
    (W dequantized for the 4-bit weight), float32. A wrong gradient (scaling or mask dropped) fails."""
    x, a, b, bias, keep, ks, s, weight, state, dense = _function_inputs(torch.float32, quantized, seed=1,
                                                                        scaling=scaling)
    g_y = torch.randn(x.shape[0], dense.shape[0], generator=torch.Generator().manual_seed(2))

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (x, a, b)]
        y = fn(*leaves)
        y.backward(g_y)
        return [y.detach(), *(t.grad for t in leaves)]

    ours = grads(lambda x_, a_, b_: _apply(function, x_, a_, b_, bias, keep, ks, s, weight, state))
    auto = grads(lambda x_, a_, b_: x_ @ dense.t() + bias + s * ((x_ * keep * ks) @ a_.t()) @ b_.t())
    for name, o, t in zip(("y", "dL/dx", "dL/dA", "dL/dB"), ours, auto, strict=True):
        torch.testing.assert_close(o, t, rtol=1e-5, atol=1e-5, msg=name)
    # the check can fail: the mask forgotten in dL/dx is caught
    wrong = auto[1] + s * ((g_y @ b) @ a) * (~keep) * ks
    assert not torch.allclose(ours[1], wrong, rtol=1e-5, atol=1e-5)


def _function_results(device: str, dtype, quantized: bool, scaling: float, seed: int, function: str):
    """y and the gradients of x, A, B from ``_apply`` (dropout, bias; ∂L/∂y drawn from ``seed``)."""
    x, a, b, bias, keep, ks, s, weight, state, dense = _function_inputs(dtype, quantized, seed, scaling, device)
    g_y = torch.randn(x.shape[0], dense.shape[0], generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    y = _apply(function, *leaves, bias, keep, ks, s, weight, state)
    y.backward(g_y)
    return [y.detach(), *(t.grad for t in leaves)]


def _assert_scaling_inside_is_bit_identical(device, monkeypatch):
    import qlora_gpu.lora_math as gl

    for function in FUNCTIONS:
        for dtype in (torch.bfloat16, torch.float32):
            for quantized in (False, True):
                for s, seed in [(0.25, 0), (2.0, 1), (0.125, 2), (-4.0, 3)]:
                    assert gl.exact_scale(s)
                    inside = _function_results(device, dtype, quantized, s, seed, function)
                    with monkeypatch.context() as m:
                        m.setattr(gl, "exact_scale", lambda _: False)  # s by a multiplication of its own
                        apart = _function_results(device, dtype, quantized, s, seed, function)
                    for name, i, a in zip(("y", "dL/dx", "dL/dA", "dL/dB"), inside, apart, strict=True):
                        assert torch.equal(i, a), (name, dtype, quantized, s, function)
    assert not gl.exact_scale(2.5) and not gl.exact_scale(16 / 8**0.5) and not gl.exact_scale(0.0)


def test_a_power_of_two_scaling_inside_the_products_gives_the_same_bits(monkeypatch):
    """s = ±2ᵏ rides inside torch.add's alpha (forward) and the GEMMs' alpha (backward) instead of a multiplication
    of its own (``qlora_gpu.lora_math.exact_scale``): s · v is exact, so y and every gradient are bit-identical to the
    separate multiplication, in bfloat16 and float32. (A wrong alpha, e.g. s applied twice, fails here and in the
    autograd and finite-difference tests above, which run both paths.)"""
    _assert_scaling_inside_is_bit_identical("cpu", monkeypatch)


@pytest.mark.gpu
def test_on_cuda_a_power_of_two_scaling_inside_the_products_gives_the_same_bits(monkeypatch):
    """The same on CUDA: cuBLAS applies alpha to the float32 accumulator before its one rounding (exact for
    s = ±2ᵏ), and torch.add computes base + alpha · P in float32 and rounds once."""
    _assert_scaling_inside_is_bit_identical("cuda", monkeypatch)


def test_scales_double_quantized_in_other_blocks_than_256_load_and_compute_the_same_weight():
    """The format allows any 8-bit block size for the second-level constants; bitsandbytes writes 256 and its
    matmul_4bit computes no other (0.50: NotImplementedError at the first forward). The GPU layer decodes such
    scales once to float32, the values the reference decodes: the same weight, and the same products."""
    from qlora_gpu.quantize import dequantize_packed
    from qlora_ref.quantize import Quantized4bit as RefQ4
    from qlora_ref.quantize import quantize_4bit, quantize_blockwise_8bit

    rng = np.random.default_rng(0)
    W = rng.standard_normal((64, 512)).astype(np.float32)
    plain = quantize_4bit(W, "nf4", 64, double_quant=False)
    offset = np.float32(plain.absmax.astype(np.float64).mean())
    state2 = quantize_blockwise_8bit(plain.absmax - offset, 128)
    q = RefQ4(plain.packed, state2.codes, plain.shape, "float32", 64, "nf4", plain.code, float(offset), state2)
    q = RefQ4.from_state_dict(q.state_dict())  # through the file format: nested_blocksize 128 is read
    assert q.state2.blocksize == 128
    ref_layer = qlora_ref.QLoRALinear.from_quantized(q, 4, 8.0, compute_dtype="float32")
    x = rng.standard_normal((3, 512)).astype(np.float32)
    for fast in (False, True):
        gpu_layer = qlora_gpu.QLoRALinear.from_quantized(q, 4, 8.0, compute_dtype="float32")
        gpu_layer.fast = fast
        packed, state = gpu_layer.frozen_weight()
        w = dequantize_packed(packed, state, torch.float32)
        assert np.array_equal(w.numpy(), ref_layer.dequantized_weight())
        y = gpu_layer(torch.from_numpy(x)).detach().numpy()
        # the same weight, summed in another order: within the float32 bound of the other tests here
        m = magnitudes(x, ref_layer.dequantized_weight(), None, None, None, np.zeros((3, 64)), 2.0, None)
        assert_within_bound("y", ref_layer.forward(x), y, m["y"], "float32", 3, 512, 64, 4)
