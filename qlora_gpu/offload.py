"""Activation offload: the checkpointed block inputs kept in pinned host memory between the forward and the backward
pass, and brought back, one block ahead, for the recomputation.

With gradient checkpointing a decoder block keeps only its input — the residual stream, (batch, seq, hidden) in
the stream's dtype (float32 as ``prepare_model`` builds it by default) — from its forward pass to its backward
pass, where it runs the block again from it (``qlora_ref.model.block``). At long context those inputs are most of
what a step holds on the GPU: L blocks x tokens x hidden x 4 bytes, 32 x 131,072 x 4,096 x 4 = 69 GB for
Llama-3.1-8B at 128k tokens (``qlora_ref.memory.offloaded_bytes``). Offloaded, the GPU holds at most two of them
at once: the one being recomputed and the next, already on its way back.

How: torch's non-reentrant checkpoint saves a block's inputs through autograd's saved-tensor machinery (its
``_NoopSaveInputs`` node), outside the hooks it installs inside the block. ``ActivationOffload.hooks()`` — a
``torch.autograd.graph.saved_tensors_hooks`` around each checkpointed call (``qlora_gpu.model._checkpoint_layer``)
— therefore sees exactly those inputs and nothing the block saves inside:

- pack (forward): a pinned host buffer, the copy issued on a side CUDA stream after the compute stream's work so
  far, so that the next block's compute runs while the copy is in flight; the device tensor is handed to the
  allocator with ``record_stream``, which frees it once the copy is done;
- unpack (backward, before a block's recomputation): the block's input back on the device — already there if it
  was prefetched — and the copy of the block before it (next in backward order) issued on the side stream, to
  arrive while this block recomputes and backpropagates; the compute stream waits for the copy it needs only.

On the CPU the same code runs with no stream and no pinning: each block input is copied into a separate host
buffer and read back from it — functionally a no-op (same loss and gradients, tests/test_offload.py), which is how
the hooks are tested without a GPU. ``stats`` counts what moved.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch


@dataclass
class OffloadStats:
    """What the hooks moved: tensors and bytes sent to host (forward) and brought back (backward); ``prefetched``:
    the copies back issued ahead of their block; ``kept``: tensors left in place (smaller than ``min_bytes``)."""

    packed: int = 0
    unpacked: int = 0
    bytes_to_host: int = 0
    bytes_to_device: int = 0
    prefetched: int = 0
    kept: int = 0


class _Handle:
    """One offloaded tensor: its host copy, where it came from, and its copy back once issued."""

    __slots__ = ("host", "device", "index", "to_host", "back", "back_ready", "__weakref__")

    def __init__(self, host: torch.Tensor, device: torch.device, index: int, to_host):
        self.host, self.device, self.index, self.to_host = host, device, index, to_host
        self.back = self.back_ready = None


class ActivationOffload:
    """Saved-tensor hooks that move checkpointed block inputs to host memory (see the module docstring).
    ``min_bytes``: smaller tensors stay where they are. ``max_host_bytes``: once a step has sent this much to the
    host, the later blocks' inputs stay on the device (pinned memory is the host's RAM, which a long sequence of
    a large model can exceed: 80 blocks x 89k tokens x 8,192 x 4 bytes = 233 GB at 70B)."""

    def __init__(self, min_bytes: int = 0, max_host_bytes: int | None = None):
        self.min_bytes, self.max_host_bytes = min_bytes, max_host_bytes
        self._step_bytes = 0  # sent to the host in this step's forward pass
        self.stats = OffloadStats()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._order: list[weakref.ref] = []  # this step's handles in forward order
        self._in_backward = False

    def hooks(self):
        """The context under which a checkpointed call's inputs are offloaded."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _stream(self, device: torch.device):
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    # ------------------------------------------------------------------------------------------ forward
    def _pack(self, t: torch.Tensor):
        if self._in_backward:  # a new step's forward pass
            self._order, self._in_backward, self._step_bytes = [], False, 0
        nbytes = t.numel() * t.element_size()
        if nbytes < self.min_bytes or (self.max_host_bytes is not None
                                       and self._step_bytes + nbytes > self.max_host_bytes):
            self.stats.kept += 1
            return t
        self._step_bytes += nbytes
        stream = self._stream(t.device)
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=stream is not None)
        to_host = None
        if stream is None:
            host.copy_(t)
        else:
            stream.wait_stream(torch.cuda.current_stream(t.device))  # t is computed
            with torch.cuda.stream(stream):
                host.copy_(t, non_blocking=True)
                to_host = torch.cuda.Event()
                to_host.record(stream)
            t.record_stream(stream)  # the allocator frees t's memory only once the copy is done
        handle = _Handle(host, t.device, len(self._order), to_host)
        self._order.append(weakref.ref(handle))
        self.stats.packed += 1
        self.stats.bytes_to_host += host.numel() * host.element_size()
        return handle

    # ------------------------------------------------------------------------------------------ backward
    def _bring_back(self, handle: _Handle) -> None:
        """Issue the copy of ``handle`` back to its device (on the side stream on CUDA)."""
        stream = self._stream(handle.device)
        if stream is None:
            handle.back = handle.host
        else:
            with torch.cuda.stream(stream):
                if handle.to_host is not None:
                    stream.wait_event(handle.to_host)
                handle.back = handle.host.to(handle.device, non_blocking=True)
                handle.back_ready = torch.cuda.Event()
                handle.back_ready.record(stream)
        self.stats.bytes_to_device += handle.host.numel() * handle.host.element_size()

    def _unpack(self, handle):
        if not isinstance(handle, _Handle):
            return handle
        self._in_backward = True
        if handle.back is None:
            self._bring_back(handle)
        if handle.index > 0:  # the block before this one is the next to be recomputed: on its way now
            before = self._order[handle.index - 1]() if handle.index - 1 < len(self._order) else None
            if before is not None and before.back is None:
                self._bring_back(before)
                self.stats.prefetched += 1
        t, ready = handle.back, handle.back_ready
        handle.back = handle.back_ready = None  # a second unpack copies again; the host copy stays until freed
        if ready is not None:
            current = torch.cuda.current_stream(handle.device)
            current.wait_event(ready)
            t.record_stream(current)
        self.stats.unpacked += 1
        return t


__all__ = ["ActivationOffload", "OffloadStats"]
