"""The reference layer equals PEFT's LoRA layer wrapped around a bitsandbytes ``Linear4bit`` (on CPU), given the
same 4-bit weight, bias, adapters, input and dropout mask: outputs, the input gradient and both LoRA gradients.

PEFT's bitsandbytes layer (peft.tuners.lora.bnb.Linear4bit.forward) computes
``result = base_layer(x)`` (x cast to the layer's compute_dtype, ``bnb.matmul_4bit``, cast back to x's dtype), then
casts x to the adapter's dtype and adds ``lora_B(lora_A(dropout(x))) * scaling`` cast to the result's dtype.
With float32 everywhere that is the reference's float32 mode; with a bfloat16 input, bfloat16 compute dtype and
bfloat16 adapters it is the reference's bfloat16 mode, operation for operation. (PEFT with float32 adapters under
a bfloat16 base computes the adapter path in float32: a mix the reference does not emulate; docs/lora_backprop.md.)

One documented difference: torch's dropout on a bfloat16 CPU tensor multiplies by bf16(1/(1-p)); on CUDA, where
QLoRA runs, torch's fused dropout multiplies by 1/(1-p) in float32 and rounds once, and so does the reference.
The layer comparison therefore gives PEFT's dropout CUDA's arithmetic (a forward hook, same mask), and separate
tests pin the CPU difference and, on a GPU, CUDA's formula.
"""

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from bnb_helpers import corrected_where_wrong
from lora_helpers import assert_within_bound, bf16_stepwise_oracle, magnitudes, small_integer_layer_inputs
from peft import LoraConfig
from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

import qlora_ref
from qlora_ref.dtypes import round_to
from qlora_ref.lora import QLoRALinear, dropout_scale


def peft_layer(q, bias, r, alpha, dropout, use_rslora, compute_dtype):
    """bitsandbytes Linear4bit holding the 4-bit state ``q`` (loaded from its state dict), wrapped by PEFT."""
    out_f, in_f = q.shape
    cdt = getattr(torch, compute_dtype)
    base = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=cdt, quant_type=q.quant_type,
                             compress_statistics=q.double_quant)
    sd = {k.removeprefix("weight."): torch.from_numpy(np.array(v)) for k, v in q.state_dict("weight.").items()}
    packed = sd.pop("weight")
    base.weight = bnb.nn.Params4bit.from_prequantized(packed, sd, requires_grad=False, device="cpu", module=base)
    if bias is not None:
        base.bias = torch.nn.Parameter(torch.from_numpy(bias.copy()).to(cdt), requires_grad=False)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora)
    layer = PeftLinear4bit(base, "default", config=config, r=r, lora_alpha=alpha)
    if compute_dtype == "bfloat16":  # QLoRA's recipe: the adapters in bfloat16 too
        layer.lora_A.to(torch.bfloat16)
        layer.lora_B.to(torch.bfloat16)
    return layer


CASES = [
    # out, in, r, alpha, dropout, rslora, bias, quant_type, blocksize, double_quant, compute dtype
    (24, 64, 4, 8.0, 0.0, False, True, "nf4", 64, True, "float32"),
    (40, 96, 8, 16.0, 0.1, False, False, "nf4", 32, False, "float32"),
    (17, 130, 3, 5.0, 0.25, True, True, "fp4", 64, True, "float32"),
    (24, 64, 4, 8.0, 0.0, False, True, "nf4", 64, True, "bfloat16"),
    (40, 96, 8, 16.0, 0.1, False, True, "nf4", 64, True, "bfloat16"),
    (33, 128, 6, 12.0, 0.05, True, False, "fp4", 128, False, "bfloat16"),
]


@pytest.mark.parametrize("out_f, in_f, r, alpha, p, rslora, has_bias, qt, bs, dq, cd", CASES)
def test_reference_equals_peft_lora_on_bitsandbytes_linear4bit(out_f, in_f, r, alpha, p, rslora, has_bias, qt, bs,
                                                               dq, cd):
    rng = np.random.default_rng(out_f * in_f + r)
    W = (rng.standard_normal((out_f, in_f)) * 0.05).astype(np.float32)
    bias = rng.standard_normal(out_f).astype(np.float32) if has_bias else None
    q = qlora_ref.quantize_4bit(W, qt, bs, dq)
    ours = QLoRALinear.from_quantized(q, r, alpha, dropout=p, bias=bias, compute_dtype=cd, use_rslora=rslora)
    theirs = peft_layer(q, bias, r, alpha, p, rslora, cd)
    assert theirs.scaling["default"] == ours.scaling
    # the same adapter in both: PEFT's own initial A (Kaiming-uniform) and a non-zero B
    a = theirs.lora_A["default"].weight.detach().float().numpy()
    b = (rng.standard_normal((out_f, r)) * 0.2).astype(np.float32)
    ours.lora_A, ours.lora_B = a, b
    with torch.no_grad():
        theirs.lora_B["default"].weight.copy_(torch.from_numpy(b))
    assert np.abs(a).max() <= 1 / np.sqrt(in_f)  # PEFT's bound, the one qlora_ref.lora.lora_a_init_bound states

    cdt = getattr(torch, cd)
    x = rng.standard_normal((2, 3, in_f)).astype(np.float32)
    gy = rng.standard_normal((2, 3, out_f)).astype(np.float32)
    # run PEFT first (its nn.Dropout draws the mask), capture the mask, give it to the reference; the kept values
    # are scaled as CUDA's fused dropout does (module docstring)
    seen = {}

    def cuda_dropout(module, inputs, out):
        seen.update(x=inputs[0], out=out)
        return out if p == 0 else (inputs[0] * (out != 0)) * (1.0 / (1.0 - p))  # torch: a float32 factor

    theirs.lora_dropout["default"].register_forward_hook(cuda_dropout)
    torch.manual_seed(0)
    xt = torch.from_numpy(x).to(cdt).requires_grad_(True)
    with corrected_where_wrong((out_f, in_f), bs):  # bitsandbytes' CPU kernel where it passes qlora_gpu's probe
        y = theirs(xt)
        y.backward(torch.from_numpy(gy).to(cdt))
    mask = None
    if p > 0:
        mask = (seen["out"] != 0).numpy()
        assert (seen["x"] != 0).all() and 0 < mask.mean() < 1
    y_ours = ours.forward(x, dropout_mask=mask)
    gx_ours = ours.backward(gy)

    rounded = (lambda t: t) if cd == "float32" else (lambda t: round_to(t, cd))  # noqa: E731
    m = magnitudes(rounded(x.reshape(6, in_f)), rounded(ours.dequantized_weight()), bias, rounded(a), rounded(b),
                   rounded(gy.reshape(6, out_f)), ours.scaling,
                   None if mask is None else mask.reshape(6, in_f) * dropout_scale(p))
    dims = (cd, 6, in_f, out_f, r)
    got = {"y": y_ours, "x": gx_ours, "lora_A": ours.grads["lora_A"], "lora_B": ours.grads["lora_B"]}
    want = {"y": y.detach().float().numpy(), "x": xt.grad.float().numpy(),
            "lora_A": theirs.lora_A["default"].weight.grad.float().numpy(),
            "lora_B": theirs.lora_B["default"].weight.grad.float().numpy()}
    for name in got:  # bit for bit where every sum is exact: test_peft_rounds_where_the_stepwise_oracle_does
        assert_within_bound(name, got[name], want[name], m[name], *dims)
    if cd == "bfloat16":
        assert np.array_equal(round_to(y_ours, "bfloat16"), y_ours)  # every output value is a bfloat16


@pytest.mark.parametrize("alpha", [8.0, 12.0])  # s = 2 (a power of two) and s = 3 (one more rounding)
def test_peft_rounds_where_the_stepwise_oracle_does(alpha):
    """bfloat16, PEFT's layer on bitsandbytes' Linear4bit: the same operations on the same bfloat16 values as the
    reference (test_lora_ref's test of the same name) — bit for bit against ``lora_helpers.bf16_stepwise_oracle``
    on a 4-bit weight that dequantizes to small integers (NF4's codes -1, 0, 1 times an absmax of 8) and
    small-integer inputs, where every float32 sum is exact whatever order torch's and bitsandbytes' CPU kernels
    take; dropout p = 0.5 multiplies by 2, exact on CPU and CUDA alike."""
    n, d_in, d_out, r = 6, 64, 24, 4
    _, x, gy, A, B, keep = small_integer_layer_inputs(n, d_in, d_out, r)
    W = (np.random.default_rng(1).integers(-1, 2, (d_out, d_in)) * 8).astype(np.float32)
    W[:, 0] = 8.0  # one code of 1.0 in every block of 64: absmax 8 exactly
    q = qlora_ref.quantize_4bit(W, "nf4", 64, False)
    assert np.array_equal(qlora_ref.dequantize_4bit(q), W)
    theirs = peft_layer(q, None, r, alpha, 0.5, False, "bfloat16")
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(torch.from_numpy(A))
        theirs.lora_B["default"].weight.copy_(torch.from_numpy(B))
    keep_t = torch.from_numpy(keep)  # PEFT's dropout module applies this mask (its own draw could hide where x = 0)
    theirs.lora_dropout["default"].register_forward_hook(lambda module, inputs, out: inputs[0] * keep_t * 2.0)
    xt = torch.from_numpy(x).to(torch.bfloat16).requires_grad_(True)
    with corrected_where_wrong((d_out, d_in), 64):
        y = theirs(xt)
        y.backward(torch.from_numpy(gy).to(torch.bfloat16))
    want = bf16_stepwise_oracle(x, W, A, B, gy, keep, alpha / r, dropout_scale(0.5))
    got = (y, xt.grad, theirs.lora_A["default"].weight.grad, theirs.lora_B["default"].weight.grad)
    for name, g, w in zip(("y", "x", "lora_A", "lora_B"), got, want, strict=True):
        np.testing.assert_array_equal(g.detach().float().numpy(), w, err_msg=name)


def test_peft_default_initialisation_rule():
    """PEFT: A ~ kaiming_uniform(a=√5) = U(±1/√in), B = 0; the reference draws from the same distribution."""
    in_f, out_f, r = 256, 32, 16
    q = qlora_ref.quantize_4bit(np.random.default_rng(0).standard_normal((out_f, in_f)).astype(np.float32))
    theirs = peft_layer(q, None, r, 16.0, 0.0, False, "float32")
    ours = QLoRALinear.from_quantized(q, r, 16.0)
    a_theirs = theirs.lora_A["default"].weight.detach().numpy()
    bound = 1 / np.sqrt(in_f)
    for a in (a_theirs, ours.lora_A):
        assert a.shape == (r, in_f) and np.abs(a).max() <= bound and np.abs(a).max() > 0.98 * bound
        assert abs(a.std() - bound / np.sqrt(3)) < 0.03 * bound  # the uniform distribution's standard deviation
    assert not theirs.lora_B["default"].weight.detach().any() and not ours.lora_B.any()


def _kept_scaling(x, p, device):
    """torch's dropout of ``x`` (bfloat16) on ``device``: the kept outputs and the inputs they came from."""
    torch.manual_seed(0)
    xt = x.to(device)
    out = torch.nn.functional.dropout(xt, p, training=True)
    kept = out != 0
    return out[kept].cpu(), xt[kept].cpu()


def test_torch_cpu_dropout_of_bfloat16_scales_by_a_rounded_factor():
    """The documented difference (docs/lora_backprop.md): on CPU torch multiplies a bfloat16 tensor by a bfloat16
    noise tensor holding 1/(1-p) — bf16(1/0.9) = 1.109375, 0.16 % short — where the reference multiplies by
    float32 1/(1-p) and rounds once."""
    x = torch.randn(20000).to(torch.bfloat16)
    out, xin = _kept_scaling(x, 0.1, "cpu")
    assert torch.equal(out, xin * torch.tensor(1 / 0.9).to(torch.bfloat16))
    ours = (xin.float() * float(dropout_scale(0.1))).to(torch.bfloat16)
    differ = (out != ours).float().mean().item()
    assert 0.05 < differ < 0.95  # measured 0.29 on N(0, 1) inputs
    assert (out.float().abs() <= ours.float().abs()).all()  # the rounded factor is smaller: never larger


@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.05, 0.1, 0.25])
def test_torch_cuda_dropout_of_bfloat16_is_the_references_formula(p):
    """On CUDA (one fused kernel) the kept values are bf16(x · float32(1/(1-p))): the reference's x_d."""
    x = torch.randn(1 << 16).to(torch.bfloat16)
    out, xin = _kept_scaling(x, p, "cuda")
    ref = qlora_ref.dtypes.round_to(xin.float().numpy() * dropout_scale(p), "bfloat16")
    np.testing.assert_array_equal(out.float().numpy(), ref)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("p", [0.05, 0.1])
def test_the_gpu_layers_dropout_is_the_references_formula(device, p):
    """``qlora_gpu``'s x ⊙ M / (1-p) runs through torch's dropout backward operator (one kernel on CUDA, where two
    multiplications would launch two): bf16(x · float32(1/(1-p))) where kept and 0 elsewhere, on both devices."""
    from qlora_gpu.lora_math import dropped, keep_scale

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1 << 16, generator=g).to(torch.bfloat16)
    keep = torch.rand(1 << 16, generator=g) >= p
    out = dropped(x.to(device), keep.to(device), keep_scale(p)).cpu()
    ref = qlora_ref.dtypes.round_to(x.float().numpy() * dropout_scale(p), "bfloat16") * keep.numpy()
    np.testing.assert_array_equal(out.float().numpy(), ref)
