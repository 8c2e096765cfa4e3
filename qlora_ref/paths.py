"""Output locations, checked before any long work starts: a run that trains for an hour and then finds its
``--output-dir`` to be a file has wasted the hour. Each check raises a ``ValueError`` that names the option
(``what``), the path and what was expected."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def _existing_ancestor(path: Path) -> Path:
    """The nearest part of ``path`` (itself or a parent) that exists."""
    for p in (path, *path.parents):
        if os.path.lexists(p):
            return p
    return Path(path.anchor or ".")


def _check_can_write_in(folder: Path, what: str, path: Path) -> None:
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot write in {folder} ({e.strerror or e})") from None


def check_writable_dir(path, what: str = "output folder") -> Path:
    """``path`` as a folder we can write in, created if missing (with its parents). Refused: a path that is a
    file, lies under a file, or cannot be created or written."""
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise ValueError(f"{what} {path}: exists and is not a folder")
    ancestor = _existing_ancestor(path)
    if ancestor != path and not ancestor.is_dir():
        raise ValueError(f"{what} {path}: {ancestor} is a file, so no folder can be made under it")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot create the folder ({e.strerror or e})") from None
    _check_can_write_in(path, what, path)
    return path


@contextlib.contextmanager
def new_run_dir(path, what: str = "output folder"):
    """``check_writable_dir`` for a run, undone if the run fails: the folders it created (``path`` and any missing
    parents) are removed again while still empty, so a refused model or data file leaves no empty folder behind.
    A folder that existed before, or holds anything, is kept."""
    path = Path(path)
    created = [p for p in (path, *path.parents) if not os.path.lexists(p)]  # deepest first
    check_writable_dir(path, what)
    try:
        yield path
    except BaseException:
        for folder in created:
            try:
                folder.rmdir()
            except OSError:  # not empty (the run wrote something), or gone: keep the rest too
                break
        raise


def check_output_file(path, what: str = "output file") -> Path:
    """``path`` as a file we can write: its folder exists and is writable, and it is not itself a folder."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path}: is a folder, expected a file name")
    folder = path.parent
    if not folder.is_dir():
        reason = "is a file" if os.path.lexists(folder) else "does not exist"
        raise ValueError(f"{what} {path}: its folder {folder} {reason} (create the folder first)")
    _check_can_write_in(folder, what, path)
    return path


#: picture formats every matplotlib backend writes (``files.save_figure`` takes the format from the suffix)
FIGURE_FORMATS = ("png", "svg", "pdf", "jpg", "jpeg", "eps", "ps", "tif", "tiff", "webp")


def check_figure_file(path, what: str = "picture") -> Path:
    """``check_output_file`` for a picture: its suffix must name a format matplotlib writes (none: PNG)."""
    path = check_output_file(path, what)
    suffix = path.suffix.lstrip(".").lower()
    if suffix and suffix not in FIGURE_FORMATS:
        raise ValueError(f"{what} {path}: .{suffix} is not a picture format; use one of "
                         f"{', '.join('.' + f for f in FIGURE_FORMATS)}")
    return path
