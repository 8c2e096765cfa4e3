"""The training progress bar: loss, learning rate, tokens per second and memory, one update per optimizer step.

Built on ``tqdm`` (written to stderr, so results printed on stdout stay clean) where stderr is a terminal;
elsewhere (a log file, ``nohup``, CI) a bar redrawn with carriage returns would be one ever-growing line, so the
same figures are written as plain lines instead: the first step, then at most one line every
``LOG_INTERVAL_S`` seconds, and the last step (``qlora_ref.bars.progress_iter`` applies the same rule to the other
long loops: an evaluation's batches, a merge's tensors, the loaders' weights and layers). Memory is what the backend
reports: the process's peak resident memory for the reference (the NumPy arrays live in host RAM), the peak
allocated device memory for the GPU backend. Tokens are the non-padding tokens of the training batches.
"""

from __future__ import annotations

import sys
import time

from ..bars import LOG_INTERVAL_S, is_terminal
from ..memory import format_bytes


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process (Linux/macOS), or None where ``resource`` is unavailable."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


class Progress:
    """``with Progress(total, initial) as p: p.update(step, loss=..., lr=..., tokens=..., memory=...)``.

    ``enabled=False`` keeps the bookkeeping (tokens/s) without drawing anything.
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "finetune", file=None):
        self.total, self.initial = total, initial
        self.enabled = enabled
        self.desc = desc
        self.file = file if file is not None else sys.stderr
        self.bar = None
        self._t0 = None
        self._tokens = 0
        self.tokens_per_second = 0.0
        self.plain = enabled and not is_terminal(self.file)  # lines, not a redrawn bar
        self._last_line = None

    def __enter__(self) -> Progress:
        self._t0 = time.perf_counter()
        if self.enabled and not self.plain:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.initial, desc=self.desc, unit="step", file=self.file,
                            dynamic_ncols=True, leave=True)
        return self

    def update(self, step: int, *, loss: float, lr: float, tokens: int, memory: int | None = None,
               grad_norm: float | None = None) -> None:
        """Called after optimizer step ``step`` (1-based) with that step's training loss and token count."""
        self._tokens += tokens
        now = time.perf_counter()
        elapsed = now - self._t0
        self.tokens_per_second = self._tokens / elapsed if elapsed > 0 else 0.0
        if not self.enabled:
            return
        post = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{self.tokens_per_second:.0f}",
                "mem": format_bytes(memory)}
        if grad_norm is not None:
            post["gnorm"] = f"{grad_norm:.3f}"
        if self.bar is not None:
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(step - self.bar.n)
            return
        if self._last_line is None or now - self._last_line >= LOG_INTERVAL_S or step >= self.total:
            self._last_line = now
            figures = " ".join(f"{k} {v}" for k, v in post.items())
            print(f"{self.desc}: step {step}/{self.total} {figures} ({elapsed:.0f} s)", file=self.file, flush=True)

    def write(self, message: str) -> None:
        """A line above the bar (e.g. a held-out evaluation)."""
        if self.bar is not None:
            self.bar.write(message, file=self.file)
        else:
            print(message, file=self.file)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
