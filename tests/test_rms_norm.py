"""``qlora_gpu.model.rms_norm``: the model's RMSNorms through torch's fused operator with transformers' rounding
steps (float32 normalization rounded to the stream's dtype, times the float32 weight, rounded again). On the CPU
the operator is transformers' own arithmetic, so outputs and input gradients are compared bit for bit; on CUDA
(marker ``gpu``) it is one kernel, and its reduction order may move a value by one bfloat16 step."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from qlora_gpu.prepare import prepare_model
from qlora_gpu.rms_norm import rms_norm
from qlora_ref.model.config import LoraConfig, ModelConfig

TINY = ModelConfig(model_type="llama", vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def _norm(width: int, device: str = "cpu", seed: int = 0) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(width, eps=1e-5).to(device)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a trained norm's weight, not ones: the second rounding then matters
        norm.weight.copy_(1 + 0.3 * torch.randn(width, generator=g))
    norm.weight.requires_grad_(False)
    return norm


def _transformers(norm, x):
    """transformers' forward with the float32 weight, cast back to the stream's dtype (what ours replaces)."""
    return LlamaRMSNorm.forward(norm, x).to(x.dtype)


def _both(norm, x, gy):
    out = []
    for fn in (_transformers, rms_norm):
        xi = x.detach().clone().requires_grad_(True)
        y = fn(norm, xi)
        y.backward(gy)
        out.append((y.detach(), xi.grad))
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_fused_norm_is_transformers_norm_bit_for_bit_on_the_cpu(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(3, 17, 96, generator=g) * 4).to(dtype)
    gy = torch.randn(3, 17, 96, generator=g).to(dtype)
    (y0, g0), (y1, g1) = _both(_norm(96, seed=seed), x, gy)
    assert y1.dtype == dtype and torch.equal(y0, y1)
    assert torch.equal(g0, g1)


def test_the_gradient_is_the_derivative():
    norm = _norm(8).double()
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(functools.partial(rms_norm, norm), (x,))
    assert torch.autograd.gradgradcheck(functools.partial(rms_norm, norm), (x,))  # create_graph: differentiable


def test_the_model_routes_every_norm_through_it():
    m = prepare_model(TINY, lora=LoraConfig(r=4), device="cpu", dtype="bfloat16", progress=False, tokenizer=False)
    norms = [mod for mod in m.hf.modules() if isinstance(mod, LlamaRMSNorm)]
    assert len(norms) == 2 * TINY.num_hidden_layers + 1
    for norm in norms:
        assert norm.forward.func is rms_norm and norm.forward.args == (norm,)
        assert norm.weight.dtype == torch.float32 and not norm.weight.requires_grad
    x = torch.randn(1, 5, 64).bfloat16()
    assert m.hf.model.norm(x).dtype == torch.bfloat16  # the float32 product comes back in the stream's dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_weighted_cast_is_one_operator_each_way_with_autograds_bits(dtype):
    """(w ⊙ n) rounded to n's dtype by one multiplication into a tensor of that dtype, and its gradient g ⊙ w
    likewise: the same bits as ``(w * n).to(dtype)`` through autograd (widen, multiply, round back), one computing
    operator each way where that takes two forward and three backward (``empty_like`` allocates, launching
    nothing)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from qlora_gpu.rms_norm import _WeightedCast

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:  # views make metadata (here: the leaf's gradient, detached)
                self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    w = 1 + 0.3 * torch.randn(96, generator=g)
    n0 = (torch.randn(5, 96, generator=g) * 3).to(dtype)
    gy = torch.randn(5, 96, generator=g).to(dtype)
    n1 = n0.clone().requires_grad_(True)
    (w * n1).to(dtype).backward(gy)
    n2 = n0.clone().requires_grad_(True)
    with Ops() as fwd:
        y = _WeightedCast.apply(w, n2)
    with Ops() as bwd:
        y.backward(gy)
    assert y.dtype == dtype and torch.equal(y, (w * n0).to(dtype))
    assert torch.equal(n2.grad, n1.grad)
    assert fwd.names == ["empty_like.default", "mul.out"] and bwd.names == ["empty_like.default", "mul.out"]


def test_a_trainable_norm_weight_gets_its_gradient():
    """A norm whose weight trains goes through autograd's product, which also gives the weight's gradient."""
    norm = _norm(8).double()
    norm.weight.requires_grad_(True)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(norm, x), (x, norm.weight))


@pytest.mark.gpu
def test_on_cuda_it_is_one_kernel_and_within_one_bfloat16_step():
    """One kernel forward where transformers' code launches seven (plus the weight product and the cast);
    the fused reduction may round the normalized value to the neighbouring bfloat16, rarely."""
    from torch.profiler import ProfilerActivity, profile

    norm = _norm(4096, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(512, 4096, generator=g, device="cuda") * 4).bfloat16()
    gy = torch.randn(512, 4096, generator=g, device="cuda").bfloat16()
    (y0, g0), (y1, g1) = _both(norm, x, gy)
    step = (y0.float().abs() * 2**-7).clamp_min(2**-126)  # one bfloat16 step at |y| (8 significant bits)
    assert ((y0.float() - y1.float()).abs() <= step).all()
    assert (y0 != y1).float().mean() < 1e-3
    assert torch.allclose(g0.float(), g1.float(), rtol=2**-6, atol=1e-3)
    for fn, most in ((rms_norm, 2), (_transformers, None)):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn(norm, x)
            torch.cuda.synchronize()
        kernels = sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())
        if most is not None:
            assert kernels <= most, kernels
        else:
            assert kernels >= 7, kernels


@pytest.mark.parametrize("trainable", [False, True])
def test_out_dtype_is_transformers_output_cast_once(trainable):
    """A float32 stream with bfloat16 compute: ``out_dtype`` bfloat16 is transformers' float32 output rounded once
    to bfloat16 (the cast the next layers' bfloat16 products make), for a frozen norm and a trainable one alike."""
    norm = _norm(64)
    norm.weight.requires_grad_(trainable)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    y = rms_norm(norm, x, torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, LlamaRMSNorm.forward(norm, x).detach().to(torch.bfloat16))
