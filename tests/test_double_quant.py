"""Double quantization and the dynamic 8-bit kernel: exact nearest codes in the reference, a bounded divergence
from bitsandbytes' lookup-table CPU kernel, and checkpoints that move between the reference, the GPU backend and
bitsandbytes with bit-identical dequantization."""

import bitsandbytes.functional as bnbf
import numpy as np
import pytest
import torch
from bnb_helpers import corrected_where_wrong
from hypothesis import given
from hypothesis import strategies as st
from quant_strategies import BLOCKSIZES, as_numpy, as_torch, same_bits_or_both_zero, tensors

import qlora_gpu
import qlora_ref
from qlora_ref.blockwise import blockwise_absmax_scale
from qlora_ref.codebooks import dynamic_map

#: bitsandbytes' CPU 8-bit kernel is not exact-nearest: codes off by at most this many steps ...
MAX_CODE_STEPS = 4
#: ... for at most this fraction of the values (measured ~0.15 % on N(0,1); docs/quantization.md)
MAX_DIFFERENT_FRACTION = 0.005


@given(st.integers(0, 2**32 - 1), st.integers(1, 5000), st.sampled_from([64, 256, 4096]))
def test_8bit_codes_are_exactly_nearest_and_close_to_bitsandbytes(seed, n, blocksize):
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    q = qlora_ref.quantize_blockwise_8bit(x, blocksize)
    codes, state = bnbf.quantize_blockwise(torch.from_numpy(x), blocksize=blocksize)
    assert np.array_equal(q.absmax, state.absmax.numpy())
    code = dynamic_map()
    scaled, _ = blockwise_absmax_scale(x, blocksize, tiny=None)  # the 8-bit scaling: x / absmax, as bitsandbytes
    ours = np.abs(code[q.codes] - scaled)
    # nearest: no code of the map is closer than the chosen one, up to one ulp of the value (a value on a float32
    # midpoint, itself rounded, takes the lower code although the upper may be nearer by an ulp)
    best = np.abs(code[None, :] - scaled[:, None]).min(axis=1)
    assert np.all(ours <= best + np.spacing(np.abs(scaled)))
    theirs = np.abs(code[codes.numpy()] - scaled)
    assert np.all(ours <= theirs + np.spacing(np.abs(scaled)))
    steps = np.abs(q.codes.astype(int) - codes.numpy().astype(int))
    assert steps.max() <= MAX_CODE_STEPS


@pytest.mark.parametrize("x", [
    np.full(256, 1e-39),  # a full block whose absmax is subnormal
    np.concatenate([np.linspace(-1, 1, 256), np.full(100, 1e-39)]),  # a subnormal short final block
    np.concatenate([np.linspace(-1, 1, 256), np.zeros(100)]),  # an all-zero short final block
], ids=["subnormal-block", "subnormal-tail", "zero-tail"])
def test_8bit_blocks_are_scaled_by_their_own_absmax_as_bitsandbytes_does(x):
    """The 8-bit kernel stores and uses each block's own absmax, the absmax bitsandbytes stores: no
    1e-38 floor, which is the 4-bit kernel's (a block below it, whose float32 reciprocal would overflow, is divided
    by its absmax). With the floor, a block of 1e-39 came back 10 times too small and a short final block stored
    1e-38 for 1e-39 or 0. The values +absmax and 0 have exact codes (the signed map ends at +1 but at -0.993), so
    the dequantized block of interest (the last) equals the input and bitsandbytes'. The linspace block before a
    tail is compared by its absmax only: its 8-bit codes are not claimed bit-identical (bitsandbytes' lookup table,
    and on CPUs without AVX2 its map, differ: docs/quantization.md)."""
    x = x.astype(np.float32)
    last = slice(256 * ((x.size - 1) // 256), None)
    q = qlora_ref.quantize_blockwise_8bit(x)
    codes, state = bnbf.quantize_blockwise(torch.from_numpy(x), blocksize=256)
    assert np.array_equal(q.absmax, state.absmax.numpy())
    ours, theirs = qlora_ref.dequantize_blockwise_8bit(q), bnbf.dequantize_blockwise(codes, state).numpy()
    assert np.array_equal(ours[last], x[last]) and np.array_equal(ours[last], theirs[last])


def test_bitsandbytes_cpu_saturates_an_8bit_block_below_1_over_the_float32_maximum():
    """docs/quantization.md: bitsandbytes' CPU quantize_blockwise multiplies by the float32 reciprocal of the absmax,
    inf below 1/3.4e38 ≈ 2.9e-39, so every value of such a block saturates to an end of the map (codes 0 and 255).
    The reference divides and keeps the precision it has for a block of absmax 1 (a constant block, where
    saturating is right by chance, cannot show this: the block here is a linspace)."""
    unit = np.linspace(-1, 1, 256).astype(np.float32)
    x = (unit * np.float32(1e-39)).astype(np.float32)
    m = float(np.abs(x).max())
    ours = qlora_ref.dequantize_blockwise_8bit(qlora_ref.quantize_blockwise_8bit(x))
    roundtrip = qlora_ref.dequantize_blockwise_8bit(qlora_ref.quantize_blockwise_8bit(unit))
    unit_error = float(np.abs(roundtrip - unit).max())
    subnormal_ulp = float(np.finfo(np.float32).smallest_subnormal)
    assert float(np.abs(ours - x).max()) <= unit_error * m + 2 * subnormal_ulp
    codes, state = bnbf.quantize_blockwise(torch.from_numpy(x), blocksize=256)
    assert set(np.unique(codes.numpy())) <= {0, 255} and np.array_equal(state.absmax.numpy(), [np.float32(m)])
    theirs = bnbf.dequantize_blockwise(codes, state).numpy()
    assert float(np.abs(theirs - x).max()) > 0.9 * m  # ~100 % error where ours is 0.7 %


def test_the_8bit_scaling_is_the_4bit_one_wherever_an_absmax_reaches_1e_38():
    """Only blocks below 1e-38 and all-zero short blocks are scaled otherwise: ordinary data gives the bytes it gave
    before the 8-bit kernel got its own rule (the reciprocal for full blocks, division for the tail)."""
    x = np.random.default_rng(5).standard_normal(256 * 9 + 77).astype(np.float32)
    for a, b in zip(blockwise_absmax_scale(x, 256, tiny=None), blockwise_absmax_scale(x, 256), strict=True):
        assert np.array_equal(a, b)


def test_8bit_codes_differ_from_bitsandbytes_rarely():
    # the rate is a property of many values (a few thousand give a binomial count of 0.15 %, which can exceed any
    # tight bound by chance): measured on 2^20 standard normal values
    x = np.random.default_rng(1).standard_normal(1 << 20).astype(np.float32)
    codes, _ = bnbf.quantize_blockwise(torch.from_numpy(x), blocksize=256)
    different = (qlora_ref.quantize_blockwise_8bit(x).codes != codes.numpy()).mean()
    assert 0 < different <= MAX_DIFFERENT_FRACTION


@given(st.integers(0, 2**32 - 1), st.integers(1, 3000))
def test_8bit_dequantize_bit_identical_to_bitsandbytes(seed, n):
    x = np.random.default_rng(seed).standard_t(3, n).astype(np.float32)
    q = qlora_ref.quantize_blockwise_8bit(x)
    state = bnbf.QuantState(absmax=torch.from_numpy(q.absmax), code=torch.from_numpy(q.code.copy()), blocksize=256,
                            dtype=torch.float32)
    theirs = bnbf.dequantize_blockwise(torch.from_numpy(q.codes), state).numpy()
    assert np.array_equal(qlora_ref.dequantize_blockwise_8bit(q).view(np.int32), theirs.view(np.int32))
    g = qlora_gpu.dequantize_blockwise_8bit(qlora_gpu.quantize_blockwise_8bit(torch.from_numpy(x)))
    assert np.abs(g.numpy() - qlora_ref.dequantize_blockwise_8bit(q)).max() <= 4 * 0.016 * np.abs(x).max()


@given(tensors(), st.sampled_from(["nf4", "fp4"]), st.sampled_from(BLOCKSIZES))
def test_double_quantized_absmax_within_bound_of_bitsandbytes(xd, quant_type, blocksize):
    x, dtype = xd
    r = qlora_ref.quantize_4bit(as_numpy(x, dtype), quant_type, blocksize, double_quant=True)
    packed, state = bnbf.quantize_4bit(as_torch(x, dtype), blocksize=blocksize, quant_type=quant_type,
                                       compress_statistics=True)
    true_absmax = qlora_ref.quantize_4bit(as_numpy(x, dtype), quant_type, blocksize, double_quant=False).absmax
    ours = r.absmax_float32()
    theirs = bnbf.dequantize_blockwise(state.absmax, state.state2).numpy() + state.offset.item()
    # the mean offset: exact mean rounded once vs torch's float32 summation: a few ulps apart
    assert abs(r.offset - state.offset.item()) <= 1e-6 * abs(r.offset) + 1e-30
    # reconstruction bound of the 8-bit map: within half the largest gap of the dynamic map (0.0141 near ±1,
    # the exponent-0 segment) times the second-level constant; bitsandbytes up to MAX_CODE_STEPS gaps
    c2 = np.repeat(r.state2.absmax, 256)[: ours.size]
    gap = np.float32(0.9 / 64)
    assert np.all(np.abs(ours - true_absmax) <= 0.5 * gap * c2 * (1 + 1e-5) + 1e-6 * np.abs(true_absmax))
    assert np.all(np.abs(ours - theirs) <= (MAX_CODE_STEPS + 0.5) * gap * c2 * (1 + 1e-5) + 1e-6 * np.abs(ours))


@given(tensors(), st.sampled_from(["nf4", "fp4"]), st.sampled_from([64, 128, 4096]), st.booleans())
def test_state_dict_moves_between_backends_and_bitsandbytes(xd, quant_type, blocksize, double_quant):
    x, dtype = xd
    packed, state = bnbf.quantize_4bit(as_torch(x, dtype), blocksize=blocksize, quant_type=quant_type,
                                       compress_statistics=double_quant)
    bnb_sd = {"weight": packed, **{"weight." + k: v for k, v in state.as_dict(packed=True).items()}}
    g = qlora_gpu.quantize_4bit(as_torch(x, dtype), quant_type, blocksize, double_quant)
    r = qlora_ref.quantize_4bit(as_numpy(x, dtype), quant_type, blocksize, double_quant)
    g_sd, r_sd = g.state_dict(), r.state_dict()
    assert set(g_sd) == set(r_sd) == set(bnb_sd)
    for k in bnb_sd:  # the GPU backend writes exactly what bitsandbytes/transformers write
        assert torch.equal(g_sd[k], bnb_sd[k]), k
        assert r_sd[k].dtype == g_sd[k].numpy().dtype, k
        if "quant_state" not in k:  # the JSON holds the offset, whose decimal repr may differ in length
            assert r_sd[k].shape == tuple(g_sd[k].shape), k
    if not double_quant:  # without the mean offset, the reference writes the same bytes too
        for k in bnb_sd:
            assert np.array_equal(r_sd[k], bnb_sd[k].numpy()), k

    # a bitsandbytes state, loaded into either backend and into QuantState.from_dict, dequantizes identically
    reference = qlora_ref.dequantize_4bit(qlora_ref.Quantized4bit.from_state_dict(bnb_sd), "float32")
    gpu = qlora_gpu.dequantize_4bit(qlora_gpu.Quantized4bit.from_state_dict(bnb_sd), "float32").numpy()
    qs = bnbf.QuantState.from_dict({k[len("weight."):]: v for k, v in bnb_sd.items() if k != "weight"}, "cpu")
    qs.dtype = torch.float32
    if packed.shape[0] == 1:  # bitsandbytes' transpose shim for one-row data: see test_quantize.py
        qs.shape = torch.Size([x.size])
    with corrected_where_wrong(tuple(qs.shape), blocksize):  # bitsandbytes' AVX-512 kernel bug: its own tests
        bnb_out = bnbf.dequantize_4bit(packed, qs).numpy()
    assert same_bits_or_both_zero(reference, gpu) and same_bits_or_both_zero(reference, bnb_out)
    # and the reference's own state, loaded by the other two
    own = qlora_ref.dequantize_4bit(r, "float32")
    via_gpu = qlora_gpu.dequantize_4bit(qlora_gpu.Quantized4bit.from_state_dict(r_sd), "float32").numpy()
    assert same_bits_or_both_zero(own, via_gpu)


def test_state_dict_prefix_and_linear4bit_keys():
    import bitsandbytes as bnb

    w = torch.randn(33, 70)
    lin = bnb.nn.Linear4bit(70, 33, bias=False, compress_statistics=True, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    lin = lin.to("cpu")
    sd = {"model.q_proj." + k: v for k, v in lin.state_dict().items()}
    r = qlora_ref.Quantized4bit.from_state_dict(sd, prefix="model.q_proj.")
    assert set(r.state_dict(prefix="model.q_proj.")) == set(sd)
    theirs = bnbf.dequantize_4bit(lin.weight.data, lin.weight.quant_state).numpy()
    assert np.array_equal(qlora_ref.dequantize_4bit(r), theirs)


def _sd():
    return qlora_ref.quantize_4bit(np.random.default_rng(0).standard_normal((10, 70)).astype(np.float32)).state_dict()


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.pop("weight.absmax"), "weight.absmax"),
        (lambda d: d.pop("weight.quant_state.bitsandbytes__nf4"), "exactly one"),
        (lambda d: d.__setitem__("weight", d["weight"][:-1]), "'weight' must have"),
        (lambda d: d.__setitem__("weight.absmax", d["weight.absmax"].astype(np.float32)), "must be uint8"),
        (lambda d: d.pop("weight.nested_absmax"), "double quantization"),
        (lambda d: d.__setitem__("weight.quant_state.bitsandbytes__nf4", np.frombuffer(b"{oops", np.uint8)), "JSON"),
        (lambda d: d.__setitem__("weight.quant_map", d["weight.quant_map"][:8]), "16 elements"),
    ],
)
def test_inconsistent_state_dicts_are_rejected(mutate, match):
    d = _sd()
    mutate(d)
    with pytest.raises(ValueError, match=match):
        qlora_ref.Quantized4bit.from_state_dict(d)


def test_double_quant_offset_is_the_correctly_rounded_mean_of_the_block_scales():
    """The offset is the exact mean of the block absmaxes rounded once to float32 (quantize.double_quantize). Seven
    blocks, one with absmax 1 and six with absmax 2⁻²⁵ (a quarter ulp of 1): the exact sum 1 + 1.5 ulp is no float32.
    A float32 sum drops every 2⁻²⁵ (sum 1), a float64 sum rounded to float32 first ties to 1 + 2 ulp; either way
    the offset lands one float32 ulp from the correctly rounded (1 + 6·2⁻²⁵)/7, on opposite sides."""
    from fractions import Fraction

    x = np.zeros((7, 64), np.float32)
    x[0, 0] = 1.0
    x[1:, 5] = np.float32(2.0**-25)
    exact = (Fraction(1) + 6 * Fraction(2) ** -25) / 7
    want = np.float32(float(exact))  # float64 holds the fraction to 2⁻⁵³ relative: far inside a float32 half-ulp
    assert want != np.float32(1.0) / np.float32(7.0) and want != np.float32(1.0 + 2.0**-22) / np.float32(7.0)
    q = qlora_ref.quantize_4bit(x, "nf4", 64, True)
    assert np.float32(q.offset) == want
