"""``qlora doctor``: the versions it prints are the installed ones, the lock comparison flags a difference, it
works without torch, and its paths section says what qlora_gpu's own status functions say."""

from __future__ import annotations

import json
import platform
import re
import sys
from importlib import metadata

import pytest

from qlora_ref.cli import main

LISTED = ("numpy", "numba", "scipy", "safetensors", "torch", "bitsandbytes", "transformers", "peft", "hypothesis",
          "qlora")


def doctor(capsys, *args) -> str:
    assert main(["doctor", *args]) == 0
    return capsys.readouterr().out


def package_line(text: str, name: str) -> str:
    section = text.split("packages:\n", 1)[1].split("\n\n", 1)[0]
    (line,) = [ln for ln in section.splitlines() if re.match(rf"\s+{name}\s", ln)]
    return line


def test_text_and_json_show_the_installed_versions(capsys):
    text = doctor(capsys)
    assert f"Python {platform.python_version()} " in text
    for name in LISTED:
        assert package_line(text, name).split()[1] == metadata.version(name), name
    report = json.loads(doctor(capsys, "--json"))
    assert report["python"].startswith(platform.python_version() + " ")
    for name in LISTED:
        assert report["packages"][name]["version"] == metadata.version(name), name


def test_version_prints_the_installed_version_and_the_commit(capsys, monkeypatch):
    import qlora_ref.cli.doctor as doctor_module

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"qlora {metadata.version('qlora')}")
    commit = doctor_module.git_commit()
    assert line.endswith(f"(commit {commit})") if commit else line == f"qlora {metadata.version('qlora')}"
    monkeypatch.setattr(doctor_module, "git_commit", lambda: None)  # an installed wheel: no checkout to name
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"qlora {metadata.version('qlora')}"


def test_a_version_other_than_the_locked_one_is_flagged(capsys, tmp_path):
    lock = tmp_path / "constraints.txt"
    lock.write_text(f"# a comment\nnumpy==0.0.1\nSciPy=={metadata.version('scipy')}\n"
                    f"# Editable install (qlora==0.1.0)\n")
    report = json.loads(doctor(capsys, "--json", "--constraints", str(lock)))["packages"]
    assert report["numpy"] == dict(version=metadata.version("numpy"), locked="0.0.1",
                                   state="differs from the tested 0.0.1")
    assert report["scipy"]["state"] == "locked"  # names compare as PEP 503 names
    assert report["peft"]["state"] == report["qlora"]["state"] == "not in constraints.txt"
    assert package_line(doctor(capsys, "--constraints", str(lock)), "numpy").endswith("differs from the tested 0.0.1")
    assert main(["doctor", "--constraints", str(tmp_path / "absent.txt")]) == 2  # a file asked for must be there
    assert "absent.txt: no such file" in capsys.readouterr().err


def test_without_a_lock_beside_the_package_versions_are_not_compared(capsys, tmp_path, monkeypatch):
    from qlora_ref.cli import doctor as doctor_module

    monkeypatch.setattr(doctor_module, "ROOT", tmp_path)  # an install from a wheel: no constraints.txt
    text = doctor(capsys)
    assert "constraints: none found" in text
    assert package_line(text, "numpy").endswith("no constraints.txt to compare with")


def test_the_lock_of_the_checkout_is_found(capsys):
    """Run from this checkout, doctor compares with its constraints.txt: every listed package it pins is there."""
    report = json.loads(doctor(capsys, "--json"))
    assert report["constraints"] is not None and report["constraints"].endswith("constraints.txt")
    assert report["packages"]["numpy"]["locked"] is not None


def test_without_torch_it_reports_and_succeeds(capsys, monkeypatch):
    """The reference-only install: torch, bitsandbytes, transformers and qlora_gpu cannot be imported and have no
    metadata."""
    gone = ("torch", "bitsandbytes", "transformers", "peft", "triton")
    for name in (*gone, "qlora_gpu"):
        monkeypatch.setitem(sys.modules, name, None)  # an import of it raises ImportError
    real_version = metadata.version

    def version(name):
        if name in gone:
            raise metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(metadata, "version", version)
    text = doctor(capsys)
    for name in gone:
        assert package_line(text, name).split()[1:] == ["-", "not", "installed"]
    assert package_line(text, "numpy").split()[1] == real_version("numpy")
    assert "torch: torch not importable" in text and "CUDA: unknown (no torch)" in text
    assert re.search(r"qlora_gpu paths:\n  not available: backend 'gpu' needs packages that are not installed", text)
    report = json.loads(doctor(capsys, "--json"))
    assert "error" in report["torch"] and "error" in report["qlora_gpu"]


def test_the_paths_are_those_qlora_gpu_reports(capsys, monkeypatch):
    from qlora_gpu import bnb_import, hardware, packing, patches, product_check, quantize

    report = json.loads(doctor(capsys, "--json"))["qlora_gpu"]
    assert report["cpu_dequantize"] == quantize.cpu_dequantize_status()
    assert report["bf16_gemm"] == hardware.bf16_gemm_status()
    assert report["dynamic_map"] == hardware.dynamic_map_status()
    assert report["hub_kernel"] == bnb_import.hub_kernel_status()
    assert report["frozen_product"] == product_check.frozen_product_status()
    assert report["packed_kernel"] == packing.varlen_kernel_status()
    status = patches.status()
    assert {"rotary embedding", "RMSNorm", "causal SDPA"} <= status.keys()
    assert report["patches"] == status

    # a forced CPU path and a patch that falls back show as such
    monkeypatch.setattr(patches, "_STATUS", dict(patches._STATUS))
    monkeypatch.setattr(patches, "use_fused_rope", lambda hf: patches._record("rotary embedding", False, "simulated"))
    quantize.set_cpu_dequantize("spec")
    product_check.set_frozen_product("dequantize")
    try:
        text = doctor(capsys)
    finally:
        quantize.set_cpu_dequantize("auto")
        product_check.set_frozen_product("auto")
    assert "CPU dequantize, ragged last dim: spec (forced by set_cpu_dequantize)" in text
    assert "4-bit product, all devices: dequantize (forced by set_frozen_product)" in text
    assert "rotary embedding (probed on a tiny Llama): fallback: simulated" in text
    assert "RMSNorm (probed on a tiny Llama): active" in text
    assert f"bf16 GEMM on CPU: {hardware.bf16_gemm_status()}" in text
    assert f"bitsandbytes' dynamic 8-bit map: {hardware.dynamic_map_status()}" in text
    assert f"bitsandbytes' Hub CPU kernel: {bnb_import.hub_kernel_status()}" in text


@pytest.mark.parametrize("flags", [None, "fpu avx2 avx512f"])
def test_cpu_features_from_cpuinfo_or_without_it(monkeypatch, flags):
    from qlora_ref.cli import doctor as doctor_cli

    class FakePath(type(doctor_cli.ROOT)):
        def read_text(self, *a, **k):
            if str(self) != "/proc/cpuinfo":
                return super().read_text(*a, **k)
            if flags is None:
                raise FileNotFoundError(self)
            return f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t: amx_tile\n"

    monkeypatch.setattr(doctor_cli, "Path", FakePath)
    got = doctor_cli.cpu()
    if flags is None:
        assert got["flags"] is None
        assert "features: unknown" in doctor_cli.format_text(doctor_cli.report(doctor_cli.ROOT / "constraints.txt"))
    else:
        have = {"avx2", "avx512f"}  # of the first processor's flags; "fpu" is not one looked for
        assert got == dict(model="Test CPU", flags={f: f in have for f in doctor_cli.CPU_FLAGS})
        assert {"avx512_bf16", "amx_tile", "amx_bf16"} <= set(doctor_cli.CPU_FLAGS)
