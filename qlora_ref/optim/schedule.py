"""Learning-rate schedules, as transformers' ``get_scheduler`` computes them.

The QLoRA recipe (the paper's ``qlora.py`` scripts) passes ``lr_scheduler_type="constant"`` with
``warmup_ratio=0.03``. transformers' "constant" schedule takes no warmup (``get_scheduler`` returns
``get_constant_schedule(optimizer)`` for it and ignores ``num_warmup_steps``), so the paper's runs trained at the full
learning rate from the first step, and so does "constant" here. Issue 36: an earlier version warmed "constant" up
over ``ceil(0.03 * max_steps)`` steps from lr 0, and its loss curves lagged transformers + peft's by those steps.
The warmup variant is "constant_with_warmup"; "linear" and "cosine" warm up over ``warmup_steps`` and then decay:

    lr(step) = base_lr * step / warmup_steps      for step < warmup_steps
             = base_lr (constant_with_warmup), or the decay (linear, cosine)   afterwards

``step`` counts optimizer steps from 0, and the lr for step ``s`` is the one used *by* optimizer step ``s``
(so with warmup the very first update uses lr 0, exactly as with transformers' Trainer).
"""

from __future__ import annotations

import math


def warmup_steps(total_steps: int, warmup_ratio: float = 0.03) -> int:
    """``ceil(warmup_ratio * total_steps)``, transformers' ``TrainingArguments.get_warmup_steps``."""
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
    return math.ceil(total_steps * warmup_ratio)


def _warmup_factor(step: int, n_warmup: int) -> float | None:
    if step < n_warmup:
        return step / max(1, n_warmup)
    return None


def constant_with_warmup(step: int, base_lr: float, total_steps: int, warmup_ratio: float = 0.03,
                         n_warmup: int | None = None) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of transformers' "constant_with_warmup": the paper's
    constant schedule (Appendix B) with the scripts' 0.03 warmup applied, which "constant" ignores."""
    n_warmup = warmup_steps(total_steps, warmup_ratio) if n_warmup is None else n_warmup
    f = _warmup_factor(step, n_warmup)
    return base_lr * (1.0 if f is None else f)


#: the schedules ``get_lr`` knows, by transformers' names
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


def get_lr(name: str, step: int, base_lr: float, total_steps: int, warmup_ratio: float = 0.03,
           n_warmup: int | None = None) -> float:
    """``name``: "constant" (the paper's: no warmup, as transformers ignores it there), "constant_with_warmup",
    "linear" or "cosine" (decay to 0 after warmup)."""
    if name not in SCHEDULES:  # checked first: an unknown name must not return warmup rates
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    if name == "constant":
        return base_lr
    n_warmup = warmup_steps(total_steps, warmup_ratio) if n_warmup is None else n_warmup
    f = _warmup_factor(step, n_warmup)
    if f is not None:
        return base_lr * f
    if name == "constant_with_warmup":
        return base_lr
    progress = (step - n_warmup) / max(1, total_steps - n_warmup)
    if name == "linear":
        return base_lr * max(0.0, (total_steps - step) / max(1, total_steps - n_warmup))
    return base_lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))  # cosine
