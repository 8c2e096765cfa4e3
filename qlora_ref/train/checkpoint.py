"""Training checkpoints with exact resume, written atomically (paper section 5: long runs are interrupted; a
resumed run must be the same run).

A checkpoint is a folder ``<output_dir>/checkpoint-<step>/``:

=============================  =======================================================================
``adapter_config.json``         PEFT's adapter config   } the adapters at this step, in PEFT's format
``adapter_model.safetensors``   PEFT-named LoRA weights } (``qlora_ref.adapters``): loadable on their own
``optimizer.safetensors``       the optimizer's flat state dict (``"<param>.<state>"``: Adam's m, v, step)
``rng.safetensors``             random states that are arrays (torch's generator state on the GPU backend)
``trainer_state.json``          step, data position, tokens seen, log history, the ``TrainConfig``, and the
                                random states that are plain numbers (NumPy bit generators: LoRA dropout)
=============================  =======================================================================

Everything is written to a temporary sibling folder first, each file flushed and fsynced, and the folder is then
renamed into place (``os.replace`` is atomic on POSIX): a crash leaves either the previous checkpoint or the new
one, never half of one. ``trainer_state.json`` is written last, and a folder without it is never picked up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------- atomic writes
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(tensors: dict[str, np.ndarray], path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.numpy.save`` to bytes, then an atomic write. Arrays are made C-contiguous first (keeping
    0-d arrays 0-d: ``np.ascontiguousarray`` would make them 1-d)."""
    from safetensors.numpy import save

    arrays = {k: np.asarray(v, order="C") for k, v in tensors.items()}
    atomic_write_bytes(path, save(arrays, metadata=metadata))


def load_safetensors(path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as NumPy arrays; a ValueError naming the file if it is unreadable."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError / OSError
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


# ---------------------------------------------------------------------------------------------- checkpoints
@dataclass
class Checkpoint:
    """Everything a training run needs to continue exactly where it stopped (all NumPy / JSON values)."""

    step: int  # optimizer steps completed
    adapter: dict[str, np.ndarray]  # PEFT names without the "base_model.model." prefix
    adapter_config: dict  # PEFT's adapter_config.json
    optimizer_state: dict[str, np.ndarray]
    state: dict  # trainer_state.json: data position, tokens, log history, config, JSON random states
    rng_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    path: Path | None = None


def checkpoint_dir(output_dir, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints (with a ``trainer_state.json``) under ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    out = []
    for p in output_dir.iterdir():
        m = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output_dir) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def save_checkpoint(output_dir, ckpt: Checkpoint, keep: int = 0) -> Path:
    """Write ``ckpt`` atomically as ``<output_dir>/checkpoint-<step>``; keep the newest ``keep`` (0: all)."""
    from ..adapters import write_adapter_files

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(output_dir, ckpt.step)
    tmp = Path(tempfile.mkdtemp(dir=output_dir, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        write_adapter_files(tmp, ckpt.adapter, ckpt.adapter_config)
        atomic_save_safetensors(ckpt.optimizer_state, tmp / OPTIMIZER_FILE, metadata={"format": "qlora-optimizer"})
        atomic_save_safetensors(ckpt.rng_arrays, tmp / RNG_FILE, metadata={"format": "qlora-rng"})
        state = dict(ckpt.state, step=ckpt.step, format_version=FORMAT_VERSION)
        atomic_write_json(tmp / STATE_FILE, state)  # last: its presence marks a complete checkpoint
        if final.exists():  # re-saving the same step: move the old one out of the way, then replace
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep:
        for _, old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint folder (or the latest checkpoint under an output folder)."""
    from ..adapters import read_adapter_files

    path = Path(path)
    if not (path / STATE_FILE).is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise ValueError(f"{path}: not a checkpoint folder (no {STATE_FILE}) and holds no {CHECKPOINT_PREFIX}N")
        path = latest
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path / STATE_FILE}: unreadable trainer state ({e})") from e
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path / STATE_FILE}: format_version {state.get('format_version')!r}, "
                         f"this version reads {FORMAT_VERSION}")
    adapter, adapter_config = read_adapter_files(path)
    optimizer_state = load_safetensors(path / OPTIMIZER_FILE)
    rng_arrays = load_safetensors(path / RNG_FILE) if (path / RNG_FILE).exists() else {}
    return Checkpoint(step=int(state["step"]), adapter=adapter, adapter_config=adapter_config,
                      optimizer_state=optimizer_state, state=state, rng_arrays=rng_arrays, path=path)
