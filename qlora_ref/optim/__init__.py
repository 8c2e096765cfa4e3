"""Reference optimizers (NumPy): AdamW, its paged and 8-bit variants, gradient clipping and the LR schedule.

All share one interface (``qlora_ref.optim.base.Optimizer``): ``step(params, grads)`` on dicts of float32
arrays, ``lr`` settable before each step, ``state_dict()`` / ``load_state_dict()`` as flat dicts of arrays.
:func:`make_optimizer` builds one by the names that ``qlora_gpu.optim`` also understands.
"""

from __future__ import annotations

from .adamw import AdamW, adamw_update
from .adamw8bit import AdamW8bit, PagedAdamW8bit
from .base import Optimizer, StateSpec
from .clip import clip_grad_norm, grad_norm
from .paged import DeviceMemory, DeviceOutOfMemory, PagedAdamW, PagedArray, PagedOptimizer
from .schedule import constant_with_warmup, get_lr, warmup_steps

#: the former name of the float32 AdamW the paged one is built on (it was a copy of ``AdamW``)
AdamW32 = AdamW

#: canonical optimizer names (the GPU backend maps the same names to torch / bitsandbytes classes)
OPTIMIZERS = {
    "adamw": AdamW,
    "paged_adamw": PagedAdamW,
    "adamw_8bit": AdamW8bit,
    "paged_adamw_8bit": PagedAdamW8bit,
}

#: other spellings, including transformers' ``TrainingArguments.optim`` values (the paper: paged_adamw_32bit)
ALIASES = {
    "adamw_torch": "adamw",
    "adamw_32bit": "adamw",
    "paged_adamw_32bit": "paged_adamw",
    "adamw_bnb_8bit": "adamw_8bit",
    "adamw8bit": "adamw_8bit",
    "paged_adamw8bit": "paged_adamw_8bit",
}


def canonical_optimizer_name(name: str) -> str:
    """The canonical name for ``name`` (case-insensitive, "-" or "_"); a ValueError listing the choices."""
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in OPTIMIZERS:
        choices = sorted(OPTIMIZERS) + sorted(ALIASES)
        raise ValueError(f"optimizer must be one of {choices}, got {name!r}")
    return key


def make_optimizer(name: str, **kwargs) -> Optimizer:
    """``make_optimizer("paged_adamw", lr=2e-4, weight_decay=0.0, budget_bytes=...)``. Paging options
    (``memory``, ``budget_bytes``, ``page_bytes``) only apply to the paged optimizers."""
    cls = OPTIMIZERS[canonical_optimizer_name(name)]
    if not issubclass(cls, PagedOptimizer):
        for k in ("memory", "budget_bytes", "page_bytes"):
            if kwargs.pop(k, None) is not None:
                raise ValueError(f"{k} only applies to the paged optimizers, not {name!r}")
    return cls(**kwargs)



__all__ = [
    "ALIASES", "OPTIMIZERS", "AdamW", "AdamW32", "AdamW8bit", "DeviceMemory", "DeviceOutOfMemory", "Optimizer",
    "PagedAdamW", "PagedAdamW8bit", "PagedArray", "PagedOptimizer", "StateSpec", "adamw_update",
    "canonical_optimizer_name", "clip_grad_norm", "constant_with_warmup", "get_lr", "grad_norm", "make_optimizer",
    "warmup_steps",
]
