"""qlora_gpu never computes with wrong weights on a CPU whose bitsandbytes kernel is wrong: its probe detects the
AVX-512 dequantization bug of bitsandbytes 0.50.2 (docs/divergences.md) and routes CPU dequantization through the
contract's definition. Both paths are exercised on every machine: the bug is simulated where the CPU lacks it,
and the definition is forced where the CPU has it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bnb_helpers import bitsandbytes_cpu_dequantize, per_row_blocks_kernel, spec_kernel

import qlora_gpu
import qlora_ref
from qlora_gpu import quantize as gq
from qlora_gpu.lora import QLoRALinear as GpuLinear
from qlora_ref.lora import QLoRALinear as RefLinear

RAGGED, ALIGNED = (40, 96), (40, 128)  # in_features 96 is not a multiple of the block size 64


def weight(shape, seed=0):
    return (np.random.default_rng(seed).standard_normal(shape) * 0.05).astype(np.float32)


def test_the_definition_passes_the_probe_and_a_simulated_bug_fails_it_only_when_ragged():
    import bitsandbytes.functional as bnbf

    with bitsandbytes_cpu_dequantize(spec_kernel):
        assert gq.probe_dequantize_4bit(bnbf.dequantize_4bit, ragged=False)
        assert gq.probe_dequantize_4bit(bnbf.dequantize_4bit, ragged=True)
    with bitsandbytes_cpu_dequantize(per_row_blocks_kernel):
        assert gq.probe_dequantize_4bit(bnbf.dequantize_4bit, ragged=False)
        assert not gq.probe_dequantize_4bit(bnbf.dequantize_4bit, ragged=True)
        assert gq.bitsandbytes_cpu_dequantize_correct(ALIGNED, 64)
        assert not gq.bitsandbytes_cpu_dequantize_correct(RAGGED, 64)
        status = gq.cpu_dequantize_status()
        assert status["ragged last dim"].startswith("spec") and status["last dim a multiple of the block size"] \
            .startswith("bitsandbytes")


def test_a_kernel_that_raises_or_returns_another_dtype_is_not_trusted():
    def raises(packed, state):
        raise RuntimeError("no kernel")

    def float32_only(packed, state):
        return gq.dequantize_4bit_spec(packed, state.absmax, state.code, state.blocksize, tuple(state.shape),
                                       torch.float32)

    assert not gq.probe_dequantize_4bit(raises, ragged=False)
    assert not gq.probe_dequantize_4bit(float32_only, ragged=False)


@pytest.mark.parametrize("kernel", [per_row_blocks_kernel, spec_kernel], ids=["simulated-bug", "correct"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_qlora_gpu_dequantizes_by_the_definition_whatever_bitsandbytes_does(kernel, dtype):
    """Under "auto": the weight, the layer's forward and its input gradient equal the reference's on a ragged
    weight, with bitsandbytes' kernel right or (simulated) wrong."""
    w = weight(RAGGED)
    q = qlora_ref.quantize_4bit(w, "nf4", 64, double_quant=True)
    with bitsandbytes_cpu_dequantize(kernel):
        got = qlora_gpu.dequantize_4bit(qlora_gpu.Quantized4bit.from_state_dict(q.state_dict()), dtype)
        np.testing.assert_array_equal(got.float().numpy(), qlora_ref.dequantize_4bit(q, dtype).astype(np.float32))
        ref = RefLinear.from_quantized(q, None, compute_dtype="float32")
        gpu = GpuLinear.from_quantized(q, None, compute_dtype="float32")
        x = np.random.default_rng(1).standard_normal((3, RAGGED[1])).astype(np.float32)
        xt = torch.from_numpy(x).requires_grad_(True)
        y = gpu(xt)
        y.backward(torch.ones_like(y))
    exact = qlora_ref.dequantize_4bit(q).astype(np.float64)
    np.testing.assert_allclose(y.detach().numpy(), x @ exact.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(xt.grad.numpy(), np.ones((3, RAGGED[0])) @ exact, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ref.forward(x), y.detach().numpy(), rtol=1e-5, atol=1e-5)


def test_forcing_bitsandbytes_reproduces_its_result_bug_included():
    """``set_cpu_dequantize("bitsandbytes")`` is what the bug would do to a user: the weight changes by O(1)."""
    w = weight(RAGGED)
    q = qlora_gpu.Quantized4bit.from_state_dict(qlora_ref.quantize_4bit(w, "nf4", 64, double_quant=False)
                                                .state_dict())
    exact = qlora_ref.dequantize_4bit(qlora_ref.quantize_4bit(w, "nf4", 64, double_quant=False))
    with bitsandbytes_cpu_dequantize(per_row_blocks_kernel):
        gq.set_cpu_dequantize("bitsandbytes")
        try:
            wrong = qlora_gpu.dequantize_4bit(q).numpy()
        finally:
            gq.set_cpu_dequantize("auto")
        right = qlora_gpu.dequantize_4bit(q).numpy()
    np.testing.assert_array_equal(right, exact)
    assert np.abs(wrong - exact).max() > 0.01
    with pytest.raises(ValueError, match="mode must be one of"):
        gq.set_cpu_dequantize("fast")
