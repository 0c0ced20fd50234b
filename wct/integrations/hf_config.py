"""What a wct checkpoint's ``config.json`` holds: the contract between saving and loading.

Two fields, each with one reason to exist:

* ``quantization_config`` (:class:`WCTQuantizationConfig`): ``quant_method="wct"``, a
  format version, the :class:`~wct.quantize.QuantConfig` that made the model
  (provenance) and the per-layer spec table (module name -> :meth:`QuantLinear.spec`).
  The table alone decides the buffer shapes transformers must build before it reads
  the weights, so it has to describe exactly the modules that are saved.
* ``transformers_weights`` = :data:`LOAD_GUARD`: **without ``import wct`` a checkpoint
  refuses to load** (instead of transformers' silent random init).  For an unknown
  ``quant_method`` transformers only logs a warning and builds dense, randomly
  initialised Linears, and nothing inside ``quantization_config`` can make it raise.
  transformers validates this top-level field (it must name a ``*.safetensors`` file)
  and raises ``ValueError`` quoting it, i.e. quoting the fix (``pip install wct`` /
  ``import wct``).  With wct imported, the quantizer drops the field
  (:func:`drop_load_guard`) before the weights-file lookup, so ``from_pretrained``
  reads ``model.safetensors`` as usual.  Checkpoints without the field (older wct) still load.

Everything here reads or writes these two fields and nothing else, so the quantizer,
the save path and the load path agree on them by construction.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from torch import nn
from transformers.utils.quantization_config import QuantizationConfigMixin

from wct.nn.model_utils import layer_specs
from wct.quantize import QuantConfig

log = logging.getLogger(__name__)

QUANT_METHOD = "wct"
FORMAT_VERSION = 1  # bump when the meaning of the stored buffers or of the layer specs changes

# config.json field and value that make a wct checkpoint fail loudly in a process without `import wct`
# (see the module docstring).  The value must not end in ".safetensors"/".safetensors.index.json": that
# is what transformers checks.  The prefix identifies the guard, so rewording the message stays compatible.
LOAD_GUARD_FIELD = "transformers_weights"
LOAD_GUARD_PREFIX = "wct checkpoint:"
LOAD_GUARD = (
    f"{LOAD_GUARD_PREFIX} its quantized layers are packed and load only through the wct quantizer (without it "
    "transformers would fill them with random weights). pip install wct, then run `import wct` before from_pretrained"
)


# ---------------------------------------------------------------------------------------------------------------------
# config.json["quantization_config"]
# ---------------------------------------------------------------------------------------------------------------------
class WCTQuantizationConfig(QuantizationConfigMixin):
    """What ``config.json["quantization_config"]`` holds for a wct checkpoint.

    ``quant_config``: ``QuantConfig.to_dict()`` of the run that produced the model
    (provenance; loading does not need it).  ``layers``: module name ->
    ``QuantLinear.spec()``; this table alone decides the buffer shapes on load, so
    it must describe the modules that are saved (see :func:`sync_quantization`).
    Unknown keys are kept so a checkpoint written by a newer minor version
    round-trips unchanged.
    """

    def __init__(
        self,
        quant_config: dict[str, Any] | None = None,
        layers: dict[str, dict[str, Any]] | None = None,
        format_version: int = FORMAT_VERSION,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("quant_method", None)
        self.quant_method = QUANT_METHOD  # a plain str: the transformers mappings are keyed by str
        try:
            self.format_version = int(format_version)
        except (TypeError, ValueError):
            raise ValueError(
                f"quantization_config.format_version must be an integer, got {format_version!r}: the config.json is "
                "corrupt; restore it or re-save the model"
            ) from None
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"this checkpoint uses wct format version {self.format_version}, but the installed wct reads up to "
                f"version {FORMAT_VERSION}: upgrade wct (pip install -U wct)"
            )
        self.quant_config = dict(quant_config or {})
        self.layers = {str(name): dict(spec) for name, spec in (layers or {}).items()}
        for name, spec in self.layers.items():
            if not isinstance(spec.get("format"), dict) or "name" not in spec["format"]:
                raise ValueError(
                    f"quantization_config.layers[{name!r}] has no 'format' dict: the config.json is corrupt or was "
                    "not written by wct; re-save the model with wct.integrations.save_pretrained"
                )
        for key, value in kwargs.items():
            setattr(self, key, value)

    @classmethod
    def from_model(cls, model: nn.Module, quant_config: QuantConfig | dict[str, Any] | None = None):
        """The config that describes the QuantLinear modules currently in ``model``."""
        if isinstance(quant_config, QuantConfig):
            quant_config = quant_config.to_dict()
        cfg = cls(quant_config=quant_config, layers=layer_specs(model))
        try:
            json.dumps(cfg.to_dict())
        except TypeError as e:
            raise ValueError(
                f"the quantization config is not JSON-serialisable ({e}); keep QuantConfig's options to plain "
                "str/int/float/bool/list/dict values"
            ) from None
        return cfg

    def to_quant_config(self) -> QuantConfig | None:
        """Rebuild the :class:`QuantConfig` (older checkpoints' option names included; unknown keys raise)."""
        if not self.quant_config:
            return None
        return QuantConfig.from_dict(self.quant_config)


def provenance(qc: WCTQuantizationConfig) -> QuantConfig | None:
    """The QuantConfig a checkpoint was made with, or None: provenance only, it must never block loading."""
    try:
        return qc.to_quant_config()
    except (TypeError, ValueError) as e:
        log.warning("could not rebuild the QuantConfig stored in quantization_config (%s); using None", e)
        return None


def is_wct_checkpoint(path: str | os.PathLike | None) -> bool:
    """True for a directory whose config.json declares ``quantization_config.quant_method == "wct"``."""
    if not path or not os.path.isdir(path):
        return False
    cfg = os.path.join(path, "config.json")
    if not os.path.exists(cfg):
        return False
    with open(cfg) as f:
        q = json.load(f).get("quantization_config") or {}
    return q.get("quant_method") == QUANT_METHOD


# ---------------------------------------------------------------------------------------------------------------------
# config.json["transformers_weights"]: the no-`import wct` guard
# ---------------------------------------------------------------------------------------------------------------------
def transformers_version() -> str:
    import transformers

    return transformers.__version__


def load_guard_supported() -> bool:
    """True where transformers consults the quantizer before it reads ``config.transformers_weights`` (5.x).

    transformers 4.x validates that field before the quantizer exists, so a guarded checkpoint
    would not load there even with wct imported; wct running on 4.x therefore writes no guard.
    """
    try:
        return int(transformers_version().split(".")[0]) >= 5
    except ValueError:
        return True


def has_load_guard(config: Any) -> bool:
    """True when ``config`` (a config object or a config.json dict) carries :data:`LOAD_GUARD`."""
    value = config.get(LOAD_GUARD_FIELD) if isinstance(config, dict) else getattr(config, LOAD_GUARD_FIELD, None)
    return isinstance(value, str) and value.startswith(LOAD_GUARD_PREFIX)


def drop_load_guard(config: Any) -> Any:
    """Remove :data:`LOAD_GUARD` from a loaded config object (a real ``transformers_weights`` is kept)."""
    if has_load_guard(config):
        delattr(config, LOAD_GUARD_FIELD)
    return config


def write_load_guard(folder: str | os.PathLike) -> bool:
    """Add :data:`LOAD_GUARD` to ``folder/config.json`` if it describes a wct checkpoint; True when written.

    Needed after ``model.save_pretrained``: transformers deletes ``transformers_weights`` from
    every config it saves, so the field cannot travel on ``model.config``.
    """
    cfg_file = os.path.join(os.fspath(folder), "config.json")
    if not load_guard_supported() or not os.path.isfile(cfg_file):
        return False
    with open(cfg_file, encoding="utf-8") as f:
        cfg = json.load(f)
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        return False
    cfg[LOAD_GUARD_FIELD] = LOAD_GUARD
    with open(cfg_file, "w", encoding="utf-8") as f:
        f.write(json.dumps(cfg, indent=2, sort_keys=True) + "\n")  # transformers' own layout
    return True
