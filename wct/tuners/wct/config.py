"""``WCTConfig``: Weak Column Tuning as a PEFT method (string ``peft_type`` ``"WCT"``).

WCT trains the 16-bit parts a quantized base already stores next to its packed
weights: the weak columns (OWQ) and/or the sparse outliers (GWQ, OPQ).  The
packed base never changes, so the adapter is tiny (``k · out`` values per
layer), training needs no dense weight, and merging is exact.

Every dataclass field lands in ``adapter_config.json``.  The fields must fully
determine the adapter's shapes, because PEFT builds the layers first and then
copies the saved tensors into them.

In memory ``peft_type`` is ``"WCT"``; on disk it is :data:`WCT_STORED_PEFT_TYPE`, a
string that names the fix.  PEFT reads ``peft_type`` before anything else and looks it
up in ``PEFT_TYPE_TO_CONFIG_MAPPING``; in a process without ``import wct`` the only thing
that reaches the user is the ``KeyError`` it raises, which quotes the key.  With wct
imported both spellings are registered (old adapters say ``"WCT"``) and
``__post_init__`` turns either back into ``"WCT"``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from peft import PeftConfig

TRAINABLE_PARTS = ("weak_columns", "outliers", "scales")
# single words; any "+"-join of the parts is valid too ("weak_columns+scales"), and "all" may be joined with "scales"
TRAINABLE = ("weak_columns", "outliers", "scales", "all")
CREATE_SCORES = ("hessian_error", "activation", "weight", "fisher")
DATA_FREE_SCORES = ("weight",)
SCALE_FORMATS = (
    "integer formats (int2/int3/int4/int8, per-channel or group-wise scales) and codebook formats without double "
    "quantization (nf4/af4/bof4/bof4s, one fp32 absmax per block)"
)


def trainable_parts(trainable: Union[str, list, tuple]) -> frozenset:
    """The parts a ``trainable`` value names: ``"all"`` is the weak columns and the outliers (its meaning
    before scales could train, kept so that saved adapters keep their shapes), ``"a+b"`` or ``[a, b]`` both."""
    words = list(trainable) if isinstance(trainable, (list, tuple, set, frozenset)) else str(trainable).split("+")
    words = [str(w).strip() for w in words]
    bad = [w for w in words if w not in TRAINABLE]
    if bad or not words:
        raise ValueError(
            f"trainable must be one of {TRAINABLE} or a '+'-join of {TRAINABLE_PARTS} (e.g. 'weak_columns+scales'), "
            f"got {trainable!r}"
        )
    parts = set()
    for w in words:
        parts |= {"weak_columns", "outliers"} if w == "all" else {w}
    return frozenset(parts)
ADAPTER_DTYPES = ("float32", "bfloat16", "float16")
ALL_LINEAR = "all-linear"
WCT_PREFIX = "wct_"


class PeftTypeStr(str):
    """A plain string that also answers ``.value`` like a ``PeftType`` enum member.

    PEFT 0.21 has no registration API for new method names (``register_peft_method``
    only accepts members of its ``PeftType`` enum), so WCT uses the string ``"WCT"``.
    A few PEFT code paths call ``peft_type.value``; a ``str`` subclass satisfies both
    the dict look-ups (hash/eq of ``"WCT"``) and those attribute reads.
    """

    @property
    def value(self) -> str:
        return str.__str__(self)


WCT_PEFT_TYPE = PeftTypeStr("WCT")
# what adapter_config.json stores: without `import wct`, PEFT's KeyError quotes it (see the module docstring)
WCT_STORED_PEFT_TYPE = "WCT: a wct adapter, it needs `pip install wct` and `import wct` before loading"


@dataclass
class WCTConfig(PeftConfig):
    """Configuration of a Weak Column Tuning adapter.

    Args:
        target_modules: which ``QuantLinear`` layers to tune. ``"all-linear"`` (default)
            means every ``QuantLinear`` except the output embedding (as PEFT does for
            LoRA), every expert of a packed MoE block included; otherwise a list of
            names/suffixes or a regex, as in PEFT. A name that reaches a packed experts
            container (``"down_proj"`` matches ``experts.down_proj``, ``"experts"`` the
            whole ``QuantExperts``) means every expert layer in it.
        exclude_modules: names/suffixes or a regex of modules to leave alone.
        trainable: ``"weak_columns"`` (the ``[out, k]`` 16-bit columns), ``"outliers"``
            (the sparse 16-bit values), ``"scales"`` (the base's own per-channel/per-group
            scales, or a codebook's per-block absmax: PEQA-style; the codes stay frozen),
            ``"all"`` (weak columns and outliers: the meaning it had before scales could
            train), or a ``"+"``-join such as ``"weak_columns+scales"`` (a list is joined).
            Layers that hold none of the chosen kinds are left unwrapped; scales are refused
            on a format without trainable scales (double-quantized codebooks). Memory of
            ``"scales"``: per scale an fp32 master value, its gradient and two AdamW moments
            (16 bytes) plus the original (2 bytes, for unmerge), i.e. ``18 · out · groups``
            bytes per layer (``18 · out`` per channel, ``0.14`` bytes per weight at group
            128, ``0.28`` per weight for a block-64 codebook); and the backward pass keeps
            each targeted layer's whole input (``tokens × in``) instead of its weak columns.
        create_columns: when ``> 0``, a targeted ``QuantLinear`` without weak columns
            gets ``k`` of its columns split out of the packed base into 16-bit
            trainable columns at injection time (``create_score`` picks them). Only the
            data-free ``"weight"`` score works here; for the calibrated scores call
            :func:`wct.tuners.wct.create_weak_columns` on the model first.
        create_score: ``"weight"`` (column norm of the dequantized base, a weak proxy:
            see :mod:`wct.tuners.wct.create`), ``"hessian_error"`` or ``"activation"``
            (both need calibration statistics, hence :func:`create_weak_columns`), or
            ``"fisher"`` (needs batches of the fine-tuning data, also through
            :func:`create_weak_columns`).
        modules_to_save: extra modules trained in full and saved with the adapter.
            Use dotted names such as ``"model.norm"``: PEFT matches these by suffix, so
            ``"norm"`` would also catch every ``input_layernorm``.
        base_fingerprint: sha256 of the packed base of the targeted layers (buffers and
            outlier indices, not the trainable values). Filled when the adapter is
            created; checked when it is loaded. Set it to ``None`` to reuse a config on
            a new base on purpose.
        init_weights: ``True`` (default): the trainable values start at the values the
            base stores, so the adapter changes nothing until trained. ``False``: they
            start perturbed (Gaussian noise of 10% of each layer's RMS value), PEFT's
            convention for an adapter that is not a no-op (tests, debugging). PEFT's own
            tools pass this field to every tuner.
        layers_to_transform: only tune the layers with these indices (an int or a list),
            as in PEFT; with ``"all-linear"`` too (PEFT's LoRA refuses that pairing).
        layers_pattern: the name of the layer list (``"layers"``, ``"h"``) when the index
            should be read after it; needs ``layers_to_transform``.
        target_parameters: PEFT's LoRA-only targeting of raw ``nn.Parameter`` s (such as
            unquantized fused MoE experts). WCT tunes packed layers only, so it must stay
            unset: fused experts are packed by ``wct.quantize_model`` (one ``QuantLinear``
            per expert) and are then ordinary WCT targets.
        trainable_token_indices: as in PEFT (handled by PEFT's generic tuner code): train
            only these rows of the (dense) input embedding, e.g. new tokens; TRL sets it
            when it adds tokens.
        adapter_dtype: dtype of the trainable values. ``"float32"`` (default) keeps
            master copies of values that are *stored* in 16-bit: Adam updates of
            ``lr · 1e-3`` relative size vanish in fp16/bf16 arithmetic. The cost is
            ``4 · k · out`` bytes per layer, negligible beside the base. PEFT's
            ``autocast_adapter_dtype=True`` (its default) upcasts 16-bit adapters to
            fp32 anyway; a 16-bit ``adapter_dtype`` only sticks with
            ``autocast_adapter_dtype=False``.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=ALL_LINEAR,
        metadata={"help": "QuantLinear layers to tune: 'all-linear', a list of names/suffixes, or a regex."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Names/suffixes or a regex of modules not to tune."}
    )
    trainable: str = field(
        default="weak_columns",
        metadata={"help": "What to train: 'weak_columns', 'outliers', 'scales', 'all' (columns and outliers), "
                          "or a '+'-join such as 'weak_columns+scales'."},
    )
    create_columns: int = field(
        default=0, metadata={"help": "Split this many 16-bit columns out of bases that have none (0: never)."}
    )
    create_score: str = field(
        default="weight", metadata={"help": "How create_columns picks columns; only 'weight' needs no data."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules trained in full and saved with the adapter."}
    )
    base_fingerprint: Optional[str] = field(
        default=None, metadata={"help": "sha256 of the packed base this adapter was trained on (filled automatically)."}
    )
    adapter_dtype: str = field(default="float32", metadata={"help": "dtype of the trainable values."})
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: start at the stored values (a no-op adapter); False: start perturbed (tests)."},
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only tune the layers with these indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list the index follows ('layers', 'h'); with layers_to_transform."}
    )
    target_parameters: Optional[list[str]] = field(
        default=None, metadata={"help": "Not used by WCT (LoRA over raw nn.Parameters); must stay unset."}
    )
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None, metadata={"help": "Train only these rows of the input embedding (PEFT's generic option)."}
    )

    def __post_init__(self) -> None:
        layers = self.layers_to_transform
        all_linear = isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR
        if isinstance(self.target_modules, str) and not all_linear and layers is not None:
            raise ValueError(
                "layers_to_transform cannot be used with a regex target_modules (as in PEFT): put the layer index in "
                "the regex, or use a list of names or 'all-linear'"
            )
        if all_linear:
            # PeftConfig refuses layers_to_transform with any str target, because PEFT would ignore it; WCT resolves
            # "all-linear" itself and applies the filter (wct.tuners.targets), so the pair is valid here
            self.layers_to_transform = None
        super().__post_init__()
        self.layers_to_transform = layers
        # also re-applied when a config is read back from adapter_config.json (a plain "WCT")
        self.peft_type = WCT_PEFT_TYPE
        if isinstance(self.trainable, (list, tuple, set, frozenset)):
            self.trainable = "+".join(self.trainable)
        parts = trainable_parts(self.trainable)
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"adapter_dtype must be one of {ADAPTER_DTYPES}, got {self.adapter_dtype!r}")
        if self.create_score not in CREATE_SCORES:
            raise ValueError(f"create_score must be one of {CREATE_SCORES}, got {self.create_score!r}")
        if not isinstance(self.create_columns, int) or self.create_columns < 0:
            raise ValueError(f"create_columns must be an int >= 0, got {self.create_columns!r}")
        if self.create_columns and "weak_columns" not in parts:
            raise ValueError(
                f"create_columns makes weak columns, but trainable={self.trainable!r} would not train them; "
                "add 'weak_columns' (e.g. 'weak_columns+scales')"
            )
        if self.create_columns and self.create_score not in DATA_FREE_SCORES:
            raise ValueError(
                f"create_score={self.create_score!r} needs data (calibration statistics or training batches), which a "
                "config cannot carry. Call wct.tuners.wct.create_weak_columns(model, k, calibration=... or data=...) "
                "before get_peft_model "
                "(and leave create_columns=0), or use create_score='weight'"
            )
        if not isinstance(self.init_weights, bool):
            raise ValueError(
                f"init_weights must be True (start at the stored values) or False (start perturbed), got "
                f"{self.init_weights!r}; WCT has no data-driven initialisation"
            )
        if self.target_parameters:
            raise ValueError(
                f"target_parameters={self.target_parameters!r}: WCT tunes the 16-bit parts of packed QuantLinear layers "
                "and has no form for raw nn.Parameters. Fused MoE experts are packed by wct.quantize_model (one "
                "QuantLinear per expert, e.g. 'experts.down_proj.0') and are then WCT targets like any other layer: "
                "use target_modules (the default 'all-linear' includes them)"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform (the layer indices to tune)")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """PEFT's writer, then ``peft_type`` replaced by :data:`WCT_STORED_PEFT_TYPE` (every adapter save ends here)."""
        super().save_pretrained(save_directory, **kwargs)
        path = os.path.join(save_directory, "adapter_config.json")
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        cfg["peft_type"] = WCT_STORED_PEFT_TYPE
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(cfg, indent=2))  # key order as PEFT wrote it
