"""Text generation with a KV cache: greedy decoding and sampling with temperature and nucleus (top-p) filtering.

The prompt is run once through the model, which stores every layer's rotated keys and values in a ``KVCache``;
each new token then costs one forward pass over a single position that attends to the cached ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np


def top_p_filter(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p`` (at least one); renormalize.

    Like transformers' ``TopPLogitsWarper``: tokens are sorted by probability and a token is dropped when the
    probability mass before it already exceeds ``top_p``.
    """
    if top_p >= 1.0:
        return probs
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    keep_sorted = (cumulative - probs[order]) < top_p  # mass *before* the token
    keep_sorted[0] = True
    filtered = np.zeros_like(probs)
    filtered[order[keep_sorted]] = probs[order[keep_sorted]]
    return filtered / filtered.sum()


def next_token(logits: np.ndarray, temperature: float = 0.0, top_p: float = 1.0,
               rng: np.random.Generator | None = None) -> int:
    """Greedy (temperature 0) or sampled next token from one position's logits."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0.0:
        return int(np.argmax(logits))
    z = np.asarray(logits, dtype=np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    probs = top_p_filter(probs, top_p)
    rng = rng if rng is not None else np.random.default_rng()
    return int(rng.choice(probs.size, p=probs))


def generate(model, input_ids: Iterable[int], max_new_tokens: int = 32, temperature: float = 0.0,
             top_p: float = 1.0, eos_token_id: int | Iterable[int] | None = None, seed: int | None = None,
             stream: Callable[[int], None] | None = None) -> list[int]:
    """The new token ids (without the prompt). Stops after ``max_new_tokens`` or at an end-of-sequence token
    (default: the model config's ``eos_token_id``); ``stream`` is called with each token as it is produced."""
    prompt = [int(t) for t in input_ids]
    if not prompt:
        raise ValueError("generation needs a prompt of at least one token")
    if eos_token_id is None:
        eos = set(model.config.eos_token_ids)
    else:
        eos = {int(eos_token_id)} if np.isscalar(eos_token_id) else {int(t) for t in eos_token_id}
    rng = np.random.default_rng(seed)
    cache = model.new_kv_cache()
    logits = model.forward(np.asarray([prompt]), kv_cache=cache, last_only=True)[0, -1]
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = next_token(logits, temperature, top_p, rng)
        out.append(token)
        if stream is not None:
            stream(token)
        if token in eos:
            break
        logits = model.forward(np.asarray([[token]]), kv_cache=cache, last_only=True)[0, -1]
    return out
