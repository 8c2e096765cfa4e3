"""A training step's forward and backward passes captured once into a CUDA graph and replayed (host time at batch
1, docs/benchmarks.md).

At batch 1 a QLoRA step on a large GPU waits on the host: the GPU runs a kernel for a small part of a LLaMA-7B step, and
the rest is Python, the dispatcher and the driver launching thousands of kernels one by one (the measured figures:
docs/benchmarks.md). A CUDA graph records those launches once; each replay hands all of them to the GPU in one call. The
arithmetic is the same kernels on the same memory, so a replayed step computes what an eager step computes from the same
state (``tests/test_graphs.py`` checks it bit for bit on a GPU, dropout included).

What capture needs, checked where it can be (``GraphedStep``):

- one fixed batch shape on a CUDA device: the inputs are copied into the graph's own tensor before each replay;
- a causal attention without an attention mask, through torch's SDPA (``is_causal``). Under capture transformers
  cannot test whether a batch is padded or packed (that reads the GPU), so it would build an explicit mask and
  SDPA would leave its flash kernels; the step therefore runs with ``CAUSAL_SDPA``, transformers' own SDPA
  function registered under a name for which transformers builds no mask — nor reads one: it would drop a padding
  mask or packed positions in silence, so while it is in use an ``attention_mask`` or ``position_ids`` given to
  the model is refused (``_refuse_masks``). A padded or packed batch cannot be a graph;
- no draws from torch's global generators inside the step (attention dropout, an ``nn.Dropout``): torch's
  checkpoint would save and restore their state, a host operation;
- gradients that stay where they are: the graph adds into the ``.grad`` tensors it captured, so they are zeroed in
  place between steps (``qlora_gpu.optim`` does) and never set to None;
- the adapters' AccumulateGrad nodes created by the captured pass itself: autograd runs a node on the stream that
  was current at its creation, and a node kept from the default stream would pull that stream into the capture
  (torch's notes: warm up on a side stream). ``qlora_gpu.fast.deferred_grads`` keeps the nodes it looked up, so they
  are released before the capture (and after it);
- the LoRA dropout masks: under gradient checkpointing a block's recomputation must draw the forward pass's
  masks again. Eagerly its generators are rewound (``qlora_gpu.model._checkpoint_layer``); a graph cannot rewind
  a generator, so the recomputation draws from a twin generator set to the same state before every replay. Both
  are registered with the graph, which advances each by its draws at every replay, as eager steps would.

The optimizer step stays outside the graph (its step count and learning rate are host numbers): ``step(ids)``
replaces ``loss_fn(ids).backward()``, and the optimizer runs after it as before.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable

import torch
from torch import nn

from ..model import RECOMPUTE_GENERATOR, draws_global_rng, lora_linears
from ..patches import CAUSAL_SDPA, register_causal_sdpa
from .deferred_grads import allowed as deferral_allowed
from .deferred_grads import release_nodes


def check_capturable(model: nn.Module, device: torch.device | str) -> None:
    """Raises ValueError, naming what to change, when a training step of ``model`` on ``device`` cannot be
    captured by ``GraphedStep`` (the module docstring's conditions that can be read off the model)."""
    device = torch.device(device)
    hf = model.hf
    if not model.training:
        raise ValueError("model: capture a training step in training mode (model.train())")
    if hf.model.embed_tokens.weight.device != device:
        raise ValueError(f"input_ids: on {device}, but the model is on {hf.model.embed_tokens.weight.device}")
    impl = hf.config._attn_implementation
    if impl not in ("sdpa", CAUSAL_SDPA):
        raise ValueError(f"model: attention 'sdpa' is needed (the causal mask by SDPA's is_causal, no mask tensor "
                         f"built under capture), the model uses {impl!r}")
    drawing = [i for i, layer in enumerate(hf.model.layers) if draws_global_rng(layer)]
    if drawing:
        raise ValueError(f"model: decoder layers {drawing[:5]} draw from torch's own generators (attention "
                         "dropout, nn.Dropout), whose state checkpointing saves on the host: not capturable")


class GraphedStep:
    """``loss = step(input_ids)``: ``loss_fn(input_ids).backward()`` of a ``QLoRAModel`` in training mode,
    captured into a CUDA graph at the first call and replayed at every call (the first included); returns the
    loss, a tensor the next call overwrites. Gradients accumulate into the adapters' ``.grad`` as after an eager
    backward pass; the optimizer step follows outside.

    ``loss_fn(input_ids)`` is the model's forward pass and loss (no attention mask or position ids: refused with
    a ValueError at the first call, as ``CAUSAL_SDPA`` would ignore them); ``warmup`` eager passes run
    on a side stream before the capture (lazy initialisations stay out of the graph) and are undone: their
    gradients zeroed, the dropout generators set back. Build it between optimizer steps, with the gradients
    zero and bound where they stay (``qlora_gpu.optim``'s flat buffer); another batch shape needs another
    ``GraphedStep``."""

    #: for a training loop that takes either: this step runs the backward pass itself
    runs_backward = True
    #: the CUDA calls of the capture, in one place (a CPU test stands in for them: ``tests/test_graphs.py``)
    _cuda = torch.cuda
    _device_type = "cuda"

    def __init__(self, model: nn.Module, loss_fn: Callable[[torch.Tensor], torch.Tensor], warmup: int = 1):
        if not (hasattr(model, "hf") and hasattr(model, "lora_parameters")):
            raise TypeError(f"model: a qlora_gpu QLoRAModel is needed, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: a callable input_ids -> loss is needed, got {type(loss_fn).__name__}")
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup: an int >= 1 is needed (eager passes before the capture), got {warmup!r}")
        self.model, self.loss_fn, self.warmup = model, loss_fn, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self._static = self._loss = None
        self._grads: list[tuple[torch.Tensor, torch.Tensor]] = []
        #: (LoRA layer with dropout, its generator, the twin its recomputation draws from in the graph)
        self._twins: list[tuple[nn.Module, torch.Generator, torch.Generator]] = []

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids: a tensor is needed, got {type(input_ids).__name__}")
        if self.graph is None:
            self._capture(input_ids)
        elif (input_ids.shape, input_ids.dtype, input_ids.device) != \
                (self._static.shape, self._static.dtype, self._static.device):
            raise ValueError(f"input_ids: the graph was captured for {tuple(self._static.shape)} "
                             f"{self._static.dtype} on {self._static.device}, got {tuple(input_ids.shape)} "
                             f"{input_ids.dtype} on {input_ids.device}: another shape needs another GraphedStep")
        self._check_gradients()
        self._sync_twins()
        self._static.copy_(input_ids)
        self.graph.replay()
        return self._loss

    # ------------------------------------------------------------------------------------------ capture
    def _capture(self, input_ids: torch.Tensor) -> None:
        device = input_ids.device
        if device.type != self._device_type:
            raise ValueError(f"input_ids: CUDA graphs need a CUDA tensor, got one on {device}")
        check_capturable(self.model, device)
        params = [p for p in self.model.lora_parameters().values() if p.requires_grad]
        if not params:
            raise ValueError("model: it has no trainable LoRA adapters, so there is no training step to capture")
        missing = [p for p in params if p.grad is None]
        if missing:
            raise ValueError(f"the model's {len(missing)} of {len(params)} LoRA tensors have no .grad: bind the "
                             "optimizer first (qlora_gpu.optim's bind), so that the graph adds into tensors that "
                             "stay")
        grads = [p.grad for p in params]
        if torch.stack(torch._foreach_norm(grads)).max().item() != 0:
            raise ValueError("the LoRA gradients are not zero: build the GraphedStep between optimizer steps "
                             "(its warm-up passes would be mixed into them)")
        static = input_ids.clone()
        twins = [(m, m._generator(device), torch.Generator(device=device))
                 for layer in self.model.hf.model.layers for m in lora_linears(layer) if m.dropout_active]
        states = [g.get_state() for _, g, _ in twins]
        cuda = self._cuda
        if twins and not hasattr(cuda.CUDAGraph, "register_generator_state"):
            raise RuntimeError(f"model: {len(twins)} LoRA layers draw dropout masks, and this torch "
                               f"({torch.__version__}) cannot register their generators with a CUDA graph "
                               "(CUDAGraph.register_generator_state, torch >= 2.5)")
        with self._causal_sdpa(), deferral_allowed():  # the step owns its backward passes
            side = cuda.Stream(device)
            side.wait_stream(cuda.current_stream(device))
            with cuda.stream(side):
                for _ in range(self.warmup):
                    self.loss_fn(static).backward()
            cuda.current_stream(device).wait_stream(side)
            torch._foreach_zero_(grads)  # the warm-up is undone: no gradient, no draw
            for (_, g, _), state in zip(twins, states, strict=True):
                g.set_state(state)
            graph = cuda.CUDAGraph()
            for _, g, twin in twins:
                twin.set_state(g.get_state())
                graph.register_generator_state(g)
                graph.register_generator_state(twin)
            # the adapters' AccumulateGrad nodes: created anew by the captured forward pass, on the capture's
            # stream (a node kept from the default stream would invalidate the capture), and not kept after it
            release_nodes(params)
            try:
                with _twins_installed(twins), cuda.graph(graph):
                    loss = self.loss_fn(static)
                    loss.backward()
            finally:
                release_nodes(params)
        self.graph, self._static, self._loss = graph, static, loss.detach()
        self._grads = [(p, p.grad) for p in params]
        self._twins = twins

    @contextlib.contextmanager
    def _causal_sdpa(self):
        """The model on ``CAUSAL_SDPA`` for the warm-up and the capture, with ``_refuse_masks`` guarding its
        decoder (``hf.model``: the causal LM's forward and ``QLoRAModel.hidden_states`` both go through it)."""
        config, inner = self.model.hf.config, self.model.hf.model
        before = config._attn_implementation
        config._attn_implementation = register_causal_sdpa()  # "sdpa" where transformers' API has moved
        names = list(inspect.signature(inner.forward).parameters)  # for arguments passed by position
        guard = inner.register_forward_pre_hook(functools.partial(_refuse_masks, names), with_kwargs=True)
        try:
            yield
        finally:
            guard.remove()
            config._attn_implementation = before

    # ------------------------------------------------------------------------------------------ replay
    def _check_gradients(self) -> None:
        for p, g in self._grads:
            if p.grad is not g:
                raise RuntimeError("a LoRA gradient was replaced since the capture (zero_grad(set_to_none=True)?): "
                                   "the graph adds into the tensors it captured; zero them in place")

    def _sync_twins(self) -> None:
        """Each twin in its generator's state: the graph reads both states at every replay, and a generator that
        drew outside the graph (or was reseeded) would otherwise leave the recomputation's masks behind."""
        for _, g, twin in self._twins:
            if not self._same_state(g, twin):
                twin.set_state(g.get_state())

    @staticmethod
    def _same_state(g: torch.Generator, twin: torch.Generator) -> bool:
        return twin.get_offset() == g.get_offset() and twin.initial_seed() == g.initial_seed()  # host reads


def _refuse_masks(names: list, module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of the decoder while ``CAUSAL_SDPA`` is in use: transformers builds no mask for that name,
    so it would ignore a padding mask and the packed examples' positions, and the step would train on wrong
    logits with no error. The rule is the simplest safe one: any ``attention_mask`` or ``position_ids`` that is
    not None is refused — an all-ones mask or ``arange`` positions included, which change nothing and can be
    dropped. Only ``is None`` is looked at: nothing is read from the GPU, so the check is as capture-safe as it is
    cheap."""
    given = dict(zip(names, args, strict=False)) | kwargs  # args: the first of the names
    for name in ("attention_mask", "position_ids"):
        if given.get(name) is not None:
            raise ValueError(f"loss_fn: passes {name} to the model, which a captured step cannot honour (its causal "
                             "attention builds no mask and restarts no positions): a graph step takes unpadded, "
                             f"unpacked batches, called without {name}")


@contextlib.contextmanager
def _twins_installed(twins):
    """Each layer's twin as its ``RECOMPUTE_GENERATOR`` while the capture runs."""
    for m, _, twin in twins:
        m.__dict__[RECOMPUTE_GENERATOR] = twin
    try:
        yield
    finally:
        for m, _, _ in twins:
            m.__dict__.pop(RECOMPUTE_GENERATOR, None)


__all__ = ["CAUSAL_SDPA", "GraphedStep", "check_capturable", "register_causal_sdpa"]
