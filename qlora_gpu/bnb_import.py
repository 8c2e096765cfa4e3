"""bitsandbytes imported without reaching the Hugging Face Hub.

bitsandbytes 0.50 (on a CPU with ``avx512_bf16``) asks the Hub for a compiled CPU kernel while it is being imported:
``kernels.get_kernel("kernels-community/quantization-bitsandbytes")`` checks the publisher online and, where that
succeeds, downloads and loads the kernel; offline it logs "Failed to load CPU gemm_4bit_forward from
kernels-community" instead. That kernel serves only ``Linear4bit`` in eval mode, which qlora_gpu never calls (it
calls ``matmul_4bit`` with its own state: docs/divergences.md), and qlora downloads nothing at run time. So the
first import of bitsandbytes through qlora_gpu hides the ``kernels`` package for its duration: bitsandbytes takes
its own fallback, as it does on every CPU without ``avx512_bf16``, and its warning about the hidden package is
dropped. A user who wants the Hub kernel imports bitsandbytes before qlora_gpu: an import already done is left as
it is (``hub_kernel_status`` says which happened; ``qlora doctor`` prints it).
"""

from __future__ import annotations

import logging
import sys

#: the bitsandbytes logger and the start of the warning it writes when the Hub kernel is not loaded
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_HUB_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"
_MISSING = object()

_STATUS = {"hub kernel": "not asked for (bitsandbytes not imported yet)"}


def _drop_hub_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_HUB_WARNING)


def import_bitsandbytes():
    """``import bitsandbytes``, the first time with the ``kernels`` package hidden (see the module's docstring);
    returns the module."""
    if "bitsandbytes" in sys.modules:
        if _STATUS["hub kernel"].startswith("not asked"):
            _STATUS["hub kernel"] = "bitsandbytes was imported before qlora_gpu: left as bitsandbytes set it up"
        return sys.modules["bitsandbytes"]
    saved = sys.modules.get("kernels", _MISSING)
    sys.modules["kernels"] = None  # `from kernels import get_kernel` raises ImportError, which bitsandbytes catches
    logger = logging.getLogger(_BNB_CPU_LOGGER)
    logger.addFilter(_drop_hub_warning)
    try:
        import bitsandbytes
    finally:
        logger.removeFilter(_drop_hub_warning)
        if saved is _MISSING:
            sys.modules.pop("kernels", None)
        else:
            sys.modules["kernels"] = saved
    _STATUS["hub kernel"] = ("not asked for: bitsandbytes imported by qlora_gpu with the kernels package hidden "
                             "(no Hub request)")
    return bitsandbytes


def hub_kernel_status() -> str:
    """How bitsandbytes' Hub CPU kernel was treated in this process (``qlora doctor``)."""
    return _STATUS["hub kernel"]


bitsandbytes = import_bitsandbytes()
