"""kill -9 inside saves, then resume: the run ends with the adapter and optimizer state an uninterrupted run ends
with, bit for bit, and never silently restarts from step 0. Slow (a fresh process per kill): -m slow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train import qa_records, write_jsonl, write_tiny_model

from qlora_ref.train.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow
CHILD = Path(__file__).with_name("crash_child.py")
MAX_STEPS = 6  # crash_child.py's config
KILLS = 12  # processes started with a kill point, per case


def child(files, out: Path, backend: str, keep: int, kill_at: int) -> int:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(CHILD), str(files / "model"), str(files / "train.jsonl"), str(out),
                           backend, str(keep), str(kill_at)], env=env, capture_output=True, timeout=600).returncode


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    write_tiny_model(root / "model", seed=3)
    write_jsonl(root / "train.jsonl", qa_records(24, seed=0))
    return root


@pytest.mark.parametrize("backend,keep", [("ref", 1), ("ref", 2), ("gpu", 1)],
                         ids=["reference-keep1", "reference-keep2", "torch_backend-keep1"])
def test_kills_inside_saves_resume_to_the_uninterrupted_result(files, tmp_path, backend, keep):
    if backend == "gpu":
        pytest.importorskip("bitsandbytes")
    (tmp_path / "full").mkdir()
    assert child(files, tmp_path / "full" / "out", backend, keep, 0) == 0
    out = tmp_path / "cut" / "out"
    out.parent.mkdir()
    rng = np.random.default_rng(keep)
    kills = 0
    for _ in range(KILLS):  # each process killed at a random operation of its saves (or, drawn late, finishing)
        rc = child(files, out, backend, keep, int(rng.integers(1, 45)))
        assert rc in (0, -9), f"the child failed (rc {rc}) instead of being killed"
        kills += rc == -9
    assert child(files, out, backend, keep, 0) == 0  # and a last, undisturbed run
    assert kills >= KILLS // 2
    full, cut = tmp_path / "full" / "out", out
    for name in ("adapter_model.safetensors", "log_history.json"):
        assert (cut / name).read_bytes() == (full / name).read_bytes(), name
    last = f"checkpoint-{MAX_STEPS}"
    assert (cut / last / "optimizer.safetensors").read_bytes() == (full / last / "optimizer.safetensors").read_bytes()
    assert [s for s, _ in list_checkpoints(cut)] == list(range(MAX_STEPS - keep + 1, MAX_STEPS + 1))
    assert not [p.name for p in cut.iterdir() if p.name.startswith(".")]  # no leftovers
    # a kill costs at most the step being saved: never a restart from step 0
    steps_run = (out.parent / "steps.log").read_text().count("step")
    assert MAX_STEPS <= steps_run <= MAX_STEPS + kills, (steps_run, kills)
