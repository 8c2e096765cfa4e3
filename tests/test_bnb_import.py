"""qlora_gpu imports bitsandbytes without letting it reach the Hugging Face Hub (qlora_gpu/bnb_import.py).

bitsandbytes 0.50, on a CPU with avx512_bf16, calls ``kernels.get_kernel(...)`` while it is imported. Each test runs a
fresh interpreter with a stand-in ``kernels`` package first on the path, whose ``get_kernel`` records that it was
called: the first test shows that bitsandbytes alone calls it here (else there is nothing to keep from it), the
others that importing qlora_gpu does not, that the stand-in is back in place afterwards, and that an import of
bitsandbytes made before qlora_gpu is left as it was.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

FAKE_KERNELS = textwrap.dedent("""
    import os

    def get_kernel(repo_id, *args, **kwargs):
        with open(os.environ["KERNEL_CALLS"], "a") as f:
            f.write(repo_id + "\\n")
        raise RuntimeError("the stand-in kernels package loads nothing")
""")


def run_python(tmp_path, code: str) -> tuple[str, list[str]]:
    """Runs ``code`` in a new interpreter with the stand-in ``kernels``; returns its stderr and the repositories
    ``get_kernel`` was asked for."""
    (tmp_path / "kernels").mkdir(exist_ok=True)
    (tmp_path / "kernels" / "__init__.py").write_text(FAKE_KERNELS)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    env = dict(os.environ, KERNEL_CALLS=str(calls),
               PYTHONPATH=os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stderr, calls.read_text().split() if calls.exists() else []


@pytest.fixture(scope="module")
def bitsandbytes_asks_the_hub(tmp_path_factory):
    stderr, calls = run_python(tmp_path_factory.mktemp("control"), "import bitsandbytes")
    if not calls:
        pytest.skip("bitsandbytes asks for its Hub kernel only on a CPU with avx512_bf16; this one did not ask")
    assert "Failed to load CPU gemm_4bit_forward" in stderr
    return calls


def test_bitsandbytes_alone_asks_the_hub_for_a_kernel(bitsandbytes_asks_the_hub):
    assert bitsandbytes_asks_the_hub == ["kernels-community/quantization-bitsandbytes"]


def test_qlora_gpu_imports_bitsandbytes_without_the_hub_kernel(tmp_path, bitsandbytes_asks_the_hub):
    stderr, calls = run_python(tmp_path, textwrap.dedent("""
        import sys
        import kernels
        import qlora_gpu
        from qlora_gpu import bnb_import
        assert sys.modules["kernels"] is kernels, "the kernels package was not put back"
        assert "bitsandbytes" in sys.modules
        print(bnb_import.hub_kernel_status(), file=sys.stderr)
    """))
    assert calls == []
    assert "Failed to load CPU gemm_4bit_forward" not in stderr
    assert "not asked for: bitsandbytes imported by qlora_gpu" in stderr


def test_kernels_is_importable_after_qlora_gpu_when_it_was_not_before(tmp_path, bitsandbytes_asks_the_hub):
    _, calls = run_python(tmp_path, textwrap.dedent("""
        import sys
        import qlora_gpu
        assert "kernels" not in sys.modules, "a hidden kernels package was left in sys.modules"
        import kernels
        try:
            kernels.get_kernel("asked-later/by-the-user")
        except RuntimeError:
            pass
    """))
    assert calls == ["asked-later/by-the-user"]


def test_bitsandbytes_imported_before_qlora_gpu_is_left_as_it_is(tmp_path, bitsandbytes_asks_the_hub):
    stderr, calls = run_python(tmp_path, textwrap.dedent("""
        import sys
        import bitsandbytes
        import qlora_gpu
        print(qlora_gpu.bnb_import.hub_kernel_status(), file=sys.stderr)
    """))
    assert calls == ["kernels-community/quantization-bitsandbytes"]
    assert "bitsandbytes was imported before qlora_gpu" in stderr
