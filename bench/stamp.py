"""What every benchmark result file carries (issue 36): the code (commit, dirty flag, a hash of the sources), the
versions, the GPU and the host, the time and the command.

    python bench/stamp.py            # print this machine's stamp
    python bench/stamp.py --freeze   # before a GPU session: write bench/results/FROZEN_STAMP.json (git's view)
    python bench/stamp.py --check    # exit 2 unless the code a result would name can be recovered

The GPU machine gets a copy of the working tree without ``.git``: there ``git`` cannot say the commit, so
``--freeze`` records it beforehand (commit, dirty flag, the diff's hash) and ``stamp()`` reads that file. Whether
the copy is still that tree is checked by ``source_sha256``, a hash of every ``.py`` file under ``qlora_ref``,
``qlora_gpu`` and ``bench`` computed where the benchmark runs: equal to the frozen one, the code is the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the project's packages
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
FROZEN = RESULTS / "FROZEN_STAMP.json"
SOURCE_DIRS = ("qlora_ref", "qlora_gpu", "bench")
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "triton", "numpy", "numba", "accelerate",
            "safetensors")


def source_sha256(root: Path = ROOT) -> str:
    """sha256 over the relative path and bytes of every ``.py`` file of ``SOURCE_DIRS``, in sorted order."""
    h = hashlib.sha256()
    for d in SOURCE_DIRS:
        for path in sorted((root / d).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


#: the most of an uncommitted diff a stamp keeps (its hash covers all of it)
MAX_DIFF_CHARS = 200_000


def git_state() -> dict | None:
    """commit, dirty flag, and for a dirty tree what differs: ``git status --porcelain``, the diff itself and the
    text of files git does not track (up to ``MAX_DIFF_CHARS`` together, ``diff_truncated`` past it; the hash
    covers the whole diff), all without ``bench/results``, so that the code of a dirty run can be rebuilt from the
    commit (None outside a git checkout)."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return None
    exclude = [f":!{RESULTS.relative_to(ROOT)}"]  # what benchmarks write is not the code that ran
    status = _git("status", "--porcelain", "--", ".", *exclude) or ""
    diff = _git("diff", "HEAD", "--", ".", *exclude) or ""
    out = dict(commit=commit, dirty=bool(status), diff_sha256=hashlib.sha256(diff.encode()).hexdigest() if diff
               else None, source="git")
    if status:
        out.update(status=status.splitlines(), diff=diff[:MAX_DIFF_CHARS], diff_truncated=len(diff) > MAX_DIFF_CHARS)
        # files git does not track are in no diff: their text too, in what is left of the budget
        left, untracked = MAX_DIFF_CHARS - len(out["diff"]), {}
        for name in (_git("ls-files", "--others", "--exclude-standard", "--", ".", *exclude) or "").splitlines():
            try:
                text = (ROOT / name).read_text()
            except (OSError, UnicodeDecodeError):
                text = None
            if text is not None and len(text) <= left:
                untracked[name], left = text, left - len(text)
            else:
                out["diff_truncated"] = True
                untracked[name] = None
        if untracked:
            out["untracked"] = untracked
    return out


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            module = __import__(name)
            out[name] = str(getattr(module, "__version__", "?"))
        except Exception:  # noqa: BLE001 - absent or broken: say so, the stamp must not fail
            out[name] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
    except Exception:  # noqa: BLE001
        pass
    return out


def gpu() -> list[dict]:
    try:
        import torch
    except Exception:  # noqa: BLE001
        return []
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(dict(index=i, name=p.name, total_bytes=int(p.total_memory), capability=f"{p.major}.{p.minor}",
                        multiprocessors=p.multi_processor_count))
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if smi.returncode == 0:
            for row, line in zip(out, smi.stdout.strip().splitlines(), strict=False):
                row["nvidia_smi"] = line.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return out


def host() -> dict:
    """The machine: its CPU's model and the instruction-set features that pick torch's, oneDNN's and bitsandbytes'
    CPU kernels (``qlora doctor``'s), cores, memory and the load average."""
    from qlora_ref.cli.doctor import cpu as cpu_report

    cpu = cpu_report()
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return dict(hostname=socket.gethostname(), platform=platform.platform(), cpu=cpu["model"],
                cpu_flags=cpu["flags"], cores=os.cpu_count(), memory_bytes=mem,
                load_average=list(load) if load else None)


def stamp(command: list[str] | None = None) -> dict:
    """The stamp of a result produced now, here: code, versions, GPU, host, UTC time, the command."""
    code = git_state()
    frozen = json.loads(FROZEN.read_text()) if FROZEN.exists() else None
    digest = source_sha256()
    if code is None:
        code = dict(frozen["code"], source="frozen") if frozen else dict(commit=None, dirty=None, source="none")
    code["source_sha256"] = digest
    if frozen is not None:
        code["matches_frozen"] = frozen["code"].get("source_sha256") == digest
    return dict(code=code, versions=versions(), gpu=gpu(), host=host(),
                time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                command=" ".join(command if command is not None else sys.argv))


def freeze() -> dict:
    """Record git's view of this checkout for a run on a machine without ``.git`` (module docstring). Only a
    committed tree: the GPU machine's results must name code that can be checked out again."""
    code = git_state()
    if code is None:
        raise SystemExit("--freeze needs a git checkout")
    if code["dirty"]:
        raise SystemExit("--freeze: the tree has uncommitted changes (" + ", ".join(code["status"][:5])
                         + "): commit them first, so that the results name code that can be checked out again")
    code["source_sha256"] = source_sha256()
    payload = dict(code=code, frozen_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    FROZEN.parent.mkdir(parents=True, exist_ok=True)
    tmp = FROZEN.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, FROZEN)
    return payload


def known_code() -> str | None:
    """Why the code a result would be stamped with cannot be recovered, or None when it can: a git checkout
    (its diff is kept when dirty), or a copy without ``.git`` whose sources hash as the frozen stamp says."""
    if git_state() is not None:
        return None
    if not FROZEN.exists():
        return (f"no .git and no {FROZEN}: run `python bench/stamp.py --freeze` on the development machine (after "
                "committing) before the GPU session")
    if not stamp([])["code"].get("matches_frozen"):
        return f"the sources differ from those {FROZEN} was frozen from: freeze again, after committing"
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--check"]:  # gpu_session.sh: results must name their code
        why = known_code()
        print(f"stamp: {why}" if why else "stamp: the code is known")
        return 2 if why else 0
    print(json.dumps(freeze() if argv[:1] == ["--freeze"] else stamp(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
