"""The data types: NF4 built from first principles equals bitsandbytes' table bit for bit; the k-bit family and
the dynamic 8-bit map have the properties section 3 of the paper asks for."""

import json
import os
import platform
import subprocess
import sys

import bitsandbytes.functional as bnbf
import numpy as np
import pytest
import torch
from scipy.stats import norm

from qlora_gpu import hardware
from qlora_ref.codebooks import codebook, dynamic_map, linspace_float32, normal_float_codebook, normal_float_offset


def bits(a):
    return np.asarray(a, np.float32).view(np.int32)


@pytest.mark.parametrize("name", ["nf4", "fp4"])
def test_4bit_codebooks_bit_identical_to_bitsandbytes(name):
    assert np.array_equal(bits(codebook(name)), bits(bnbf.get_4bit_type(name, device="cpu").numpy()))


def test_nf4_matches_bitsandbytes_construction_and_hardcoded_table():
    built = bnbf.create_normal_map(offset=0.9677083, use_extra_value=True).numpy()
    assert np.array_equal(np.sort(built[built != 0]), codebook("nf4")[codebook("nf4") != 0])


def test_nf4_shape_of_the_data_type():
    q = codebook("nf4")
    assert q.dtype == np.float32 and q.size == 16
    assert np.all(np.diff(q) > 0)
    assert q[0] == -1.0 and q[-1] == 1.0 and q[7] == 0.0  # exact zero, asymmetric: 7 negative, 8 positive
    assert (q < 0).sum() == 7 and (q > 0).sum() == 8


def test_nf4_levels_are_normal_quantiles():
    # the positive levels are Φ⁻¹ at an even grid from δ to 1/2, divided by Φ⁻¹(δ)
    delta = 0.9677083
    grid = np.linspace(delta, 0.5, 9)[:-1]
    expected = norm.ppf(grid) / norm.ppf(delta)
    assert np.allclose(np.sort(codebook("nf4")[8:])[::-1], expected, rtol=1e-6)


def test_equal_mass_codes_are_an_idealisation_that_blockwise_absmax_departs_from():
    """docs/quantization.md: on N(0, 1) scaled so that Φ⁻¹(δ) lands on 1 and rounded to the nearest code, each NF4
    code gets 0.89-1.14 of an even share; after absmax scaling in blocks of 64 the outer codes are reached far
    less (the absmax of 64 normal values is about 2.6σ, not 1.85σ): 0.28-1.48.

    The blockwise shares are checked against their expectation derived here, independently of the quantizer: in a
    block of n = 64 normal values with absmax M (density n·2φ(m)·(2Φ(m) - 1)^(n-1)), the largest value lands on
    ±1 (code 0 or 15, half the time each) and the other n - 1, normal truncated to [-M, M], land in code k's cell
    [e_k, e_k+1] (midpoints between codes) with probability (Φ(e_k+1·M) - Φ(e_k·M)) / (2Φ(M) - 1); averaged over M.
    The counts of 2^20 values are binomial around that within 5 standard errors (measured: within 2.1)."""
    from scipy import integrate

    import qlora_ref

    q = codebook("nf4").astype(np.float64)
    edges = (q[1:] + q[:-1]) / 2 * norm.ppf(0.9677083)
    ideal = np.diff(np.concatenate([[0.0], norm.cdf(edges), [1.0]])) * 16
    assert 0.88 < ideal.min() < 0.90 and 1.13 < ideal.max() < 1.15

    n = 64
    cells = np.concatenate([[-1.0], (q[1:] + q[:-1]) / 2, [1.0]])

    def absmax_density(m):
        return n * 2 * norm.pdf(m) * (2 * norm.cdf(m) - 1) ** (n - 1)

    expected = np.array([(n - 1) / n * integrate.quad(
        lambda m, a=a, b=b: absmax_density(m) * (norm.cdf(b * m) - norm.cdf(a * m)) / (2 * norm.cdf(m) - 1),
        0, 12, points=[2, 2.5, 3], limit=200)[0] for a, b in zip(cells[:-1], cells[1:], strict=True)])
    expected[[0, 15]] += 0.5 / n
    assert abs(expected.sum() - 1) < 1e-9
    w = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    counts = np.bincount(qlora_ref.quantize_4bit(w, "nf4", 64, double_quant=False).codes(), minlength=16)
    standard_error = np.sqrt(expected * (1 - expected) * w.size)
    assert np.all(np.abs(counts - expected * w.size) <= 5 * standard_error), (counts / w.size * 16, expected * 16)
    share = expected * 16  # the docs' figures follow from the expectation
    assert 0.27 < share.min() < 0.28 and 1.47 < share.max() < 1.48
    assert share.argmin() in (0, 15) and share.argmax() in range(5, 9)  # fewest at the ends, most near zero


def test_nf4_offset_is_the_bitsandbytes_literal_not_the_formula(monkeypatch):
    """docs/quantization.md: δ₄ = 0.9677083 is the formula's 0.96770833… truncated to 7 decimals; the two are one
    float32 ulp apart, and built from the formula 12 of the 16 NF4 values would differ from bitsandbytes' table."""
    from qlora_ref import codebooks

    n = 16
    formula = 0.5 * ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n)))
    assert abs(formula - 0.9677083) < 1e-7 and np.float32(formula) == np.nextafter(np.float32(0.9677083), 1)
    assert normal_float_offset(4) == 0.9677083
    table = np.sort(bnbf.get_4bit_type("nf4", device="cpu").numpy())
    assert np.array_equal(bits(codebooks._normal_float_codebook.__wrapped__(4)), bits(table))
    monkeypatch.setattr(codebooks, "NF4_OFFSET", formula)
    assert (bits(codebooks._normal_float_codebook.__wrapped__(4)) != bits(table)).sum() == 12


@pytest.mark.parametrize("k", range(2, 9))
def test_k_bit_normal_float(k):
    q = normal_float_codebook(k)
    assert q.size == 2**k
    assert np.all(np.diff(q) > 0)
    assert q.min() == -1.0 and q.max() == 1.0 and 0.0 in q
    assert (q > 0).sum() == 2 ** (k - 1) and (q < 0).sum() == 2 ** (k - 1) - 1


@pytest.mark.parametrize("k", range(2, 9))
def test_numpy_integers_give_the_int_codebook(k):
    """NumPy's integers compute in their own width (2**8 overflows an int8) and hash like the int: each is the
    plain int's table, whichever type asked first."""
    for t in (np.int8, np.uint8, np.int64):
        assert np.array_equal(normal_float_codebook(t(k)), normal_float_codebook(k))


@pytest.mark.parametrize("bad", [1, 9, 4.0, "4", True, [4], np.int8(9)])
def test_normal_float_bad_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        normal_float_codebook(bad)


def test_unknown_codebook():
    with pytest.raises(ValueError, match="quant_type"):
        codebook("nf5")


def torch_fuses_linspace() -> bool:
    """Which of the reference's two roundings this machine's torch.linspace takes (docs/quantization.md); a third
    way fails here rather than passing as either."""
    rounding = hardware.torch_linspace_rounding()
    assert rounding in ("fused", "two roundings"), f"torch.linspace rounds in neither documented way: {rounding}"
    return rounding == "fused"


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_bit_identical_to_bitsandbytes(signed):
    # bitsandbytes builds the map with this machine's torch.linspace: the reference's map wherever torch fuses the
    # multiply-add (its AVX2 and AVX-512 kernels), the fused=False one under its scalar kernel
    theirs = bnbf.create_dynamic_map(signed=signed).numpy()
    assert np.array_equal(bits(dynamic_map(signed, fused=torch_fuses_linspace())), bits(theirs))


LINSPACE_CASES = [(0.1, 1.0, 2), (0.1, 1.0, 65), (0.9677083, 0.5, 9), (-3.0, 7.5, 1001), (2.5, -1.0, 1), (0.1, 1.0, 0)]


@pytest.mark.parametrize("args", LINSPACE_CASES)
def test_linspace_float32_matches_torch(args):
    ours = linspace_float32(*args, fused=torch_fuses_linspace())
    assert np.array_equal(bits(ours), bits(torch.linspace(*args, dtype=torch.float32).numpy()))


@pytest.mark.parametrize("args", LINSPACE_CASES)
def test_the_two_linspace_roundings_differ_by_the_rounding_of_the_product(args):
    # fused: round(s + p); two roundings: round(s + round(p)), p = step·i exact. They differ by at most
    # |round(p) - p| <= ulp(p)/2 plus half an ulp of each result.
    start, stop, num = args
    fused, twice = linspace_float32(*args), linspace_float32(*args, fused=False)
    if num < 2:
        assert np.array_equal(bits(fused), bits(twice))
        return
    step = np.float64(np.float32((np.float32(stop) - np.float32(start)) / np.float32(num - 1)))
    i = np.arange(num)
    product = np.float32(np.abs(step * np.where(i < num // 2, i, num - 1 - i)))
    bound = 0.5 * np.spacing(product) + np.spacing(np.maximum(np.abs(fused), np.abs(twice)))
    assert np.all(np.abs(fused.astype(np.float64) - twice) <= bound)


_MAPS_UNDER = """
import json, numpy as np, torch, bitsandbytes.functional as F
from qlora_gpu import hardware
print(json.dumps(dict(capability=torch.backends.cpu.get_cpu_capability(),
                      rounding=hardware.torch_linspace_rounding(),
                      maps={s: F.create_dynamic_map(signed=s == "signed").numpy().view(np.int32).tolist()
                            for s in ("signed", "unsigned")})))
"""


def maps_under(capability: str) -> dict:
    """bitsandbytes' dynamic maps built by torch under ATEN_CPU_CAPABILITY=capability, in a fresh process."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    out = subprocess.run([sys.executable, "-c", _MAPS_UNDER], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="ATEN_CPU_CAPABILITY=default/avx2 name torch's x86 kernels")
def test_bitsandbytes_dynamic_map_depends_on_torch_cpu_kernel():
    # The documented difference (docs/quantization.md, docs/divergences.md), shown on this machine: torch's
    # scalar kernel rounds linspace twice and bitsandbytes' map follows it; its AVX2 kernel gives the reference's.
    scalar = maps_under("default")
    assert (scalar["capability"], scalar["rounding"]) == ("DEFAULT", "two roundings")
    runs = [scalar]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):  # the CPU has AVX2 (torch caps, never raises)
        avx2 = maps_under("avx2")
        assert (avx2["capability"], avx2["rounding"]) == ("AVX2", "fused")
        runs.append(avx2)
    for run in runs:
        fused = run["rounding"] == "fused"
        for kind in ("signed", "unsigned"):
            assert run["maps"][kind] == bits(dynamic_map(kind == "signed", fused=fused)).tolist()
    # the two maps: bitsandbytes' under the scalar kernel against the reference's, entries a few ulps apart
    for kind in ("signed", "unsigned"):
        d = np.array(scalar["maps"][kind], np.int64) - bits(dynamic_map(kind == "signed"))
        assert 0 < np.count_nonzero(d) and np.abs(d).max() <= 2


def test_fp4_and_int4_layouts():
    fp4 = codebook("fp4")
    assert fp4[3] == 1.0 and fp4[11] == -1.0 and fp4[0] == 0.0 and fp4[8] == 0.0
    assert np.array_equal(codebook("int4")[:8], np.arange(7, -1, -1, dtype=np.float32) / np.float32(7))
    e3m0 = codebook("fp4_e3m0")
    assert set(np.abs(e3m0[e3m0 != 0]).tolist()) == {2.0**-e for e in range(7)}


@pytest.mark.parametrize("k", [2, 3, 5, 6, 7, 8])
def test_k_bit_normal_float_levels_are_the_quantiles_of_the_documented_construction(k):
    """NF-k for k ≠ 4 (this project's extension, normal_float_codebook): δ = ½((1 - 1/(2(2ᵏ-1))) + (1 - 1/(2·2ᵏ))),
    2ᵏ⁻¹ positive levels Φ⁻¹(p) at p evenly spaced from δ down to (not including) ½, 2ᵏ⁻¹ - 1 negative ones at
    spacing (δ - ½)/(2ᵏ⁻¹ - 1), and 0, all divided by Φ⁻¹(δ). Computed here in float64; the reference rounds the
    probabilities to float32 (≤ 1 ulp of 1 = 2⁻²³ each), which moves a level by at most 2⁻²³·(Φ⁻¹)'(δ) / Φ⁻¹(δ),
    plus the float32 rounding of the level itself."""
    n, half = 2**k, 2 ** (k - 1)
    delta = 0.5 * ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n)))
    assert abs(normal_float_offset(k) - delta) < 1e-15
    top = norm.ppf(delta)
    positive = norm.ppf(delta - np.arange(half) * (delta - 0.5) / half) / top
    negative = -norm.ppf(delta - np.arange(half - 1) * (delta - 0.5) / (half - 1)) / top
    want = np.sort(np.concatenate([positive, [0.0], negative]))
    bound = 2 * 2.0**-23 / norm.pdf(top) / top + 2 * 2.0**-24
    assert np.max(np.abs(normal_float_codebook(k).astype(np.float64) - want)) <= bound


def test_fp4_e3m0_layout_and_its_zeros_are_positive():
    """E3M0 by nibble: sign bit, then exponent e = 0..7 standing for 0 and 2^(e-7); nibble 8 (sign set, exponent 0)
    is +0.0 like bitsandbytes' FP4 table, so a zero never dequantizes to -0.0."""
    e3m0 = codebook("fp4_e3m0")
    magnitudes = np.array([0.0] + [2.0 ** (e - 7) for e in range(1, 8)], np.float32)
    assert np.array_equal(e3m0[:8], magnitudes) and np.array_equal(e3m0[8:], -magnitudes)
    assert not np.signbit(e3m0).any(where=e3m0 == 0)
    assert not np.signbit(codebook("fp4")[[0, 8]]).any()
