"""The adapters' gradients widened and accumulated in one operation per backward pass (host time at batch 1,
docs/benchmarks.md).

Autograd hands each LoRA layer's bfloat16 gradients of A and B to the float32 parameters with two kernels per
tensor: a cast to float32 (the engine matches a gradient to its input's dtype), then AccumulateGrad's in-place
``grad += g`` — 28 per LLaMA block and step. When the gradients live in a flat optimizer's buffer
(``qlora_gpu.optim.FlatBuffer``), the fast path's layers (``qlora_gpu.fast.layer``) can instead write their
gradient products straight into one buffer in the compute dtype, laid out as the flat one (``slot``), and a single
``add_`` at the end of the backward pass widens and accumulates all of them: ``grad += float32(g)`` per element,
AccumulateGrad's arithmetic exactly. Two kernels per backward pass (the buffer's zeroing and the addition) instead
of 28 per block; the price is that buffer while the backward pass runs (half the float32 adapters' size: 0.32 GB
at LLaMA-7B).

It runs only where it is AccumulateGrad's arithmetic: a plain ``backward()`` — not ``torch.autograd.grad``, not
``backward(inputs=...)`` leaving a parameter out, not ``create_graph`` —, every parameter's ``.grad`` its slice of
the flat gradient buffer, no hook on any of them (``register_hook``, ``register_post_accumulate_grad_hook``), and
each gradient written once in the pass. Otherwise the layers return their gradients to autograd as before. (A
layer called twice in one pass: its second gradient goes to autograd, which adds it before the end-of-pass
addition; autograd alone would sum the two first. Into a zeroed ``.grad`` the two orders agree exactly; into an
accumulated one they may differ in the last bit of float32.)

And it runs only inside ``allowed()``, which qlora's own training steps enter around their backward pass
(``GpuTrainer.forward_backward``, ``GraphedStep``), whose parameters carry no hook of others: a hook on a
parameter's AccumulateGrad node (DDP's reducer, accelerate; ``get_gradient_edge(p).node.register_hook``) reads
``.grad`` when the node has run, before the end-of-pass addition, and the tensor does not show it. A user's own
``loss.backward()`` gets autograd's path, the same values. Nor where this torch lacks one of the private names
read here (``SUPPORTED``, ``qlora doctor``).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.autograd.graph import get_gradient_edge

from ..optim import FLAT_BUFFER


def _has_internals() -> bool:
    """Whether this torch has the private names the deferral reads; any release may rename one, and then every
    backward pass through the layers would fail on it."""
    engine = getattr(getattr(torch.autograd, "Variable", None), "_execution_engine", None)
    return all(hasattr(owner, name) for owner, name in (
        (torch._C, "_current_graph_task_id"), (torch._C, "_will_engine_execute_node"), (engine, "queue_callback"),
        (torch.Tensor, "_backward_hooks"), (torch.Tensor, "_post_accumulate_grad_hooks")))


#: checked at import: without these internals every gradient goes to autograd (the same values, more kernels)
SUPPORTED = _has_internals()

#: how many ``allowed()`` are entered. A module-wide count, not a context variable: the engine runs a CUDA pass's
#: backward functions on its own threads
_entered = 0


@contextlib.contextmanager
def allowed():
    """The backward passes run inside may defer (module docstring): qlora's training steps, which own theirs."""
    global _entered
    _entered += 1
    try:
        yield
    finally:
        _entered -= 1


def status() -> str:
    """One line for ``qlora doctor``."""
    if SUPPORTED:
        return "on in qlora's training steps (one widening addition per backward pass)"
    return f"off: torch {torch.__version__} lacks an autograd internal it reads (autograd adds each gradient)"


class DeferredGrads:
    """For the tensors of a flat buffer (``qlora_gpu.optim.FlatBuffer``, which holds this object, made at the first
    ``slot`` asked of it): ``grads`` (the float32 gradient buffer), ``slices`` and ``shapes`` their places in it,
    ``grad_ptrs`` the addresses of those places. It holds the tensors' AccumulateGrad nodes (looked up once: a
    lookup costs a view), until ``release_nodes``."""

    def __init__(self, tensors: list[torch.Tensor], grads: torch.Tensor, slices: list[slice], shapes: list,
                 grad_ptrs: list[int]):
        self._grads, self._slices, self._shapes, self._ptrs = grads, slices, shapes, grad_ptrs
        self._tensors = list(tensors)
        self._nodes: list | None = [_accumulator(t) for t in tensors]
        self._task = None
        self._low: torch.Tensor | None = None
        self._written: list[bool] = []

    @classmethod
    def of(cls, flat) -> DeferredGrads:
        """The ``DeferredGrads`` of a ``qlora_gpu.optim.FlatBuffer``, made on the first call."""
        if flat.deferred is None:
            flat.deferred = cls(flat.tensors, flat.param.grad, flat.slices, flat.shapes, flat.grad_ptrs)
        return flat.deferred

    def slot(self, i: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Where tensor ``i``'s gradient in ``dtype`` is to be written in this backward pass, or None: give it to
        autograd. The first call of a pass decides for all tensors (``_deferrable``)."""
        task = torch._C._current_graph_task_id()
        if task != self._task:
            self._begin(task, dtype)
        if self._low is None or self._written[i] or dtype != self._low.dtype:
            return None
        self._written[i] = True
        return self._low[self._slices[i]].view(self._shapes[i])

    def _begin(self, task: int, dtype: torch.dtype) -> None:
        self._task, self._low = task, None
        if task < 0 or torch.is_grad_enabled() or not self._deferrable():
            return
        low = torch.zeros(self._grads.shape, dtype=dtype, device=self._grads.device)
        self._low, self._written = low, [False] * len(self._tensors)
        torch.autograd.Variable._execution_engine.queue_callback(functools.partial(self._flush, low))

    def _flush(self, low: torch.Tensor) -> None:
        """At the end of the backward pass: every written gradient widened and added to its ``.grad`` slice (the
        rest of the buffer is zeros)."""
        self._grads.add_(low)
        if self._low is low:
            self._low = None

    def release_nodes(self) -> None:
        """Let go of the AccumulateGrad nodes; the next pass looks up the ones of its graph. A node runs on the CUDA
        stream that was current when it was created, and autograd synchronises that stream with the pass's: one
        kept from the binding (the default stream) would pull the default stream into a pass captured into a CUDA
        graph on another stream, which invalidates the capture (torch's CUDA-graph notes). ``qlora_gpu.fast.graphs``
        releases them before its capture, so that the captured forward pass creates its nodes on the capture's
        stream."""
        self._nodes = None

    def _deferrable(self) -> bool:
        if self._nodes is not None and all(self._accumulates_here(i) for i in range(len(self._tensors))):
            return True
        # released, or a tensor given new data since (``p.data = ...``) may have a new AccumulateGrad node
        self._nodes = [_accumulator(t) for t in self._tensors]
        return all(self._accumulates_here(i) for i in range(len(self._tensors)))

    def _accumulates_here(self, i: int) -> bool:
        """Whether autograd would add tensor ``i``'s gradient in place into its slice, unhooked, in this pass."""
        node = self._nodes[i]
        if node is None:
            return True  # frozen: no gradient
        t = self._tensors[i]
        g = t.grad
        if g is None or g.data_ptr() != self._ptrs[i] or t._backward_hooks or t._post_accumulate_grad_hooks:
            return False
        try:
            return torch._C._will_engine_execute_node(node)
        except RuntimeError:  # inside torch.autograd.grad: gradients are returned there, not accumulated
            return False


def _accumulator(t: torch.Tensor):
    return get_gradient_edge(t).node if t.requires_grad else None


def release_nodes(params) -> None:
    """``DeferredGrads.release_nodes`` of every flat buffer holding one of ``params``."""
    owners = {}
    for p in params:
        entry = p.__dict__.get(FLAT_BUFFER)
        flat = entry[0]() if entry is not None else None
        if flat is not None and flat.deferred is not None:
            owners[id(flat.deferred)] = flat.deferred
    for owner in owners.values():
        owner.release_nodes()


def slot(param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Where a layer writes ``param``'s gradient (in ``dtype``) in the current backward pass instead of returning
    it to autograd; None when ``param`` is not in a flat buffer, outside ``allowed()``, or the pass does not allow it
    (module docstring)."""
    entry = param.__dict__.get(FLAT_BUFFER)
    if entry is None or not (_entered and SUPPORTED):
        return None
    flat = entry[0]()
    return None if flat is None else DeferredGrads.of(flat).slot(entry[1], dtype)
