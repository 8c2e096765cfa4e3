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

**One flat buffer** for bitsandbytes' 32-bit optimizers (``paged_adamw``; ``flat=None`` chooses it whenever the
parameters share a device and dtype): the parameters are re-pointed into one contiguous tensor (each slice starting
on a 512-byte boundary, ``flat_layout``), their gradients into a second one, and bitsandbytes updates that single
tensor. bitsandbytes' ``step`` is a Python loop that,
for every parameter, prefetches its paged state, launches one update kernel and calls ``torch.cuda.synchronize()``
(bitsandbytes 0.50; its open PR #2050 describes the per-parameter synchronisation): 448 times a step for LLaMA-7B's
adapters, 1 time here. The update is elementwise, so the parameters and states are bit-identical to the
per-parameter loop (``tests/test_optim_flat.py``). Gradients stay in their buffer: ``zero_grad`` zeroes it in place and
autograd accumulates into it, so the buffer costs no memory beyond the gradients themselves. The 8-bit optimizers
keep one state per parameter: their 256-element blocks and ``min_8bit_size`` are per tensor, and flattening would
change their arithmetic.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping

import torch

from qlora_ref.optim import canonical_optimizer_name
from qlora_ref.optim.base import check_hparams

_BNB_CLASSES = {"paged_adamw": "PagedAdamW", "adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit"}
#: optimizers whose update is elementwise over 32-bit states, so that one flat buffer changes no arithmetic
FLAT_OPTIMIZERS = ("paged_adamw",)
#: on each tensor of a flat buffer (its ``__dict__``): (weak reference to its ``FlatBuffer``, its index there), for
#: ``qlora_gpu.fast.deferred_grads``, which writes the layers' gradients into the buffer in one operation per pass
FLAT_BUFFER = "_qlora_flat_buffer"
#: bitsandbytes' update kernels count elements in a 32-bit int: the largest buffer they can take in one launch
FLAT_MAX_NUMEL = 2**31 - 1
#: each parameter's slice of the flat buffer starts at a multiple of this many bytes, the alignment of torch's CUDA
#: caching allocator: CUDA kernels choose vectorised paths by address (``torch._foreach_norm`` sums in another
#: order on a misaligned tensor), so a slice must sit as a separately allocated tensor would
FLAT_ALIGN_BYTES = 512


def _check_unchanged(name: str, t: torch.Tensor, built: torch.Tensor) -> None:
    """A parameter handed to the optimizer in place of the one it was built over must have its shape, dtype and
    device; anything else needs a new optimizer."""
    if t.shape != built.shape or t.dtype != built.dtype or t.device != built.device:
        raise ValueError(f"parameter {name!r} changed to {tuple(t.shape)} {t.dtype} on {t.device} after the optimizer "
                         f"was built for {tuple(built.shape)} {built.dtype} on {built.device}: build a new optimizer "
                         "(or move the model before building it)")


def flat_layout(numels: list[int], element_size: int) -> tuple[list[int], int]:
    """Where each tensor of ``numels`` elements starts in the flat buffer (in elements, each start aligned to
    ``FLAT_ALIGN_BYTES``) and the buffer's length. The gaps (under 512 bytes each) stay zero, and AdamW keeps a
    zero with a zero gradient zero."""
    step = max(1, FLAT_ALIGN_BYTES // element_size)
    starts, end = [], 0
    for n in numels:
        start = -(-end // step) * step
        starts.append(start)
        end = start + n
    return starts, end


#: bitsandbytes' optimizers without paging: the same update on states in ordinary memory
_UNPAGED = {"PagedAdamW": "AdamW", "PagedAdamW8bit": "AdamW8bit"}


def _torch_class(name: str, paged: bool = True):
    if name == "adamw":
        return torch.optim.AdamW
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - bitsandbytes is in the gpu extra
        raise ImportError(f"optimizer {name!r} needs bitsandbytes: pip install 'qlora[gpu]' ({e})") from e
    cls = _BNB_CLASSES[name]
    return getattr(bnb.optim, cls if paged else _UNPAGED.get(cls, cls))


class TorchOptimizer:
    """A torch / bitsandbytes optimizer built lazily on the first ``step`` over the parameters it is given."""

    def __init__(self, name: str, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, flat: bool | None = None, paged: bool = True, **kwargs):
        self.name = canonical_optimizer_name(name)
        betas = check_hparams(lr, betas, eps, weight_decay)  # when built, as the reference (torch: at the 1st step)
        if flat not in (None, True, False):
            raise ValueError(f"flat must be None, True or False, got {flat!r}")
        if flat and self.name not in FLAT_OPTIMIZERS:
            raise ValueError(f"flat=True needs one of {FLAT_OPTIMIZERS} (an elementwise 32-bit update), got "
                             f"{self.name!r}")
        # bitsandbytes' max_unorm and percentile_clipping take norms over one tensor: not elementwise
        elementwise = kwargs.get("max_unorm", 0.0) == 0.0 and kwargs.get("percentile_clipping", 100) == 100
        if flat and not elementwise:
            raise ValueError("flat=True needs an elementwise update: max_unorm and percentile_clipping take norms "
                             "per tensor")
        self._flat_wanted = self.name in FLAT_OPTIMIZERS and elementwise if flat is None else flat
        self._flat_forced = flat is True
        self._flat: FlatBuffer | None = None
        self._cls = _torch_class(self.name, paged)
        self._kwargs = dict(betas=tuple(betas), eps=eps, weight_decay=weight_decay, **kwargs)
        if self.name == "adamw":
            self._kwargs.setdefault("foreach", None)
        self._lr = float(lr)
        self._opt: torch.optim.Optimizer | None = None
        self._names: list[str] = []
        self._pending_state: dict | None = None
        self._loaded = False  # a state was loaded: its keys are bitsandbytes' layout of the version that wrote it

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
    @property
    def torch_optimizer(self) -> torch.optim.Optimizer | None:
        """The underlying torch / bitsandbytes optimizer (None until built)."""
        return self._opt

    @property
    def flat(self) -> bool:
        """Whether the parameters live in one flat buffer (known once the optimizer is built: ``bind``/``step``)."""
        return self._flat is not None

    @torch.no_grad()
    def bind(self, params: Mapping[str, torch.Tensor]) -> None:
        """Build the optimizer over ``params`` now rather than at the first ``step``. With a flat buffer, call it
        before the first backward pass: the gradients then accumulate in the buffer from the start, instead of
        being copied there (a transient second copy of every gradient) at the first step."""
        if self._opt is None:
            self._build(params)
        elif list(params) != self._names:
            raise ValueError("bind() must get the parameter names the optimizer was built with, in that order")
        if self._flat is not None:
            self._flat.adopt(list(params.values()), list(params))
            self._flat.link_grads(list(params.values()), keep=True)

    def _build(self, params: Mapping[str, torch.Tensor]) -> None:
        self._names = list(params)
        tensors = list(params.values())
        if not tensors:
            raise ValueError("params is empty: the optimizer has nothing to update")
        same = all(t.device == tensors[0].device and t.dtype == tensors[0].dtype for t in tensors)
        numel = flat_layout([t.numel() for t in tensors], tensors[0].element_size())[1]
        if self._flat_forced and not same:
            raise ValueError("flat=True needs every parameter on one device with one dtype, got "
                             f"{sorted({f'{t.device}/{t.dtype}' for t in tensors})}")
        if self._flat_forced and numel > FLAT_MAX_NUMEL:
            raise ValueError(f"flat=True: {numel} elements in all, more than bitsandbytes' kernels take in one "
                             f"launch ({FLAT_MAX_NUMEL})")
        if self._flat_wanted and same and numel <= FLAT_MAX_NUMEL:
            self._flat = FlatBuffer(tensors)
            tensors = [self._flat.param]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Pp]aged.*")  # bitsandbytes' CPU fallback notice
            self._opt = self._cls(tensors, lr=self._lr, **self._kwargs)
        if self._pending_state is not None:
            pending, self._pending_state = self._pending_state, None
            self._load(pending)

    @torch.no_grad()
    def zero_grad(self, params: Mapping[str, torch.Tensor]) -> None:
        """Clear the gradients of ``params`` after a step: with a flat buffer, zero it in place and point each
        parameter's ``.grad`` at its slice (autograd accumulates there); otherwise set them to None."""
        if self._flat is None:
            for p in params.values():
                p.grad = None
            return
        self._flat.param.grad.zero_()
        self._flat.link_grads(list(params.values()), keep=False)

    @torch.no_grad()
    def step(self, params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor | None]) -> None:
        if self._opt is None:
            self._build(params)
        elif list(params) != self._names:
            raise ValueError("step() must get the same parameter names, in the same order, every time")
        if self._flat is not None:
            self._flat_step(params, grads)
            return
        self._adopt(params)
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
        except KeyError as e:
            if not self._loaded:
                raise
            raise self._layout_error({k for s in self._opt.state.values() for k in s} - {"step"}, repr(e.args[0])) \
                from None
        finally:
            for name, p in params.items():
                p.grad = saved[name]

    def _adopt(self, params: Mapping[str, torch.Tensor]) -> None:
        """Update the tensors given, as the reference does: a tensor other than the one the optimizer was built over
        (a copy, a reloaded model) takes that one's place and its state; the optimizer would otherwise go on
        updating the old tensor and leave the given one unchanged, silently."""
        held = self._opt.param_groups[0]["params"]
        for i, (name, t) in enumerate(params.items()):
            old = held[i]
            if t is old:
                continue
            _check_unchanged(name, t, old)
            held[i] = t
            if old in self._opt.state:
                self._opt.state[t] = self._opt.state.pop(old)

    def _flat_step(self, params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor | None]) -> None:
        missing = [name for name in self._names if grads.get(name) is None]
        if missing:  # one shared state and step count: a parameter cannot sit a step out
            raise ValueError(f"a flat optimizer updates every parameter at each step; no gradient for {missing[:3]}"
                             f" ({len(missing)} in all): build it with flat=False to skip parameters")
        self._flat.adopt(list(params.values()), list(params))
        self._flat.load_grads([grads[name] for name in self._names], self._names)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Pp]aged.*")
            self._opt.step()

    def _layout_error(self, loaded: set, reads: str) -> ValueError:
        """A loaded state whose keys are not those this optimizer class reads: written under another layout of
        bitsandbytes' state (a release that renamed a key), refused by name rather than a bare KeyError."""
        return ValueError(f"the loaded optimizer state holds {sorted(map(str, loaded))}, where "
                          f"{type(self._opt).__name__} of this bitsandbytes reads {reads}: the checkpoint was written "
                          "with another layout of the optimizer's state; resume with the bitsandbytes that wrote it "
                          "(constraints.txt) or start afresh")

    # -- state -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self._opt is None:
            return out
        if self._flat is not None:
            state = self._opt.state.get(self._flat.param)
            for name, sl, shape in zip(self._names, self._flat.slices, self._flat.shapes, strict=True):
                for key, value in (state or {}).items():
                    if key == "step":
                        out[f"{name}.step"] = torch.tensor(int(value), dtype=torch.int64)
                    elif torch.is_tensor(value) and value.numel() == self._flat.param.numel():
                        out[f"{name}.{key}"] = value[sl].view(shape).clone()
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
        if self._flat is not None:
            self._load_flat(sd)
            return
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
            self._loaded = True
        unknown = sorted(set(sd) - known)
        if unknown:
            raise KeyError(f"unknown optimizer state keys: {unknown[:5]}")

    def _load_flat(self, sd: dict[str, torch.Tensor]) -> None:
        unknown = sorted(k for k in sd if k.rpartition(".")[0] not in self._names)
        steps = {int(sd[f"{n}.step"]) for n in self._names if f"{n}.step" in sd}
        if unknown or not steps:
            raise KeyError(f"unknown optimizer state keys: {unknown[:5]}" if unknown else
                           "the optimizer state has none of this optimizer's parameters")
        keys = {k.rpartition(".")[2] for k in sd} - {"step"}
        incomplete = [f"{n}.{k}" for n in self._names for k in sorted(keys | {"step"}) if f"{n}.{k}" not in sd]
        if len(steps) > 1 or incomplete:
            raise ValueError("a flat optimizer holds one state for all parameters: the loaded state must cover "
                             f"every parameter at one step (steps {sorted(steps)}, missing {incomplete[:3]}); "
                             "load it with flat=False")
        p = self._flat.param
        state = self._opt.state[p]
        if not state:  # bitsandbytes allocates the (paged) buffers
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*[Pp]aged.*")
                self._opt.init_state(self._opt.param_groups[0], p, 0, 0)
        reads = {k for k in state if k != "step"}  # what this bitsandbytes allocated, hence reads
        if keys != reads:
            raise self._layout_error(keys, str(sorted(reads)))
        for key in keys:
            for name, sl in zip(self._names, self._flat.slices, strict=True):
                state[key][sl].copy_(sd[f"{name}.{key}"].reshape(-1))
        state["step"] = steps.pop()


def flat_view(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]] | None:
    """The one storage ``tensors`` already share at ``flat_layout``'s places (relative to the first), as a 1-D
    tensor spanning them, and their starts in it; None if they do not lie so. ``prepare_model`` builds the adapters
    so: binding then copies nothing (re-pointing separately allocated tensors holds two copies of them at once,
    3.2 GB for LLaMA-65B's float32 adapters, docs/benchmarks.md), and a decoder block casts its adapters in one
    operator (``qlora_gpu.fast.staging.stage_layer``)."""
    first = tensors[0]
    starts, numel = flat_layout([t.numel() for t in tensors], first.element_size())
    storage, base = first.untyped_storage(), first.storage_offset()
    for t, start in zip(tensors, starts, strict=True):
        if (t.untyped_storage().data_ptr() != storage.data_ptr() or t.dtype != first.dtype
                or t.device != first.device or not t.is_contiguous() or t.storage_offset() != base + start):
            return None
    if (base + numel) * first.element_size() > storage.nbytes():
        return None
    return torch.empty(0, dtype=first.dtype, device=first.device).set_(storage, base, (numel,), (1,)), starts


def adapter_buffer(numels: list[int], dtype: torch.dtype, device) -> tuple[torch.Tensor, list[int]]:
    """A zeroed buffer for tensors of ``numels`` elements laid out as the flat buffer lays them out, and their
    starts: tensors placed there (``buffer[start:start + n]``) are bound by a flat optimizer without a copy."""
    starts, numel = flat_layout(numels, dtype.itemsize)
    return torch.zeros(numel, dtype=dtype, device=device), starts


class FlatBuffer:
    """Tensors re-pointed into one contiguous parameter (``param``) and their gradients into its ``.grad``: the
    flat buffer of ``TorchOptimizer`` (module docstring)."""

    def __init__(self, tensors: list[torch.Tensor]):
        first = tensors[0]
        self.shapes = [t.shape for t in tensors]
        starts, numel = flat_layout([t.numel() for t in tensors], first.element_size())
        self.slices = [slice(a, a + t.numel()) for a, t in zip(starts, tensors, strict=True)]
        found = flat_view(tensors)  # e.g. prepare_model's adapters: nothing to move
        self.param = torch.nn.Parameter(found[0] if found is not None else
                                        torch.zeros(numel, dtype=first.dtype, device=first.device))
        self.param.grad = torch.zeros_like(self.param)
        self.views = [self.param.data[sl].view(shape) for sl, shape in zip(self.slices, self.shapes, strict=True)]
        self.grad_views = [self.param.grad[sl].view(shape) for sl, shape in zip(self.slices, self.shapes, strict=True)]
        # addresses compared at every step (host time: 1,120 tensors for LLaMA-65B's adapters)
        self._ptrs = [v.data_ptr() for v in self.views]
        self.grad_ptrs = [v.data_ptr() for v in self.grad_views]
        self.adopt(tensors)
        self.tensors = list(tensors)
        #: ``qlora_gpu.fast.deferred_grads.DeferredGrads`` of this buffer, made there at its first use
        self.deferred = None
        me = weakref.ref(self)
        for i, t in enumerate(tensors):
            if t.requires_grad:
                t.__dict__[FLAT_BUFFER] = (me, i)

    def adopt(self, tensors: list[torch.Tensor], names: list[str] | None = None) -> None:
        """Point each tensor at its slice, keeping its values: at the build, and again for one given new storage
        since (``module.to(...)``, ``p.data = ...``), whose values would otherwise stop being updated."""
        names = names or [f"#{i}" for i in range(len(tensors))]
        for t, view, ptr, name in zip(tensors, self.views, self._ptrs, names, strict=True):
            if t.data_ptr() == ptr:
                continue
            _check_unchanged(name, t, view)
            view.copy_(t.detach())
            t.data = view

    def link_grads(self, tensors: list[torch.Tensor], keep: bool) -> None:
        """Make each trainable tensor's ``.grad`` its slice of the gradient buffer (autograd adds into it);
        ``keep``: a gradient it already has is copied there, else dropped."""
        for t, gview, ptr in zip(tensors, self.grad_views, self.grad_ptrs, strict=True):
            if t.requires_grad and (t.grad is None or t.grad.data_ptr() != ptr):
                if keep and t.grad is not None:
                    gview.copy_(t.grad)
                t.grad = gview

    def load_grads(self, grads: list[torch.Tensor], names: list[str]) -> None:
        """Copy into the gradient buffer those gradients that are not already their slice of it (one operator)."""
        dst, src = [], []
        for g, gview, ptr, name in zip(grads, self.grad_views, self.grad_ptrs, names, strict=True):
            if g.data_ptr() == ptr:
                continue
            if g.shape != gview.shape:
                raise ValueError(f"gradient of {name!r} has shape {tuple(g.shape)}, parameter has "
                                 f"{tuple(gview.shape)}")
            dst.append(gview)
            src.append(g.detach().to(device=gview.device))
        if dst:
            torch._foreach_copy_(dst, src)


def make_optimizer(name: str, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                   **kwargs) -> TorchOptimizer:
    """``make_optimizer("paged_adamw", lr=2e-4, weight_decay=0.0)``: the reference's names, torch/bitsandbytes
    underneath. The reference's simulation options (``memory``, ``budget_bytes``, ``page_bytes``) mean nothing
    here — the GPU's own memory is the budget — and are refused. ``flat`` (None: automatic) keeps the parameters
    of a 32-bit bitsandbytes optimizer in one buffer (module docstring). ``paged=False`` runs a paged optimizer's
    update on states in ordinary memory (bitsandbytes' ``AdamW``/``AdamW8bit``: the same arithmetic), for
    parameters on the host (FSDP's CPU offload), where unified memory buys nothing. Extra keywords go to the
    underlying class (for 8-bit: ``min_8bit_size``)."""
    for k in ("memory", "budget_bytes", "page_bytes", "keep_v_positive"):
        if k in kwargs:
            raise ValueError(f"{k!r} is an option of the reference's simulation; bitsandbytes has none")
    return TorchOptimizer(name, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)


def clip_grad_norm(grads: Mapping[str, torch.Tensor | None], max_norm: float, norm_type: float = 2.0,
                   error_if_nonfinite: bool = False, combine=None) -> float:
    """``torch.nn.utils.clip_grad_norm_`` on a dict of gradient tensors (scaled in place, by torch's multi-tensor
    operators: a few kernels whatever the number of tensors); returns the total norm, as
    ``qlora_ref.optim.clip_grad_norm`` does for arrays. ``combine``: for gradients that are this rank's shards
    (``qlora_gpu.fsdp_train``), a function from this rank's norm (a 0-d tensor) to the norm over all ranks."""
    tensors = [g for g in grads.values() if g is not None]
    if not tensors:
        return 0.0
    total = torch.nn.utils.get_total_norm(tensors, norm_type, error_if_nonfinite=error_if_nonfinite)
    if combine is not None:
        total = combine(total)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    torch._foreach_mul_(tensors, coef.to(tensors[0].device))
    return float(total)
