"""Learning-rate schedules with linear warmup, as transformers' ``get_scheduler`` computes them.

The QLoRA recipe (the paper's scripts) uses ``lr_scheduler_type="constant"`` with ``warmup_ratio=0.03``, which
transformers turns into "constant with warmup" over ``ceil(0.03 * max_steps)`` steps:

    lr(step) = base_lr * step / warmup_steps      for step < warmup_steps
             = base_lr                             afterwards

``step`` counts optimizer steps from 0, and the lr for step ``s`` is the one used *by* optimizer step ``s``
(so the very first update uses lr 0 when there is warmup, exactly as with transformers' Trainer).
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
    """The learning rate for optimizer step ``step`` (0-based) of the paper's constant schedule."""
    n_warmup = warmup_steps(total_steps, warmup_ratio) if n_warmup is None else n_warmup
    f = _warmup_factor(step, n_warmup)
    return base_lr * (1.0 if f is None else f)


def get_lr(name: str, step: int, base_lr: float, total_steps: int, warmup_ratio: float = 0.03,
           n_warmup: int | None = None) -> float:
    """``name``: "constant" (with warmup, the paper's), "linear" or "cosine" (decay to 0 after warmup)."""
    n_warmup = warmup_steps(total_steps, warmup_ratio) if n_warmup is None else n_warmup
    f = _warmup_factor(step, n_warmup)
    if f is not None:
        return base_lr * f
    if name in ("constant", "constant_with_warmup"):
        return base_lr
    progress = (step - n_warmup) / max(1, total_steps - n_warmup)
    if name == "linear":
        return base_lr * max(0.0, (total_steps - step) / max(1, total_steps - n_warmup))
    if name == "cosine":
        return base_lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"schedule must be 'constant', 'linear' or 'cosine', got {name!r}")
