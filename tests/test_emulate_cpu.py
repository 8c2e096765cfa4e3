"""``.ci/emulate-cpu``, which CI runs the suite under (docs/dependencies.md, "Other CPUs"): each level holds the
libraries whose kernels can be observed from Python — torch, NumPy, Numba and (with threadpoolctl) OpenBLAS — to
that level's instruction sets, and bad arguments are refused with the accepted forms named."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_ref.cli.doctor import cpu

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "emulate-cpu"

_PROBE = """
import json, numba, numpy as np, torch
kernels = dict(torch=torch.backends.cpu.get_cpu_capability(), numba=numba.config.CPU_NAME,
               numpy_exp=np.lib.introspect.opt_func_info(func_name="exp")["exp"]["ff"]["current"])
try:
    import threadpoolctl
    kernels["openblas"] = [i.get("architecture") for i in threadpoolctl.threadpool_info()
                           if i["internal_api"] == "openblas"]
except ImportError:
    pass
print(json.dumps(kernels))
"""


_FLAGS = cpu()["flags"] or {}  # qlora doctor's reading of /proc/cpuinfo

needs_avx2_x86 = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or not (_FLAGS.get("avx2") and _FLAGS.get("fma")),
    reason="the script emulates x86-64 levels from an x86-64 CPU with AVX2 and FMA")


@needs_avx2_x86
@pytest.mark.parametrize("level, torch_capability, numba_cpu, numpy_not, openblas", [
    ("x86-64-v3", "AVX2", "haswell", ("X86_V4", "AVX512_ICL", "AVX512_SPR"), "Haswell"),
    ("x86-64-v2", "DEFAULT", "nehalem", ("X86_V3", "X86_V4", "AVX512_ICL", "AVX512_SPR"), "Nehalem"),
])
def test_each_level_holds_the_kernels_down(level, torch_capability, numba_cpu, numpy_not, openblas):
    out = subprocess.run(["bash", str(SCRIPT), level, sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    kernels = json.loads(out.stdout.strip().splitlines()[-1])
    assert kernels["torch"] == torch_capability and kernels["numba"] == numba_cpu
    assert kernels["numpy_exp"] not in numpy_not
    if "openblas" in kernels:
        assert set(kernels["openblas"]) == {openblas}


@pytest.mark.parametrize("args, message", [
    ([], "x86-64-v3|x86-64-v2"),
    (["x86-64-v4", "true"], "x86-64-v3|x86-64-v2"),
    (["x86-64-v3"], "no command given after the level x86-64-v3"),
])
def test_bad_arguments_are_refused_with_the_accepted_forms(args, message):
    out = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and message in out.stderr
