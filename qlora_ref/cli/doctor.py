"""``qlora doctor``: what to paste into a bug report (as ``python -m bitsandbytes`` and ``torch.utils.collect_env``).

    qlora doctor           # Python, versions against constraints.txt, CPU features, CUDA devices, qlora_gpu's paths
    qlora doctor --json    # the same as one JSON object

The versions are compared with the locked set the suite was proven with (``constraints.txt`` beside the package,
docs/dependencies.md); the paths are those ``qlora_gpu`` takes on this machine: bitsandbytes' CPU dequantization
trusted or replaced by the specification, bfloat16 matrix products native or float32-accumulated, transformers'
functions replaced or left in place (``qlora_gpu.patches``). Works on the reference-only install: torch and the
GPU backend are imported here, inside ``try``, and their absence is reported.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from importlib import import_module, metadata
from pathlib import Path

#: the distributions a report lists, in this order
PACKAGES = ("numpy", "numba", "scipy", "safetensors", "torch", "bitsandbytes", "transformers", "peft", "triton",
            "hypothesis", "qlora")
#: /proc/cpuinfo flags that decide bitsandbytes' CPU kernels and torch's bfloat16 arithmetic
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
             "amx_int8")
#: the source checkout this module runs from (constraints.txt and .git live here when it is one)
ROOT = Path(__file__).resolve().parents[2]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="print versions, CPU/GPU and the active code paths for a bug report",
                              description="Print what a bug report needs: Python, the installed versions against "
                              "the locked set (constraints.txt), CPU features, CUDA devices and which paths "
                              "qlora_gpu takes on this machine.")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--constraints", type=Path, default=None,
                   help="the lock file to compare against [default: constraints.txt beside the package, if any]")
    p.set_defaults(func=run)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def locked_versions(path: Path) -> dict[str, str] | None:
    """``{canonical name: version}`` of a pip constraints file's ``name==version`` lines; None if it is absent."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    pins = (line.split("#")[0].strip().split("==") for line in lines)
    return {_canonical(p[0]): p[1].strip() for p in pins if len(p) == 2}


def packages(locked: dict[str, str] | None) -> dict[str, dict]:
    """Each of ``PACKAGES``: installed version (None if not installed), locked version, and a verdict."""
    out = {}
    for name in PACKAGES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = None
        pin = (locked or {}).get(_canonical(name))
        if version is None:
            state = "not installed"
        elif locked is None:
            state = "no constraints.txt to compare with"
        elif pin is None:
            state = ("not in constraints.txt (the install command pins it: README)" if name == "torch"
                     else "not in constraints.txt")
        else:
            state = "locked" if version == pin else f"differs from the tested {pin}"
        out[name] = dict(version=version, locked=pin, state=state)
    return out


def git_commit() -> str | None:
    """The checkout's commit (``+ changes`` when the tracked files differ from it); None outside a git checkout."""
    if not (ROOT / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + (" + changes" if dirty.stdout.strip() else "")


def version_line() -> str:
    """``qlora 0.1.0`` and, in a git checkout, ``(commit 0123456789ab)``: what a bug report names first."""
    try:
        version = metadata.version("qlora")
    except metadata.PackageNotFoundError:
        version = "(not installed: run from a source tree)"
    commit = git_commit()
    return f"qlora {version}" + (f" (commit {commit})" if commit else "")


def cpu() -> dict:
    """The CPU's model and ``CPU_FLAGS`` (None where there is no /proc/cpuinfo: not Linux)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return dict(model=platform.processor() or platform.machine(), flags=None)
    first = info.split("\n\n")[0]  # the first processor's block
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}
    flags = set(fields.get("flags", "").split())
    return dict(model=fields.get("model name", platform.machine()), flags={f: f in flags for f in CPU_FLAGS})


def torch_report() -> dict:
    """torch's CPU capability and CUDA devices; ``{"error": ...}`` when torch cannot be imported."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - absent or broken: say so, the report must not fail
        return dict(error=f"torch not importable ({type(e).__name__}: {e})")
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append(dict(name=p.name, memory_gib=round(p.total_memory / 2**30, 1),
                                capability=f"{p.major}.{p.minor}"))
    return dict(cpu_capability=torch.backends.cpu.get_cpu_capability(), cuda_build=torch.version.cuda,
                cuda_devices=devices)


def gpu_paths() -> dict:
    """Which paths ``qlora_gpu`` takes here (reached through the backend entry point: the reference never imports
    it); ``{"error": ...}`` when the backend cannot be loaded."""
    from qlora_ref.backends import load_backend

    os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")  # bitsandbytes' CPU fallbacks: no minutes of compiling
    try:
        gpu = load_backend("gpu")
        hardware = import_module(".hardware", gpu.__name__)
    except (ValueError, ImportError) as e:
        return dict(error=str(e))
    return dict(cpu_dequantize=gpu.quantize.cpu_dequantize_status(), bf16_gemm=hardware.bf16_gemm_status(),
                dynamic_map=hardware.dynamic_map_status(), hub_kernel=gpu.bnb_import.hub_kernel_status(),
                deferred_grads=gpu.fast.deferred_grads.status(),
                frozen_product=import_module(".product_check", gpu.__name__).frozen_product_status(),
                packed_kernel=import_module(".packing", gpu.__name__).varlen_kernel_status(),
                patches=gpu.patches.probe())


def report(constraints: Path) -> dict:
    locked = locked_versions(constraints)
    return dict(python=f"{platform.python_version()} ({platform.python_implementation()})",
                platform=platform.platform(), git=git_commit(),
                constraints=str(constraints) if locked is not None else None, packages=packages(locked),
                cpu=cpu(), torch=torch_report(), qlora_gpu=gpu_paths())


def format_text(r: dict) -> str:
    lines = [f"Python {r['python']} on {r['platform']}",
             f"qlora {r['packages']['qlora']['version']}" + (f", git {r['git']}" if r["git"] else ""),
             f"constraints: {r['constraints'] or 'none found (an install from a wheel): versions not compared'}",
             "", "packages:"]
    for name, p in r["packages"].items():
        lines.append(f"  {name:<13}{p['version'] or '-':<16}{p['state']}")
    c = r["cpu"]
    flags = ("unknown (no /proc/cpuinfo)" if c["flags"] is None
             else ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in c["flags"].items()))
    lines += ["", f"CPU: {c['model']}", f"  features: {flags}"]
    t = r["torch"]
    if "error" in t:
        lines += [f"  torch: {t['error']}", "CUDA: unknown (no torch)"]
    else:
        lines.append(f"  torch's CPU capability: {t['cpu_capability']}")
        devs = [f"  {i}: {d['name']}, {d['memory_gib']} GiB, capability {d['capability']}"
                for i, d in enumerate(t["cuda_devices"])]
        lines += [f"CUDA: {t['cuda_build'] or 'CPU-only torch build'}, {len(devs)} device(s)", *devs]
    g = r["qlora_gpu"]
    lines += ["", "qlora_gpu paths:"]
    if "error" in g:
        lines.append(f"  not available: {g['error']}")
    else:
        lines += [f"  CPU dequantize, {k}: {v}" for k, v in g["cpu_dequantize"].items()]
        lines.append(f"  bf16 GEMM on CPU: {g['bf16_gemm']}")
        lines.append(f"  bitsandbytes' dynamic 8-bit map: {g['dynamic_map']}")
        lines.append(f"  bitsandbytes' Hub CPU kernel: {g['hub_kernel']}")
        lines.append(f"  deferred adapter gradients: {g['deferred_grads']}")
        lines += [f"  4-bit product, {k}: {v}" for k, v in g["frozen_product"].items()]
        lines.append(f"  packed attention's variable-length kernel (CUDA): {g['packed_kernel']}")
        lines += [f"  {k} (probed on a tiny Llama): {v}" for k, v in g["patches"].items()]
    return "\n".join(lines)


def run(args) -> int:
    if args.constraints is not None and not args.constraints.is_file():
        raise ValueError(f"--constraints {args.constraints}: no such file")
    r = report(args.constraints if args.constraints is not None else ROOT / "constraints.txt")
    print(json.dumps(r, indent=2) if args.json else format_text(r))
    return 0
