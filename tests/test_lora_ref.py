"""qlora_ref.QLoRALinear: every gradient against torch autograd and against finite differences, the fused
dequantize-matmul kernel against the naive path (values and memory), dropout, initialisation, merging, and the
errors bad input must give."""

import math
import tracemalloc

import numpy as np
import pytest
import torch
from lora_helpers import assert_within_bound, bf16_stepwise_oracle, magnitudes, small_integer_layer_inputs
from numba.core.runtime import _nrt_python, rtsys

import qlora_ref
from qlora_ref import fused_matmul
from qlora_ref.dtypes import round_to
from qlora_ref.lora import QLoRALinear, dropout_scale, lora_scaling
from qlora_ref.lora_merge import merge_error


def make_layer(out_f=24, in_f=80, r=6, alpha=12.0, p=0.0, bias=True, quant="nf4", compute_dtype="float32", seed=0,
               **kw):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((out_f, in_f)) * 0.1).astype(np.float32)
    b = rng.standard_normal(out_f).astype(np.float32) if bias else None
    layer = QLoRALinear.from_weight(W, r, alpha, dropout=p, quant_type=quant, bias=b, compute_dtype=compute_dtype,
                                    seed=seed, **kw)
    if r is not None:
        layer.lora_B = (rng.standard_normal((out_f, r)) * 0.3).astype(np.float32)  # B = 0 would hide bugs
    return layer, rng


def torch_oracle(layer, x, gy, mask):
    """The same layer as an ordinary torch graph (F.linear, dropout multiplier, casts) differentiated by autograd."""
    cdt = getattr(torch, layer.compute_dtype)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    a = torch.from_numpy(layer.lora_A.copy()).requires_grad_(True)
    b = torch.from_numpy(layer.lora_B.copy()).requires_grad_(True)
    w = torch.from_numpy(layer.dequantized_weight().copy()).to(cdt)
    bias = None if layer.bias is None else torch.from_numpy(layer.bias).to(cdt)
    xc = xt.to(cdt)
    base = torch.nn.functional.linear(xc, w, bias)
    xd = xc
    if mask is not None:
        xd = (xc * torch.from_numpy(mask).to(cdt)) * float(dropout_scale(layer.dropout))  # CUDA's fused dropout
    y = base + torch.nn.functional.linear(torch.nn.functional.linear(xd, a.to(cdt)), b.to(cdt)) * layer.scaling
    y.float().backward(torch.from_numpy(gy))
    return y.detach().float().numpy(), xt.grad.numpy(), a.grad.numpy(), b.grad.numpy()


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("quant, p, bias, lead", [
    ("nf4", 0.0, True, (7,)),
    ("nf4", 0.2, False, (2, 5)),
    ("fp4", 0.1, True, (3, 1, 4)),
    (None, 0.3, True, (6,)),
])
def test_gradients_match_torch_autograd(compute_dtype, quant, p, bias, lead):
    layer, rng = make_layer(p=p, bias=bias, quant=quant, compute_dtype=compute_dtype)
    x = rng.standard_normal((*lead, layer.in_features)).astype(np.float32)
    gy = rng.standard_normal((*lead, layer.out_features)).astype(np.float32)
    mask = (rng.random(x.shape) >= p) if p > 0 else None
    y = layer.forward(x, dropout_mask=mask)
    gx = layer.backward(gy)
    y_t, gx_t, ga_t, gb_t = torch_oracle(layer, x, gy, mask)

    n = int(np.prod(lead))
    cd = compute_dtype
    ks = None if mask is None else mask.reshape(n, -1) * dropout_scale(p)
    m = magnitudes(round_to(x.reshape(n, -1), cd), layer.dequantized_weight(), layer.bias,
                   round_to(layer.lora_A, cd), round_to(layer.lora_B, cd), round_to(gy.reshape(n, -1), cd),
                   layer.scaling, ks)
    dims = (cd, n, layer.in_features, layer.out_features, layer.r)
    assert y.shape == (*lead, layer.out_features) and gx.shape == x.shape
    assert_within_bound("y", y, y_t, m["y"], *dims)
    assert_within_bound("x", gx, gx_t, m["x"], *dims)
    assert_within_bound("lora_A", layer.grads["lora_A"], ga_t, m["lora_A"], *dims)
    assert_within_bound("lora_B", layer.grads["lora_B"], gb_t, m["lora_B"], *dims)
    assert set(layer.grads) == {"lora_A", "lora_B"}  # nothing for the frozen weight or the bias


def _fd_round_off_bound(layer, arrays, name, d, R, mask, n_ops, lam=8.0):
    """λ u sqrt(1.5 n Σ_i (|R_i| M_i)²): the probabilistic round-off bound derived in
    test_gradients_match_finite_differences. |W| is the weight the layer multiplies by (a magnitude for the bound,
    not an expected value)."""
    ab = {k: np.abs(v.astype(np.float64)) for k, v in arrays.items()}
    ab[name] = ab[name] + np.abs(d.astype(np.float64))
    w = np.abs(layer.dequantized_weight().astype(np.float64))
    b = 0.0 if layer.bias is None else np.abs(layer.bias.astype(np.float64))
    keep = (1.0 if mask is None else mask) * float(dropout_scale(layer.dropout))
    M = ab["x"] @ w.T + b + abs(layer.scaling) * ((ab["x"] * keep) @ ab["lora_A"].T) @ ab["lora_B"].T
    return lam * 2.0**-24 * math.sqrt(1.5 * n_ops * float(np.sum((np.abs(R) * M) ** 2)))


@pytest.mark.parametrize("quant, p, kernel", [("nf4", 0.0, "fused"), ("fp4", 0.25, "naive"), (None, 0.1, "fused")])
def test_gradients_match_finite_differences(quant, p, kernel):
    """L = Σ y ⊙ R. y is affine in x and linear in A and in B (the dropout mask fixed), so a central difference
    is exact for any step: with a step of 1 the only error is float32 round-off in L.

    Tolerance (``_fd_round_off_bound``), derived. Every float32 quantity here is a chain of at most
    n = in + out + r + tokens operations (the base matmul over in, the LoRA path over in then r, the gradients over
    out or the tokens, a few scalings and adds). In the first-order model each rounding is an error δ_k, |δ_k| <= u
    = 2^-24, whose coefficient in the error of L is at most |R_i| M_i for the output i it feeds, where
    M = |x'| |W|ᵀ + |b| + s · (|x'| ⊙ keep/(1-p)) |A'|ᵀ |B'|ᵀ (absolute values, the perturbed array taken as
    |a| + |d|) bounds every partial sum. fd - analytic collects the errors of L(+d)/2, L(-d)/2 and <grad, d>, at
    most n per output each, so Σ_k c_k² <= (1/4 + 1/4 + 1) n Σ_i (|R_i| M_i)². The worst case (all δ_k aligned)
    gives 2 n u Σ|R| M, 3-20x above the earlier ad-hoc 1e-5·Σ|y||R|·sqrt(|d|₁), so no deterministic bound is
    tighter; with independent, mean-zero roundings (Higham & Mary 2019, probabilistic rounding error analysis)
    Hoeffding gives |error| <= λ u sqrt(Σ c_k²) except with probability 2 exp(-λ²/2): λ = 8, 2.5e-14.
    This bound is 0.04-0.63x the earlier tolerance in every case (for ∂L/∂x along a random direction 0.03 % of
    |<grad, d>| instead of 0.8 %); measured errors are 150x or more below it."""
    layer, rng = make_layer(p=p, quant=quant, kernel=kernel)
    x = rng.standard_normal((4, 3, layer.in_features)).astype(np.float32)
    R = rng.standard_normal((4, 3, layer.out_features)).astype(np.float32)
    mask = (rng.random(x.shape) >= p) if p > 0 else None

    def loss():
        return float(np.sum(layer.forward(x, dropout_mask=mask).astype(np.float64) * R))

    layer.forward(x, dropout_mask=mask)
    grads = {"x": layer.backward(R).astype(np.float64)}
    grads.update({k: v.astype(np.float64) for k, v in layer.grads.items()})
    arrays = {"x": x, "lora_A": layer.lora_A, "lora_B": layer.lora_B}
    scale = float(np.sum(np.abs(layer.forward(x, dropout_mask=mask)) * np.abs(R)))  # |L| before cancellation
    for name, arr in arrays.items():
        # a random direction, and three single elements
        directions = [rng.standard_normal(arr.shape).astype(np.float32)]
        for _ in range(3):
            e = np.zeros(arr.shape, np.float32)
            e[tuple(rng.integers(0, s) for s in arr.shape)] = 1.0
            directions.append(e)
        for d in directions:
            original = arr.copy()
            arr += d
            up = loss()
            arr[...] = original - d
            down = loss()
            arr[...] = original
            fd = (up - down) / 2.0
            analytic = float(np.sum(grads[name] * d))
            bound = _fd_round_off_bound(layer, arrays, name, d, R, mask, n_ops=layer.in_features
                                        + layer.out_features + layer.lora_A.shape[0] + x.size // x.shape[-1])
            assert bound < 1e-5 * scale * max(1.0, float(np.abs(d).sum())) ** 0.5  # never looser than before
            assert abs(fd - analytic) <= bound, (name, fd, analytic, bound)


@pytest.mark.parametrize("alpha", [8.0, 12.0])  # s = 2 (a power of two) and s = 3 (one more rounding)
@pytest.mark.parametrize("kernel", ["naive", "fused"])
def test_bfloat16_rounding_steps_are_bit_exact_against_a_stepwise_oracle(kernel, alpha):
    """QLoRA computes in bfloat16: every matmul's output is a bfloat16 tensor, so the reference rounds each one —
    in particular ∂L/∂H = s G B before it is used in ∂L/∂A and ∂L/∂x. Oracle (``lora_helpers.bf16_stepwise_oracle``):
    the same steps in float64 with an explicit bfloat16 rounding (torch's) after each, on small-integer inputs whose
    every float32 product and sum is exact whatever the BLAS order, so the layer must agree bit for bit on any CPU.
    The oracle without the ∂L/∂H rounding is shown to differ, so the test fails if that rounding is removed."""
    n, d_in, d_out, r = 6, 40, 24, 4
    W, x, gy, A, B, keep = small_integer_layer_inputs(n, d_in, d_out, r)
    layer = QLoRALinear.from_weight(W, r, alpha, dropout=0.5, quant_type=None, compute_dtype="bfloat16",
                                    kernel=kernel)
    layer.lora_A, layer.lora_B = A, B
    s, drop = alpha / r, 2.0
    assert layer.scaling == s and dropout_scale(0.5) == drop
    y = layer.forward(x, dropout_mask=keep)
    gx = layer.backward(gy)
    y_o, gx_o, ga_o, gb_o = bf16_stepwise_oracle(x, W, A, B, gy, keep, s, drop)
    np.testing.assert_array_equal(y, y_o)
    np.testing.assert_array_equal(gx, gx_o)
    np.testing.assert_array_equal(layer.grads["lora_A"], ga_o)
    np.testing.assert_array_equal(layer.grads["lora_B"], gb_o)
    _, gx_unrounded, ga_unrounded, _ = bf16_stepwise_oracle(x, W, A, B, gy, keep, s, drop, round_gh=False)
    assert not np.array_equal(gx_unrounded, gx_o) and not np.array_equal(ga_unrounded, ga_o)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape, blocksize, tile", [((37, 50), 64, None), ((96, 200), 32, 7), ((64, 64), 64, 1)])
def test_fused_kernel_equals_naive_path(compute_dtype, shape, blocksize, tile):
    rng = np.random.default_rng(1)
    q = qlora_ref.quantize_4bit(rng.standard_normal(shape).astype(np.float32), "nf4", blocksize)
    w = fused_matmul.dequantized_weight(q, compute_dtype)
    assert np.array_equal(w, round_to(qlora_ref.dequantize_4bit(q, "float32"), compute_dtype))
    x = round_to(rng.standard_normal((9, shape[1])).astype(np.float32), compute_dtype)
    g = round_to(rng.standard_normal((9, shape[0])).astype(np.float32), compute_dtype)
    y = fused_matmul.fused_x_wt(x, q, compute_dtype, tile)
    gx = fused_matmul.fused_g_w(g, q, compute_dtype, tile)
    # same products, float32 accumulation in another order: |Δ| ≤ 2 K 2⁻²⁴ Σ|terms|
    np.testing.assert_array_less(np.abs(y - x @ w.T), 2 * shape[1] * 2.0**-24 * (np.abs(x) @ np.abs(w).T) + 1e-30)
    np.testing.assert_array_less(np.abs(gx - g @ w), 2 * shape[0] * 2.0**-24 * (np.abs(g) @ np.abs(w)) + 1e-30)
    np.testing.assert_allclose(fused_matmul.naive_x_wt(x, q, compute_dtype), x @ w.T, rtol=0, atol=0)


def test_fused_kernel_allocates_only_its_tile():
    """The Numba kernels allocate nothing (Numba's allocation counter sees only the wrappers of their array
    arguments: five per tile for the dequantization, four per call for the double-quantized constants), so
    tracemalloc sees every buffer: the fused path peaks at one tile, the naive path at the whole dequantized
    weight."""
    rng = np.random.default_rng(2)
    out_f, in_f, tile = 512, 1024, 16
    q = qlora_ref.quantize_4bit(rng.standard_normal((out_f, in_f)).astype(np.float32))
    x = rng.standard_normal((8, in_f)).astype(np.float32)
    g = rng.standard_normal((8, out_f)).astype(np.float32)

    def numba_allocations(t):
        was_enabled = _nrt_python.memsys_stats_enabled()
        _nrt_python.memsys_enable_stats()
        try:
            before = rtsys.get_allocation_stats().alloc
            fused_matmul.fused_x_wt(x, q, tile=t)
            fused_matmul.fused_g_w(g, q, tile=t)
            return rtsys.get_allocation_stats().alloc - before
        finally:
            if not was_enabled:
                _nrt_python.memsys_disable_stats()

    numba_allocations(tile)  # compile first
    tiles = out_f // tile + in_f // tile  # forward: tiles of rows; backward: tiles of columns
    assert numba_allocations(tile) == 5 * tiles + 4 * 2 and numba_allocations(max(out_f, in_f)) == 5 * 2 + 4 * 2

    def peak(f, *args):
        tracemalloc.start()
        f(*args)
        p = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return p

    weight_bytes = 4 * out_f * in_f
    for fused, naive, arg in ((fused_matmul.fused_x_wt, fused_matmul.naive_x_wt, x),
                              (fused_matmul.fused_g_w, fused_matmul.naive_g_w, g)):
        assert peak(naive, arg, q) >= weight_bytes
        assert peak(fused, arg, q, "bfloat16", tile) < weight_bytes / 8


def test_fused_and_naive_layer_paths_agree():
    """The fused kernel (dequantizing a tile at a time) and the naive path (the whole weight, then one product) in
    bfloat16: the same products summed in another float32 order, so an output differs at most where that order
    moves a value across a bfloat16 rounding boundary — one bfloat16 step (2^-7 of it) — and the adapter gradients,
    which do not involve the frozen weight's product directly, only through ∂L/∂y (here the same ones)."""
    layer, rng = make_layer(compute_dtype="bfloat16")
    x = rng.standard_normal((5, layer.in_features)).astype(np.float32)
    out = {}
    for kernel in ("fused", "naive"):
        layer.kernel = kernel
        layer.zero_grad()  # gradients accumulate, as torch's do
        y = layer.forward(x)
        out[kernel] = (y, layer.backward(np.ones_like(y)), layer.grads["lora_A"].copy(), layer.grads["lora_B"].copy())
    (y_f, gx_f, ga_f, gb_f), (y_n, gx_n, ga_n, gb_n) = out["fused"], out["naive"]
    assert np.all(np.abs(y_f - y_n) <= 2.0**-7 * np.abs(y_n))
    assert np.all(np.abs(gx_f - gx_n) <= 2.0**-7 * np.abs(gx_n))
    np.testing.assert_array_equal(gb_f, gb_n)  # ∂L/∂B = s Gᵀ H: no frozen product on its path
    np.testing.assert_array_equal(ga_f, ga_n)  # ∂L/∂A = (s G B)ᵀ x_d: neither


def test_initialisation_scaling_and_parameters():
    layer, _ = make_layer(r=None)
    assert layer.parameters() == {} and layer.lora_A is None and layer.scaling == 0.0
    layer = QLoRALinear.from_weight(np.ones((8, 100), np.float32), 4, 16.0, seed=3)
    assert layer.lora_A.shape == (4, 100) and layer.lora_B.shape == (8, 4)
    assert np.abs(layer.lora_A).max() <= 1 / math.sqrt(100) and not layer.lora_B.any()
    assert layer.scaling == 4.0 == lora_scaling(16.0, 4)
    assert QLoRALinear.from_weight(np.ones((8, 100), np.float32), 4, 16.0, use_rslora=True).scaling == 8.0
    # the model's LoraConfig scales as its layers do (it once ignored rsLoRA)
    from qlora_ref.model import LoraConfig

    for rs, s in ((False, 4.0), (True, 8.0)):
        assert LoraConfig(r=4, alpha=16.0, use_rslora=rs).scaling == s == lora_scaling(16.0, 4, rs)
    assert LoraConfig(r=0).scaling == 0.0 == lora_scaling(16.0, 0) == lora_scaling(16.0, None)
    with pytest.raises(ValueError, match="use_rslora must be True or False"):
        LoraConfig(use_rslora="yes")
    # the same seed, the same adapter; another seed, another one
    assert np.array_equal(layer.lora_A, QLoRALinear.from_weight(np.ones((8, 100), np.float32), 4, 16.0, seed=3).lora_A)
    assert not np.array_equal(layer.lora_A, QLoRALinear.from_weight(np.ones((8, 100), np.float32), 4, 16.0).lora_A)
    params = layer.parameters()
    assert set(params) == {"lora_A", "lora_B"} and params["lora_A"] is layer.lora_A  # live arrays
    # B = 0: the adapted layer starts as exactly the frozen one
    x = np.random.default_rng(0).standard_normal((3, 100)).astype(np.float32)
    frozen = QLoRALinear(layer.weight, None, compute_dtype="bfloat16")
    assert np.array_equal(layer.forward(x), frozen.forward(x))


def test_dropout_mask_is_seeded_kept_for_backward_and_off_in_eval():
    layer, rng = make_layer(p=0.5, r=4, compute_dtype="float32")
    x = rng.standard_normal((200, layer.in_features)).astype(np.float32)
    y1 = layer.forward(x)
    keep = layer._cache["keep"]
    assert 0.4 < keep.mean() < 0.6 and layer._cache["scale"] == 2.0
    # backward uses the forward's mask: ∂L/∂A only sees kept inputs
    layer.backward(np.ones_like(y1))
    gh = (np.ones((200, layer.out_features), np.float32) * layer.scaling) @ layer.lora_B
    np.testing.assert_allclose(layer.grads["lora_A"], gh.T @ (x * keep * 2.0), rtol=1e-5, atol=1e-5)
    # a new layer with the same seed draws the same masks; eval mode turns dropout off
    twin, _ = make_layer(p=0.5, r=4, compute_dtype="float32")
    assert np.array_equal(twin.forward(x), y1)
    layer.eval()
    assert np.array_equal(layer.forward(x), layer.forward(x))
    assert layer._cache["keep"] is None
    # the kept values are scaled by 1/(1-p) in float32, whatever the compute dtype
    assert dropout_scale(0.1) == np.float32(1) / np.float32(0.9) and dropout_scale(0.5) == 2.0


def test_frozen_layer_backward_and_gradient_accumulation():
    frozen, rng = make_layer(r=None, compute_dtype="float32")
    x = rng.standard_normal((4, frozen.in_features)).astype(np.float32)
    g = rng.standard_normal((4, frozen.out_features)).astype(np.float32)
    frozen.forward(x)
    np.testing.assert_allclose(frozen.backward(g), g @ frozen.dequantized_weight(), rtol=1e-5, atol=1e-6)
    assert frozen.grads == {}

    layer, _ = make_layer(compute_dtype="float32")
    layer.forward(x)
    layer.backward(g)
    first = {k: v.copy() for k, v in layer.grads.items()}
    layer.forward(x)
    layer.backward(g)  # accumulates, like torch's .grad
    for k in first:
        np.testing.assert_allclose(layer.grads[k], 2 * first[k], rtol=1e-6)
    layer.zero_grad()
    assert layer.grads == {}


def test_one_dimensional_input_and_from_quantized():
    rng = np.random.default_rng(5)
    W = rng.standard_normal((10, 64)).astype(np.float32)
    q = qlora_ref.quantize_4bit(W, "fp4", 32, False)
    layer = QLoRALinear.from_quantized(q, 2, 4.0, bias=np.zeros(10, np.float32))
    assert layer.weight is q  # used as stored
    y = layer.forward(rng.standard_normal(64).astype(np.float32))
    assert y.shape == (10,) and layer.backward(np.ones(10, np.float32)).shape == (64,)


def test_merge_reproduces_the_adapted_layer():
    layer, rng = make_layer(compute_dtype="float32", bias=True)
    x = rng.standard_normal((6, layer.in_features)).astype(np.float32)
    merged = layer.merged_layer()
    assert merged.r is None and merged.parameters() == {}
    np.testing.assert_allclose(merged.forward(x), layer.forward(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.merge(), qlora_ref.dequantize_4bit(layer.weight, "float32")
                               + layer.scaling * layer.lora_B @ layer.lora_A, rtol=1e-6, atol=1e-7)
    requant = layer.merged_layer(requantize=True)
    assert requant.weight.quant_type == layer.weight.quant_type and requant.weight.double_quant


def test_requantizing_a_merged_weight_loses_a_small_update():
    """Requantizing is idempotent on a dequantized weight (each value sits on a code, half a code gap from the
    nearest rounding boundary), so an update smaller than that gap vanishes: the merged-and-requantized layer is
    the base layer again. A large update survives, with fresh quantization noise (docs/lora_backprop.md)."""
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((256, 256)) * 0.02).astype(np.float32)
    layer = QLoRALinear.from_weight(W, 16, 16.0, compute_dtype="float32")
    x = rng.standard_normal((64, 256)).astype(np.float32)
    w = qlora_ref.dequantize_4bit(layer.weight, "float32")
    results = {}
    for rho in (0.01, 0.3):  # ||ΔW|| / ||W||
        b = rng.standard_normal((256, 16)).astype(np.float32)
        b *= rho * np.linalg.norm(w) / np.linalg.norm(layer.scaling * b @ layer.lora_A)
        layer.lora_B = b
        results[rho] = merge_error(layer, x)
    small, large = results[0.01], results[0.3]
    assert small["float32"] < 1e-4 and small["codes_changed"] < 0.005 and small["retained"] < 0.1
    assert 0.9 < small["requantized"] < 1.3  # no better than dropping the adapter
    assert 0.05 < small["bfloat16"] < 0.5  # a 16-bit merge keeps most of it
    assert large["retained"] > 0.9 and large["requantized"] < 0.5 and large["codes_changed"] > 0.3


def test_bad_input_gives_value_errors():
    layer, _ = make_layer(p=0.1)
    with pytest.raises(ValueError, match="in_features=80"):
        layer.forward(np.zeros((3, 81), np.float32))
    with pytest.raises(ValueError, match="float array"):
        layer.forward(np.zeros((3, 80), np.int64))
    with pytest.raises(ValueError, match=r"lora_A must have shape \(r, in_features\) = \(6, 80\)"):
        layer.lora_A = np.zeros((6, 81), np.float32)
    with pytest.raises(ValueError, match=r"lora_B must have shape \(out_features, r\) = \(24, 6\)"):
        layer.lora_B = np.zeros((6, 24), np.float32)
    W = np.ones((4, 8), np.float32)
    for r in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="r \\(the LoRA rank\\) must be a positive integer"):
            QLoRALinear.from_weight(W, r, 8.0)
    for p in (-0.01, 1.0, 2.0):
        with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\)"):
            QLoRALinear.from_weight(W, 2, 8.0, dropout=p)
    with pytest.raises(ValueError, match="alpha"):
        QLoRALinear.from_weight(W, 2, float("nan"))
    with pytest.raises(ValueError, match="compute_dtype"):
        QLoRALinear.from_weight(W, 2, 8.0, compute_dtype="float16")
    with pytest.raises(ValueError, match="2-D"):
        QLoRALinear.from_weight(np.ones(8, np.float32), 2, 8.0)
    with pytest.raises(ValueError, match="bias must have shape"):
        QLoRALinear.from_weight(W, 2, 8.0, bias=np.ones(5, np.float32))
    with pytest.raises(ValueError, match="dropout_mask must have the input's shape"):
        layer.forward(np.zeros((3, 80), np.float32), dropout_mask=np.ones((3, 79), bool))
    layer.forward(np.zeros((3, 80), np.float32))
    with pytest.raises(ValueError, match="grad_y must have the shape"):
        layer.backward(np.zeros((3, 23), np.float32))
    with pytest.raises(ValueError, match=r"kernel must be one of \('fused', 'naive'\), got 'magic'"):
        QLoRALinear.from_weight(W, 2, 8.0, kernel="magic")
    fresh, _ = make_layer()
    with pytest.raises(RuntimeError, match="forward"):
        fresh.backward(np.zeros((3, 24), np.float32))
    with pytest.raises(ValueError, match="no adapter"):
        make_layer(r=None)[0].lora_A = np.zeros((1, 80), np.float32)


@pytest.mark.parametrize("quant_type, blocksize, double_quant", [("nf4", 32, False), ("nf4", 128, True)])
def test_requantized_merge_keeps_the_base_weights_settings(quant_type, blocksize, double_quant):
    """merged_layer(requantize=True) and merge_error quantize again with the base weight's data type, block size
    and double quantization. Requantizing a dequantized weight with its own settings is idempotent (every value
    sits on a code, each block's absmax is reproduced exactly by the value that attained it), so with B = 0 the merge
    is the base weight and not one code may change; other block sizes would rescale most blocks."""
    layer, rng = make_layer(quant=quant_type, blocksize=blocksize, double_quant=double_quant)
    layer.lora_B = np.zeros_like(layer.lora_B)
    requant = layer.merged_layer(requantize=True).weight
    assert (requant.quant_type, requant.blocksize, requant.double_quant) == (quant_type, blocksize, double_quant)
    assert np.array_equal(requant.codes(), layer.weight.codes())
    layer.lora_B[0, 0] = 1e-30  # ΔW ≠ 0 (merge_error divides by ||x ΔWᵀ||), far below any code gap
    x = rng.standard_normal((4, layer.in_features)).astype(np.float32)
    assert merge_error(layer, x)["codes_changed"] == 0.0
