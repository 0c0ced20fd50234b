"""Floor 4: adapters over the packed ``QuantLinear``.

* :mod:`wct.tuners.wct`: Weak Column Tuning, a PEFT method of its own (``WCTConfig``).
* :mod:`wct.tuners.lora`: LoRA over ``QuantLinear`` (``QuantLoraLinear``), which PEFT's
  ``LoraModel`` dispatches to once :func:`wct.integrations.peft.register_wct_peft` ran.
* :mod:`wct.tuners.targets`: what ``target_modules`` means over a packed model ("all-linear" with every packed
  expert, never a router; expert containers; layer filters), for both.

Nothing here writes into PEFT's registries; that is floor 5's job.
"""

from .lora import QuantLoraLinear
from .wct import WCTConfig, WCTLayer, WCTModel, create_weak_columns, prepare_for_training

__all__ = ["QuantLoraLinear", "WCTConfig", "WCTLayer", "WCTModel", "create_weak_columns", "prepare_for_training"]
