"""Shared helpers for the model tests: a plain float linear layer and a finite-difference checker."""

from __future__ import annotations

import copy

import numpy as np


class DenseLinear:
    """The linear-layer protocol the blocks use (forward / backward / grads / parameters), without LoRA:
    y = x W^T + b. Keeps the dtype it is given, so finite differences can run in float64."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None = None):
        self.weight, self.bias = weight, bias
        self.grads: dict = {}
        self._x = None

    def forward(self, x):
        self._x = x
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias

    def backward(self, grad):
        self.grads["weight"] = np.tensordot(grad, self._x, axes=(tuple(range(grad.ndim - 1)),) * 2)
        return grad @ self.weight

    def parameters(self):
        return {}

    def clear_cache(self):
        self._x = None


def random_linear(rng, out_f, in_f, bias=False, dtype=np.float64, scale=None):
    scale = scale if scale is not None else 1 / np.sqrt(in_f)
    w = (rng.standard_normal((out_f, in_f)) * scale).astype(dtype)
    b = (rng.standard_normal(out_f) * 0.1).astype(dtype) if bias else None
    return DenseLinear(w, b)


def check_finite_differences(f, x, grad_out, grad_x, rng, eps=1e-6, n_dirs=3):
    """Directional derivatives of L(x) = sum(f(x) * grad_out) against <grad_x, v> for random directions v.

    f must be float64 throughout. The central difference D(h) = (L(x+hv) - L(x-hv)) / 2h misses the derivative by
    a truncation error h^2 |L'''| / 6 plus a rounding error of at most |dL| / h, where dL, the error of one float64
    evaluation of L, is at most (k + log2 n) u sum|f(x) * grad_out| for a computation k roundings deep summed over
    n terms; k + log2 n = 64 covers every layer tested here (a transformer block is ~30 deep). The truncation is
    bounded by |D(2h) - D(h)| (3 h^2 |L'''| / 6 to leading order), which does not depend on grad_x. A wrong
    gradient shows once it is off by ~1e-8 of the loss's scale (the tolerance was 1e-6 of |<grad_x, v>|).
    """
    u = np.finfo(np.float64).eps / 2
    for _ in range(n_dirs):
        v = rng.standard_normal(x.shape)

        def central(h, v=v):
            return (np.sum(f(x + h * v) * grad_out) - np.sum(f(x - h * v) * grad_out)) / (2 * h)

        numeric, numeric_2h = central(eps), central(2 * eps)
        analytic = np.sum(grad_x * v)
        rounding = 64 * u * np.sum(np.abs(f(x) * grad_out)) / eps
        truncation = abs(numeric_2h - numeric)
        assert abs(numeric - analytic) <= rounding + truncation, (numeric, analytic, rounding, truncation)

# ----------------------------------------------------------------------------------------------- HF models
SMALL_CONFIGS = {
    # grouped-query heads (5 query heads share 1 key/value head), odd vocabulary and MLP sizes, untied head
    "llama-gqa": dict(arch="llama", vocab_size=97, hidden_size=40, intermediate_size=67, num_hidden_layers=2,
                      num_attention_heads=5, num_key_value_heads=1, tie_word_embeddings=False),
    # tied embeddings, head_dim given explicitly (query width 24 != hidden 36), Llama 3 rope scaling
    "llama-tied-llama3": dict(arch="llama", vocab_size=61, hidden_size=36, intermediate_size=50, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=6, tie_word_embeddings=True,
                              rope_theta=500000.0,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
    # Qwen2: q/k/v biases, tied embeddings
    "qwen2": dict(arch="qwen2", vocab_size=83, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True),
    # Qwen3: each head's query and key normalized before the rotation, head_dim given (query width 64 != hidden 40)
    "qwen3": dict(arch="qwen3", vocab_size=89, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
    # Qwen2 extended by YaRN (as Qwen2.5's model cards add it for long inputs): theta 100 and an original context
    # of 1024 put the ramp over dimensions 2-7, so head dims 12 hold kept, blended and interpolated frequencies
    "qwen2-yarn": dict(arch="qwen2", vocab_size=83, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=100.0,
                       max_position_embeddings=4096,
                       rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}),
}


def make_hf_model(arch="llama", seed=0, **kwargs):
    """A small transformers causal LM with every parameter random (norm weights around 1, biases non-zero),
    float32, eager attention."""
    import torch
    import transformers

    cls_cfg, cls_model = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                          "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                          "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
                          "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[arch]
    kwargs.setdefault("rms_norm_eps", 1e-5)
    kwargs.setdefault("max_position_embeddings", 128)
    config = cls_cfg(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls_model(config).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    return model


def small_hf_model(name, seed=0):
    kwargs = copy.deepcopy(SMALL_CONFIGS[name])  # transformers 5 writes rope_theta into the rope_scaling it is given
    return make_hf_model(kwargs.pop("arch"), seed=seed, **kwargs)


def max_rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def lora_step(model, ids):
    """One training step of a ``qlora_gpu`` model on ``ids`` (1, T), the global seed fixed and dropout masks drawn
    from the model's seeded generators: the logits, the next-token loss and every LoRA gradient (copies)."""
    import torch

    torch.manual_seed(0)
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    loss.backward()
    return logits.detach(), loss.detach(), {k: g.clone() for k, g in model.lora_grads().items()}


def count_calls(monkeypatch, owner, name: str, key: str = "calls"):
    """``owner.<name>`` wrapped, for the test's duration, to count its calls: the returned Counter's ``key``."""
    import collections

    calls = collections.Counter()
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls[key] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls
