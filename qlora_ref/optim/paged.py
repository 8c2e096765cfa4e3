"""Paged optimizers: optimizer state that lives in fixed-size pages and makes room for memory spikes.

QLoRA (paper, section 3, "Paged Optimizers") allocates the optimizer state in NVIDIA unified memory. When a
memory spike — a long sequence, the activations recomputed by gradient checkpointing — needs more GPU memory
than is free, the driver evicts state pages to CPU RAM instead of failing with out-of-memory, and pages them
back when the optimizer update touches them. bitsandbytes' ``PagedAdamW`` does this with ``cudaMallocManaged``
buffers and prefetches each state tensor before its update.

This module *simulates* it, so the mechanism can be read, tested and measured on any machine:

- :class:`DeviceMemory` is a device of ``budget_bytes``. It holds two kinds of memory: *pinned* allocations
  (weights, activations: :meth:`DeviceMemory.allocate` / :meth:`DeviceMemory.free`, or the
  :meth:`DeviceMemory.spike` context) that can never be moved, and *pages* of optimizer state, each occupying
  ``page_bytes`` of the budget while resident. When room is needed, the least recently used pages that are not in
  use are evicted to host memory ("page-out"); a page is brought back when the optimizer touches it
  ("page-in"). If pinned memory plus the pages one update needs at once exceed the budget, that is a genuine
  out-of-memory (:class:`DeviceOutOfMemory`), as it would be on the GPU.
- :class:`PagedArray` is one state tensor split into pages.
- :class:`PagedAdamW` (and ``PagedAdamW8bit`` in ``adamw8bit.py``) run the very same update as their unpaged
  twins, one page of elements at a time, touching only that page's states — so their results are bit-identical
  whatever the budget, and only the traffic counters differ.

Counters (:meth:`DeviceMemory.stats`): ``page_ins``/``page_outs`` (pages moved), ``bytes_paged_in``/
``bytes_paged_out``, ``page_allocs`` (pages created on the device: first touch, no transfer), ``peak_bytes``
(the most device memory ever in use, pinned + resident pages; never above the budget), ``used_bytes``,
``resident_pages``/``host_pages``. The NumPy arrays never actually move — both "memories" are host RAM — the
simulation decides and counts where each page would be. docs/paged_optimizers.md maps this onto bitsandbytes.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .adamw import AdamW
from .base import Optimizer, StateSpec

#: CUDA unified memory migrates small pages on demand (4 KiB host pages, 64 KiB on the GPU side) grouped into
#: chunks of up to 2 MiB when it can: the default page size
DEFAULT_PAGE_BYTES = 2 * 1024 * 1024


class DeviceOutOfMemory(MemoryError):
    """Pinned memory plus the pages that must be resident together do not fit in the budget."""


@dataclass(eq=False)
class Page:
    """A fixed-size page: ``data`` holds its elements (the last page of an array may hold fewer, but still
    occupies ``page_bytes`` on the device, like an allocation rounded up to the page size)."""

    data: np.ndarray
    resident: bool = False
    id: int = field(default=0)


class DeviceMemory:
    """A simulated device with ``budget_bytes`` of memory (``None``: unlimited) shared by pinned allocations and
    pageable optimizer-state pages of ``page_bytes`` each."""

    def __init__(self, budget_bytes: int | None = None, page_bytes: int = DEFAULT_PAGE_BYTES):
        if page_bytes <= 0 or page_bytes % 1024:
            raise ValueError(f"page_bytes must be a positive multiple of 1024, got {page_bytes}")
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0 or None, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.page_bytes = int(page_bytes)
        self.pinned: dict[str, int] = {}
        self._resident: OrderedDict[int, Page] = OrderedDict()  # least recently used first
        self._next_id = 0
        self.host_pages = 0
        self.reset_counters()

    # -- counters ------------------------------------------------------------------------------------------------
    def reset_counters(self) -> None:
        """Zero the traffic counters; ``peak_bytes`` restarts from the memory in use now."""
        self.page_ins = self.page_outs = self.page_allocs = 0
        self.peak_bytes = self.used_bytes

    @property
    def pinned_bytes(self) -> int:
        return sum(self.pinned.values())

    @property
    def resident_pages(self) -> int:
        return len(self._resident)

    @property
    def used_bytes(self) -> int:
        return self.pinned_bytes + len(self._resident) * self.page_bytes

    def stats(self) -> dict[str, int | None]:
        return {
            "budget_bytes": self.budget_bytes,
            "page_bytes": self.page_bytes,
            "used_bytes": self.used_bytes,
            "peak_bytes": self.peak_bytes,
            "pinned_bytes": self.pinned_bytes,
            "resident_pages": self.resident_pages,
            "host_pages": self.host_pages,
            "page_allocs": self.page_allocs,
            "page_ins": self.page_ins,
            "page_outs": self.page_outs,
            "bytes_paged_in": self.page_ins * self.page_bytes,
            "bytes_paged_out": self.page_outs * self.page_bytes,
        }

    def report(self) -> str:
        s = self.stats()
        mib = 1024 * 1024
        budget = "unlimited" if s["budget_bytes"] is None else f"{s['budget_bytes'] / mib:.2f} MiB"
        return (
            f"device budget {budget}, peak {s['peak_bytes'] / mib:.2f} MiB "
            f"(pinned now {s['pinned_bytes'] / mib:.2f} MiB); optimizer pages of {s['page_bytes'] // 1024} KiB: "
            f"{s['resident_pages']} on device, {s['host_pages']} on host; "
            f"{s['page_outs']} page-outs ({s['bytes_paged_out'] / mib:.2f} MiB), "
            f"{s['page_ins']} page-ins ({s['bytes_paged_in'] / mib:.2f} MiB)"
        )

    # -- pinned memory ---------------------------------------------------------------------------------------------
    def allocate(self, tag: str, nbytes: int) -> None:
        """Pin ``nbytes`` under ``tag`` (weights, activations), evicting optimizer pages if needed."""
        if tag in self.pinned:
            raise ValueError(f"{tag!r} is already allocated")
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        self._make_room(nbytes, keep=(), why=f"allocating {tag!r}")
        self.pinned[tag] = int(nbytes)
        self._note_peak()

    def free(self, tag: str) -> None:
        del self.pinned[tag]

    @contextlib.contextmanager
    def spike(self, tag: str, nbytes: int):
        """A temporary allocation: ``with memory.spike("activations", n): ...`` (e.g. one forward/backward)."""
        self.allocate(tag, nbytes)
        try:
            yield
        finally:
            self.free(tag)

    # -- pages -----------------------------------------------------------------------------------------------------
    def new_page(self, data: np.ndarray, on_device: bool = True) -> Page:
        """A page for ``data``: created on the device (first touch, no transfer), or on the host."""
        page = Page(data, resident=False, id=self._next_id)
        self._next_id += 1
        if on_device:
            self._make_room(self.page_bytes, keep=(), why="creating optimizer state")
            page.resident = True
            self._resident[page.id] = page
            self.page_allocs += 1
            self._note_peak()
        else:
            self.host_pages += 1
        return page

    def ensure_resident(self, pages: list[Page]) -> None:
        """Make all ``pages`` resident together (page-ins, evicting other pages as needed) and mark them used."""
        missing = [p for p in pages if not p.resident]
        for p in pages:
            if p.resident:
                self._resident.move_to_end(p.id)
        if not missing:
            return
        keep = {p.id for p in pages}
        self._make_room(len(missing) * self.page_bytes, keep=keep, why=f"paging in {len(missing)} page(s)")
        for p in missing:
            p.resident = True
            self._resident[p.id] = p
            self.host_pages -= 1
            self.page_ins += 1
        self._note_peak()

    def release(self, pages: list[Page]) -> None:
        """Forget pages (their state was deleted)."""
        for p in pages:
            if p.resident:
                del self._resident[p.id]
            else:
                self.host_pages -= 1

    def _make_room(self, nbytes: int, keep, why: str) -> None:
        if self.budget_bytes is None:
            return
        while self.used_bytes + nbytes > self.budget_bytes:
            victim = next((p for pid, p in self._resident.items() if pid not in keep), None)
            if victim is None:
                raise DeviceOutOfMemory(
                    f"out of device memory {why}: need {nbytes} bytes, budget {self.budget_bytes}, "
                    f"pinned {self.pinned_bytes}, {len(self._resident)} page(s) of {self.page_bytes} in use now"
                )
            del self._resident[victim.id]
            victim.resident = False
            self.host_pages += 1
            self.page_outs += 1

    def _note_peak(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)


class PagedArray:
    """A flat array of ``numel`` elements stored as pages of ``memory.page_bytes // itemsize`` elements."""

    def __init__(self, memory: DeviceMemory, values: np.ndarray, on_device: bool = True):
        values = np.ascontiguousarray(values).reshape(-1)
        self.memory = memory
        self.dtype = values.dtype
        self.numel = values.size
        self.per_page = memory.page_bytes // values.dtype.itemsize
        self.pages = [memory.new_page(values[i:i + self.per_page].copy(), on_device)
                      for i in range(0, self.numel, self.per_page)]

    def pages_for(self, lo: int, hi: int) -> list[Page]:
        """The pages holding elements ``[lo, hi)``."""
        if hi <= lo:
            return []
        return self.pages[lo // self.per_page: (hi - 1) // self.per_page + 1]

    def read(self, lo: int, hi: int) -> np.ndarray:
        """A copy of elements ``[lo, hi)``; their pages must be resident (the caller touched them)."""
        parts = []
        for k, page in enumerate(self.pages_for(lo, hi), start=lo // self.per_page):
            assert page.resident, "read from a page that is not on the device"
            start = k * self.per_page
            parts.append(page.data[max(lo - start, 0): min(hi - start, page.data.size)])
        return np.concatenate(parts) if len(parts) != 1 else parts[0].copy()

    def write(self, lo: int, hi: int, values: np.ndarray) -> None:
        for k, page in enumerate(self.pages_for(lo, hi), start=lo // self.per_page):
            assert page.resident, "write to a page that is not on the device"
            start = k * self.per_page
            a, b = max(lo - start, 0), min(hi - start, page.data.size)
            page.data[a:b] = values[start + a - lo: start + b - lo]

    def to_numpy(self) -> np.ndarray:
        """All elements, wherever their pages are (a checkpoint read; not counted as traffic)."""
        if not self.pages:
            return np.zeros(0, self.dtype)
        return np.concatenate([p.data for p in self.pages])

    def release(self) -> None:
        self.memory.release(self.pages)
        self.pages = []


class PagedOptimizer(Optimizer):
    """Mixin: store every state array as a :class:`PagedArray` and update one page of elements at a time.

    Use it before an elementwise optimizer in the bases: ``class PagedAdamW(PagedOptimizer, AdamW)``. The
    optimizer either gets a shared ``memory`` (so pinned allocations of the training loop compete with it) or
    makes its own from ``budget_bytes`` and ``page_bytes``.
    """

    def __init__(self, *args, memory: DeviceMemory | None = None, budget_bytes: int | None = None,
                 page_bytes: int = DEFAULT_PAGE_BYTES, **kwargs):
        super().__init__(*args, **kwargs)
        if memory is not None and budget_bytes is not None:
            raise ValueError("give either memory or budget_bytes, not both")
        self.memory = memory if memory is not None else DeviceMemory(budget_bytes, page_bytes)

    def _chunk_elements(self, layout: dict[str, StateSpec]) -> int:
        """Parameter elements updated per chunk: one page of the widest per-element state. A multiple of every
        ``per`` (block size) because pages are multiples of 1024 bytes and block sizes divide 1024 here."""
        widest = max(np.dtype(s.dtype).itemsize for s in layout.values() if s.per == 1)
        n = self.memory.page_bytes // widest
        for s in layout.values():
            if n % s.per:
                raise ValueError(f"page_bytes {self.memory.page_bytes} does not hold whole blocks of {s.per}")
        return n

    def _new_state(self, shape):
        layout = self.state_layout(shape)
        n = int(np.prod(shape, dtype=np.int64))
        return {"step": 0, "shape": tuple(shape),
                **{k: PagedArray(self.memory, np.zeros(s.numel(n), s.dtype)) for k, s in layout.items()}}

    def _state_from_arrays(self, shape, step, arrays):
        # a loaded state starts on the host: it is paged in when the optimizer first uses it
        return {"step": step, "shape": tuple(shape),
                **{k: PagedArray(self.memory, v, on_device=False) for k, v in arrays.items()}}

    def load_state_dict(self, state_dict):
        old = self.state
        super().load_state_dict(state_dict)
        for state in old.values():
            for v in state.values():
                if isinstance(v, PagedArray):
                    v.release()

    def _read_state(self, state, key):
        spec = self.state_layout(state["shape"])[key]
        return state[key].to_numpy().reshape(spec.shape(state["shape"]))

    def _update(self, param, grad, state):
        layout = self.state_layout(state["shape"])
        flat_p = param.reshape(-1)
        if not np.shares_memory(flat_p, param):
            raise ValueError("parameters must be contiguous arrays (they are updated in place)")
        flat_g = grad.reshape(-1)
        n = flat_p.size
        chunk = self._chunk_elements(layout)
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            ranges = {k: (lo // s.per, -(-hi // s.per)) for k, s in layout.items()}
            pages = [p for k in layout for p in state[k].pages_for(*ranges[k])]
            self.memory.ensure_resident(pages)  # page-in on use (bitsandbytes prefetches the same way)
            states = {k: state[k].read(*ranges[k]) for k in layout}
            self.update_chunk(flat_p[lo:hi], flat_g[lo:hi], states, state["step"])
            for k in layout:
                state[k].write(*ranges[k], states[k])

    def paging_report(self) -> str:
        return self.memory.report()


class PagedAdamW(PagedOptimizer, AdamW):
    """AdamW (32-bit states) in pages under a simulated device-memory budget — the paper's optimizer
    (``--optim paged_adamw_32bit``). ``PagedAdamW(lr=2e-4, weight_decay=0.0, budget_bytes=..., page_bytes=...)``
    or with a shared ``memory=DeviceMemory(...)``. Its updates equal :class:`AdamW`'s bit for bit; its states
    have bitsandbytes' names (``state1`` = m, ``state2`` = v), as ``qlora_gpu``'s paged AdamW's."""

    STATE_KEYS = ("state1", "state2")
