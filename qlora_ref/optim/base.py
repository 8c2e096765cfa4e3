"""The optimizer interface shared by every reference optimizer (and mirrored by ``qlora_gpu.optim``).

Parameters are a ``dict`` name -> float32 ``ndarray`` and so are the gradients; ``step(params, grads)`` updates
the parameters in place. State is created lazily, per parameter name, on the first step that sees it.
``state_dict()`` is a *flat* ``dict`` ``"<param name>.<state key>" -> ndarray`` (so a checkpoint is one
safetensors file); the learning rate is a plain attribute (``opt.lr = ...``), set before each step by the
schedule.

Every optimizer here is *elementwise* apart from blockwise state quantization: element ``i`` of a parameter is
updated from element ``i`` of its gradient and states. A subclass therefore describes its states
(:meth:`Optimizer.state_layout`) and updates any contiguous run of elements (:meth:`Optimizer.update_chunk`);
the base class runs that on whole tensors, and the paged optimizers run it page by page.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StateSpec:
    """One state array of a parameter: its dtype and how many parameter elements one state element covers
    (1 for per-element states such as Adam's m and v, the block size for per-block quantization scales)."""

    dtype: np.dtype
    per: int = 1

    def numel(self, param_numel: int) -> int:
        return -(-param_numel // self.per)

    def shape(self, param_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Per-element states have the parameter's shape (like torch's and bitsandbytes'); others are flat."""
        n = int(np.prod(param_shape, dtype=np.int64))
        return tuple(param_shape) if self.per == 1 else (self.numel(n),)


def check_hparams(lr: float, betas, eps: float, weight_decay: float) -> tuple[float, float]:
    """AdamW's hyperparameters as torch accepts them (``betas`` two numbers in [0, 1)), refused with a
    ``ValueError`` naming the argument when built — one rule for both backends' optimizers. Returns ``betas`` as
    a pair of floats."""
    try:
        betas = tuple(float(b) for b in betas)
    except (TypeError, ValueError):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}") from None
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    return betas


class Optimizer:
    """Base class: hyperparameters, lazily created per-parameter state, the step loop and the flat state dict."""

    def __init__(self, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        betas = check_hparams(lr, betas, eps, weight_decay)
        self.lr = float(lr)
        self.betas = betas
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        #: per parameter name: {"step": int, "shape": tuple, <state key>: array}
        self.state: dict[str, dict] = {}

    # -- what subclasses implement -------------------------------------------------------------------------
    def state_layout(self, shape: tuple[int, ...]) -> dict[str, StateSpec]:
        """The state arrays a parameter of this shape gets (all start at zero)."""
        raise NotImplementedError

    def update_chunk(self, param: np.ndarray, grad: np.ndarray, states: dict[str, np.ndarray], step: int) -> None:
        """Update ``param`` and ``states`` in place for one run of elements (whole tensors, or flat slices
        whose start is a multiple of every ``StateSpec.per``)."""
        raise NotImplementedError

    # -- the interface ---------------------------------------------------------------------------------------
    def step(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        """One optimizer step for every parameter that has a gradient (a missing or ``None`` gradient is skipped,
        and that parameter's step counter does not advance, as in torch)."""
        for name, param in params.items():
            grad = grads.get(name)
            if grad is None:
                continue
            if not isinstance(param, np.ndarray) or param.dtype != np.float32:
                raise TypeError(f"parameter {name!r} must be a float32 ndarray (updated in place), got "
                                f"{type(param).__name__} {getattr(param, 'dtype', '')}")
            grad = np.asarray(grad, dtype=np.float32)
            if grad.shape != param.shape:
                raise ValueError(f"gradient of {name!r} has shape {grad.shape}, parameter has {param.shape}")
            state = self.state.get(name)
            if state is None:
                state = self.state[name] = self._new_state(param.shape)
            elif state["shape"] != param.shape:
                raise ValueError(f"parameter {name!r} has shape {param.shape}, its optimizer state {state['shape']}")
            state["step"] += 1
            self._update(param, grad, state)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat ``"<param>.<key>" -> ndarray`` (copies); the step counter is an int64 array of shape ``()``."""
        out: dict[str, np.ndarray] = {}
        for name, state in self.state.items():
            out[f"{name}.step"] = np.array(state["step"], dtype=np.int64)
            for key in self.state_layout(state["shape"]):
                out[f"{name}.{key}"] = np.array(self._read_state(state, key), copy=True)
        return out

    def load_state_dict(self, state_dict: Mapping[str, np.ndarray]) -> None:
        """Restore from :meth:`state_dict`'s output (replaces all state). Shapes come from the arrays; a key
        this optimizer does not know, or a missing one, is an error naming it."""
        names = sorted(k[: -len(".step")] for k in state_dict if k.endswith(".step"))
        known = {f"{n}.step" for n in names}
        new_state = {}
        for name in names:
            first = next((v for k, v in state_dict.items() if k.startswith(name + ".") and np.ndim(v) > 0), None)
            shape = self._shape_from_state_dict(name, state_dict, first)
            layout = self.state_layout(shape)
            arrays = {}
            for key, spec in layout.items():
                full = f"{name}.{key}"
                if full not in state_dict:
                    raise KeyError(f"optimizer state for {name!r} lacks {full!r}")
                a = np.asarray(state_dict[full])
                if a.shape != spec.shape(shape) or a.dtype != spec.dtype:
                    raise ValueError(f"{full!r} has shape {a.shape} {a.dtype}, expected {spec.shape(shape)} "
                                     f"{np.dtype(spec.dtype)}")
                arrays[key] = a
                known.add(full)
            new_state[name] = self._state_from_arrays(shape, int(np.asarray(state_dict[f"{name}.step"])), arrays)
        unknown = sorted(set(state_dict) - known)
        if unknown:
            raise KeyError(f"unknown optimizer state keys: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        self.state = new_state

    # -- storage of the states (the paged optimizers override these) ---------------------------------------------
    def _shape_from_state_dict(self, name, state_dict, first) -> tuple[int, ...]:
        for key, spec in self.state_layout((1,)).items():
            if spec.per == 1 and f"{name}.{key}" in state_dict:
                return tuple(np.shape(state_dict[f"{name}.{key}"]))
        raise KeyError(f"optimizer state for {name!r} has no per-element state to take its shape from")

    def _new_state(self, shape: tuple[int, ...]) -> dict:
        layout = self.state_layout(shape)
        return {"step": 0, "shape": tuple(shape),
                **{k: np.zeros(spec.shape(shape), dtype=spec.dtype) for k, spec in layout.items()}}

    def _state_from_arrays(self, shape, step: int, arrays: dict[str, np.ndarray]) -> dict:
        return {"step": step, "shape": tuple(shape), **{k: np.array(v, copy=True) for k, v in arrays.items()}}

    def _read_state(self, state: dict, key: str) -> np.ndarray:
        return state[key]

    def _update(self, param: np.ndarray, grad: np.ndarray, state: dict) -> None:
        states = {k: state[k] for k in self.state_layout(state["shape"])}
        self.update_chunk(param, grad, states, state["step"])
