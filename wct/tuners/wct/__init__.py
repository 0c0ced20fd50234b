"""Weak Column Tuning (WCT) as a PEFT method: train the 16-bit columns/outliers of a packed base.

Layout as in ``peft/tuners/lora``: :mod:`.config` (``WCTConfig``), :mod:`.layer`
(``WCTLayer``), :mod:`.model` (``WCTModel``, ``prepare_for_training``), plus
:mod:`.create` (``create_weak_columns`` for bases that have no weak columns) and
:mod:`.fisher` (the task-aware ``score="fisher"`` it can use).
The PEFT registration (string ``peft_type`` ``"WCT"``) lives in
:mod:`wct.integrations.peft`, one floor up.
"""

from .config import WCT_PEFT_TYPE, WCT_PREFIX, WCT_STORED_PEFT_TYPE, PeftTypeStr, WCTConfig, trainable_parts
from .create import (
    column_scores,
    create_weak_columns,
    expected_quant_error,
    expected_quant_error_matrix,
    split_weak_columns,
)
from .fisher import gradient_energy
from .layer import WCTLayer
from .model import WCTModel, base_fingerprint, optimizer_groups, prepare_for_training, quant_linear_layers

__all__ = [
    "PeftTypeStr",
    "WCTConfig",
    "WCTLayer",
    "WCTModel",
    "WCT_PEFT_TYPE",
    "WCT_PREFIX",
    "WCT_STORED_PEFT_TYPE",
    "base_fingerprint",
    "column_scores",
    "create_weak_columns",
    "expected_quant_error",
    "expected_quant_error_matrix",
    "gradient_energy",
    "optimizer_groups",
    "prepare_for_training",
    "quant_linear_layers",
    "split_weak_columns",
    "trainable_parts",
]
