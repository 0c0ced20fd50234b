"""Floor 4: adapters over the packed ``QuantLinear``.

* :mod:`wct.tuners.wct`: Weak Column Tuning, a PEFT method of its own (``WCTConfig``).
* :mod:`wct.tuners.lora`: LoRA over ``QuantLinear`` (``QuantLoraLinear``), which PEFT's
  ``LoraModel`` dispatches to once :func:`wct.integrations.peft.register_wct_peft` ran.

Nothing here writes into PEFT's registries; that is floor 5's job.
"""

from .lora import QuantLoraLinear
from .wct import WCTConfig, WCTLayer, WCTModel, create_weak_columns, prepare_for_training

__all__ = ["QuantLoraLinear", "WCTConfig", "WCTLayer", "WCTModel", "create_weak_columns", "prepare_for_training"]
