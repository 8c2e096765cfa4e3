"""Print constraints.txt for the current environment: ``python .ci/lock.py > constraints.txt`` (docs/dependencies.md).

Run it in the environment the suite, the notebooks and the docs build were just proven in (the README's test
command plus the ``notebooks,docs,demo`` extras and the ``--no-deps`` model packages, as ``.ci/run`` installs them).
It prints the header of the current constraints.txt, then ``pip freeze`` without torch (the install command pins
it; a GPU machine chooses its CUDA build), torch's CUDA runtime packages and the project itself (editable). It
refuses when a requirement of the project's extras is not installed: the lock would not cover it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

CONSTRAINTS = Path(__file__).resolve().parent.parent / "constraints.txt"
#: left to the install command: torch and its CUDA runtime (``nvidia-*`` wheels of a CUDA build)
UNLOCKED = re.compile(r"^(torch|nvidia-[\w.-]+|qlora)==", re.IGNORECASE)


def header() -> list[str]:
    """The comment lines at the top of the current constraints.txt."""
    lines = CONSTRAINTS.read_text().splitlines()
    return lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))]


def missing_requirements() -> list[str]:
    """Requirements of qlora with all its extras (markers evaluated here) that are not installed, torch aside."""
    from packaging.requirements import Requirement

    extras = ["", *(metadata.metadata("qlora").get_all("Provides-Extra") or [])]
    missing = []
    for text in metadata.requires("qlora") or []:
        req = Requirement(text)
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras):
            continue
        if req.name in ("torch", "qlora"):
            continue
        try:
            metadata.version(req.name)
        except metadata.PackageNotFoundError:
            missing.append(req.name)
    return missing


def main() -> int:
    missing = missing_requirements()
    if missing:
        print(f"not installed, so not locked: {', '.join(missing)} — install every extra first, as .ci/run "
              "does (docs/dependencies.md)", file=sys.stderr)
        return 1
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True,
                            text=True, check=True).stdout.splitlines()
    pins = [line for line in freeze if line and not line.startswith(("#", "-e ")) and not UNLOCKED.match(line)]
    print("\n".join([*header(), *pins]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
