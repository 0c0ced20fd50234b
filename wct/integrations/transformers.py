"""``quant_method="wct"`` for transformers: packed checkpoints that ``from_pretrained`` understands.

Importing this module registers the ``"wct"`` quantizer with transformers (``import wct``
does it for you) and gathers the public names of the integration in one place.  The
work is split by job:

* :mod:`.hf_config`: what a checkpoint's ``config.json`` holds (``quantization_config``:
  :class:`WCTQuantizationConfig`, the layer table; ``transformers_weights``: the guard
  that makes a checkpoint fail loudly without ``import wct``);
* :mod:`.hf_quantizer`: :class:`WCTHfQuantizer`, what transformers calls during
  ``from_pretrained``, and its registration;
* :mod:`.validation`: safetensors headers and loaded buffers checked against the layer table;
* :mod:`.record`: the quantization record of an in-memory model (:func:`quantize_model`,
  :func:`attach_quantization`, :func:`sync_quantization`);
* :mod:`.checkpoint`: :func:`save_pretrained` (atomic, checksummed) and :func:`load_quantized`
  (the checked way back).

Checkpoints are safetensors only (no pickle).
"""

from __future__ import annotations

from wct.checkpoint_io import WCTCheckpointError

from .checkpoint import load_quantized, save_pretrained
from .hf_config import (
    FORMAT_VERSION,
    LOAD_GUARD,
    LOAD_GUARD_FIELD,
    QUANT_METHOD,
    WCTQuantizationConfig,
    drop_load_guard,
    has_load_guard,
    is_wct_checkpoint,
    layer_specs,
    load_guard_supported,
    write_load_guard,
)
from .hf_quantizer import WCTHfQuantizer, is_registered
from .record import attach_quantization, quantize_model, sync_quantization

__all__ = [
    "FORMAT_VERSION",
    "LOAD_GUARD",
    "LOAD_GUARD_FIELD",
    "QUANT_METHOD",
    "WCTCheckpointError",
    "WCTHfQuantizer",
    "WCTQuantizationConfig",
    "attach_quantization",
    "drop_load_guard",
    "has_load_guard",
    "is_registered",
    "is_wct_checkpoint",
    "layer_specs",
    "load_guard_supported",
    "load_quantized",
    "quantize_model",
    "save_pretrained",
    "sync_quantization",
    "write_load_guard",
]
