"""Floor 5: wct seen from the Hugging Face stack.

Importing :mod:`wct.integrations.transformers` registers ``quant_method="wct"``
with transformers, so ``AutoModelForCausalLM.from_pretrained`` loads packed wct
checkpoints; ``import wct`` does it for you.
"""

from .transformers import (
    QUANT_METHOD,
    WCTCheckpointError,
    WCTHfQuantizer,
    WCTQuantizationConfig,
    attach_quantization,
    is_registered,
    layer_specs,
    load_quantized,
    quantize_model,
    save_pretrained,
    sync_quantization,
)

__all__ = [
    "QUANT_METHOD",
    "WCTCheckpointError",
    "WCTHfQuantizer",
    "WCTQuantizationConfig",
    "attach_quantization",
    "is_registered",
    "layer_specs",
    "load_quantized",
    "quantize_model",
    "save_pretrained",
    "sync_quantization",
]
