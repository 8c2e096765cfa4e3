"""Training checkpoints with exact resume, written atomically (this project's requirement, not the paper's: long
runs are interrupted, and a resumed run must be the same run).

A checkpoint is a folder ``<output_dir>/checkpoint-<step>/``:

=============================  =======================================================================
``adapter_config.json``         PEFT's adapter config   } the adapters at this step, in PEFT's format
``adapter_model.safetensors``   PEFT-named LoRA weights } (``qlora_ref.adapters``): loadable on their own
``optimizer.safetensors``       the optimizer's flat state dict (``"<param>.<state>"``: Adam's m, v, step)
``rng.safetensors``             random states that are arrays (torch's generator state on the GPU backend)
``trainer_state.json``          step, run id, data position, fingerprint of the training data, tokens seen,
                                log history, the ``TrainConfig``, and the random states that are plain numbers
                                (NumPy bit generators: LoRA dropout)
``qlora_checkpoint.json``       the marker: our format, its version, the run id, the step and the SHA-256 of
                                every other file (written last)
=============================  =======================================================================

Everything is written to a temporary sibling folder first, each file flushed and fsynced, and the folder is then
renamed into place (``os.replace`` is atomic on POSIX): a crash leaves either the previous checkpoint or the new
one, never half of one (``recover_checkpoints`` tidies what a kill leaves). The marker is written last: a folder
without it is never picked up, and never deleted — rotation removes only checkpoints whose marker carries the
current run's id, so a Hugging Face Trainer's ``checkpoint-N`` or an older run's stay untouched. One run at a
time writes a folder (``run_lock``): a second is refused before it tidies or resumes anything. The marker's
checksums catch what no structural check can — a bit flipped inside a tensor, an edited number — and a resume
passes over such a checkpoint as over an unreadable one; a marker without them (written before they existed) is
read unchecked.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, INCOMPLETE_FILE, read_adapter_files, write_adapter_files
from ..files import (
    atomic_save_safetensors,
    atomic_write_json,
    check_finite,
    fsync_dir,
    load_safetensors,
    sha256_file,
    temporary_folder,
)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
MARKER_FILE = "qlora_checkpoint.json"
MARKER_FORMAT = "qlora-checkpoint"
FORMAT_VERSION = 1
#: the files the marker's checksums cover: all of a checkpoint but the marker itself
CHECKSUMMED = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, OPTIMIZER_FILE, RNG_FILE, STATE_FILE)
#: what trainer_state.json must hold for a resume
STATE_KEYS = ("step", "run_id", "run_started", "data_position", "data_fingerprint", "tokens_seen", "log_history",
              "config", "rng")


# ---------------------------------------------------------------------------------------------- checkpoints
@dataclass
class Checkpoint:
    """Everything a training run needs to continue exactly where it stopped (all NumPy / JSON values)."""

    step: int  # optimizer steps completed
    adapter: dict[str, np.ndarray]  # PEFT names without the "base_model.model." prefix
    adapter_config: dict  # PEFT's adapter_config.json
    optimizer_state: dict[str, np.ndarray]
    state: dict  # trainer_state.json: run id, data position and fingerprint, tokens, log history, config, JSON rngs
    rng_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    path: Path | None = None

    @property
    def run_id(self) -> str:
        return self.state["run_id"]


class DamagedCheckpointError(ValueError):
    """A checkpoint whose files read but do not fit together or this model (a missing or extra optimizer state, a
    missing random state): resuming falls back to the checkpoint before it, as for an unreadable file."""


class OtherBackendError(ValueError):
    """A checkpoint written by the other backend: a refusal (its random state cannot move), not damage."""


def check_rng_backend(state: dict, mine: str) -> None:
    """A checkpoint's random state resumes only on the backend that wrote it: adapters and optimizer states move
    between backends, random generators do not (NumPy's and torch's streams differ)."""
    theirs = state.get("backend")
    if theirs == mine:
        return
    how = (f"--backend gpu --nproc {state.get('world_size')}" if theirs == "gpu-fsdp"  # qlora_gpu.fsdp_train's mark
           else f"--backend {theirs}")
    raise OtherBackendError(f"the checkpoint's random state comes from another backend ({theirs!r}, this is "
                            f"{mine!r}; NumPy's and torch's random generators cannot continue each other's "
                            f"streams): resume with {how}, or start afresh in another output folder")


def check_resume_backend(output_dir, mine: str) -> None:
    """``check_rng_backend`` on the checkpoint a resumed run would continue from, read from its
    ``trainer_state.json`` alone: the refusal comes before the model is loaded (minutes at scale), not after. An
    unreadable state is left to the resume, which falls back past it."""
    latest = latest_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    if latest is None:
        return
    try:
        rng = json.loads((latest / STATE_FILE).read_text())["rng"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if isinstance(rng, dict):
        check_rng_backend(rng, mine)


def new_run_id() -> str:
    """A fresh run's identity: its checkpoints carry it, and only checkpoints carrying it are ever deleted."""
    return uuid.uuid4().hex


def checkpoint_dir(output_dir, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"


def _marker(folder: Path) -> tuple[dict | None, str | None]:
    """(the valid marker, None), or (None, why a marker file that exists is not valid), or (None, None)."""
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as e:
        return None, f"unreadable ({e})"
    ok = (isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT
          and marker.get("format_version") == FORMAT_VERSION and isinstance(marker.get("run_id"), str)
          and isinstance(marker.get("run_started"), int | float) and isinstance(marker.get("step"), int))
    if not ok:
        return None, (f"not a {MARKER_FORMAT} version {FORMAT_VERSION} marker with run_id, run_started and step")
    sums = marker.get("sha256", {})  # absent in checkpoints written before checksums existed
    if not (isinstance(sums, dict) and set(sums) <= set(CHECKSUMMED)
            and all(isinstance(v, str) for v in sums.values())):
        return None, f"its sha256 is not a table of {', '.join(CHECKSUMMED)} to hex digests"
    if not (folder / STATE_FILE).is_file():
        return None, f"its {STATE_FILE} is missing"
    return marker, None


def read_marker(folder) -> dict | None:
    """The marker of a checkpoint folder this code wrote (format, version, run id, step), or None for anything
    else: a folder without it (a Hugging Face Trainer checkpoint, a half-written one) is never ours."""
    return _marker(Path(folder))[0]


def damaged_marker(folder) -> str | None:
    """Why ``folder``'s marker file, which exists, is not valid (bit rot, an edit), or None: such a folder may be
    ours, so it is reported as damaged, not as someone else's (and still never replaced or deleted)."""
    return _marker(Path(folder))[1]


def _our_checkpoints(output_dir) -> list[tuple[int, Path, dict]]:
    """(step, folder, marker) of every complete checkpoint of ours under ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    out = []
    for p in output_dir.iterdir():
        m = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", p.name)
        if m and p.is_dir():
            marker = read_marker(p)
            if marker is not None and marker["step"] == int(m.group(1)):
                out.append((int(m.group(1)), p, marker))
    return sorted(out, key=lambda t: t[0])


def list_checkpoints(output_dir, run_id: str | None = None) -> list[tuple[int, Path]]:
    """Complete checkpoints written by this code (of run ``run_id`` if given) under ``output_dir``, oldest first."""
    return [(s, p) for s, p, m in _our_checkpoints(output_dir) if run_id is None or m["run_id"] == run_id]


def resume_candidates(output_dir) -> list[Path]:
    """The checkpoints a resumed run may continue from, newest first: those of the most recently started run
    (a ``--no-resume`` run started over an older run's checkpoints is the one to continue), by step."""
    found = _our_checkpoints(output_dir)
    if not found:
        return []
    newest = max(found, key=lambda t: (t[2]["run_started"], t[0]))[2]["run_id"]
    return [p for _, p, m in reversed(found) if m["run_id"] == newest]


def latest_checkpoint(output_dir) -> Path | None:
    found = resume_candidates(output_dir)
    return found[0] if found else None


def foreign_checkpoint(output_dir, step: int, run_id: str) -> Path | None:
    """``checkpoint-<step>`` if it exists and was not written by run ``run_id`` (so it must not be replaced)."""
    final = checkpoint_dir(output_dir, step)
    if not os.path.lexists(final):
        return None
    marker = read_marker(final) if final.is_dir() else None
    return None if marker is not None and marker["run_id"] == run_id else final


# ---------------------------------------------------------------------------------------------- leftovers
#: what a killed save leaves behind: hidden folders ``.checkpoint-N.<random>.tmp`` (being written),
#: ``.checkpoint-N.old`` (a checkpoint being replaced) and ``.checkpoint-N.<random>.del`` (being deleted)
_LEFTOVER = re.compile(rf"\.{CHECKPOINT_PREFIX}(\d+)\.(?:.+\.tmp|old|.+\.del)")
#: an atomic file write killed before its rename: ``.<name>.<random>.tmp`` next to an output file of ours
_LEFTOVER_FILE = re.compile(r"\.(?:adapter_model\.safetensors|adapter_config\.json|train_config\.json|"
                            r"log_history\.json|demo_summary\.json)\..+\.tmp")


def recover_checkpoints(output_dir) -> list[str]:
    """Tidy what an interrupted save left in ``output_dir``; returns what was done, one line each.

    A kill between the two renames that replace a checkpoint leaves no ``checkpoint-N`` but a complete
    ``.checkpoint-N.<random>.tmp`` (the new one) or ``.checkpoint-N.old`` (the previous one): the complete one
    is put back in place (with ``keep_checkpoints=1`` it may be the only checkpoint). Every other leftover is
    removed — only names of our own temporary folders and files, never anything else."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    done = []
    leftovers = sorted((p for p in output_dir.iterdir() if _LEFTOVER.fullmatch(p.name) and p.is_dir()),
                       key=lambda p: (not p.name.endswith(".tmp"), p.name))  # a complete new one before .old
    for p in leftovers:
        step = int(_LEFTOVER.fullmatch(p.name).group(1))
        final = checkpoint_dir(output_dir, step)
        marker = read_marker(p)
        if (not p.name.endswith(".del") and marker is not None and marker["step"] == step
                and not os.path.lexists(final)):
            os.replace(p, final)
            done.append(f"restored {final.name} from {p.name} (a save was interrupted)")
        else:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name} (left by an interrupted save)")
    for p in output_dir.iterdir():
        if _LEFTOVER_FILE.fullmatch(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            done.append(f"removed {p.name} (left by an interrupted write)")
    if (output_dir / INCOMPLETE_FILE).exists():  # kept: only a finished run's complete set of files removes it
        done.append(f"{INCOMPLETE_FILE}: a run was stopped while replacing the final adapter files; they are "
                    "refused until a run that reaches max_steps here rewrites them")
    if done:
        fsync_dir(output_dir)
    return done


def _delete_checkpoint(path: Path) -> None:
    """Rename first (atomic), then delete: a kill halfway never leaves a half-deleted ``checkpoint-N``."""
    doomed = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".del"))
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(output_dir, ckpt: Checkpoint, keep: int = 0) -> Path:
    """Write ``ckpt`` atomically as ``<output_dir>/checkpoint-<step>``; keep the newest ``keep`` of this run's
    checkpoints (0: all). Only checkpoints whose marker carries this run's id are ever replaced or deleted: a
    ``checkpoint-<step>`` of anyone else is an error, not something to overwrite."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(output_dir, ckpt.step)
    if foreign_checkpoint(output_dir, ckpt.step, ckpt.run_id) is not None:
        raise ValueError(f"{final}: exists and was not written by this run; refusing to replace it")
    check_finite(ckpt.optimizer_state, f"checkpoint-{ckpt.step} optimizer state")
    tmp = temporary_folder(output_dir, prefix=f".{final.name}.", suffix=".tmp")
    try:
        write_adapter_files(tmp, ckpt.adapter, ckpt.adapter_config, ckpt.state.get("base_model_fingerprint"))
        atomic_save_safetensors(ckpt.optimizer_state, tmp / OPTIMIZER_FILE, metadata={"format": "qlora-optimizer"})
        atomic_save_safetensors(ckpt.rng_arrays, tmp / RNG_FILE, metadata={"format": "qlora-rng"})
        state = dict(ckpt.state, step=ckpt.step, format_version=FORMAT_VERSION)
        atomic_write_json(tmp / STATE_FILE, state)
        # last: its presence marks a complete checkpoint of ours, and of which run; the checksums are of the files
        # as written (read back, likely from the page cache), so what changes them afterwards is caught on resume
        atomic_write_json(tmp / MARKER_FILE, {"format": MARKER_FORMAT, "format_version": FORMAT_VERSION,
                                              "run_id": ckpt.run_id, "run_started": ckpt.state["run_started"],
                                              "step": ckpt.step,
                                              "sha256": {name: sha256_file(tmp / name) for name in CHECKSUMMED}})
        if final.exists():  # re-saving the same step: move the old one out of the way, then replace
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)  # a kill between the two renames: recover_checkpoints puts one back
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep:
        for _, old in list_checkpoints(output_dir, ckpt.run_id)[:-keep]:
            _delete_checkpoint(old)
    return final


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint folder (or the newest checkpoint under an output folder)."""
    path = Path(path)
    if read_marker(path) is None:
        if (path / STATE_FILE).is_file() or (path / MARKER_FILE).exists():
            raise ValueError(f"{path}: not a complete checkpoint written by qlora (no valid {MARKER_FILE}; "
                             "a Hugging Face Trainer checkpoint, or an interrupted save)")
        latest = latest_checkpoint(path)
        if latest is None:
            raise ValueError(f"{path}: not a checkpoint folder (no {MARKER_FILE}) and holds no {CHECKPOINT_PREFIX}N")
        path = latest
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path / STATE_FILE}: unreadable trainer state ({e})") from e
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        version = state.get("format_version") if isinstance(state, dict) else None
        raise ValueError(f"{path / STATE_FILE}: format_version {version!r}, this version reads {FORMAT_VERSION}")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"{path / STATE_FILE}: incomplete trainer state (no {', '.join(missing)})")
    marker = read_marker(path)
    check_checksums(path, marker)  # first: a changed file is named as the checkpoint's damage, whatever reads it
    adapter, adapter_config = read_adapter_files(path, check_sha256=False)  # its bytes: the marker's checksum
    optimizer_state = load_safetensors(path / OPTIMIZER_FILE)
    check_finite(optimizer_state, str(path / OPTIMIZER_FILE))
    rng_arrays = load_safetensors(path / RNG_FILE)  # save_checkpoint always writes it (empty on the reference)
    for key in ("step", "run_id"):  # the marker is checked against the folder's name; the state must agree with it
        if state[key] != marker[key]:
            raise ValueError(f"{path / STATE_FILE}: {key} {state[key]!r} disagrees with {marker[key]!r} in "
                             f"{MARKER_FILE} (an edited or damaged file)")
    return Checkpoint(step=int(state["step"]), adapter=adapter, adapter_config=adapter_config,
                      optimizer_state=optimizer_state, state=state, rng_arrays=rng_arrays, path=path)


def check_checksums(path: Path, marker: dict) -> None:
    """Each file of checkpoint ``path`` against the SHA-256 its marker recorded when it was written: a file that
    reads but changed since (a flipped bit, an edit) is damage, reported before anything resumes from it. Run
    after the files are read, so that a file that does not read is named as unreadable."""
    sums = marker.get("sha256", {})
    for name in (n for n in CHECKSUMMED if n in sums):
        expected, actual = sums[name], sha256_file(path / name)
        if actual != expected:
            raise ValueError(f"{path / name}: its content changed since it was written (sha256 {actual[:12]}..., "
                             f"{MARKER_FILE} recorded {expected[:12]}...): a damaged or edited file")


#: the advisory lock a run holds on its output folder (``run_lock``); it holds the holder's process id
LOCK_FILE = ".qlora.lock"


def _locked(output_dir, holder: str) -> ValueError:
    return ValueError(f"{output_dir}: another qlora run is writing this folder"
                      f"{f' (process {holder})' if holder else ''}; wait for it to end, or choose another output "
                      "folder")


def check_not_locked(output_dir) -> None:
    """``run_lock``'s refusal, before a model is loaded (minutes at scale): a probe of the lock, released at once.
    The run still takes the lock itself; this only spares the wait when another run already holds it. (flock has
    no test without taking: a second run that takes its lock in the probe's microseconds is refused, naming the
    previous holder. Two runs started on one folder at the same moment: one of them is refused either way.)"""
    try:
        import fcntl
    except ImportError:
        return
    try:
        fd = os.open(Path(output_dir) / LOCK_FILE, os.O_RDWR)
    except OSError:  # no lock file: no run holds it
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        raise _locked(output_dir, os.read(fd, 32).decode(errors="replace").strip()) from None
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_lock(output_dir):
    """Hold an exclusive advisory lock (``flock``) on ``<output_dir>/.qlora.lock`` for a run: a second run in the
    same folder is refused at once, naming the holder's process id, instead of tidying away the first run's
    in-flight checkpoint (``recover_checkpoints``) and both crashing. The kernel drops the lock when the holder
    dies, so a killed run never leaves a stale one. Where ``flock`` does not exist (Windows) or is refused (some
    network file systems) the run goes on unlocked: concurrent runs are then the documented limit."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    path = Path(output_dir) / LOCK_FILE
    fd = None
    while fcntl is not None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise _locked(output_dir, holder) from None
        except OSError:  # no lock support here
            os.close(fd)
            fd = None
            break
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:  # not unlinked by a finishing holder meanwhile
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        if fd is not None:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                path.unlink()  # before the unlock: a run that opened it meanwhile sees the inode change, retries
            os.close(fd)
