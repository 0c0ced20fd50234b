"""wct: quantization-aware fine-tuning of LLMs over frozen low-bit bases.

Public names are re-exported here; the work happens in the floors below
(formats → kernels → nn → quantize / tuners → integrations).
"""

from __future__ import annotations

import importlib.util as _ilu
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _mount_source_kernels() -> None:
    """Installed wheels map ``kernels/wct_kernels/`` to ``wct.kernels``; a bare source checkout needs the same."""
    if "wct.kernels" in _sys.modules or _ilu.find_spec("wct.kernels") is not None:
        return
    src = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels", "wct_kernels", "__init__.py")
    if not _os.path.exists(src):
        raise ImportError("wct.kernels is missing: reinstall wct (pip install -e .)")
    spec = _ilu.spec_from_file_location("wct.kernels", src, submodule_search_locations=[_os.path.dirname(src)])
    mod = _ilu.module_from_spec(spec)
    _sys.modules["wct.kernels"] = mod
    spec.loader.exec_module(mod)


_mount_source_kernels()

from wct.exporters import export  # noqa: E402  (the function wct.export(src, format, out); the package is wct.exporters)
from wct.formats import QuantizedTensor, get_format  # noqa: E402
from wct.integrations import (  # noqa: E402  (importing registers quant_method="wct" with transformers)
    attach_quantization,
    load_quantized,
    quantize_model,
    save_pretrained,
    sync_quantization,
)
from wct.integrations.bnb import quiet_offline_hub_kernel_notices  # noqa: E402
from wct.integrations.peft import load_adapter, register_wct_peft  # noqa: E402
from wct.nn import QuantExperts, QuantLinear  # noqa: E402
from wct.quantize import QuantConfig, model_bits  # noqa: E402
from wct.tuners import QuantLoraLinear, WCTConfig, create_weak_columns, prepare_for_training  # noqa: E402

register_wct_peft()
quiet_offline_hub_kernel_notices()

__all__ = [
    "QuantConfig",
    "QuantExperts",
    "QuantLinear",
    "QuantLoraLinear",
    "WCTConfig",
    "QuantizedTensor",
    "__version__",
    "attach_quantization",
    "create_weak_columns",
    "export",
    "get_format",
    "load_adapter",
    "load_quantized",
    "model_bits",
    "prepare_for_training",
    "quantize_model",
    "register_wct_peft",
    "save_pretrained",
    "sync_quantization",
]
