import os

# bitsandbytes wraps its CPU fallback kernels in torch.compile: same arithmetic, but minutes of compiling per shape
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
# small matrix products: BLAS threads only contend with Numba and torch threads on a 2-core machine
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# on a GPU: cuBLAS picks the same reduction on every stream (its documented condition for bitwise reproducibility),
# which the bit-for-bit twins need where one run is captured on a CUDA graph's stream (tests/test_graphs.py); set
# before any test initialises cuBLAS
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import importlib
import platform
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

#: the benchmark scripts, importable as modules by the tests of their machinery (bench/ is no package)
BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

if not torch.cuda.is_available():
    # Triton reads this when its kernels are defined (first import of qlora_gpu.fast.triton_kernels): without CUDA they
    # run in Triton's CPU interpreter, whichever test module imports them first
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The test extra (pyproject.toml: `pip install -e ".[test]"`) is required, not optional: a library of it that is
# missing or fails to import (a torch/bitsandbytes ABI break, an error in qlora_gpu's import of bitsandbytes) stops
# the run here, named, instead of turning every test that needs it into a skip. qlora_gpu first: it imports
# bitsandbytes the way it means to (qlora_gpu/bnb_import.py). Triton is in the extra on x86-64 Linux only.
_TEST_EXTRA = ["qlora_gpu", "bitsandbytes", "transformers", "peft", "accelerate", "gguf", "tokenizers", "yaml",
               "jinja2", "chatterbot_corpus", "matplotlib", "sentencepiece"]
if sys.platform == "linux" and platform.machine() == "x86_64":
    _TEST_EXTRA.append("triton")
for _name in _TEST_EXTRA:
    try:
        importlib.import_module(_name)
    except Exception as _error:
        raise ImportError(f"the tests need {_name!r} (the test extra: pip install torch==2.13.0 && pip install -e "
                          f"'.[test]' -c constraints.txt), and importing it failed: {_error!r}") from _error

settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough", max_examples=2000, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=20, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    """Skip the tests marked ``gpu`` (``@pytest.mark.gpu``, or ``pytest.param(..., marks=pytest.mark.gpu)``) where
    there is no CUDA device, saying so (``-ra`` lists the reason). The marker, not ``item.keywords``: keywords also
    hold parametrize ids and the names of parent folders and classes, so a CPU test with an id ``gpu`` (the GPU
    backend run on the CPU) or in a folder named ``gpu`` would be skipped too, with a wrong reason."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs a CUDA device; none is available on this machine")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def bitsandbytes_dequantize():
    """qlora_gpu dequantizes on the CPU with bitsandbytes' own kernel for the test's duration, even where that kernel
    failed qlora_gpu's probe and is routed around (``qlora_gpu.quantize.set_cpu_dequantize``). For tests that count
    operators as the CPU's stand-in for the kernels of a CUDA step — which always runs bitsandbytes' kernels — and
    compare two runs of the same arithmetic with each other, never with a reference."""
    from qlora_gpu.quantize import set_cpu_dequantize

    set_cpu_dequantize("bitsandbytes")
    try:
        yield
    finally:
        set_cpu_dequantize("auto")


def pytest_terminal_summary(terminalreporter):
    """The fuzz suite's case count (tests/test_fuzz.py), so every run states how many inputs were tried."""
    import sys

    fuzz = sys.modules.get("test_fuzz")
    cases = getattr(fuzz, "CASES", None)
    if cases:
        parts = ", ".join(f"{name} {n}" for name, n in sorted(cases.items()) if name != "counter self-test")
        total = sum(n for name, n in cases.items() if name != "counter self-test")
        terminalreporter.write_line(f"fuzz: {total} cases ({parts})")
