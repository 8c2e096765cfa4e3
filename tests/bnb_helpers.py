"""bitsandbytes' CPU dequantization kernel replaced for a test: by the numerical contract's definition (to use
bitsandbytes as a peer on a machine where its kernel is known wrong), or by a simulation of that bug (to exercise
qlora_gpu's detection and workaround on a machine where the kernel is right).

The replacement is registered with torch's dispatcher for the ``bitsandbytes::dequantize_4bit`` operator on the CPU
— the one every bitsandbytes CPU path reaches (``dequantize_4bit``, ``matmul_4bit``, ``Linear4bit``) — and removed
afterwards; qlora_gpu's probe is run again on entry and on exit."""

from __future__ import annotations

import contextlib
import gc
import warnings

import torch

from qlora_gpu import quantize as gq
from qlora_ref.codebooks import codebook


def spec_kernel(A, absmax, blocksize, quant_type, shape, dtype):
    """``bitsandbytes::dequantize_4bit`` as the contract defines it (``qlora_gpu.quantize.dequantize_4bit_spec``)."""
    code = torch.from_numpy(codebook(quant_type).copy())
    return gq.dequantize_4bit_spec(A, absmax, code, blocksize, tuple(shape), dtype)


def per_row_blocks_kernel(A, absmax, blocksize, quant_type, shape, dtype):
    """The AVX-512 bug of bitsandbytes 0.50.2, simulated: each row of a 2-D weight restarts its blocks, so a row
    whose width is not a multiple of the block size reads its neighbours' scales (docs/divergences.md)."""
    rows, width = (1, shape[0]) if len(shape) == 1 else (int(torch.tensor(shape[:-1]).prod()), shape[-1])
    per_row = -(-width // blocksize)
    col_block = torch.arange(width) // blocksize
    index = (torch.arange(rows)[:, None] * per_row + col_block[None, :]).clamp_max(absmax.numel() - 1)
    code = torch.from_numpy(codebook(quant_type).copy())
    flat = A.reshape(-1).view(torch.uint8)
    nibbles = torch.stack((flat >> 4, flat & 0x0F), dim=1).reshape(-1)[: rows * width].long().view(rows, width)
    return (code[nibbles] * absmax.float()[index]).reshape(shape).to(dtype)


@contextlib.contextmanager
def bitsandbytes_cpu_dequantize(kernel):
    """bitsandbytes' CPU ``dequantize_4bit`` is ``kernel`` inside the block (qlora_gpu's probe re-run)."""
    lib = torch.library.Library("bitsandbytes", "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Warning only once for all operators")
        warnings.filterwarnings("ignore", ".*Overriding a previously registered kernel")
        lib.impl("dequantize_4bit", kernel, "CPU")
    gq._bnb_cpu_kernel_correct.cache_clear()
    try:
        yield
    finally:
        destroy = getattr(lib, "_destroy", None)
        if destroy is not None:
            destroy()
        del lib
        gc.collect()  # older torch removes a Library's registrations when it is collected
        gq._bnb_cpu_kernel_correct.cache_clear()


def corrected_where_wrong(shape: tuple, blocksize: int):
    """A context in which bitsandbytes, as a peer, dequantizes ``shape`` correctly: its own kernel where that passed
    qlora_gpu's probe on this machine, the contract's definition where it did not (the divergence itself has its
    own tests: tests/test_quantize.py, tests/test_bnb_cpu_kernels.py)."""
    if gq.bitsandbytes_cpu_dequantize_correct(shape, blocksize):
        return contextlib.nullcontext()
    return bitsandbytes_cpu_dequantize(spec_kernel)
