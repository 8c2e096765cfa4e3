"""A training run that kills itself (SIGKILL, no cleanup) at its N-th file-system operation inside a save: the
child process of tests/test_crash_resume.py.

    python crash_child.py MODEL DATA OUTPUT_DIR BACKEND KEEP_CHECKPOINTS KILL_AT

KILL_AT = 0 runs to the end. Every optimizer step appends a line to OUTPUT_DIR/../steps.log, so the parent can
count the steps all processes together ran (a silent restart at step 0 would show there).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path


def main() -> None:
    model, data, out, backend, keep, kill_at = sys.argv[1:7]
    kill_at = int(kill_at)
    from qlora_ref.train.api import load_tokenizer, make_trainer, prepare_data
    from qlora_ref.train.config import TrainConfig
    from qlora_ref.train.loop import train

    config = TrainConfig(lora_r=4, lora_dropout=0.1, max_steps=6, micro_batch_size=2, gradient_accumulation_steps=1,
                         learning_rate=1e-3, save_every=1, keep_checkpoints=int(keep), eval_fraction=0.0,
                         progress=False, compute_dtype="float32")
    train_ds, _, _ = prepare_data(data, load_tokenizer(model), config)
    trainer, _ = make_trainer(model, config, backend)
    log = os.open(Path(out).parent / "steps.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    step = trainer.optimizer_step

    def logged_step(*a, **k):
        norm = step(*a, **k)
        os.write(log, b"step\n")
        return norm

    trainer.optimizer_step = logged_step
    calls = 0

    def deadly(f):
        def inner(*a, **k):
            nonlocal calls
            calls += 1
            if calls == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return f(*a, **k)

        return inner

    # every write, rename and removal a save makes goes through these
    os.replace, os.fsync, shutil.rmtree = deadly(os.replace), deadly(os.fsync), deadly(shutil.rmtree)
    train(trainer, train_ds, config, output_dir=out, resume=True)


if __name__ == "__main__":
    main()
