"""``QLoRALinear.out_dtype`` (issue 36): a layer writing into a float32 stream adds its adapter's output to the widened
frozen output in float32, peft's arithmetic under autocast — where the bfloat16 addition rounds a small update away.
Checked against peft's own layer (bitsandbytes ``Linear4bit`` + ``peft.tuners.lora.Linear4bit`` under
``torch.autocast``, the same 4-bit bytes and adapters) and against torch autograd for the gradients."""

from __future__ import annotations

import pytest
import torch

from qlora_gpu.lora import QLoRALinear

IN, OUT, R, ALPHA = 128, 64, 8, 16.0  # in_features a multiple of 64 (the blocksize)


def _layer(out_dtype, seed=0, dropout=0.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT, IN, generator=g) * 0.2
    m = QLoRALinear.from_weight(w, R, ALPHA, dropout=dropout, compute_dtype="bfloat16", out_dtype=out_dtype)
    with torch.no_grad():
        m.lora_B.copy_(torch.randn(OUT, R, generator=g) * 1e-3)  # a first update's size: ~lr · a few steps
    return m


def _peft_twin(ours: QLoRALinear, alpha=ALPHA):
    """peft's LoRA layer around a bitsandbytes ``Linear4bit`` holding our 4-bit weight and our adapter."""
    import bitsandbytes as bnb
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    base = bnb.nn.Linear4bit(IN, OUT, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(ours.weight.data, requires_grad=False, quant_state=ours.weight.quant_state,
                                    quant_type="nf4", bnb_quantized=True)
    config = LoraConfig(r=R, lora_alpha=alpha, lora_dropout=0.0)
    layer = PeftLinear4bit(base, "default", config, r=R, lora_alpha=alpha, lora_dropout=0.0)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
    return layer


@pytest.fixture(scope="module")
def x():
    return torch.randn(3, 16, IN, generator=torch.Generator().manual_seed(1))


def test_float32_output_is_peft_layers_output_under_autocast(x):
    ours = _layer("float32")
    theirs = _peft_twin(ours)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = theirs(x)
    y = ours(x.to(torch.bfloat16))  # the norm hands the compute dtype; peft casts the float32 output the same way
    assert y.dtype == expected.dtype == torch.float32
    assert torch.equal(y, expected)


def test_the_bfloat16_addition_rounds_a_small_update_away(x):
    """The mechanism of issue 36: B of a first update's size. In float32 its whole contribution reaches the
    output; added in bfloat16 most of it is lost (under half a bfloat16 step of the frozen output)."""
    wide, narrow = _layer("float32"), _layer(None)
    xb = x.to(torch.bfloat16)
    frozen = _layer("float32")
    with torch.no_grad():
        frozen.lora_B.zero_()
        base = frozen(xb)
        delta_wide = wide(xb) - base
        delta_narrow = narrow(xb).float() - base
        p = (xb.reshape(-1, IN) @ wide.lora_A.to(torch.bfloat16).t()) @ wide.lora_B.to(torch.bfloat16).t()
    exact = (wide.scaling * p.float()).reshape(delta_wide.shape)
    assert torch.allclose(delta_wide, exact, rtol=0, atol=2.0**-20 * float(base.abs().max()))  # f32 rounding
    lost = (delta_narrow == 0) & (exact != 0)
    assert lost.float().mean() > 0.5, float(lost.float().mean())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_float32_output_gradients_match_autograd(x, dropout):
    """Backward: the float32 output gradient rounded once to bfloat16 (autocast's cast), then the layer's own
    products — torch autograd of the same composition, with the same dropout mask."""
    ours = _layer("float32", dropout=dropout)
    xb = x.to(torch.bfloat16).requires_grad_(True)
    keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) >= dropout if dropout else None
    y = ours(xb, keep)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    y.backward(g)
    got = (xb.grad.clone(), ours.lora_A.grad.clone(), ours.lora_B.grad.clone())

    from qlora_gpu.quantize import Quantized4bit, dequantize_4bit

    w = dequantize_4bit(Quantized4bit.from_bnb(ours.weight.data, ours.weight.quant_state), torch.bfloat16)
    a = ours.lora_A.detach().clone().requires_grad_(True)
    b = ours.lora_B.detach().clone().requires_grad_(True)
    xr = xb.detach().clone().requires_grad_(True)
    xd = xr if keep is None else torch.ops.aten.native_dropout_backward(xr, keep, 1.0 / (1.0 - dropout))
    base = xr @ w.t()
    p = (xd @ a.to(torch.bfloat16).t()) @ b.to(torch.bfloat16).t()
    (base.float() + ours.scaling * p.float()).backward(g)
    for name, ours_g, ref_g in zip(("x", "A", "B"), got, (xr.grad, a.grad, b.grad), strict=True):
        # the same bfloat16 products; summation order may differ by a few bfloat16 steps of the largest term
        bound = 4 * 2.0**-8 * float(ref_g.abs().max())
        assert float((ours_g.float() - ref_g.float()).abs().max()) <= bound, name


def test_bad_out_dtype_is_named():
    with pytest.raises(ValueError, match="out_dtype"):
        _layer("int8")
    m = _layer(None)
    m.out_dtype = "float32"
    assert m(torch.zeros(2, IN, dtype=torch.bfloat16)).dtype == torch.float32
    assert "out_dtype='float32'" in repr(m)


@pytest.mark.parametrize("alpha", [24.0, 12.0])  # s = 3, 1.5: not powers of two, the separate multiplication
def test_float32_output_with_a_scaling_not_a_power_of_two_is_peft_layers_output(x, alpha):
    """With s not ±2ᵏ, s · P is a multiplication of its own: peft rounds it to bfloat16 (lora_B's output times
    the scaling under autocast) before the float32 addition, y = f32(base) + f32(rnd(s · P)) (add_adapter)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(OUT, IN, generator=g) * 0.2
    ours = QLoRALinear.from_weight(w, R, alpha, compute_dtype="bfloat16", out_dtype="float32")
    with torch.no_grad():
        ours.lora_B.copy_(torch.randn(OUT, R, generator=g) * 1e-1)
    assert ours.scaling == alpha / R
    theirs = _peft_twin(ours, alpha)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = theirs(x)
    with torch.no_grad():
        y = ours(x.to(torch.bfloat16))
    assert y.dtype == expected.dtype == torch.float32
    assert torch.equal(y, expected)
