"""Every place where qlora_gpu replaces a function of transformers, each behind a check.

qlora_gpu runs transformers' own decoder with three of its pieces swapped for cheaper equivalents (fewer kernel
launches, the same bits — on CUDA the fused RMSNorm reduces in another order, within one bfloat16 step,
docs/divergences.md; docs/benchmarks.md): the rotary embedding (``qlora_gpu.rope``), the RMSNorm
(``qlora_gpu.rms_norm.rms_norm``) and, for CUDA-graph capture, SDPA attention under a name that builds no mask.
Each of them rests on transformers' code being the code it was written against, and transformers changes weekly.
So each install first verifies its target — the signature, and the values on a tiny input against our
replacement — and otherwise leaves transformers' own function in place and warns once (``PatchFallbackWarning``):
training still works, only slower (an RMSNorm left alone still has its result cast back to the stream's dtype, as
the replacement does: the norm weights are float32). ``status()`` says what is active (``qlora doctor`` prints it).

Gradient checkpointing is not here: ``qlora_gpu.model`` wraps each decoder layer's ``forward`` itself (torch's
checkpoint, the LoRA dropout masks replayed), relying on nothing of transformers but that a decoder layer is an
``nn.Module`` called with its input first.
"""

from __future__ import annotations

import copy
import functools
import inspect
import sys
import warnings

import torch
from torch import nn

from . import packing
from .rms_norm import rms_norm
from .rope import rope, signed_sin


class PatchFallbackWarning(UserWarning):
    """A replacement of a transformers function was not installed: transformers' own code runs (slower, correct)."""


#: patch name -> what happened at its last install ("active", or "fallback: <why>")
_STATUS: dict[str, str] = {}
_WARNED: set[tuple[str, str]] = set()


def status() -> dict[str, str]:
    """Each patch's state at its last install in this process: ``"active"``, ``"fallback: <why>"``; patches not
    yet installed (no model built) are absent."""
    return dict(_STATUS)


def _record(name: str, ok: bool, why: str = "") -> bool:
    if ok:
        _STATUS[name] = "active"
        return True
    _STATUS[name] = f"fallback: {why}"
    if (name, why) not in _WARNED:
        _WARNED.add((name, why))
        warnings.warn(f"qlora_gpu: {name} not replaced ({why}); transformers' own code runs — training still "
                      "works, only slower", PatchFallbackWarning, stacklevel=3)
    return False


# ----------------------------------------------------------------------------------------------- rotary embedding
#: the attribute of the ``sin`` tensor that a marked rotary embedding returns: its ``sin_signed``
_MARK = "_qlora_sin_signed"


def _dispatcher(original, positional: tuple[str, ...], default_unsqueeze: int):
    """A drop-in ``apply_rotary_pos_emb``: ours when ``sin`` carries the mark of a model set up by
    ``use_fused_rope`` (and no gradient is asked of cos or sin), transformers' ``original`` otherwise.
    ``positional``: the original's parameters after ``sin`` that may come positionally (``unsqueeze_dim``, and in
    older versions a ``position_ids`` that must be None); ``unsqueeze_dim`` may always come by keyword."""
    keywords = set(positional) | {"unsqueeze_dim"}

    @functools.wraps(original, updated=())  # not __dict__: an nn.Module wrapper's would come along
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        sin_signed = getattr(sin, _MARK, None)
        if sin_signed is None or cos.requires_grad or sin.requires_grad:
            return original(q, k, cos, sin, *args, **kwargs)
        unsqueeze_dim = default_unsqueeze
        if args or kwargs:
            bound = dict(zip(positional, args, strict=False))
            if len(args) > len(positional) or bound.keys() & kwargs.keys() or not kwargs.keys() <= keywords:
                return original(q, k, cos, sin, *args, **kwargs)
            bound.update(kwargs)
            if bound.get("position_ids") is not None:
                return original(q, k, cos, sin, *args, **kwargs)
            unsqueeze_dim = bound.get("unsqueeze_dim", default_unsqueeze)
        return rope(q, k, cos, sin_signed, unsqueeze_dim)

    apply_rotary_pos_emb.__dict__["_qlora_original"] = original
    return apply_rotary_pos_emb


def _is_ours(fn) -> bool:
    return isinstance(getattr(fn, "__dict__", None), dict) and "_qlora_original" in fn.__dict__


def _rope_signature(fn):
    """(parameters after ``sin`` that may come positionally, default ``unsqueeze_dim`` or None to find by probing)
    of a standard ``apply_rotary_pos_emb``; None when the signature is not one we know. A callable taking only
    ``*args, **kwargs`` is a wrapper — transformers >= 5.2x makes the function an ``nn.Module`` through the
    ``kernels`` package's ``use_kernel_forward_from_hub`` — accepted with ``unsqueeze_dim`` by keyword only."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if [p.kind for p in params] == [inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD]:
        return (), None
    names = tuple(p.name for p in params)
    if names[:4] != ("q", "k", "cos", "sin") or names[4:] not in (("unsqueeze_dim",),
                                                                  ("position_ids", "unsqueeze_dim")):
        return None
    if any(p.kind is not p.POSITIONAL_OR_KEYWORD for p in params) or params[-1].default not in (1, 2) or (
            len(params) == 6 and params[4].default is not None):
        return None
    return names[4:], params[-1].default


def _probe_rope(fn, default: int | None) -> int | None:
    """The default ``unsqueeze_dim`` of ``fn`` if it gives our values on a small float64 case (GQA, both head
    layouts, ``unsqueeze_dim`` by keyword and by default), else None."""
    g = torch.Generator().manual_seed(0)
    cos, sin = torch.randn(2, 2, 3, 8, dtype=torch.float64, generator=g)
    layouts = {1: ((2, 4, 3, 8), (2, 2, 3, 8)), 2: ((2, 3, 4, 8), (2, 3, 2, 8))}
    found = None
    try:
        with torch.no_grad():
            for dim, (shape_q, shape_k) in layouts.items():
                q = torch.randn(shape_q, dtype=torch.float64, generator=g)
                k = torch.randn(shape_k, dtype=torch.float64, generator=g)
                ours = rope(q, k, cos, signed_sin(sin), dim)
                if not all(torch.equal(a, b) for a, b in zip(fn(q, k, cos, sin, unsqueeze_dim=dim), ours, strict=True)):
                    return None
                try:
                    plain = fn(q, k, cos, sin)
                except RuntimeError:  # the other layout's default: the shapes do not broadcast
                    continue
                if all(torch.equal(a, b) for a, b in zip(plain, ours, strict=True)):
                    found = dim
    except Exception:  # noqa: BLE001 - any surprise means: not the standard form, leave it alone
        return None
    return found if default is None or found == default else None


def _patch_rope_module(module) -> str:
    """Route ``module.apply_rotary_pos_emb`` through ``_dispatcher``, once; "" when done, else why not."""
    fn = getattr(module, "apply_rotary_pos_emb", None)
    if _is_ours(fn):
        return ""
    if not callable(fn) or not callable(getattr(module, "rotate_half", None)):
        return f"{module.__name__} has no apply_rotary_pos_emb/rotate_half pair"
    sig = _rope_signature(fn)
    if sig is None:
        return f"{module.__name__}.apply_rotary_pos_emb has a signature this version of qlora does not know"
    default = _probe_rope(fn, sig[1])
    if default is None:
        return f"{module.__name__}.apply_rotary_pos_emb does not compute q·cos + rotate_half(q)·sin"
    module.apply_rotary_pos_emb = _dispatcher(fn, sig[0], default)
    return ""


def _marked_rotary(forward, *args, **kwargs):
    """The rotary embedding's ``forward``, its ``sin`` marked with ``signed_sin(sin)`` (once per model forward;
    every layer's attention, and a checkpointed layer's recomputation, gets these same tensor objects)."""
    out = forward(*args, **kwargs)
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], torch.Tensor):
        setattr(out[1], _MARK, signed_sin(out[1]))
    return out


def use_fused_rope(hf: nn.Module) -> bool:
    """Route the rotary embedding of a transformers model's attention through ``qlora_gpu.rope.rope``: the modeling
    modules of its attention layers get ``_dispatcher`` as their ``apply_rotary_pos_emb`` (transformers calls it as
    a module global, so it cannot be swapped per model), and this model's rotary embedding marks the ``sin`` it
    returns (an instance ``forward``) — other models in the process, whose ``sin`` is unmarked, still run
    transformers' function. Idempotent. False, nothing of this model changed and a warning, when its modeling code
    is not the standard rotate-half form (checked on its signature and on values)."""
    rotary = getattr(getattr(hf, "model", hf), "rotary_emb", None)
    modules = {sys.modules.get(type(m).__module__) for m in hf.modules() if type(m).__name__.endswith("Attention")}
    if rotary is None or not modules or None in modules:
        return _record("rotary embedding", False, "the model has no rotary_emb or no attention module")
    reasons = [why for module in sorted(modules, key=lambda m: m.__name__) if (why := _patch_rope_module(module))]
    if reasons:
        return _record("rotary embedding", False, reasons[0])
    if not (isinstance(rotary.forward, functools.partial) and rotary.forward.func is _marked_rotary):
        rotary.forward = functools.partial(_marked_rotary, rotary.forward)
    return _record("rotary embedding", True)


# ----------------------------------------------------------------------------------------------- RMSNorm
#: (class, its forward) -> "" where ``_probe_rms_norm`` passed, else why not: a class whose forward is replaced later
#: (a hub kernel, a monkeypatch) is probed again
_RMS_NORM_CHECKED: dict[tuple[type, object], str] = {}


def _probe_rms_norm(norm: nn.Module) -> str:
    """"" if ``rms_norm(norm, x)`` equals the class's own forward rounded to x's dtype, bit for bit, on a CPU copy
    with a random weight (float32 and bfloat16 inputs), else why not."""
    if not hasattr(norm, "variance_epsilon"):  # e.g. Gemma's, whose ``eps`` goes with a (1 + weight) scale
        return f"{type(norm).__name__} has no variance_epsilon: not the form of transformers' LlamaRMSNorm"
    try:
        # the module with a CPU weight of its own (its weight may be a shard, a DTensor, of a model under FSDP)
        probe = copy.copy(norm)
        weight = torch.randn(tuple(norm.weight.shape), generator=torch.Generator().manual_seed(0))
        probe._parameters = {**norm._parameters, "weight": nn.Parameter(weight, norm.weight.requires_grad)}
        g = torch.Generator().manual_seed(1)
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(2, 3, probe.weight.shape[-1], generator=g) * 3).to(dtype)
            with torch.no_grad():
                theirs = type(norm).forward(probe, x).to(dtype)
                ours = rms_norm(probe, x)
            if not torch.equal(theirs, ours):
                return f"{type(norm).__name__}.forward is not x / rms(x) · weight as in transformers' LlamaRMSNorm"
    except Exception as e:  # noqa: BLE001 - any surprise means: leave it alone
        return f"{type(norm).__name__} could not be checked ({type(e).__name__}: {e})"
    return ""


def _own_forward_in_stream_dtype(norm: nn.Module, hidden: torch.Tensor, out_dtype=None) -> torch.Tensor:
    """The fallback: the norm class's own forward, its result cast to the stream's dtype (or ``out_dtype``) — a
    float32 weight (``prepare_model`` keeps norms in float32) promotes transformers' result to float32, which the
    next bfloat16 layer would refuse; ``rms_norm`` casts the same way."""
    return type(norm).forward(norm, hidden).to(out_dtype or hidden.dtype)


def use_fused_rms_norm(hf: nn.Module, out_dtype: torch.dtype | None = None, own: dict | None = None) -> bool:
    """Route every RMSNorm of a transformers model through ``qlora_gpu.rms_norm.rms_norm`` (an instance
    ``forward``, so forward hooks still run), returning ``out_dtype`` (None: the stream's dtype), where its class
    passes ``_probe_rms_norm`` (checked once per class and forward); ``own``: ``{norm: dtype}``, norms whose output
    has its own dtype (None: their input's) — the last norm, feeding the LM head; Qwen3's query/key norms, feeding
    the rotary embedding. False and a warning where some did not — a class
    named ``*RMSNorm`` of another form included, rather than skipped in silence: those run their class's own
    forward, cast the same way (``_own_forward_in_stream_dtype``)."""
    why = ""
    for module in hf.modules():
        if not type(module).__name__.endswith("RMSNorm"):
            continue
        dtype = own[module] if own and module in own else out_dtype
        key = type(module), type(module).forward
        if key not in _RMS_NORM_CHECKED:
            _RMS_NORM_CHECKED[key] = _probe_rms_norm(module)
        if _RMS_NORM_CHECKED[key]:
            why = why or _RMS_NORM_CHECKED[key]
            module.forward = functools.partial(_own_forward_in_stream_dtype, module, out_dtype=dtype)
            continue
        module.forward = functools.partial(rms_norm, module, out_dtype=dtype)
    return _record("RMSNorm", not why, why)


# ----------------------------------------------------------------------------------------------- causal SDPA
#: transformers' SDPA attention under a name transformers builds no mask for: causal through ``is_causal``. It
#: ignores a padding mask and packed position ids alike (no error), so only unpadded, unpacked batches may use it:
#: ``qlora_gpu.fast.graphs.GraphedStep`` refuses both while it does
CAUSAL_SDPA = "qlora_causal_sdpa"


@functools.cache
def register_causal_sdpa() -> str:
    """Register ``CAUSAL_SDPA`` with transformers' ``AttentionInterface`` (and not with its mask interface, so that
    ``create_causal_mask`` returns None for it and SDPA applies the causal mask itself) and return it — after
    checking on a tiny Llama that it gives SDPA's logits with a causal mask; otherwise ``"sdpa"`` (transformers
    then builds the mask tensor, and a CUDA-graph capture may refuse it: ``qlora_gpu.fast.graphs``) and a warning."""
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
        logits = {}
        with torch.device("cpu"), torch.no_grad():  # also when called while a model is laid out on meta
            model = _tiny_llama()
            ids = torch.arange(7)[None] * 5 % 32
            for impl in ("sdpa", CAUSAL_SDPA):
                model.config._attn_implementation = impl
                logits[impl] = model(input_ids=ids, use_cache=False).logits
        ok = torch.allclose(logits["sdpa"], logits[CAUSAL_SDPA], rtol=1e-5, atol=1e-6)
        why = "" if ok else "SDPA under a registered name does not give the causal SDPA's logits"
    except Exception as e:  # noqa: BLE001 - an API that moved: leave it alone
        why = f"transformers' attention interface could not be used ({type(e).__name__}: {e})"
    return CAUSAL_SDPA if _record("causal SDPA", not why, why) else "sdpa"


# ----------------------------------------------------------------------------------------------- packed attention
class PackingUnavailableError(RuntimeError):
    """Neither qlora's variable-length attention nor transformers' own keeps packed examples apart here."""


def _keeps_examples_apart(model: nn.Module, impl: str) -> bool:
    """Whether attention ``impl`` gives a packed row of two examples (positions restarting at 0, no attention mask,
    no cache: how ``QLoRAModel`` runs a packed batch) the logits of each example run alone."""
    ids = torch.arange(7)[None] * 5 % 32
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        alone = torch.cat([model(input_ids=ids[:, :4], use_cache=False).logits,
                           model(input_ids=ids[:, 4:], use_cache=False).logits], dim=1)
        model.config._attn_implementation = impl
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    return torch.allclose(packed, alone, rtol=1e-5, atol=1e-6)


@functools.cache
def register_varlen_attention() -> str | None:
    """Register ``qlora_gpu.packing.VARLEN`` with transformers and return it — after checking on a tiny Llama that
    a packed row gives each example's own logits (transformers must pass the position ids to the attention
    function). Otherwise None and a warning, where transformers' own attention keeps the examples apart from the
    position ids (slower: a dense mask); and ``PackingUnavailableError`` where it does not either, since training
    on examples that see each other would be silently wrong."""
    try:
        packing.register()
        with torch.device("cpu"):  # also when called while a model is laid out on the meta device
            ok = _keeps_examples_apart(_tiny_llama(), packing.VARLEN)
        why = "" if ok else "the variable-length attention did not receive the packed position ids"
    except Exception as e:  # noqa: BLE001 - an API that moved: leave it alone
        why = f"transformers' attention interface could not be used ({type(e).__name__}: {e})"
    if _record("packed attention", not why, why):
        return packing.VARLEN
    with torch.device("cpu"):
        apart = _keeps_examples_apart(_tiny_llama(), "sdpa")
    if not apart:
        raise PackingUnavailableError(f"packing is unavailable with transformers {_transformers_version()}: {why}, "
                                      "and its own attention lets packed examples see each other; train without "
                                      "packing")
    return None


def use_varlen_attention(hf: nn.Module) -> bool:
    """Switch a transformers model (its config and every sub-config) to ``VARLEN`` attention where
    ``register_varlen_attention`` passed; False where the model keeps its own attention (checked to keep packed
    examples apart)."""
    if register_varlen_attention() is None:
        return False
    for module in hf.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = packing.VARLEN
    return True


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _tiny_llama() -> nn.Module:
    """A one-layer transformers Llama with grouped-query heads, in eval mode (the self-checks' model), drawn
    without touching the caller's random state."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(cfg).eval()


def probe() -> dict[str, str]:
    """Install every patch on a tiny transformers Llama and return ``status()``: what a Llama-family model set up
    now would get (``qlora doctor``). A fallback is reported in the status, not warned."""
    try:
        hf = _tiny_llama()
    except Exception as e:  # noqa: BLE001 - no usable transformers: nothing would be patched
        return {"transformers": f"no Llama could be built ({type(e).__name__}: {e})"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PatchFallbackWarning)
        use_fused_rope(hf)
        use_fused_rms_norm(hf)
        register_causal_sdpa()
        try:
            register_varlen_attention()
        except PackingUnavailableError as e:
            _STATUS["packed attention"] = f"unavailable: {e}"
    return status()


__all__ = ["CAUSAL_SDPA", "PackingUnavailableError", "PatchFallbackWarning", "probe", "register_causal_sdpa",
           "register_varlen_attention", "status", "use_fused_rms_norm", "use_fused_rope", "use_varlen_attention"]
