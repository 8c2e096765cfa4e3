"""The data types: NF4 built from first principles equals bitsandbytes' table bit for bit; the k-bit family and
the dynamic 8-bit map have the properties section 3 of the paper asks for."""

import bitsandbytes.functional as bnbf
import numpy as np
import pytest
import torch
from scipy.stats import norm

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


def test_offset_formula_gives_the_paper_constant():
    n = 16
    assert abs(0.5 * ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n))) - 0.9677083) < 1e-7
    assert normal_float_offset(4) == 0.9677083


@pytest.mark.parametrize("k", range(2, 9))
def test_k_bit_normal_float(k):
    q = normal_float_codebook(k)
    assert q.size == 2**k
    assert np.all(np.diff(q) > 0)
    assert q.min() == -1.0 and q.max() == 1.0 and 0.0 in q
    assert (q > 0).sum() == 2 ** (k - 1) and (q < 0).sum() == 2 ** (k - 1) - 1


@pytest.mark.parametrize("bad", [1, 9, 4.0, "4"])
def test_normal_float_bad_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        normal_float_codebook(bad)


def test_unknown_codebook():
    with pytest.raises(ValueError, match="quant_type"):
        codebook("nf5")


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_bit_identical_to_bitsandbytes(signed):
    assert np.array_equal(bits(dynamic_map(signed)), bits(bnbf.create_dynamic_map(signed=signed).numpy()))


@pytest.mark.parametrize("args", [(0.1, 1.0, 2), (0.1, 1.0, 65), (0.9677083, 0.5, 9), (-3.0, 7.5, 1001)])
def test_linspace_float32_matches_torch(args):
    assert np.array_equal(bits(linspace_float32(*args)), bits(torch.linspace(*args, dtype=torch.float32).numpy()))


def test_fp4_and_int4_layouts():
    fp4 = codebook("fp4")
    assert fp4[3] == 1.0 and fp4[11] == -1.0 and fp4[0] == 0.0 and fp4[8] == 0.0
    assert np.array_equal(codebook("int4")[:8], np.arange(7, -1, -1, dtype=np.float32) / np.float32(7))
    e3m0 = codebook("fp4_e3m0")
    assert set(np.abs(e3m0[e3m0 != 0]).tolist()) == {2.0**-e for e in range(7)}
