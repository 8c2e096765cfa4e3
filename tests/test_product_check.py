"""bitsandbytes' 4-bit product is checked before it is trusted (qlora_gpu.product_check): a product that decodes
the weight wrongly fails the probe and never reaches a layer's output; one that only sums in another order passes."""

import copy

import bitsandbytes as bnb
import numpy as np
import pytest
import torch

import qlora_gpu  # noqa: E402
import qlora_ref  # noqa: E402
from qlora_gpu import product_check  # noqa: E402
from qlora_gpu.quantize import decode_absmax, dequantize_packed  # noqa: E402

CPU = torch.device("cpu")


def wrong_scales(x, packed, quant_state, bias=None):
    """A kernel that reads each block's scale from the next block: what a fused-kernel indexing bug does."""
    state = copy.copy(quant_state)
    state.absmax, state.nested, state.state2, state.offset = decode_absmax(quant_state).roll(1), False, None, None
    return torch.nn.functional.linear(x, dequantize_packed(packed, state, x.dtype), bias)


def other_order(x, packed, quant_state, bias=None):
    """The same product summed in float64 and rounded once: another order, within the derived bound."""
    w = dequantize_packed(packed, quant_state, torch.float32).double()  # the weight unrounded, as a fused kernel may
    return torch.nn.functional.linear(x.double(), w, bias).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_the_probe_passes_bitsandbytes_and_another_summation_order_and_fails_wrong_scales(dtype):
    assert product_check.probe_matmul_4bit(bnb.matmul_4bit, CPU, dtype)
    assert product_check.probe_matmul_4bit(other_order, CPU, dtype)
    assert not product_check.probe_matmul_4bit(wrong_scales, CPU, dtype)
    assert not product_check.probe_matmul_4bit(lambda *a, **k: 1 / 0, CPU, dtype)  # cannot run: not trusted


def test_a_wrong_bitsandbytes_product_never_reaches_the_layer(monkeypatch):
    """With matmul_4bit replaced by a wrong kernel, the layer's output is still the reference's: the probe fails
    and the frozen product takes dequantize + GEMM."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((64, 256)).astype(np.float32)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    ref_layer = qlora_ref.QLoRALinear.from_weight(W, 4, 8.0, compute_dtype="float32")
    monkeypatch.setattr(bnb, "matmul_4bit", wrong_scales)
    product_check._probed.cache_clear()
    try:
        gpu_layer = qlora_gpu.QLoRALinear.from_weight(W, 4, 8.0, compute_dtype="float32")
        y = gpu_layer(torch.from_numpy(x)).detach().numpy()
        assert "failed the probe" in product_check.frozen_product_status()["cpu, float32"]
        monkeypatch.setattr(product_check, "_MODE", {"mode": "bitsandbytes"})  # forced: the wrong kernel runs
        y_forced = gpu_layer(torch.from_numpy(x)).detach().numpy()
    finally:
        product_check._probed.cache_clear()
    np.testing.assert_allclose(y, ref_layer.forward(x), rtol=1e-5, atol=1e-5)
    assert np.abs(y_forced - y).max() > 0.1  # what the kernel would have given


def test_set_frozen_product_checks_its_argument_and_forces_the_path():
    with pytest.raises(ValueError, match=r"mode must be one of \('auto', 'bitsandbytes', 'dequantize'\)"):
        product_check.set_frozen_product("fused")
    product_check.set_frozen_product("dequantize")
    try:
        assert not product_check.bnb_product_trusted(CPU, torch.bfloat16)
        assert product_check.frozen_product_status() == {"all devices": "dequantize (forced by set_frozen_product)"}
    finally:
        product_check.set_frozen_product("auto")
    assert product_check.bnb_product_trusted(CPU, torch.bfloat16)  # bitsandbytes' CPU product passes here


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_on_cuda_bitsandbytes_fused_product_is_within_the_bound(dtype):
    """The check this module exists for: on a GPU, bitsandbytes' product at 1 to 64 rows (its fused cgemm_4bit
    kernel for the fewest) is the product of the dequantized weight within the derived bound. A failure here is a
    finding about bitsandbytes (qlora routes around it), to be written down in docs/divergences.md."""
    assert product_check.probe_matmul_4bit(bnb.matmul_4bit, torch.device("cuda"), dtype)
