"""kill -9 inside saves, then resume: the run ends with the adapter and optimizer state an uninterrupted run ends
with, bit for bit, and never silently restarts from step 0 (slow, a fresh process per kill: -m slow); and a kill
inside the final write of the adapter files leaves a folder that is refused until a rerun repairs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train import qa_records, write_jsonl, write_tiny_model

from qlora_ref.adapters import ADAPTER_CONFIG, INCOMPLETE_FILE, read_adapter_files
from qlora_ref.cli import main
from qlora_ref.train.checkpoint import list_checkpoints

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


@pytest.mark.slow
@pytest.mark.parametrize("backend,keep", [("ref", 1), ("ref", 2), ("gpu", 1)],
                         ids=["reference-keep1", "reference-keep2", "torch_backend-keep1"])
def test_kills_inside_saves_resume_to_the_uninterrupted_result(files, tmp_path, backend, keep):
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


#: ``python -c KILL_BEFORE_REPLACE DST qlora-args...``: the CLI in this process, SIGKILLed just before the
#: ``os.replace`` onto DST (every atomic write ends in one), as crash_child.py kills inside saves
KILL_BEFORE_REPLACE = """
import os, signal, sys
dst, replace = os.path.abspath(sys.argv[1]), os.replace
def deadly(src, to, *a, **k):
    if os.path.abspath(to) == dst:
        os.kill(os.getpid(), signal.SIGKILL)
    return replace(src, to, *a, **k)
os.replace = deadly
from qlora_ref.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("before", ["adapter_config.json", "train_config.json", "log_history.json"])
def test_a_kill_inside_the_final_write_never_leaves_a_silently_mixed_adapter(files, tmp_path, before, capsys):
    """Run X finishes; run Y (another alpha, --no-resume) is killed between the renames of its final files. The
    folder then mixes Y's weights with X's files: every reader must refuse it, and rerunning Y's command (it
    resumes) must leave exactly what an uninterrupted Y leaves."""
    common = ["finetune", "--model", str(files / "model"), "--data", str(files / "train.jsonl"), "--lora-r", "4",
              "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-3", "--no-progress"]
    y = [*common, "--max-steps", "2", "--lora-alpha", "64"]
    out, clean = tmp_path / "out", tmp_path / "clean"
    assert main([*common, "--max-steps", "3", "--lora-alpha", "16", "--output-dir", str(out)]) == 0  # run X
    killed = subprocess.run([sys.executable, "-c", KILL_BEFORE_REPLACE, str(out / before), *y, "--no-resume",
                             "--output-dir", str(out)], capture_output=True, timeout=300)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    with pytest.raises(ValueError, match=f"{INCOMPLETE_FILE}: a qlora finetune run was stopped"):
        read_adapter_files(out)
    capsys.readouterr()
    assert main(["generate", "--adapter", str(out), "--prompt", "what is 1 plus 2", "--max-new-tokens", "2"]) == 2
    assert INCOMPLETE_FILE in capsys.readouterr().err
    with pytest.warns(UserWarning, match=f"{INCOMPLETE_FILE}: a run was stopped"):
        assert main([*y, "--output-dir", str(out)]) == 0  # the repair: Y's command again, resuming Y
    assert main([*y, "--output-dir", str(clean)]) == 0  # Y, never interrupted
    assert not (out / INCOMPLETE_FILE).exists()
    for name in ("adapter_model.safetensors", ADAPTER_CONFIG, "log_history.json"):
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name
    assert read_adapter_files(out)[1]["lora_alpha"] == 64
