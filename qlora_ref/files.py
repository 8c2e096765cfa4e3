"""Files written atomically (write a temporary sibling, fsync, ``os.replace``) and safetensors read with clear
errors: a crash leaves either the old file or the new one, never half of one.

Checkpoints, adapters and exported folders all write through these functions. The module imports nothing of the
package, so every module that writes files can use it without depending on the training or model code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename inside it) to disk, where the platform allows it."""
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


def _umask() -> int:
    # read without changing it for good: os.umask only sets (and returns the old value)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class WriteError(OSError):
    """A file that could not be written (a full disk, no permission): one line naming the file, the reason and
    the free space there (``qlora``'s commands print it as their error, exit status 2)."""

    def __str__(self) -> str:
        return self.strerror


def _write_error(path: Path, e: Exception) -> WriteError:
    code = getattr(e, "errno", None)
    if code is None:  # safetensors' own error, e.g. "I/O error: No space left on device (os error 28)"
        m = re.search(r"os error (\d+)", str(e))
        code = int(m.group(1)) if m else errno.EIO
    try:
        free = f"; {shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free there"
    except OSError:
        free = ""
    return WriteError(code, f"{path}: could not be written ({os.strerror(code)}{free}); the previous file, if "
                            "any, is unchanged")


def atomic_write_with(path, write) -> None:
    """``write(tmp)`` fills a temporary sibling of ``path`` (a path), which is then flushed to disk and renamed
    over ``path``. The file gets the mode a plain ``open(path, "w")`` gives (``0o666`` less the umask):
    ``mkstemp`` alone would leave it readable by its owner only, a shared model folder unreadable to others.
    An OS error (a full disk) is a :class:`WriteError` naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _atomic_write_with(path, write)
    except WriteError:
        raise
    except OSError as e:
        raise _write_error(path, e) from e
    except Exception as e:
        if type(e).__name__ != "SafetensorError":  # safetensors reports a failed write as its own error type
            raise
        raise _write_error(path, e) from e


def _atomic_write_with(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # after the write: a writer may replace the file (safetensors does)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def temporary_folder(parent, prefix: str, suffix: str) -> Path:
    """A new hidden folder in ``parent`` to fill and then rename into place, with the mode ``mkdir`` gives
    (``0o777`` less the umask), not ``mkdtemp``'s owner-only one."""
    folder = Path(tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=suffix))
    folder.chmod(0o777 & ~_umask())
    return folder


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    atomic_write_with(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(tensors: dict[str, np.ndarray], path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.numpy.save_file`` into a temporary sibling, then renamed over ``path`` (``atomic_write_with``).
    Arrays are made C-contiguous first (keeping 0-d arrays 0-d: ``np.ascontiguousarray`` would make them 1-d)."""
    from safetensors.numpy import save_file

    arrays = {k: np.asarray(v, order="C") for k, v in tensors.items()}

    def write(tmp):
        # straight to the file: serialising to bytes first would hold a second copy of a model being exported
        save_file(arrays, tmp, metadata=metadata)
        if metadata and len(metadata) > 1:
            _sort_metadata(tmp)

    atomic_write_with(path, write)


def _sort_metadata(path) -> None:
    """Rewrite a safetensors file's ``__metadata__`` in sorted key order, in place. safetensors writes it from a
    hash map whose order changes from process to process, so the same tensors and metadata would give other
    bytes on every write (and byte-identical resumes would not be). The header is the format's documented
    8-byte length and compact JSON; reordering keys keeps its length, and where it would not (an escape written
    otherwise) the file is left as written."""
    import struct

    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        body = raw.rstrip(b" ")  # the header is padded with spaces to an 8-byte boundary
        header = json.loads(body)
        meta = header.pop("__metadata__", None)
        if meta is None:
            return
        ordered = json.dumps({"__metadata__": dict(sorted(meta.items())), **header}, separators=(",", ":"),
                             ensure_ascii=False).encode()
        if len(ordered) == len(body) and ordered != body:
            f.seek(8)
            f.write(ordered)


def sha256_file(path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB pieces (a checkpoint's optimizer state may be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tensors_sha256(tensors) -> str:
    """The SHA-256 of named arrays — each name, dtype, shape and bytes, in name order: what a safetensors file
    holds, whatever its header's layout. Kept in an adapter file's metadata, it catches a bit flipped in a weight,
    which no structural check can."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


#: model_fingerprint: files up to this size are hashed whole; larger ones by their first MiB (the header) and a
#: 4 KiB sample every 8 MiB, so that a 140 GB model costs about 70 MB of reads, not 140 GB
_WHOLE, _HEAD, _SAMPLE, _STRIDE = 64 << 20, 1 << 20, 4 << 10, 8 << 20


def model_fingerprint(path) -> str | None:
    """A sampled SHA-256 of a model's own files — ``config.json`` and its ``.safetensors`` / ``.gguf`` weights (the
    shards and the index of a sharded folder; or the one ``.gguf`` file ``path`` is) — naming each file and its
    size; None if ``path`` is not a file or folder here (a hub id). Two copies of a model have the same
    fingerprint wherever they lie; another model or another revision of one (every tensor of a fine-tune differs)
    has another. Sampled above 64 MiB a file: an edit of a single small tensor inside a large file may go
    unseen."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and (p.suffix in (".safetensors", ".gguf") or p.name == "config.json"))
        try:  # a sharded folder: the shards its index lists (what the loaders read), not every file beside them
            shards = set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())
            files = [p for p in files if p.suffix != ".safetensors" or p.name in shards]
            files.append(path / "model.safetensors.index.json")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
    else:
        return None
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= _WHOLE:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
                continue
            h.update(fh.read(_HEAD))
            for offset in [*range(_HEAD, size - _SAMPLE, _STRIDE), size - _SAMPLE]:
                fh.seek(offset)
                h.update(fh.read(_SAMPLE))
    return "sampled-sha256:" + h.hexdigest()


def read_json_object(path) -> dict:
    """The JSON object in the file ``path``; a ``ValueError`` naming the file when it cannot be read, is not UTF-8
    JSON, or holds something other than an object. Every configuration file a user brings (config.json, tokenizer
    files, adapter_config.json, a training config) is read through this."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


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


def check_finite(arrays: dict[str, np.ndarray], what: str) -> None:
    """Refuse NaN or Inf in float arrays (a diverged run's state must never replace a good one on disk)."""
    for name, a in arrays.items():
        a = np.asarray(a)
        a = a.astype(np.float32) if a.dtype.name == "bfloat16" else a  # ml_dtypes' bfloat16 is not of kind "f"
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ValueError(f"{what}: tensor {name!r} holds NaN or Inf (a diverged training run?)")


def save_figure(fig, path, dpi: int = 120) -> None:
    """A matplotlib figure written atomically, in the format its file name says (``.png``, ``.svg``, ``.pdf``)."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=fmt))
