"""The training progress bar: loss, learning rate, tokens per second and memory, one update per optimizer step.

Built on ``tqdm`` (written to stderr, so results printed on stdout stay clean) where stderr is a terminal;
elsewhere (a log file, ``nohup``, CI) a bar redrawn with carriage returns would be one ever-growing line, so the
same figures are written as plain lines instead: the first step, then at most one line every
``LOG_INTERVAL_S`` seconds, and the last step (``progress_iter`` applies the same rule to the other long loops:
an evaluation's batches, a merge's tensors, the GPU loader's layers). Memory is what the backend
reports: the process's peak resident memory for the reference (the NumPy arrays live in host RAM), the peak
allocated device memory for the GPU backend. Tokens are the non-padding tokens of the training batches.
"""

from __future__ import annotations

import sys
import time

from ..memory import format_bytes


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process (Linux/macOS), or None where ``resource`` is unavailable."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


#: seconds between two plain progress lines when stderr is not a terminal
LOG_INTERVAL_S = 30.0


def is_terminal(file) -> bool:
    """A terminal, or a Jupyter kernel's output stream (which draws tqdm's bar in place, though not a TTY)."""
    if type(file).__module__.startswith("ipykernel"):
        return True
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def progress_iter(items, total: int | None = None, desc: str = "", unit: str = "it", file=None):
    """``items``, one at a time, with their progress shown on ``file`` (stderr) by ``Progress``'s rule: tqdm's bar
    on a terminal; elsewhere (a log file) plain lines instead of a bar redrawn with carriage returns — after the
    first item, then at most one every ``LOG_INTERVAL_S`` seconds, and after the last. ``unit``: one item, in the
    singular (``"batch"``, ``"tensor"``): a line reads ``merge: tensor 12/22 (3 s)``."""
    file = file if file is not None else sys.stderr
    if is_terminal(file):
        from tqdm.auto import tqdm

        yield from tqdm(items, total=total, desc=desc, unit=unit, file=file, dynamic_ncols=True)
        return
    t0 = time.perf_counter()
    last = None  # (time, count) of the last line
    n = 0

    def line():  # the form of Progress' lines: "finetune: step 3/40 ... (12 s)"
        of = f"/{total}" if total is not None else ""
        print(f"{desc}: {unit} {n}{of} ({time.perf_counter() - t0:.0f} s)", file=file, flush=True)

    for item in items:
        yield item
        n += 1
        now = time.perf_counter()
        if last is None or now - last[0] >= LOG_INTERVAL_S or n == total:
            last = (now, n)
            line()
    if last is None or last[1] != n:  # the end, where the total was not known
        line()


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
