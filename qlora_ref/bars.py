"""Progress of a long loop on stderr, for people and for logs: tqdm's bar where stderr is a terminal (or a Jupyter
kernel); elsewhere (a log file, ``nohup``, CI) a bar redrawn with carriage returns would be one ever-growing line,
so plain lines instead — after the first item, then at most one every ``LOG_INTERVAL_S`` seconds, and after the
last. Used by the loader (reading and quantizing weights), a merge's tensors, an evaluation's batches; the training
bar (``qlora_ref.train.progress.Progress``) follows the same rule. A module of its own, below the model and the
training loop, so that both can show progress.
"""

from __future__ import annotations

import sys
import time

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
    """``items``, one at a time, with their progress shown on ``file`` (stderr) by the module's rule: tqdm's bar
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
