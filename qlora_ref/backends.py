"""Finding a backend by name through the ``qlora.backends`` entry-point group.

Each package registers itself in pyproject.toml, so the reference never imports ``qlora_gpu`` (and runs
without torch installed) while the CLI can still offer ``--backend gpu``.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from types import ModuleType

GROUP = "qlora.backends"


def available_backends() -> list[str]:
    """Names of the installed backends ("ref", "gpu", ...)."""
    return sorted(ep.name for ep in entry_points(group=GROUP))


def load_backend(name: str) -> ModuleType:
    """The backend's module; a clear error if it is unknown or its dependencies are missing."""
    eps = {ep.name: ep for ep in entry_points(group=GROUP)}
    if name not in eps:
        if name == "ref":  # running from a source tree that was not pip-installed
            return importlib.import_module("qlora_ref")
        raise ValueError(f"backend must be one of {sorted(eps) or ['ref']}, got {name!r}")
    try:
        return eps[name].load()
    except ImportError as e:
        raise ValueError(
            f"backend {name!r} needs packages that are not installed ({e}); "
            f"for the gpu backend: pip install 'qlora[gpu]'"
        ) from e
