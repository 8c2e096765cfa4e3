"""Is bitsandbytes' 4-bit product the product of the dequantized weight? Checked before it is trusted.

``bitsandbytes.matmul_4bit`` does not always dequantize W and call one GEMM. Without gradients, on CUDA, it may run
its own fused kernel (``cgemm_4bit``), chosen by a private heuristic per GPU architecture: always for up to 4 rows
(every step of batch-1 generation), sometimes up to 1,536 (bitsandbytes 0.50). How that kernel sums and decodes
double-quantized scales is not documented, and nothing else in qlora compares it with the numerical contract. So
at the first 4-bit product on a device and dtype, a small probe (``probe_matmul_4bit``) compares ``matmul_4bit``
with the contract's two steps — ``dequantize_packed`` then ``F.linear`` — at several row counts, NF4 and FP4, with
and without double quantization, within the bound derived below; where it disagrees, ``frozen_product``
(``qlora_gpu.lora_math``) takes the two steps itself (bitsandbytes' own unfused arithmetic) on that device and
dtype. ``set_frozen_product`` forces either path; ``frozen_product_status`` says which one runs (``qlora doctor``).

The bound: both sides round the weight's values to the input's dtype or keep them wider (≤ u·|w| each, u the
dtype's unit roundoff), round the output once (≤ u·|y| each), and accumulate in float32 in some order
(≤ K·2⁻²³·Σ|x||w| between two orders, K the reduction length):
|Δy| ≤ (3u + K·2⁻²³) · Σₖ |xₖ| |wₖ|. A kernel that decodes a wrong scale, code or nibble is off by O(|y|).
"""

from __future__ import annotations

import functools

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch

from qlora_ref.checks import QUANT_TYPES_4BIT

from .quantize import dequantize_packed

#: which 4-bit product qlora_gpu runs: "auto" (bitsandbytes' where it passes its probe), "bitsandbytes", "dequantize"
_MODE = {"mode": "auto"}
FROZEN_PRODUCT_MODES = ("auto", "bitsandbytes", "dequantize")

#: the probe's row counts: bitsandbytes' fused kernel for few rows (always up to 4), its GEMM path for more
_PROBE_ROWS = (1, 2, 4, 16, 64)
#: the probe's weight (out, in) and block size
_PROBE_WEIGHT, _PROBE_BLOCKSIZE = (256, 512), 64

#: unit roundoff of each dtype the layer computes in
_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def set_frozen_product(mode: str) -> None:
    """Choose qlora_gpu's 4-bit product x Wᵀ: ``"auto"`` (default: ``bitsandbytes.matmul_4bit`` on each device and
    dtype where it passed ``probe_matmul_4bit``, the two steps elsewhere), ``"bitsandbytes"`` (always
    ``matmul_4bit``: to reproduce its results) or ``"dequantize"`` (always ``dequantize_packed`` and one GEMM:
    the contract's arithmetic at every row count)."""
    if mode not in FROZEN_PRODUCT_MODES:
        raise ValueError(f"mode must be one of {FROZEN_PRODUCT_MODES}, got {mode!r}")
    _MODE["mode"] = mode


def bnb_product_trusted(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``frozen_product`` hands a 4-bit product on ``device`` in ``dtype`` to ``bitsandbytes.matmul_4bit``
    (see ``set_frozen_product``): under ``"auto"``, whether it passed the probe there (probed once per device
    and dtype and process)."""
    mode = _MODE["mode"]
    if mode != "auto":
        return mode == "bitsandbytes"
    return _probed(torch.device(device), dtype)


@functools.cache
def _probed(device: torch.device, dtype: torch.dtype) -> bool:
    return probe_matmul_4bit(bnb.matmul_4bit, device, dtype)


def probe_matmul_4bit(matmul, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``matmul`` (``bitsandbytes.matmul_4bit``'s signature) computes x Wᵀ within the module's bound of
    ``F.linear(x, dequantize_packed(W))`` on random weights on ``device``, for each row count of the probe, NF4
    and FP4, plain and double-quantized scales. Its inputs come from a generator of its own (the global random
    streams, which dropout and data order read, are left as they were); outside autocast and autograd. Any
    exception counts as a failure."""
    g = torch.Generator().manual_seed(0)
    out_f, in_f = _PROBE_WEIGHT
    u = _UNIT_ROUNDOFF.get(dtype)
    if u is None:
        return False
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            w = torch.randn(out_f, in_f, generator=g).to(device)
            for quant_type in QUANT_TYPES_4BIT:
                for nested in (False, True):
                    packed, state = bnbf.quantize_4bit(w, blocksize=_PROBE_BLOCKSIZE, quant_type=quant_type,
                                                       compress_statistics=nested)
                    w_hat = dequantize_packed(packed, state, dtype)
                    w_abs = dequantize_packed(packed, state, torch.float32).abs()
                    for rows in _PROBE_ROWS:
                        x = torch.randn(rows, in_f, generator=g).to(device=device, dtype=dtype)
                        theirs = matmul(x, packed, quant_state=state).float()  # as frozen_product calls it
                        ours = torch.nn.functional.linear(x, w_hat).float()
                        bound = (3 * u + in_f * 2.0**-23) * (x.float().abs() @ w_abs.t())
                        if theirs.shape != ours.shape or not bool(((theirs - ours).abs() <= bound).all()):
                            return False
    except Exception:  # noqa: BLE001 - a kernel that cannot even run the probe is not trusted
        return False
    return True


def frozen_product_status() -> dict[str, str]:
    """Which 4-bit product runs on the CPU in bfloat16 and float32 and on each CUDA device in bfloat16 (probed
    now where not yet in this process; for ``qlora doctor``)."""
    mode = _MODE["mode"]
    if mode != "auto":
        return {"all devices": f"{mode} (forced by set_frozen_product)"}
    return {f"{device}, {str(dtype).removeprefix('torch.')}":
            "bitsandbytes' matmul_4bit (passed the probe)" if _probed(device, dtype)
            else "dequantize + GEMM (bitsandbytes' matmul_4bit failed the probe)"
            for device, dtype in _probed_keys()}


def _probed_keys() -> list[tuple[torch.device, torch.dtype]]:
    cpu = torch.device("cpu")
    keys = [(cpu, torch.bfloat16), (cpu, torch.float32)]
    if torch.cuda.is_available():
        keys += [(torch.device("cuda", i), torch.bfloat16) for i in range(torch.cuda.device_count())]
    return keys
