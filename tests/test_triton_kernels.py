"""The fused Triton kernels (qlora_gpu/fast/triton_kernels.py, docs/fused_kernels.md) against the unfused path.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before the module is imported, only
where CUDA is absent): float32 compute, and bfloat16 compute with float32 ``tl.dot`` operands holding bfloat16
values (``dot_f32``; the interpreter's bfloat16 ``tl.dot`` is wrong, and the kernels' own integer rounding makes the
bfloat16 steps exact there). They check what can go wrong in a kernel: indexing, the nibble order, absmax and
double-quantization decoding, masks for ragged shapes, the bias, the dropout mask, the LoRA epilogues. The
``gpu``-marked tests repeat the properties with native bfloat16 tensor-core dots on CUDA, on larger shapes.

The comparison is the layer against itself with ``kernel="bnb"`` (``FastQLoRAFunction``: ``bnb.matmul_4bit``
forward, ``dequantize_4bit`` + GEMM backward), within the bound of tests/lora_helpers.py (the two differ only in
float32 summation order; both round the same steps). Where bitsandbytes' AVX-512 CPU dequantize is wrong (ragged
``in_features``, docs/divergences.md) the ``"bnb"`` layer routes around it by itself (tests/test_bnb_cpu_kernels.py).

Why ``TritonQLoRAFunction.backward`` has no autograd or finite-difference test of its own: the Triton kernels have
no float64 path (``tl.dot`` takes float32/bfloat16 operands), so a float64 ``torch.autograd.gradcheck`` cannot run
on them, and float32 finite differences of a 4-bit layer could not resolve a wrong term in a small gradient. The
check is transitive instead: the unfused ``QLoRALinearFunction`` / ``FastQLoRAFunction`` is checked against torch
autograd and by ``gradcheck`` (tests/test_lora_backends.py), and the fused function is compared here with that
checked path on every output and gradient — within the summation-order bound on random shapes, and bit for bit on
small bfloat16 layers (where a dropped or added rounding step would show).
"""

import contextlib
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton and qlora_gpu.fast.triton_kernels are imported

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton; Linux only)")

import triton.language as tl  # noqa: E402, I001
from hypothesis import Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from lora_helpers import (  # noqa: E402
    assert_within_bound,
    bf16_stepwise_oracle,
    magnitudes,
    small_integer_layer_inputs,
)

import qlora_ref  # noqa: E402
from qlora_gpu.fast import triton_kernels as tk  # noqa: E402
from qlora_gpu.fast.layer import TritonQLoRAFunction  # noqa: E402
from qlora_gpu.lora import KERNELS, QLoRALinear, set_kernel  # noqa: E402
from qlora_gpu.quantize import Quantized4bit  # noqa: E402
from qlora_ref.dtypes import round_to  # noqa: E402
from qlora_ref.lora import dropout_scale  # noqa: E402

CUDA = torch.cuda.is_available()
if not CUDA and not tk.INTERPRET:
    pytest.skip("no CUDA device and qlora_gpu.fast.triton_kernels was imported without TRITON_INTERPRET=1",
                allow_module_level=True)

# the interpreter runs each program in NumPy: the exact-weight property (identity inputs of up to 150 rows, small
# tiles: up to seconds per example) runs a quarter of the profile's examples (ci: 15; thorough: 500)
EXAMPLES = max(5, settings.default.max_examples // 4)


def exact_dequant(q) -> np.ndarray:
    """The definition (qlora_ref): float32(code[nibble] · absmax[block]), double quantization decoded."""
    return qlora_ref.dequantize_4bit(q)


# --------------------------------------------------------------------------------------------------------------
# The dequantized tiles are exactly the weight
# --------------------------------------------------------------------------------------------------------------


@st.composite
def weight_cases(draw):
    return dict(
        out_f=draw(st.integers(1, 70)), in_f=draw(st.integers(1, 150)),
        quant=draw(st.sampled_from(["nf4", "fp4"])), blocksize=draw(st.sampled_from([32, 64, 128, 256])),
        double_quant=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)),
        block=draw(st.sampled_from([None, (16, 16, 16), (16, 32, 16)])),
    )


def _weight(c, rng, device):
    W = (rng.standard_normal((c["out_f"], c["in_f"])) * rng.choice([0.02, 1.0, 30.0])).astype(np.float32)
    q = qlora_ref.quantize_4bit(W, c["quant"], c["blocksize"], c["double_quant"])
    gq = Quantized4bit.from_state_dict(q.state_dict()).to(device)
    return q, gq


@settings(max_examples=EXAMPLES)
@given(weight_cases())
def test_kernels_multiply_by_exactly_the_dequantized_weight(c):
    """x = I gives y = dequant(W)ᵀ and G = I gives ∂L/∂x = dequant(W), bit for bit (each output is one product
    with 1 plus zeros): the nibble order, the block index, the absmax (double quantization decoded) and the
    masks of ragged tiles, all exact. Also the decoded scales equal bitsandbytes' own decoding bit for bit."""
    rng = np.random.default_rng(c["seed"])
    device = "cuda" if CUDA else "cpu"
    q, gq = _weight(c, rng, device)
    w = tk.weight_from_bnb(gq.packed, gq.to_bnb())
    assert torch.equal(w.absmax, gq.absmax_float32().float())
    expected = exact_dequant(q)
    eye_in = torch.eye(c["in_f"], device=device)
    eye_out = torch.eye(c["out_f"], device=device)
    y = tk.fused_linear_forward(eye_in, w, block=c["block"])
    gx = tk.fused_grad_input(eye_out, w, block=c["block"])
    np.testing.assert_array_equal(y.t().cpu().numpy(), expected)
    np.testing.assert_array_equal(gx.cpu().numpy(), expected)
    # bfloat16: the tiles hold bf16(dequant(W)), rounded to nearest even like bitsandbytes' bfloat16 output
    yb = tk.fused_linear_forward(eye_in.bfloat16(), w, block=c["block"], dot_f32=not CUDA or None)
    np.testing.assert_array_equal(yb.t().float().cpu().numpy(), round_to(expected, "bfloat16"))


def test_integer_rounding_to_bfloat16_is_round_to_nearest_even():
    """``_round_bf16`` (every bfloat16 rounding in the kernels) equals torch's float32 → bfloat16 conversion, on
    random bit patterns, on exact ties (both directions of the even rule) and at the top of the range."""
    @triton.jit
    def round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        tl.store(y_ptr + offs, tk._round_bf16(tl.load(x_ptr + offs, mask=ok, other=0.0)), mask=ok)

    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (4000,), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    x = x[torch.isfinite(x)]
    ties = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 2.0**-8), 2.0**-130 + 2.0**-138, 3.3895e38,
                         0.0, -0.0, 1e-45], dtype=torch.float32)
    x = torch.cat([x, ties])
    device = "cuda" if CUDA else "cpu"
    x = x.to(device)
    y = torch.empty_like(x)
    round_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    expected = x.bfloat16().float()
    assert torch.equal(y.view(torch.int32), expected.view(torch.int32))


# --------------------------------------------------------------------------------------------------------------
# The layer: fused against unfused, outputs and every gradient
# --------------------------------------------------------------------------------------------------------------


@st.composite
def layer_cases(draw, max_out=48, max_in=96):
    return dict(
        out_f=draw(st.integers(1, max_out)), in_f=draw(st.integers(1, max_in)),
        lead=draw(st.sampled_from([(), (1,), (5,), (2, 3), (17,)])),
        r=draw(st.sampled_from([None, 1, 2, 4, 7, 8, 16, 19, 70])),
        alpha=draw(st.sampled_from([1.0, 8.0, 16.0, 0.5])),
        quant=draw(st.sampled_from(["nf4", "fp4"])), blocksize=draw(st.sampled_from([32, 64, 128, 256])),
        double_quant=draw(st.booleans()), p=draw(st.sampled_from([0.0, 0.1, 0.5])),
        use_rslora=draw(st.booleans()), has_bias=draw(st.booleans()),
        compute_dtype=draw(st.sampled_from(["float32", "bfloat16"])), seed=draw(st.integers(0, 2**32 - 1)),
        w_scale=draw(st.sampled_from([0.02, 1.0])),
    )


@contextlib.contextmanager
def float32_reductions():
    """The bound assumes every product accumulated in float32 and rounded once; cuBLAS may otherwise reduce split-K
    partial sums of bfloat16 products in bfloat16 (as tests/test_lora_backends.py's CUDA test). CPU: no effect."""
    flags = torch.backends.cuda.matmul
    old = flags.allow_bf16_reduced_precision_reduction
    flags.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        flags.allow_bf16_reduced_precision_reduction = old


def check_fused_against_unfused(c, device, dot_f32=None):
    """Build the layer twice from one 4-bit state (kernel="triton" and the unfused reference), run forward and
    backward with the same input, output gradient and dropout mask; every result within the bound."""
    rng = np.random.default_rng(c["seed"])
    W = (rng.standard_normal((c["out_f"], c["in_f"])) * c["w_scale"]).astype(np.float32)
    bias = rng.standard_normal(c["out_f"]).astype(np.float32) if c["has_bias"] else None
    q = qlora_ref.quantize_4bit(W, c["quant"], c["blocksize"], c["double_quant"])
    kw = dict(dropout=c["p"], bias=bias, compute_dtype=c["compute_dtype"], seed=c["seed"] % 1000,
              use_rslora=c["use_rslora"], device=device)
    fused = QLoRALinear.from_quantized(q, c["r"], c["alpha"], kernel="triton", **kw)
    wd = exact_dequant(q)
    unfused = QLoRALinear.from_quantized(q, c["r"], c["alpha"], kernel="bnb", **kw)
    if c["r"] is not None:
        B = (rng.standard_normal((c["out_f"], c["r"])) * 0.1).astype(np.float32)
        for layer in (fused, unfused):
            layer.lora_B = torch.nn.Parameter(torch.from_numpy(B.copy()).to(device))
        assert torch.equal(fused.lora_A, unfused.lora_A)
    x = rng.standard_normal((*c["lead"], c["in_f"])).astype(np.float32)
    gy = rng.standard_normal((*c["lead"], c["out_f"])).astype(np.float32)
    mask = None
    if c["p"] > 0 and c["r"] is not None:
        mask = rng.random(x.shape) >= c["p"]

    results = []
    for layer in (fused, unfused):
        xt = torch.from_numpy(x.copy()).to(device).requires_grad_(True)
        m = None if mask is None else torch.from_numpy(mask).to(device)
        with float32_reductions():
            if layer is fused and dot_f32 is not None:
                y = TritonQLoRAFunction.apply(*_function_args(layer, xt, m), dot_f32)
                y = y.float().reshape(*c["lead"], c["out_f"])
            else:
                y = layer(xt, dropout_mask=m)
            y.backward(torch.from_numpy(gy.copy()).to(device))
        grads = {"y": y.detach(), "x": xt.grad}
        if c["r"] is not None:
            grads |= {"lora_A": layer.lora_A.grad, "lora_B": layer.lora_B.grad}
        results.append({k: v.float().cpu().numpy() for k, v in grads.items()})
    assert fused.weight.grad is None

    cd = c["compute_dtype"]
    n = int(np.prod(c["lead"], dtype=np.int64))
    ks = None if mask is None else mask.reshape(n, c["in_f"]) * dropout_scale(c["p"])
    a_c = None if c["r"] is None else round_to(fused.lora_A.detach().cpu().numpy(), cd)
    b_c = None if c["r"] is None else round_to(fused.lora_B.detach().cpu().numpy(), cd)
    mag = magnitudes(round_to(x.reshape(n, c["in_f"]), cd), round_to(wd, cd), bias, a_c, b_c,
                     round_to(gy.reshape(n, c["out_f"]), cd), fused.scaling, ks)
    dims = (cd, n, c["in_f"], c["out_f"], c["r"])
    for name in results[1]:
        assert_within_bound(name, results[0][name], results[1][name], mag[name], *dims)


def _function_args(layer, xt, mask):
    """The arguments ``QLoRALinear.forward`` gives its autograd function (2-D input in the compute dtype)."""
    cdt = getattr(torch, layer.compute_dtype)
    xc = xt.reshape(-1, layer.in_features).to(cdt)
    keep = None if mask is None else mask.reshape(-1, layer.in_features)
    keep_scale = float(dropout_scale(layer.dropout))
    bias = None if layer.bias is None else layer.bias.to(cdt)
    a = None if layer.r is None else layer.lora_A.to(cdt)
    b = None if layer.r is None else layer.lora_B.to(cdt)
    return xc, a, b, bias, keep, keep_scale, layer.scaling, layer.weight, layer.weight.quant_state


@given(layer_cases())
def test_fused_layer_matches_unfused_layer(c):
    """Outputs, ∂L/∂x, ∂L/∂A and ∂L/∂B of kernel="triton" within the bound of the unfused path, for random
    ragged shapes, ranks (one, several and more than one BLOCK_R step), block sizes, NF4/FP4, double
    quantization, bias, dropout masks, both compute dtypes (the interpreter: bfloat16 with float32 dot operands)."""
    check_fused_against_unfused(c, "cuda" if CUDA else "cpu")


@pytest.mark.parametrize("alpha", [8.0, 12.0])  # s = 2 (a power of two) and s = 3 (one more rounding)
@pytest.mark.parametrize("p", [0.5, 0.0])
def test_fused_layer_rounds_where_the_stepwise_oracle_does(p, alpha):
    """bfloat16: the kernels round exactly where the unfused graph and the reference round (base, P, s·P, the sum;
    backward alike): bit for bit against ``lora_helpers.bf16_stepwise_oracle``, on a 4-bit weight that dequantizes
    to small integers (NF4's codes -1, 0 and 1 times an absmax of 8, plain float32 absmax) and small-integer
    inputs, so every float32 sum is exact in any order — the interpreter's NumPy dots and Triton's tensor-core dots
    alike. A rounding step dropped or added (which the bound tolerates) fails here."""
    n, d_in, d_out, r = 6, 64, 24, 4
    _, x, gy, A, B, keep = small_integer_layer_inputs(n, d_in, d_out, r)
    rng = np.random.default_rng(1)
    W = (rng.integers(-1, 2, (d_out, d_in)) * 8).astype(np.float32)
    W[:, 0] = 8.0  # one code of 1.0 in every block of 64: absmax 8 exactly
    q = qlora_ref.quantize_4bit(W, "nf4", 64, False)
    assert np.array_equal(exact_dequant(q), W)
    device = "cuda" if CUDA else "cpu"
    layer = QLoRALinear.from_quantized(q, r, alpha, kernel="triton", dropout=p, compute_dtype="bfloat16",
                                       device=device)
    with torch.no_grad():
        layer.lora_A.copy_(torch.from_numpy(A))
        layer.lora_B.copy_(torch.from_numpy(B))
    if p == 0.0:
        keep = np.ones_like(keep)
    xt = torch.from_numpy(x).to(device).requires_grad_(True)
    with float32_reductions():
        y = layer(xt, dropout_mask=torch.from_numpy(keep).to(device) if p else None)
        y.backward(torch.from_numpy(gy).to(device))
    want = bf16_stepwise_oracle(x, W, A, B, gy, keep, alpha / r, dropout_scale(p))
    for got, w in zip((y, xt.grad, layer.lora_A.grad, layer.lora_B.grad), want, strict=True):
        np.testing.assert_array_equal(got.detach().float().cpu().numpy(), w)


def test_layer_saves_no_dequantized_weight_with_triton_kernel():
    """The fused autograd function keeps what the unfused one keeps: x_d, the mask, the adapter; no (out, in)
    tensor, and no float32 scales (decoded again in backward)."""
    out_f, in_f, n, r, bs = 40, 64, 5, 4, 32
    layer = QLoRALinear.from_weight(torch.randn(out_f, in_f), r, 8.0, dropout=0.1, blocksize=bs,
                                    compute_dtype="float32", kernel="triton", device="cuda" if CUDA else None)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    x = torch.randn(n, in_f, requires_grad=True, device=layer.weight.device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert sorted(s for s in saved if np.prod(s) > r * max(in_f, out_f)) == [(n, in_f), (n, in_f)], saved
    assert (out_f * in_f // bs,) not in saved and layer.lora_A.grad is not None and x.grad is not None


# --------------------------------------------------------------------------------------------------------------
# The switch
# --------------------------------------------------------------------------------------------------------------


def test_kernel_option_is_checked_and_set_kernel_switches_a_model():
    W = torch.randn(8, 16)
    assert KERNELS == ("bnb", "triton")
    with pytest.raises(ValueError, match=r"kernel must be one of \('bnb', 'triton'\), got 'cuda'"):
        QLoRALinear.from_weight(W, 2, kernel="cuda")
    with pytest.raises(ValueError, match="kernel='triton' needs a 4-bit weight"):
        QLoRALinear.from_weight(W, 2, quant_type=None, kernel="triton")
    layer = QLoRALinear.from_weight(W, 2)
    assert layer.kernel == "bnb" and "kernel='bnb'" in repr(layer)
    with pytest.raises(ValueError, match="kernel must be one of"):
        layer.kernel = "fused"
    frozen = QLoRALinear.from_weight(W, 2, quant_type=None)
    model = torch.nn.ModuleDict({"a": layer, "b": torch.nn.Sequential(QLoRALinear.from_weight(W, None)), "f": frozen})
    with pytest.raises(ValueError, match="kernel='triton' needs a 4-bit weight"):
        set_kernel(model, "triton")
    assert [m.kernel for m in model.modules() if isinstance(m, QLoRALinear)] == ["bnb"] * 3  # unchanged
    del model["f"]
    assert set_kernel(model, "triton") == 2
    assert [m.kernel for m in model.modules() if isinstance(m, QLoRALinear)] == ["triton"] * 2
    assert set_kernel(model, "bnb") == 2 and layer.kernel == "bnb"


def test_triton_kernel_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setattr(tk, "INTERPRET", False)
    w = tk.weight_from_bnb(*(lambda q: (q.packed, q.to_bnb()))(Quantized4bit.from_state_dict(
        qlora_ref.quantize_4bit(np.ones((4, 4), np.float32)).state_dict())))
    with pytest.raises(ValueError, match="need CUDA tensors"):
        tk.fused_linear_forward(torch.ones(2, 4), w)


@pytest.mark.parametrize(("triton_version", "numpy_version", "refused"), [
    ("3.6.0", "2.4.6", True),  # torch 2.11's pin with a current NumPy: 9 tests failed with a bare TypeError
    ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False), ("3.9.0", "2.5.0", False), ("3.10.1", "3.0.0", False),
    ("3.5.1+git4a2b", "2.4.0rc1", True),
])
def test_the_interpreter_known_to_fail_under_this_numpy_is_named(triton_version, numpy_version, refused):
    problem = tk.interpreter_problem(triton_version, numpy_version)
    assert (problem is not None) == refused
    if refused:
        assert triton_version in problem and numpy_version in problem and "triton>=3.7" in problem


def test_a_kernel_launch_in_an_incompatible_interpreter_says_what_to_install(monkeypatch):
    monkeypatch.setattr(tk, "INTERPRET", True)
    monkeypatch.setattr(tk.triton, "__version__", "3.6.0")
    monkeypatch.setattr(tk.np, "__version__", "2.4.6")
    w = tk.weight_from_bnb(*(lambda q: (q.packed, q.to_bnb()))(Quantized4bit.from_state_dict(
        qlora_ref.quantize_4bit(np.ones((4, 4), np.float32)).state_dict())))
    with pytest.raises(RuntimeError, match="pip install 'triton>=3.7' or 'numpy<2.4'"):
        tk.fused_linear_forward(torch.ones(2, 4), w)


# --------------------------------------------------------------------------------------------------------------
# CUDA: native bfloat16 tensor-core dots, larger shapes
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@settings(max_examples=max(10, settings.default.max_examples // 3), phases=(Phase.explicit, Phase.generate))
@given(layer_cases(max_out=300, max_in=600))
def test_gpu_fused_layer_matches_unfused_layer(c):
    """The same property on CUDA with native bfloat16 ``tl.dot`` (and IEEE float32 in float32). A third of the
    profile's examples (ci: 20): every new combination of the kernels' compile-time flags is a compilation. No
    shrinking: each shrunk shape is another compilation, and GPU time is scarce (the first failing case is reported)."""
    check_fused_against_unfused(c, "cuda", dot_f32=False)


@pytest.mark.gpu
@pytest.mark.parametrize("out_f, in_f, tokens, r", [(4096, 4096, 512, 64), (11008, 4096, 512, 64),
                                                     (4096, 11008, 512, 64), (1000, 3000, 333, 16)])
@pytest.mark.parametrize("compute_dtype", ["bfloat16", "float32"])
def test_gpu_fused_layer_matches_unfused_on_llama_shapes(out_f, in_f, tokens, r, compute_dtype):
    c = dict(out_f=out_f, in_f=in_f, lead=(tokens,), r=r, alpha=16.0, quant="nf4", blocksize=64, double_quant=True,
             p=0.1, use_rslora=False, has_bias=False, compute_dtype=compute_dtype, seed=out_f + in_f, w_scale=0.02)
    check_fused_against_unfused(c, "cuda", dot_f32=False)


@pytest.mark.gpu
def test_gpu_dot_f32_fallback_matches_native_bfloat16():
    c = dict(out_f=257, in_f=1000, lead=(130,), r=8, alpha=16.0, quant="fp4", blocksize=128, double_quant=False,
             p=0.0, use_rslora=True, has_bias=True, compute_dtype="bfloat16", seed=1, w_scale=1.0)
    check_fused_against_unfused(c, "cuda", dot_f32=True)


def test_fused_path_dispatches_fewer_operators(monkeypatch):
    """At batch 1 a training step may be bound by the host's cost per launched operator (docs/fused_kernels.md):
    one layer's forward + backward on the fused path (its two kernels stubbed, each launch counted as one
    operator) dispatches fewer computing operators — the CPU's stand-in for kernels; views launch none — than on
    the unfused path (bitsandbytes' product is one operator on either device; on CUDA it launches four kernels
    inside) — and the double-quantized scales are decoded in two."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import gpu_scale  # bench/gpu_scale.py: count_op_kinds

    launches = []

    class Stub:  # kernel[grid](*args) records the launch and computes nothing
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(grid)

    monkeypatch.setattr(tk, "_forward_kernel", Stub())
    monkeypatch.setattr(tk, "_grad_input_kernel", Stub())
    counts = {}
    for kernel in ("triton", "bnb"):
        layer = QLoRALinear.from_weight(torch.randn(64, 128), 8, 16.0, dropout=0.1, kernel=kernel)
        x = torch.randn(4, 128, dtype=torch.bfloat16, requires_grad=True)
        layer(x).float().sum().backward()  # first call: generators and caches
        launches.clear()
        _, n, _ = gpu_scale.count_op_kinds(lambda layer=layer, x=x: layer(x).float().sum().backward())
        counts[kernel] = n + len(launches)
        assert len(launches) == (2 if kernel == "triton" else 0)
    assert counts["triton"] < counts["bnb"], counts
    print(f"operators per layer, forward + backward: fused {counts['triton']}, unfused {counts['bnb']}")
    state = layer.weight.quant_state
    n, absmax = gpu_scale.count_ops(lambda: tk.decode_absmax(state))
    assert n <= 2, n
    assert torch.equal(absmax, Quantized4bit.from_bnb(layer.weight.data, state).absmax_float32().float())
