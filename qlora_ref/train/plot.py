"""A fine-tune's curves in one picture (``qlora plot RUN_DIR``): the training loss of every optimizer step with its
running mean, the held-out loss where it was measured (at step 0 too for ``qlora demo``, which measures it before
training), and beneath it the learning rate and the gradient norm before clipping — what ``log_history.json``
(written by ``loop.train``) records, read back.

matplotlib is optional; it is imported only here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .config import adapter_recipe

#: what ``loop.train`` writes beside the adapter: one entry per optimizer step
LOG_FILE = "log_history.json"


def read_log(run_dir) -> list[dict]:
    """The entries of ``run_dir/log_history.json``, checked: a list of objects with an integer ``step``. A run
    still going, or interrupted, has no such file yet: then the log its newest checkpoint holds (the one a resume
    would continue from)."""
    from .checkpoint import STATE_FILE, resume_candidates

    path = Path(run_dir) / LOG_FILE
    if not Path(run_dir).is_dir():
        raise ValueError(f"{run_dir}: no such run folder (the --output-dir of qlora finetune or demo)")
    if not path.is_file():
        candidates = resume_candidates(run_dir)
        if not candidates:
            raise ValueError(f"{run_dir}: no {LOG_FILE} and no checkpoint: nothing trained here yet")
        path = candidates[0] / STATE_FILE
    try:
        log = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if path.name == STATE_FILE:
        log = log.get("log_history") if isinstance(log, dict) else None
    if not isinstance(log, list) or not all(isinstance(e, dict) and isinstance(e.get("step"), int) for e in log):
        raise ValueError(f"{path}: expected a list of entries with an integer 'step'")
    if not any(_finite(e.get("loss")) for e in log):
        raise ValueError(f"{path}: no training loss to plot")
    return log


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def running_mean(values: list[float], window: int) -> list[float]:
    """The mean of the last ``window`` values at each position (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def held_out_before(run_dir) -> float | None:
    """The held-out loss before training, where the run recorded it (``qlora demo``'s ``demo_summary.json``)."""
    path = Path(run_dir) / "demo_summary.json"
    try:
        ppl = json.loads(path.read_text()).get("perplexity_before") if path.is_file() else None
    except (json.JSONDecodeError, AttributeError):
        return None
    return math.log(ppl) if _finite(ppl) and ppl > 0 else None


def plot_run(run_dir, path) -> list[dict]:
    """Write the run's curves to ``path`` (its suffix picks the format: .png, .svg, .pdf); returns the log drawn."""
    log = read_log(run_dir)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ValueError(f"plotting needs matplotlib, which is not installed ({e}): pip install matplotlib") from e
    from ..files import save_figure

    train = [(e["step"], e["loss"]) for e in log if _finite(e.get("loss"))]
    held = [(e["step"], e["eval_loss"]) for e in log if _finite(e.get("eval_loss"))]
    before = held_out_before(run_dir)
    if before is not None:
        held.insert(0, (0, before))
    steps, losses = zip(*train, strict=True)
    window = max(1, len(losses) // 10)

    fig = Figure(figsize=(7.5, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    top.plot(steps, losses, ".", color="tab:blue", alpha=0.35, label="training loss (each step)")
    top.plot(steps, running_mean(list(losses), window), "-", color="tab:blue",
             label=f"training loss (mean of {window} steps)")
    if held:
        top.plot(*zip(*held, strict=True), "o-", color="tab:orange", label="held-out loss")
    top.set_ylabel("loss (nats per token)")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    lr = [(e["step"], e["lr"]) for e in log if _finite(e.get("lr"))]
    norm = [(e["step"], e["grad_norm"]) for e in log if _finite(e.get("grad_norm"))]
    if lr:
        bottom.plot(*zip(*lr, strict=True), "-", color="tab:green")
    bottom.set_ylabel("learning rate", color="tab:green")
    bottom.set_xlabel("optimizer step")
    bottom.grid(alpha=0.3)
    if norm:
        twin = bottom.twinx()
        twin.plot(*zip(*norm, strict=True), "-", color="tab:red", alpha=0.7)
        twin.set_ylabel("gradient norm (before clipping)", color="tab:red")
    recipe = adapter_recipe(run_dir)
    title = f"{Path(run_dir).name}: {len(train)} steps"
    if recipe is not None:
        title += (f"; {recipe.quant_type}, r={recipe.lora_r}, lr {recipe.learning_rate:g} ({recipe.lr_scheduler}), "
                  f"batch {recipe.micro_batch_size}×{recipe.gradient_accumulation_steps}")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
    return log
