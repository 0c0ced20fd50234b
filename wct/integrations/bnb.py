"""bitsandbytes without its hub side trip: the peer our benchmarks and the QLoRA recipe compare against.

On CPUs with AVX512-BF16, ``import bitsandbytes`` (>= 0.49) asks Hugging Face's ``kernels`` package for an optional
CPU kernel from the hub and logs a failure line when the hub is unreachable. With ``HF_HUB_OFFLINE=1`` no request
is made, but two lines are still logged on every run. wct never uses that kernel: bitsandbytes falls back to its own
CPU code, which is what our QLoRA rows measure. So, in offline mode only, exactly those two records are dropped
(docs/upstream.md). Online, bitsandbytes is left to do what it does.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

HUB_KERNEL_REPO = "kernels-community/quantization-bitsandbytes"
# the loggers that report the failed fetch: bitsandbytes' CPU backend and `kernels`' trust check
_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")


def hub_offline() -> bool:
    """huggingface_hub's own reading of ``HF_HUB_OFFLINE`` (1/true/yes/on)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


class _DropOfflineHubKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return HUB_KERNEL_REPO not in record.getMessage()


_FILTER = _DropOfflineHubKernelNotice()


def quiet_offline_hub_kernel_notices() -> None:
    """Attach the filter to the two loggers (idempotent; imports nothing). A no-op when the hub is online."""
    if not hub_offline():
        return
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def import_bitsandbytes() -> ModuleType:
    """``import bitsandbytes`` with a clear error when it is missing and no offline noise."""
    quiet_offline_hub_kernel_notices()
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError("bitsandbytes is needed for the QLoRA baseline: pip install bitsandbytes") from e
    return bitsandbytes
