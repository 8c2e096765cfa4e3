"""``qlora_gpu.hardware``: the probe behind every conditional bf16 bit-identity claim detects a summation other than
the reference's float32 arithmetic, and accepts that arithmetic itself; doctor's line on bitsandbytes' dynamic map
counts the entries that differ."""

from __future__ import annotations

import numpy as np
import torch

from qlora_gpu import hardware

_MM = torch.mm


def test_the_order_sensitive_rows_round_differently_under_another_grouping():
    rows = hardware._order_sensitive(4, 40, seed=0)
    assert torch.equal(torch.sort(rows[0]).values, torch.sort(rows[1]).values)  # the same values, shuffled
    ones = torch.ones(40)
    sequential = torch.zeros(4)
    for j in range(40):  # 1 first, then left to right in float32: every 2^-24 is a tie and rounds away
        sequential = sequential + torch.sort(rows, dim=1, descending=True).values[:, j]
    assert torch.equal(sequential.to(torch.bfloat16), ones[:4].to(torch.bfloat16))
    exact = rows.double().sum(dim=1)  # one rounding of the exact sum: above the tie
    assert torch.equal(exact.to(torch.bfloat16).float(), torch.full((4,), 1 + 2.0**-7))


def test_a_product_summed_in_float32_passes(monkeypatch):
    monkeypatch.setattr(torch, "mm", lambda a, b: _MM(a.float(), b.float()).to(a.dtype))
    assert hardware.bf16_gemm_is_float32.__wrapped__(16, 64, 64)


def _partial_sums_rounded(a, b, block=16):
    """A kernel that rounds each partial sum of ``block`` products to bfloat16 before adding the next."""
    out = torch.zeros(a.shape[0], b.shape[1], dtype=a.dtype)
    for j in range(0, a.shape[1], block):
        out = (out.float() + _MM(a[:, j:j + block].float(), b[j:j + block].float())).to(a.dtype)
    return out


def test_a_product_summed_otherwise_is_detected(monkeypatch):
    monkeypatch.setattr(torch, "mm", _partial_sums_rounded)
    assert not hardware.bf16_gemm_is_float32.__wrapped__(16, 64, 64)
    monkeypatch.setattr(hardware, "bf16_gemm_is_float32", lambda m, k, n: False)
    assert hardware.bf16_gemm_status(((8, 8, 8),)) == f"8x8x8: {hardware.OTHER_SUM}"


def test_dynamic_map_status_names_the_entries_that_differ(monkeypatch):
    # a machine whose torch rounds linspace twice (tests/test_codebooks.py runs one): doctor's line counts the
    # entries of bitsandbytes' maps that are not the reference's
    import bitsandbytes.functional as bnbf

    from qlora_ref.codebooks import dynamic_map

    assert hardware.dynamic_map_status().startswith("the reference's, bit for bit") == (
        hardware.torch_linspace_rounding() == "fused")
    monkeypatch.setattr(bnbf, "create_dynamic_map",
                        lambda signed=True: torch.from_numpy(dynamic_map(signed, fused=False).copy()))
    monkeypatch.setattr(hardware, "torch_linspace_rounding", lambda: "two roundings")
    signed, unsigned = (np.count_nonzero(dynamic_map(s) != dynamic_map(s, fused=False)) for s in (True, False))
    assert 0 < signed and 0 < unsigned
    status = hardware.dynamic_map_status()
    assert status.startswith(f"{signed} signed and {unsigned} unsigned entries of 256 differ from the reference's")
    assert "(torch.linspace: two roundings)" in status
