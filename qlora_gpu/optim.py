"""Optimizers for the GPU backend: torch's AdamW and bitsandbytes' paged / 8-bit AdamW behind the reference's
interface and names.

``make_optimizer(name, ...)`` takes the same names as ``qlora_ref.optim.make_optimizer``
("adamw", "paged_adamw", "adamw_8bit", "paged_adamw_8bit", and the aliases, e.g. transformers'
"paged_adamw_32bit") and returns an object with the reference's methods:

- ``step(params, grads)``: ``params`` a dict name -> tensor (leaf tensors; updated in place), ``grads`` a dict
  name -> tensor (a missing or ``None`` gradient skips that parameter, as in the reference),
- ``lr`` settable before each step (the warmup schedule, ``qlora_ref.optim.schedule``, is shared),
- ``state_dict()`` / ``load_state_dict()`` as a flat dict ``"<param>.<key>" -> tensor`` with the same keys as the
  reference optimizer of that name (torch: ``exp_avg``/``exp_avg_sq``; bitsandbytes: ``state1``/``state2``,
  and for 8-bit states ``absmax1``/``absmax2``/``qmap1``/``qmap2``; ``step`` an int64 scalar), so checkpoints
  move between the backends.

The paging itself is bitsandbytes': its paged optimizers allocate state tensors of 100k elements or more in CUDA
unified memory, and the driver evicts them to CPU RAM under memory pressure (docs/paged_optimizers.md). On a
machine without CUDA bitsandbytes falls back to ordinary tensors (and warns); the arithmetic is unchanged, which
is how the tests compare the backends on CPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch

from qlora_ref.optim import canonical_optimizer_name

_BNB_CLASSES = {"paged_adamw": "PagedAdamW", "adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit"}


def _torch_class(name: str):
    if name == "adamw":
        return torch.optim.AdamW
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - bitsandbytes is in the gpu extra
        raise ImportError(f"optimizer {name!r} needs bitsandbytes: pip install 'qlora[gpu]' ({e})") from e
    return getattr(bnb.optim, _BNB_CLASSES[name])


class TorchOptimizer:
    """A torch / bitsandbytes optimizer built lazily on the first ``step`` over the parameters it is given."""

    def __init__(self, name: str, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, **kwargs):
        self.name = canonical_optimizer_name(name)
        self._cls = _torch_class(self.name)
        self._kwargs = dict(betas=tuple(betas), eps=eps, weight_decay=weight_decay, **kwargs)
        if self.name == "adamw":
            self._kwargs.setdefault("foreach", None)
        self._lr = float(lr)
        self._opt: torch.optim.Optimizer | None = None
        self._names: list[str] = []
        self._pending_state: dict | None = None

    # -- lr -------------------------------------------------------------------------------------------------------
    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = float(value)
        if self._opt is not None:
            for group in self._opt.param_groups:
                group["lr"] = self._lr

    # -- step ------------------------------------------------------------------------------------------------------
    def _build(self, params: Mapping[str, torch.Tensor]) -> None:
        self._names = list(params)
        tensors = list(params.values())
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Pp]aged.*")  # bitsandbytes' CPU fallback notice
            self._opt = self._cls(tensors, lr=self._lr, **self._kwargs)
        if self._pending_state is not None:
            pending, self._pending_state = self._pending_state, None
            self._load(pending)

    @torch.no_grad()
    def step(self, params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor | None]) -> None:
        if self._opt is None:
            self._build(params)
        elif list(params) != self._names:
            raise ValueError("step() must get the same parameter names, in the same order, every time")
        saved = {}
        for name, p in params.items():
            saved[name] = p.grad
            g = grads.get(name)
            if g is not None and g.shape != p.shape:
                raise ValueError(f"gradient of {name!r} has shape {tuple(g.shape)}, parameter has {tuple(p.shape)}")
            p.grad = None if g is None else g.to(device=p.device, dtype=p.dtype)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*[Pp]aged.*")
                self._opt.step()
        finally:
            for name, p in params.items():
                p.grad = saved[name]

    # -- state -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self._opt is None:
            return out
        params = self._opt.param_groups[0]["params"]
        for name, p in zip(self._names, params, strict=True):
            state = self._opt.state.get(p)
            if not state:
                continue
            for key, value in state.items():
                if key == "step":
                    out[f"{name}.step"] = torch.tensor(int(value), dtype=torch.int64)
                elif torch.is_tensor(value):
                    out[f"{name}.{key}"] = value.detach().clone()
        return out

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a flat state dict (this backend's or the reference's, as tensors or arrays). Before the first
        ``step`` the optimizer does not know its parameters yet, so the state is kept until then."""
        sd = {k: torch.as_tensor(v) for k, v in state_dict.items()}
        if self._opt is None:
            self._pending_state = sd
        else:
            self._load(sd)

    def _load(self, sd: dict[str, torch.Tensor]) -> None:
        params = self._opt.param_groups[0]["params"]
        by_name = dict(zip(self._names, params, strict=True))
        known = set()
        for name, p in by_name.items():
            if f"{name}.step" not in sd:
                continue
            prefix = name + "."
            keys = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
            known.update(f"{name}.{k}" for k in keys)
            step = int(keys.pop("step"))
            state = {}
            for key, value in keys.items():
                state[key] = value.to(p.device).clone()
            if self.name == "adamw":
                state["step"] = torch.tensor(float(step), dtype=torch.float32)
            else:
                state["step"] = step
            self._opt.state[p] = state
        unknown = sorted(set(sd) - known)
        if unknown:
            raise KeyError(f"unknown optimizer state keys: {unknown[:5]}")


def make_optimizer(name: str, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                   **kwargs) -> TorchOptimizer:
    """``make_optimizer("paged_adamw", lr=2e-4, weight_decay=0.0)``: the reference's names, torch/bitsandbytes
    underneath. The reference's simulation options (``memory``, ``budget_bytes``, ``page_bytes``) mean nothing
    here — the GPU's own memory is the budget — and are refused. Extra keywords go to the underlying class
    (for 8-bit: ``min_8bit_size``)."""
    for k in ("memory", "budget_bytes", "page_bytes", "keep_v_positive"):
        if k in kwargs:
            raise ValueError(f"{k!r} is an option of the reference's simulation; bitsandbytes has none")
    return TorchOptimizer(name, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)


def clip_grad_norm(grads: Mapping[str, torch.Tensor | None], max_norm: float, norm_type: float = 2.0,
                   error_if_nonfinite: bool = False) -> float:
    """``torch.nn.utils.clip_grad_norm_`` on a dict of gradient tensors (scaled in place); returns the total norm,
    as ``qlora_ref.optim.clip_grad_norm`` does for arrays."""
    tensors = [g for g in grads.values() if g is not None]
    if not tensors:
        return 0.0
    norms = torch.stack([torch.linalg.vector_norm(g.detach(), norm_type) for g in tensors])
    total = torch.linalg.vector_norm(norms, norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite ({float(total)})")
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in tensors:
        g.mul_(coef.to(g.device, g.dtype))
    return float(total)
