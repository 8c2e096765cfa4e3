"""Text generation with a KV cache: greedy decoding and sampling with temperature and nucleus (top-p) filtering.

The prompt is run once through the model, which stores every layer's rotated keys and values in a ``KVCache``;
each new token then costs one forward pass over a single position that attends to the cached ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from numbers import Integral, Real

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


#: the largest seed of a generation: NumPy's generators take any integer >= 0, torch's ``manual_seed`` one up to
#: 2**64-1 (and negative ones, which NumPy refuses); both backends take what both accept
MAX_SEED = 2**64 - 1


def check_seed(seed) -> None:
    """A generation's ``seed``: None (unseeded) or an integer from 0 to ``MAX_SEED``. Shared by both backends."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed <= MAX_SEED):
        raise ValueError(f"seed must be an integer from 0 to 2**64-1, got {seed!r}")


#: the smallest sampling temperature: below it sampling is greedy decoding up to float rounding, and the torch
#: backend's float32 logits / temperature overflow (transformers' temperature warper divides before the softmax)
MIN_TEMPERATURE = 1e-4


def check_sampling(temperature: float, top_p: float) -> None:
    """temperature: 0 (greedy) or a finite number >= ``MIN_TEMPERATURE``; top_p: in (0, 1]. Shared by both
    backends."""
    if isinstance(temperature, bool) or not isinstance(temperature, Real) or not (
            math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {temperature!r}: a "
                         "smaller one samples as greedy decoding does, up to float rounding, and overflows float32")
    if isinstance(top_p, bool) or not isinstance(top_p, Real) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1: no nucleus filtering), got {top_p!r}")


def check_generation(prompt_tokens: int | None, max_new_tokens, temperature: float = 0.0, top_p: float = 1.0,
                     context: int | None = None, seed=None) -> None:
    """The arguments of a generation, checked before any work (both backends call this): at least one new token,
    sampling settings in range (:func:`check_sampling`), a seed both backends accept (:func:`check_seed`; checked
    at temperature 0 too, where it is unused, so that a command's validity does not depend on it), a non-empty
    prompt (``prompt_tokens``; None: not known yet) and prompt + new tokens within the model's ``context``
    (``max_position_embeddings``): positions past it were never trained and its rotary embedding is not defined
    for them."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    check_sampling(temperature, top_p)
    check_seed(seed)
    if prompt_tokens is None:
        return
    if prompt_tokens < 1:
        raise ValueError("the prompt is empty: generation needs a prompt of at least one token")
    if context is not None and prompt_tokens + max_new_tokens > context:
        raise ValueError(f"the prompt ({prompt_tokens} tokens) and max_new_tokens ({max_new_tokens}) exceed the "
                         f"model's context of {context} tokens (max_position_embeddings): shorten the prompt or "
                         "ask for fewer new tokens")


def next_token(logits: np.ndarray, temperature: float = 0.0, top_p: float = 1.0,
               rng: np.random.Generator | None = None) -> int:
    """Greedy (temperature 0) or sampled next token from one position's logits."""
    check_sampling(temperature, top_p)
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
    """The prompt's ids followed by the new ones, as transformers' ``generate`` returns them (both backends:
    ``out[len(input_ids):]`` is the continuation). Stops after ``max_new_tokens`` or at an end-of-sequence token
    (default: the model config's ``eos_token_id``), which is kept; ``stream`` is called with each new token as it
    is produced. Arguments are checked first (:func:`check_generation`): prompt + new tokens must fit the
    context."""
    prompt = [int(t) for t in input_ids]
    check_generation(len(prompt), max_new_tokens, temperature, top_p, model.config.max_position_embeddings, seed)
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
    return prompt + out


def answer(model, tokenizer, prompt: str, max_new_tokens: int = 40, *, raw: bool = False, **sampling) -> str:
    """The decoded answer of ``model`` (either backend's model, or a trainer: anything with ``generate``) to one
    question: the prompt formatted as training formats it (``qlora_ref.data.prompt_ids``; with ``raw`` only
    tokenized), greedy unless ``sampling`` (``temperature``, ``top_p``, ``seed``) says otherwise, stopped at EOS."""
    if not raw:
        return reply(model, tokenizer, [{"role": "user", "content": prompt}], max_new_tokens, **sampling)
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    out = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id, **sampling)
    return tokenizer.decode(out[len(ids):], skip_special_tokens=True).strip()


def reply(model, tokenizer, messages: list[dict], max_new_tokens: int = 40, **sampling) -> str:
    """The decoded answer of ``model`` to a conversation (``{"role", "content"}`` messages ending with a user turn),
    formatted as training formats it (``qlora generate --chat``). Where the conversation and ``max_new_tokens``
    would not fit the model's context, its oldest exchanges (a user turn and its answer; a leading system message
    stays) are left out of the prompt."""
    from ..data.pipeline import prompt_ids

    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    messages = list(messages)
    ids = prompt_ids(tokenizer, messages)
    first = 1 if messages[0].get("role") == "system" else 0
    while context is not None and len(ids) + max_new_tokens > context and len(messages) - first > 2:
        del messages[first:first + 2]
        ids = prompt_ids(tokenizer, messages)
    out = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id, **sampling)
    return tokenizer.decode(out[len(ids):], skip_special_tokens=True).strip()
