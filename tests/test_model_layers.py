"""Every layer of the reference transformer: forward against a torch formula, hand-written backward against torch
autograd (float32) and against finite differences (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_helpers import check_finite_differences, random_linear

from qlora_ref.model.attention import Attention, KVCache, causal_mask
from qlora_ref.model.block import DecoderBlock
from qlora_ref.model.embedding import Embedding
from qlora_ref.model.mlp import SwiGLU
from qlora_ref.model.rmsnorm import RMSNorm
from qlora_ref.model.rope import RotaryEmbedding, apply_rope, apply_rope_backward, rope_attention_factor, rope_inv_freq

tt = torch.from_numpy


def grads_close(a, b, rtol=1e-5):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    assert np.max(np.abs(a - b)) <= rtol * max(1e-30, np.max(np.abs(b))), np.max(np.abs(a - b)) / np.max(np.abs(b))


# ----------------------------------------------------------------------------------------------- embedding
def test_embedding_forward_backward():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((11, 5)).astype(np.float32)
    ids = np.array([[1, 3, 3, 10], [0, 1, 7, 3]])
    emb = Embedding(w)
    y = emb.forward(ids)
    g = rng.standard_normal(y.shape).astype(np.float32)
    gw = emb.backward(g)
    tw = tt(w).requires_grad_()
    ty = torch.nn.functional.embedding(tt(ids), tw)
    ty.backward(tt(g))
    np.testing.assert_array_equal(y, ty.detach().numpy())
    grads_close(gw, tw.grad.numpy())


def test_embedding_backward_finite_differences():
    """L(W) = Σ Embedding(W)(ids) ⊙ G is linear in the table W, so a central difference in float64 is exact up to
    round-off. Ids repeat (row 3 three times, row 1 twice: its gradient is a sum) and rows 2, 4... are unused
    (their gradient is zero); float64 torch autograd agrees too."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((11, 5))
    ids = np.array([[1, 3, 3, 10], [0, 1, 7, 3]])
    g = rng.standard_normal((*ids.shape, 5))
    emb = Embedding(w)
    emb.forward(ids)
    gw = emb.backward(g)
    check_finite_differences(lambda table: Embedding(table).forward(ids), w, g, gw, rng)
    tw = tt(w).requires_grad_()
    torch.nn.functional.embedding(tt(ids), tw).backward(tt(g))
    # each entry sums at most 3 float64 terms, in either order: within 2 roundings of 2⁻⁵³ of their |sum| <= 3 max|G|
    np.testing.assert_allclose(gw, tw.grad.numpy(), rtol=0, atol=2 * 2.0**-53 * 3 * np.abs(g).max())


def test_embedding_rejects_out_of_range_ids():
    emb = Embedding(np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        emb.forward(np.array([[0, 4]]))


# ----------------------------------------------------------------------------------------------- RMSNorm
def torch_rmsnorm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("shape", [(2, 5, 7), (3, 16)])
def test_rmsnorm_vs_autograd(shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    w = (1 + 0.3 * rng.standard_normal(shape[-1])).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    norm = RMSNorm(w, 1e-5, weight_grad=True)
    y = norm.forward(x)
    dx = norm.backward(g)
    tx, tw = tt(x).requires_grad_(), tt(w).requires_grad_()
    ty = torch_rmsnorm(tx, tw, 1e-5)
    ty.backward(tt(g))
    grads_close(y, ty.detach().numpy(), 1e-6)
    grads_close(dx, tx.grad.numpy())
    grads_close(norm.grad_weight, tw.grad.numpy())
    frozen = RMSNorm(w, 1e-5)  # QLoRA's norms: no weight gradient, the same input gradient
    frozen.forward(x)
    assert np.array_equal(frozen.backward(g), dx) and frozen.grad_weight is None


def test_rmsnorm_finite_differences():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 4, 9))
    w = 1 + 0.3 * rng.standard_normal(9)
    g = rng.standard_normal(x.shape)
    norm = RMSNorm(w, 1e-6)
    norm.forward(x)
    dx = norm.backward(g)
    check_finite_differences(lambda z: RMSNorm(w, 1e-6).forward(z), x, g, dx, rng)


def test_rmsnorm_weight_gradient_finite_differences():
    """∂L/∂w of L(w) = Σ RMSNorm(w)(x) ⊙ g: y is linear in w (x fixed), so a float64 central difference is exact up
    to round-off; float64 torch autograd agrees too."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 4, 9))
    w = 1 + 0.3 * rng.standard_normal(9)
    g = rng.standard_normal(x.shape)
    norm = RMSNorm(w, 1e-6, weight_grad=True)
    norm.forward(x)
    norm.backward(g)
    check_finite_differences(lambda v: RMSNorm(v, 1e-6).forward(x), w, g, norm.grad_weight, rng)
    tw = tt(w).requires_grad_()
    torch_rmsnorm(tt(x), tw, 1e-6).backward(tt(g))
    # each side is within 20 roundings (u = 2⁻⁵³) of the exact value, relative to Σ|g·x̂|: x̂ = x·r with r from a
    # mean of 9 squares (≤ 9u, halved by the square root), + eps, sqrt and divide (≤ 8u in all), the product g·x̂
    # (1u), the sum over 12 rows (≤ 11u); the two sides differ by at most twice that, 40u
    x_hat = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    bound = 40 * 2.0**-53 * np.abs(g * x_hat).reshape(-1, 9).sum(axis=0)
    assert np.all(np.abs(norm.grad_weight - tw.grad.numpy()) <= bound)


# ----------------------------------------------------------------------------------------------- RoPE
@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    # the ramp over dimensions 3-8 (of 16) at theta 5e5, rounded outwards; then unrounded, other betas, a given
    # attention factor; DeepSeek's mscale ratio
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
    {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096, "beta_fast": 16.0,
     "beta_slow": 2.0, "truncate": False, "attention_factor": 1.5},
    {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 0.707,
     "mscale_all_dim": 1.0},
])
def test_rope_inv_freq_matches_transformers(scaling):
    """The frequencies within 2e-7 (numpy's and torch's float32 pow may differ by an ulp; each later step is one
    float32 operation on either side) and the attention factor cos and sin are scaled by."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=2, rope_theta=500000.0, max_position_embeddings=16384,
                      rope_scaling=dict(scaling) if scaling else None)
    rope_type = scaling["rope_type"] if scaling else "default"
    if rope_type == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        expected, factor = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        expected, factor = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
    got = rope_inv_freq(32, 500000.0, scaling)
    np.testing.assert_allclose(got, expected.numpy(), rtol=2e-7)
    assert rope_attention_factor(scaling) == factor
    if rope_type == "yarn":  # kept, blended and interpolated frequencies all occur
        ratio = rope_inv_freq(32, 500000.0) / got
        assert ratio[0] == 1 and np.isclose(ratio[-1], scaling["factor"], rtol=1e-6)
        assert np.any((ratio > 1.01) & (ratio < scaling["factor"] * 0.99))


def test_yarn_scales_cos_and_sin_as_transformers_does():
    """transformers multiplies cos and sin by the attention factor in float32 (so every q·k by its square): exactly
    that product here. Against transformers' tables, positions within and beyond the original context: each side's
    float32 cos is within an ulp (numpy's libm, torch's own), so the unscaled tables differ by at most 2^-23, the
    scaled ones by factor·2^-23 plus a rounding of the product on each side, factor·2^-22 in all."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=2, rope_theta=100.0, max_position_embeddings=256,
                      rope_scaling=dict(scaling))
    positions = np.array([0, 1, 63, 64, 200])
    ours, plain = RotaryEmbedding(32, 100.0, scaling), RotaryEmbedding(32, 100.0)
    ours.inv_freq = plain.inv_freq = LlamaRotaryEmbedding(cfg).inv_freq.numpy()  # frequencies are compared above
    factor = 0.1 * np.log(4.0) + 1
    assert ours.attention_factor == pytest.approx(factor, rel=1e-15)
    for scaled, unscaled in zip(ours.cos_sin(positions), plain.cos_sin(positions), strict=True):
        assert np.array_equal(scaled, unscaled * np.float32(factor))
    theirs = LlamaRotaryEmbedding(cfg)(torch.zeros(1, 5, 32), torch.from_numpy(positions)[None])
    for table, their_table in zip(ours.cos_sin(positions), theirs, strict=True):
        assert np.max(np.abs(table - their_table[0].numpy())) <= factor * 2.0**-22


def test_rope_apply_and_backward_vs_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rng = np.random.default_rng(3)
    rope = RotaryEmbedding(8, 10000.0)
    cos, sin = rope.cos_sin(np.arange(6))
    q = rng.standard_normal((2, 3, 6, 8)).astype(np.float32)
    k = rng.standard_normal((2, 1, 6, 8)).astype(np.float32)
    gq, gk = rng.standard_normal(q.shape).astype(np.float32), rng.standard_normal(k.shape).astype(np.float32)
    tq, tk = tt(q).requires_grad_(), tt(k).requires_grad_()
    oq, ok = apply_rotary_pos_emb(tq, tk, tt(cos)[None], tt(sin)[None])
    (oq * tt(gq)).sum().backward()
    (ok * tt(gk)).sum().backward()
    grads_close(apply_rope(q, cos, sin), oq.detach().numpy(), 1e-6)
    grads_close(apply_rope(k, cos, sin), ok.detach().numpy(), 1e-6)
    grads_close(apply_rope_backward(gq, cos, sin), tq.grad.numpy())
    grads_close(apply_rope_backward(gk, cos, sin), tk.grad.numpy())


def test_rope_finite_differences():
    rng = np.random.default_rng(4)
    cos, sin = RotaryEmbedding(6, 100.0).cos_sin(np.arange(5))
    x = rng.standard_normal((2, 5, 6))
    g = rng.standard_normal(x.shape)
    check_finite_differences(lambda z: apply_rope(z, cos, sin), x, g, apply_rope_backward(g, cos, sin), rng)


# ----------------------------------------------------------------------------------------------- attention
def make_attention(rng, d=12, heads=6, kv_heads=2, head_dim=4, bias=False, dtype=np.float64, window=None,
                   qk_norm=False):
    """``qk_norm``: Qwen3's RMSNorm over each head's query and key, weights around 1."""
    q, kv = heads * head_dim, kv_heads * head_dim
    norms = None
    if qk_norm:
        norms = tuple(RMSNorm((1 + 0.3 * rng.standard_normal(head_dim)).astype(dtype), 1e-6) for _ in range(2))
    projs = [random_linear(rng, q, d, bias, dtype), random_linear(rng, kv, d, bias, dtype),
             random_linear(rng, kv, d, bias, dtype), random_linear(rng, d, q, False, dtype)]
    return Attention(*projs, heads, kv_heads, head_dim, RotaryEmbedding(head_dim, 10000.0), sliding_window=window,
                     qk_norms=norms)


def torch_attention(attn, x, positions=None):
    """The same computation in torch (transformers' eager attention); ``positions`` (B, T): packed rows, each token
    rotated by its position and masked by transformers' packed-sequence rule (tests/test_packing.py)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    B, T, _ = x.shape
    H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim

    def lin(m, z):
        y = z @ tt(m.weight).T
        return y if m.bias is None else y + tt(m.bias)

    q = lin(attn.q_proj, x).view(B, T, H, D).transpose(1, 2)
    k = lin(attn.k_proj, x).view(B, T, Hkv, D).transpose(1, 2)
    if attn.q_norm is not None:  # Qwen3
        q, k = torch_rmsnorm(q, tt(attn.q_norm.weight), 1e-6), torch_rmsnorm(k, tt(attn.k_norm.weight), 1e-6)
    v = lin(attn.v_proj, x).view(B, T, Hkv, D).transpose(1, 2)
    cos, sin = attn.rope.cos_sin(np.arange(T)[None] if positions is None else positions)  # (1 or B, T, D)
    q, k = apply_rotary_pos_emb(q, k, tt(cos).to(x.dtype), tt(sin).to(x.dtype))
    k, v = repeat_kv(k, H // Hkv), repeat_kv(v, H // Hkv)
    if positions is None:
        mask = tt(causal_mask(T, T, 0, attn.sliding_window)).to(x.dtype)
    else:
        from transformers.masking_utils import find_packed_sequence_indices

        seg, i = find_packed_sequence_indices(tt(positions)), torch.arange(T)
        allowed = (seg[:, :, None] == seg[:, None, :]) & (i[None, None, :] <= i[None, :, None])
        mask = torch.zeros(allowed.shape, dtype=x.dtype).masked_fill(~allowed, float("-inf"))[:, None]
    s = q @ k.transpose(2, 3) * D ** -0.5 + mask
    o = torch.softmax(s, dim=-1) @ v
    return lin(attn.o_proj, o.transpose(1, 2).reshape(B, T, H * D))


@pytest.mark.parametrize("bias,kv_heads,window,qk_norm", [(False, 2, None, False), (True, 3, None, False),
                                                          (False, 6, None, False), (False, 1, 3, False),
                                                          (False, 2, None, True)])
def test_attention_vs_autograd(bias, kv_heads, window, qk_norm):
    rng = np.random.default_rng(5)
    attn = make_attention(rng, kv_heads=kv_heads, bias=bias, dtype=np.float32, window=window, qk_norm=qk_norm)
    x = rng.standard_normal((2, 7, 12)).astype(np.float32)
    g = rng.standard_normal((2, 7, 12)).astype(np.float32)
    y = attn.forward(x)
    dx = attn.backward(g)
    tx = tt(x).requires_grad_()
    ty = torch_attention(attn, tx)
    ty.backward(tt(g))
    grads_close(y, ty.detach().numpy(), 1e-5)
    grads_close(dx, tx.grad.numpy(), 1e-5)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_finite_differences(qk_norm):
    rng = np.random.default_rng(6)
    attn = make_attention(rng, bias=True, qk_norm=qk_norm)
    x = rng.standard_normal((2, 5, 12))
    g = rng.standard_normal(x.shape)
    attn.forward(x)
    dx = attn.backward(g)
    check_finite_differences(lambda z: attn.forward(z), x, g, dx, rng)


def test_attention_kv_cache_equals_full_pass():
    rng = np.random.default_rng(7)
    attn = make_attention(rng, dtype=np.float32)
    x = rng.standard_normal((1, 6, 12)).astype(np.float32)
    full = attn.forward(x)
    cache = KVCache(1)
    parts = [attn.forward(x[:, :4], cache), attn.forward(x[:, 4:5], cache), attn.forward(x[:, 5:6], cache)]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-5, atol=1e-6)
    assert cache.length() == 6


# ----------------------------------------------------------------------------------------------- SwiGLU
def test_swiglu_vs_autograd_and_finite_differences():
    rng = np.random.default_rng(8)
    mlp = SwiGLU(random_linear(rng, 10, 6, dtype=np.float32), random_linear(rng, 10, 6, dtype=np.float32),
                 random_linear(rng, 6, 10, dtype=np.float32))
    x = (3 * rng.standard_normal((2, 4, 6))).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    y = mlp.forward(x)
    dx = mlp.backward(g)
    tx = tt(x).requires_grad_()
    w = lambda m: tt(m.weight)  # noqa: E731
    ty = (torch.nn.functional.silu(tx @ w(mlp.gate_proj).T) * (tx @ w(mlp.up_proj).T)) @ w(mlp.down_proj).T
    ty.backward(tt(g))
    grads_close(y, ty.detach().numpy(), 1e-6)
    grads_close(dx, tx.grad.numpy())

    mlp64 = SwiGLU(random_linear(rng, 10, 6), random_linear(rng, 10, 6), random_linear(rng, 6, 10))
    x64, g64 = 3 * rng.standard_normal((2, 4, 6)), rng.standard_normal((2, 4, 6))
    mlp64.forward(x64)
    check_finite_differences(mlp64.forward, x64, g64, mlp64.backward(g64), rng)


# ----------------------------------------------------------------------------------------------- block
def make_block(rng, dtype=np.float64, checkpointing=False):
    attn = make_attention(rng, dtype=dtype)
    mlp = SwiGLU(random_linear(rng, 20, 12, dtype=dtype), random_linear(rng, 20, 12, dtype=dtype),
                 random_linear(rng, 12, 20, dtype=dtype))
    n1 = RMSNorm((1 + 0.2 * rng.standard_normal(12)).astype(dtype))
    n2 = RMSNorm((1 + 0.2 * rng.standard_normal(12)).astype(dtype))
    return DecoderBlock(n1, attn, n2, mlp, checkpointing)


def test_block_vs_autograd():
    rng = np.random.default_rng(9)
    block = make_block(rng, np.float32)
    x = rng.standard_normal((2, 6, 12)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    y = block.forward(x)
    dx = block.backward(g)
    w = lambda m: tt(m.weight)  # noqa: E731
    tx = tt(x).requires_grad_()
    h = tx + torch_attention(block.self_attn, torch_rmsnorm(tx, w(block.input_layernorm), 1e-6))
    z = torch_rmsnorm(h, w(block.post_attention_layernorm), 1e-6)
    m = block.mlp
    ty = h + (torch.nn.functional.silu(z @ w(m.gate_proj).T) * (z @ w(m.up_proj).T)) @ w(m.down_proj).T
    ty.backward(tt(g))
    grads_close(y, ty.detach().numpy(), 1e-5)
    grads_close(dx, tx.grad.numpy(), 1e-5)


def test_block_finite_differences_and_checkpointing():
    rng = np.random.default_rng(10)
    block = make_block(rng)
    x = rng.standard_normal((1, 5, 12))
    g = rng.standard_normal(x.shape)
    y = block.forward(x)
    dx = block.backward(g)
    weight_grads = {n: m.grads["weight"].copy() for n, m in block.linears().items()}
    check_finite_differences(block.forward, x, g, dx, rng)

    block.gradient_checkpointing = True
    y2 = block.forward(x)
    assert block.self_attn._cache is None and block.mlp._cache is None  # only x is kept
    dx2 = block.backward(g)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(dx2, dx)
    for n, m in block.linears().items():
        np.testing.assert_array_equal(m.grads["weight"], weight_grads[n])


# grouped-query (kv_heads 3 of 6: groups of 2), multi-query (kv_heads 1: one key/value head for all 6 query heads)
# and the sliding window (a window of 2 or 3 over T = 6 masks keys that causality alone would allow), alone and
# together; test_attention_finite_differences covers kv_heads 2 without a window
GQA_WINDOW_CASES = [(3, None), (1, None), (2, 2), (1, 3), (6, 3)]


@pytest.mark.parametrize("kv_heads,window", GQA_WINDOW_CASES, ids=lambda v: f"{v}")
def test_attention_gqa_mqa_window_finite_differences(kv_heads, window):
    """Float64 central differences (eps 1e-6: truncation eps^2·|L'''| ~ 1e-12, round-off ~ 1e-16·|L|/eps ~ 1e-10,
    both far inside rtol 1e-6) of L(x) = Σ Attention(x) ⊙ G against <dx, v>, for the kv-head and window cases the
    other finite-difference test does not reach. The window must mask something: checked."""
    rng = np.random.default_rng(60 + kv_heads)
    attn = make_attention(rng, kv_heads=kv_heads, bias=True, window=window)
    x = rng.standard_normal((2, 6, 12))
    g = rng.standard_normal(x.shape)
    if window is not None:
        assert np.isinf(causal_mask(6, 6, 0, window)).sum() > np.isinf(causal_mask(6, 6, 0)).sum()
    attn.forward(x)
    dx = attn.backward(g)
    check_finite_differences(lambda z: attn.forward(z), x, g, dx, rng, n_dirs=4)


def _transformers_mask(t, s, past, sliding_window=None):
    """The additive (t, s) mask from transformers' own mask functions (masking_utils), not qlora_ref's
    ``causal_mask``: so a wrong window in the library shows up against torch, where finite differences of the
    library's own forward cannot see it."""
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

    fn = causal_mask_function if sliding_window is None else sliding_window_causal_mask_function(sliding_window)
    allowed = fn(0, 0, torch.arange(past, past + t)[:, None], torch.arange(s)[None, :]).numpy()
    return np.where(allowed, 0.0, -np.inf)


@pytest.mark.parametrize("kv_heads,window", GQA_WINDOW_CASES, ids=lambda v: f"{v}")
def test_attention_gqa_mqa_window_vs_float64_autograd(kv_heads, window, monkeypatch):
    """The same cases in float64 against transformers' eager attention (repeat_kv, its own mask functions) under
    torch autograd. Both sides compute the same sums in float64 in different orders; each output and gradient
    element is a short chain (projections of width 12 and 24, softmax over <= 6 keys, head dim 4) of O(1) values,
    so the two differ by a few hundred ulps at most: rtol 1e-12 of the largest element (2^-52 ~ 2.2e-16)."""
    import sys

    monkeypatch.setattr(sys.modules[__name__], "causal_mask", _transformers_mask)  # torch_attention's mask
    rng = np.random.default_rng(70 + kv_heads)
    attn = make_attention(rng, kv_heads=kv_heads, bias=True, window=window)
    x = rng.standard_normal((2, 6, 12))
    g = rng.standard_normal(x.shape)
    y = attn.forward(x)
    dx = attn.backward(g)
    tx = tt(x).requires_grad_()
    ty = torch_attention(attn, tx)
    ty.backward(tt(g))
    assert ty.dtype == torch.float64
    grads_close(y, ty.detach().numpy(), 1e-12)
    grads_close(dx, tx.grad.numpy(), 1e-12)
