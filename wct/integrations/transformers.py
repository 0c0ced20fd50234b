"""``quant_method="wct"`` for transformers: packed checkpoints that ``from_pretrained`` understands.

Why a transformers quantizer at all: a wct checkpoint is an ordinary HF directory
(``config.json`` + ``model.safetensors``), but its quantized Linears hold packed
buffers (``qweight``, ``scales``, outliers ...) instead of a ``weight``.  On load,
transformers must build :class:`~wct.nn.QuantLinear` modules with exactly those
buffer shapes *before* it reads the file, and it only does that through a
registered quantizer.  Importing this module registers:

* :class:`WCTQuantizationConfig` (``config.json["quantization_config"]``): the
  :class:`~wct.quantize.QuantConfig` that made the model, the per-layer spec table
  (module name -> :meth:`QuantLinear.spec`) and a checkpoint format version.
* :class:`WCTHfQuantizer`: swaps the listed Linears for empty QuantLinear
  skeletons (on the meta device), checks the safetensors headers against them
  before any byte is loaded, and validates every layer after loading.

Checkpoints are safetensors only (no pickle).  :func:`save_pretrained` writes them
atomically; :func:`load_quantized` is the checked way back.

**Without ``import wct`` a checkpoint refuses to load** (instead of transformers' silent
random init).  For an unknown ``quant_method`` transformers only logs a warning and builds
dense, randomly initialised Linears, and nothing inside ``quantization_config`` can make it
raise.  So :func:`save_pretrained` also writes ``config.json["transformers_weights"] =``
:data:`LOAD_GUARD`: transformers validates that top-level field (it must name a
``*.safetensors`` file) and raises ``ValueError`` quoting it, i.e. quoting the fix
(``pip install wct`` / ``import wct``).  With wct imported, :class:`WCTHfQuantizer` drops the
field in ``update_attn_implementation`` — the one quantizer hook that sees the model config
between the quantizer's creation and the weights-file lookup — so ``from_pretrained`` then
reads ``model.safetensors`` as usual.  Checkpoints without the field (older wct) still load.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import fields
from typing import Any, Iterable

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from wct.checkpoint_io import (
    WCTCheckpointError,
    atomic_folder,
    interrupted_copy,
    missing_path_message,
    read_safetensors_header,
    verify_manifest,
)
from wct.nn import QuantLinear, set_module
from wct.quantize import QuantConfig
from wct.quantize import quantize_model as _quantize_modules
from wct.quantize.api import QUANT_ATTR
from wct.resources import check_memory_for_checkpoint

log = logging.getLogger(__name__)

QUANT_METHOD = "wct"
FORMAT_VERSION = 1  # bump when the meaning of the stored buffers or of the layer specs changes

# config.json field and value that make a wct checkpoint fail loudly in a process without `import wct`
# (see the module docstring).  The value must not end in ".safetensors"/".safetensors.index.json": that
# is what transformers checks.  The prefix identifies the guard, so rewording the message stays compatible.
LOAD_GUARD_FIELD = "transformers_weights"
_LOAD_GUARD_PREFIX = "wct checkpoint:"
LOAD_GUARD = (
    f"{_LOAD_GUARD_PREFIX} its quantized layers are packed and load only through the wct quantizer (without it "
    "transformers would fill them with random weights). pip install wct, then run `import wct` before from_pretrained"
)

_ST_DTYPE = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


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
                f"the quantization config is not JSON-serialisable ({e}); keep QuantConfig.extra to plain "
                "str/int/float/bool/list/dict values"
            ) from None
        return cfg

    def to_quant_config(self) -> QuantConfig | None:
        """Rebuild the :class:`QuantConfig` (unknown keys, e.g. from a newer wct, are dropped with a warning)."""
        if not self.quant_config:
            return None
        known = {f.name for f in fields(QuantConfig)}
        unknown = sorted(set(self.quant_config) - known)
        if unknown:
            log.warning("quantization_config.quant_config has keys this wct does not know: %s (ignored)", unknown)
        return QuantConfig(**{k: v for k, v in self.quant_config.items() if k in known})


# ---------------------------------------------------------------------------------------------------------------------
# the quantizer transformers calls during from_pretrained
# ---------------------------------------------------------------------------------------------------------------------
class WCTHfQuantizer(HfQuantizer):
    """Loads pre-quantized wct checkpoints; it never quantizes (``requires_calibration``).

    Training flags, as read by ``transformers.trainer_utils.validate_quantization_for_training``:

    * ``is_trainable = True``: required for *any* Trainer run on a model carrying
      this quantizer, PEFT-wrapped or not.  The packed base is buffers only, so
      adapters (the WCT tuner, LoRA) train and the base stays frozen.
    * ``is_qat_trainable = False``: a bare quantized model with no adapter is
      refused by Trainer ("attach trainable adapters").  With True it would be
      accepted but only embeddings and norms could change (QuantLinear has no
      parameters), which is almost always a forgotten ``peft_config`` rather than
      the intent; the explicit error is the better default.
    """

    requires_calibration = True

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        # Called from get_hf_quantizer and again with the resolved map for string device_maps.
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError(
                "wct: disk offload of packed QuantLinear buffers is not supported; use a device_map without 'disk' "
                "(more CPU memory, or offload_buffers=True with CPU offload)"
            )

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype  # the compute dtype of the float params; packed buffers keep their own dtypes (meta dtype wins)

    def update_attn_implementation(self, config):
        """Drop the no-``import wct`` guard (:data:`LOAD_GUARD`) from the config about to be loaded.

        transformers calls this right after creating the quantizer and before it resolves the
        weights file from ``config.transformers_weights``; it is the only quantizer hook that
        receives the model config there.  The attention implementation itself is left alone.
        """
        base = getattr(super(), "update_attn_implementation", None)
        return drop_load_guard(base(config) if base is not None else config)

    def update_tp_plan(self, config):
        """Earlier transformers 5.x releases call this hook (not ``update_attn_implementation``) with the config."""
        base = getattr(super(), "update_tp_plan", None)
        return drop_load_guard(base(config) if base is not None else config)

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files=None, **kwargs: Any):
        """Swap every listed Linear for an empty QuantLinear with the exact per-layer buffer shapes.

        Runs inside transformers' meta-device init context, so the skeletons cost no
        memory.  Then the safetensors headers are checked against them, so a corrupt
        or stale file fails here naming the module and buffer instead of loading garbage.
        """
        for name, spec in self.quantization_config.layers.items():
            where, module = _resolve_module(model, name)
            if isinstance(module, QuantLinear):
                continue
            in_f, out_f = _linear_shape(where, module)
            device = next(module.parameters(), torch.empty(0, device="meta")).device
            try:
                q = QuantLinear.from_spec(in_f, out_f, spec, device=device)
            except (ValueError, TypeError, KeyError) as e:
                raise WCTCheckpointError(f"{where}: bad layer spec in quantization_config ({e})") from None
            set_module(model, where, q)
        if checkpoint_files:
            for folder in sorted({os.path.dirname(os.fspath(f)) for f in checkpoint_files}):
                verify_manifest(folder)  # a flipped bit in a packed code is a valid code: only a checksum sees it
            _check_files_against_model(model, self.quantization_config.layers, checkpoint_files)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any):
        """Restore buffer dtypes that ``_keep_in_fp32_modules`` may have widened, then validate every layer."""
        for name, spec in self.quantization_config.layers.items():
            where, module = _resolve_module(model, name)
            if not isinstance(module, QuantLinear):
                raise WCTCheckpointError(f"{where}: expected a QuantLinear after loading, found {type(module).__name__}")
            _restore_buffer_dtypes(where, module, spec)
            module.validate(where)
        setattr(model, QUANT_ATTR, {"config": _provenance(self.quantization_config), "layers": layer_specs(model)})
        return model

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """``model.dequantize()``: every QuantLinear becomes a dense ``nn.Linear`` (outliers included)."""
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
        for name, module in list(model.named_modules()):
            if isinstance(module, QuantLinear):
                dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                  device=module.qweight.device, dtype=dtype)
                with torch.no_grad():
                    dense.weight.copy_(module.dequantize_weight(dtype))
                    if module.bias is not None:
                        dense.bias.copy_(module.bias.to(dtype))
                set_module(model, name, dense)
        if hasattr(model, QUANT_ATTR):
            delattr(model, QUANT_ATTR)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return False


def _register_all() -> None:
    """Register ``"wct"`` with transformers, idempotently (re-imports and reloads replace our own entries)."""
    for mapping, cls, register in (
        (AUTO_QUANTIZATION_CONFIG_MAPPING, WCTQuantizationConfig, register_quantization_config),
        (AUTO_QUANTIZER_MAPPING, WCTHfQuantizer, register_quantizer),
    ):
        current = mapping.get(QUANT_METHOD)
        if current is cls:
            continue
        if current is not None:
            if (current.__module__, current.__qualname__) != (cls.__module__, cls.__qualname__):
                raise RuntimeError(
                    f"quant_method {QUANT_METHOD!r} is already registered by {current.__module__}.{current.__qualname__}; "
                    "another package claims the same name; uninstall one of them"
                )
            del mapping[QUANT_METHOD]  # a reload of this very module
        register(QUANT_METHOD)(cls)


def is_registered() -> bool:
    """True when transformers will route ``quant_method="wct"`` to this module."""
    return (
        AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is WCTQuantizationConfig
        and AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is WCTHfQuantizer
    )


_register_all()


# ---------------------------------------------------------------------------------------------------------------------
# in-memory models: make save_pretrained write a wct checkpoint
# ---------------------------------------------------------------------------------------------------------------------
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


def layer_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Module name -> ``QuantLinear.spec()`` for the QuantLinears in ``model`` (what its state dict holds)."""
    return {name: m.spec() for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def attach_quantization(model: nn.Module) -> nn.Module:
    """After :func:`wct.quantize.quantize_model`: make the model look like a loaded wct checkpoint.

    Sets ``config.quantization_config`` (so ``save_pretrained`` writes it to
    config.json), ``hf_quantizer`` (so the Trainer gate and PEFT see a quantized
    model) and the ``is_quantized`` / ``quantization_method`` flags.
    """
    record = getattr(model, QUANT_ATTR, None)
    if record is None:
        raise ValueError(
            f"{type(model).__name__} carries no wct quantization record: run wct.quantize_model(model, config) first "
            "(or load a wct checkpoint with wct.integrations.load_quantized)"
        )
    if not hasattr(model, "config"):
        raise TypeError(f"{type(model).__name__} has no .config: attach_quantization needs a transformers PreTrainedModel")
    _check_not_peft(model, "attach_quantization")
    _check_no_tied_quantlinear(model)
    qc = WCTQuantizationConfig.from_model(model, record.get("config"))
    if not qc.layers:
        raise ValueError("the model holds no QuantLinear layers; nothing to attach")
    record["layers"] = dict(qc.layers)
    model.config.quantization_config = qc
    model.config._is_quantized = True
    model.hf_quantizer = WCTHfQuantizer(qc, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    return model


def sync_quantization(model: nn.Module) -> nn.Module:
    """Rebuild ``quantization_config.layers`` from the QuantLinears currently in ``model``.

    Needed whenever layers change after quantization, e.g. LoRA ``merge_and_unload()``
    turns some QuantLinears into dense ``nn.Linear``: a stale table would make the
    next load build packed skeletons for dense weights.  When no QuantLinear is
    left, the quantization state is removed and the model saves as a plain one.
    """
    _check_not_peft(model, "sync_quantization")
    layers = layer_specs(model)
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is not None and not isinstance(qc, WCTQuantizationConfig):
        if layers:
            raise ValueError(
                f"the model carries a non-wct quantization_config ({getattr(qc, 'quant_method', qc)!r}) and wct "
                "QuantLinear layers at the same time; wct cannot describe that mix"
            )
        return model  # another quantizer's model: not ours to touch
    if not layers:
        if qc is not None:
            quantizer = getattr(model, "hf_quantizer", None)
            if quantizer is not None:
                quantizer.remove_quantization_config(model)  # drops hf_quantizer, config.quantization_config, flags
            else:
                del model.config.quantization_config
                model.is_quantized = False
            model.config._is_quantized = False
        if hasattr(model, QUANT_ATTR):
            delattr(model, QUANT_ATTR)
        return model
    _check_no_tied_quantlinear(model)
    if qc is None:
        if getattr(model, QUANT_ATTR, None) is None:
            setattr(model, QUANT_ATTR, {"config": None, "layers": layers})
        return attach_quantization(model)
    qc.layers = layers
    record = getattr(model, QUANT_ATTR, None)
    if record is None:
        setattr(model, QUANT_ATTR, {"config": _provenance(qc), "layers": dict(layers)})
    else:
        record["layers"] = dict(layers)
    if getattr(model, "hf_quantizer", None) is None:
        model.hf_quantizer = WCTHfQuantizer(qc, pre_quantized=True)
        model.is_quantized, model.quantization_method = True, QUANT_METHOD
        model.config._is_quantized = True
    return model


def quantize_model(
    model: nn.Module,
    config: QuantConfig | None = None,
    calibration: torch.Tensor | None = None,
    progress: bool = True,
) -> nn.Module:
    """Quantize ``model`` in place (:func:`wct.quantize.quantize_model`) and attach the wct quantizer.

    Afterwards ``model.save_pretrained(dir)`` (or the atomic :func:`save_pretrained`)
    writes a packed checkpoint that ``AutoModelForCausalLM.from_pretrained(dir)``
    loads back bit for bit, after ``import wct``.  A plain ``nn.Module`` (no
    ``.config``) is only quantized: there is no config.json to attach to.
    """
    if config is not None and config.include_lm_head and _ties_output_embedding(model):
        raise ValueError(
            "include_lm_head=True, but lm_head is tied to the input embedding (config.tie_word_embeddings=True): a "
            "tied lm_head cannot be packed. Quantize with include_lm_head=False, or untie it first"
        )
    _quantize_modules(model, config, calibration=calibration, progress=progress)
    if not hasattr(model, "config"):  # a plain nn.Module: nothing to describe in a config.json
        return model
    return attach_quantization(model)


# ---------------------------------------------------------------------------------------------------------------------
# checkpoint I/O
# ---------------------------------------------------------------------------------------------------------------------
def save_pretrained(
    model: nn.Module,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    tokenizer: Any = None,
    **kwargs: Any,
) -> str:
    """Save ``model`` (and ``tokenizer``) to ``out_dir`` atomically; returns the directory.

    Why atomic: a checkpoint is several files; a crash or a full disk halfway must
    never leave a directory that looks complete.  Everything is written into a
    temporary sibling (same filesystem, so ``rename`` is atomic), fsynced, then
    swapped into place (:mod:`wct.checkpoint_io`).  With ``overwrite=True``
    the old copy stays at the path until the new one is complete.  A
    ``wct_manifest.json`` records the sha256 of every file, checked on load.
    """
    if kwargs.pop("push_to_hub", False):
        raise ValueError("save_pretrained(push_to_hub=True) is not atomic: save first, then call model.push_to_hub(...)")
    if kwargs.get("safe_serialization") is False:
        raise ValueError("wct checkpoints are safetensors only (no pickle): drop safe_serialization=False")
    if not _is_peft(model):  # a PEFT wrapper saves only its adapter; the base's table is not written
        sync_quantization(model)  # the spec table must describe exactly the modules being saved
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, **kwargs)
        write_load_guard(tmp)  # before the manifest: plain transformers must refuse the folder, not load garbage
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    out = os.path.abspath(os.fspath(out_dir))
    return out


def load_quantized(path: str | os.PathLike, auto_class: Any = None, **kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **kwargs)`` with wct's checks.

    Refuses pickle checkpoints, and refuses to return a model that silently lost
    its quantization: without the ``"wct"`` registration transformers only logs a
    warning and builds randomly initialised dense Linears.  ``auto_class``: another
    auto class or model class (default ``AutoModelForCausalLM``).
    """
    if auto_class is None:
        from transformers import AutoModelForCausalLM as auto_class  # lazy: half a second at import time
    if kwargs.get("use_safetensors") is False:
        raise ValueError("wct loads safetensors checkpoints only (no pickle): drop use_safetensors=False")
    kwargs["use_safetensors"] = True
    path = os.fspath(path)
    expects_wct = False
    if not os.path.exists(path):
        looks_local = os.path.isabs(path) or path.startswith(".") or path.count("/") > 1  # hub ids are "org/name"
        if looks_local or interrupted_copy(path):
            raise FileNotFoundError(missing_path_message(path))
    if os.path.isdir(path):
        verify_manifest(path)
        for name in sorted(os.listdir(path)):
            if name.endswith(".safetensors"):  # before transformers opens them: errors name the file
                read_safetensors_header(os.path.join(path, name))
        # headers only: fails early, with the numbers, instead of being killed halfway through the load
        check_memory_for_checkpoint(path, kwargs.get("dtype", kwargs.get("torch_dtype")))
        names = os.listdir(path)
        if not any(n.endswith(".safetensors") for n in names):
            pickles = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
            if pickles:
                raise ValueError(
                    f"{path} holds only pickle weights ({', '.join(pickles)}); wct loads safetensors only because "
                    "unpickling can run arbitrary code. Convert it in a trusted environment: load it with "
                    "transformers and re-save with wct.integrations.save_pretrained"
                )
        cfg_file = os.path.join(path, "config.json")
        if os.path.isfile(cfg_file):
            try:
                with open(cfg_file, encoding="utf-8") as f:
                    cfg = json.load(f)
                if not isinstance(cfg, dict):
                    raise ValueError("not a JSON object")
            except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
                raise WCTCheckpointError(f"{cfg_file} is corrupt ({e}); restore it from a good copy or re-save the model") from None
            qc = cfg.get("quantization_config") or {}
            expects_wct = isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD
            if expects_wct and not is_registered():
                raise RuntimeError(_unregistered_message(path))
    try:
        model = auto_class.from_pretrained(path, **kwargs)
    except ValueError as e:
        if isinstance(e, WCTCheckpointError) or _LOAD_GUARD_PREFIX not in str(e):
            raise
        # transformers refused LOAD_GUARD: nothing dropped it, so the "wct" quantizer did not run
        if is_registered() and not load_guard_supported():
            raise RuntimeError(
                f"{path} is a wct checkpoint, and wct is imported, but transformers {_transformers_version()} reads "
                f"config.json's {LOAD_GUARD_FIELD!r} before wct's quantizer runs: upgrade transformers (>= 5), or "
                f"pass config=AutoConfig.from_pretrained(path) after `del config.{LOAD_GUARD_FIELD}`"
            ) from e
        raise RuntimeError(_unregistered_message(path)) from e
    except (ArithmeticError, AssertionError, AttributeError, IndexError, KeyError, TypeError) as e:
        # transformers/safetensors internals tripping over a corrupt config.json or file: name the folder
        raise WCTCheckpointError(
            f"{path}: loading failed inside transformers ({type(e).__name__}: {e}); config.json or the weights are "
            "corrupt or inconsistent (or a from_pretrained argument does not fit this model) — restore the files "
            "from a good copy or re-save the model"
        ) from e
    qc = getattr(model.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if expects_wct or method == QUANT_METHOD:
        if not isinstance(getattr(model, "hf_quantizer", None), WCTHfQuantizer) or not layer_specs(model):
            raise RuntimeError(_unregistered_message(path))
    return model


def load_guard_supported() -> bool:
    """True where transformers consults the quantizer before it reads ``config.transformers_weights`` (5.x).

    transformers 4.x validates that field before the quantizer exists, so a guarded checkpoint
    would not load there even with wct imported; wct running on 4.x therefore writes no guard.
    """
    try:
        return int(_transformers_version().split(".")[0]) >= 5
    except ValueError:
        return True


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def has_load_guard(config: Any) -> bool:
    """True when ``config`` (a config object or a config.json dict) carries :data:`LOAD_GUARD`."""
    value = config.get(LOAD_GUARD_FIELD) if isinstance(config, dict) else getattr(config, LOAD_GUARD_FIELD, None)
    return isinstance(value, str) and value.startswith(_LOAD_GUARD_PREFIX)


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


def _provenance(qc: WCTQuantizationConfig) -> QuantConfig | None:
    """The QuantConfig a checkpoint was made with, or None: provenance only, it must never block loading."""
    try:
        return qc.to_quant_config()
    except (TypeError, ValueError) as e:
        log.warning("could not rebuild the QuantConfig stored in quantization_config (%s); using None", e)
        return None


def _unregistered_message(path: str) -> str:
    return (
        f"{path} is a wct checkpoint (quantization_config.quant_method='wct'), but the 'wct' quantizer is not "
        "registered with transformers, so its packed layers would load as randomly initialised Linears. "
        "Run `import wct` before loading it."
    )


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------
def _name_candidates(model: nn.Module, name: str) -> list[str]:
    """``name`` as written at save time, and with/without the base-model prefix (CausalLM vs bare model)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    cands = [name]
    if prefix:
        if name.startswith(prefix + "."):
            cands.append(name[len(prefix) + 1:])
        else:
            cands.append(f"{prefix}.{name}")
    return cands


def _resolve_module(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    for cand in _name_candidates(model, name):
        try:
            return cand, model.get_submodule(cand)
        except AttributeError:
            continue
    raise WCTCheckpointError(
        f"quantization_config lists layer {name!r}, but {type(model).__name__} has no such module: the checkpoint "
        "was saved from a different architecture, or its config.json was edited"
    )


def _linear_shape(name: str, module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or a transformers ``Conv1D`` (weight stored ``[in, out]``)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nx") and hasattr(module, "nf"):
        return int(module.nx), int(module.nf)
    raise WCTCheckpointError(
        f"{name}: quantization_config lists it as a quantized Linear, but the model has a {type(module).__name__} there"
    )


def _check_files_against_model(model: nn.Module, layers: dict[str, dict], files: Iterable) -> None:
    """Compare the safetensors headers with the QuantLinear skeletons: every buffer present, right shape and dtype."""
    files = [os.fspath(f) for f in files if os.fspath(f).endswith(".safetensors")]
    if not files:
        return
    tensors: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in files:
        tensors.update(read_safetensors_header(f))
    listed: set[str] = set()
    for name in layers:
        where, module = _resolve_module(model, name)
        in_file = next((c for c in _name_candidates(model, where) if f"{c}.qweight" in tensors), where)
        listed.add(in_file)
        expected = {b: (tuple(t.shape), _ST_DTYPE.get(t.dtype, str(t.dtype))) for b, t in module.named_buffers(recurse=False)}
        for buf, (shape, dtype) in expected.items():
            got = tensors.get(f"{in_file}.{buf}")
            if got is None:
                raise WCTCheckpointError(
                    f"{where}: buffer '{buf}' is missing from the checkpoint; the file does not match its "
                    "quantization_config (partial copy, or saved without sync_quantization)"
                )
            if got[0] != shape or got[1] != dtype:
                raise WCTCheckpointError(
                    f"{where}: buffer '{buf}' in the checkpoint is {list(got[0])} {got[1]}, but its layer spec needs "
                    f"{list(shape)} {dtype}; the file is corrupt or does not belong to this config.json"
                )
        extra = sorted(k for k in tensors if k.startswith(in_file + ".") and k[len(in_file) + 1:] not in expected)
        extra = [k for k in extra if "." not in k[len(in_file) + 1:]]
        if extra:
            raise WCTCheckpointError(
                f"{where}: the checkpoint holds {extra} that a packed layer with this spec does not have; "
                "the config.json and the weights are out of sync"
            )
    stale = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight") and k[: -len(".qweight")] not in listed)
    if stale:
        raise WCTCheckpointError(
            f"the checkpoint holds packed weights for {stale[:5]}{' ...' if len(stale) > 5 else ''} that "
            "quantization_config.layers does not list; re-save with wct.integrations.save_pretrained (it syncs "
            "the layer table)"
        )


def _restore_buffer_dtypes(name: str, module: QuantLinear, spec: dict[str, Any]) -> None:
    """Undo dtype overrides of the loader (``_keep_in_fp32_modules`` loads fp16 buffers as fp32).

    The reference is the layer spec from config.json, not the module (whose bias
    dtype may itself have been widened).  Only exact round trips are undone
    (fp16 -> fp32 -> fp16 is lossless); any other mismatch is an error.
    """
    ref = QuantLinear.from_spec(module.in_features, module.out_features, spec, device="meta")
    for buf, want in ref.named_buffers(recurse=False):
        have = module._buffers.get(buf)
        if have is None:
            raise WCTCheckpointError(f"{name}: buffer '{buf}' was not loaded")
        if tuple(have.shape) != tuple(want.shape):
            raise WCTCheckpointError(
                f"{name}: buffer '{buf}' has shape {list(have.shape)}, but its layer spec needs {list(want.shape)}"
            )
        if have.dtype == want.dtype:
            continue
        if have.is_floating_point() and want.is_floating_point():
            back = have.to(want.dtype)
            if torch.equal(back.to(have.dtype), have):
                module._buffers[buf] = back
                continue
        raise WCTCheckpointError(
            f"{name}: buffer '{buf}' loaded as {have.dtype}, but its layer spec needs {want.dtype} and the values do "
            "not convert exactly; the checkpoint does not match its config"
        )


def _is_peft(model: nn.Module) -> bool:
    return any(c.__name__ in ("PeftModel", "PeftMixedModel") for c in type(model).__mro__)


def _check_not_peft(model: nn.Module, what: str) -> None:
    """PEFT wrappers rename layers (``base_model.model.…base_layer``); the table must use the saved names."""
    if _is_peft(model):
        raise ValueError(
            f"{what} got a {type(model).__name__}: call merge_and_unload() (or unload()) first, so that layer names "
            "match what save_pretrained writes"
        )


def _ties_output_embedding(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return False
    tied = getattr(cfg, "tie_word_embeddings", False)
    if callable(getattr(cfg, "get_text_config", None)):
        tied = getattr(cfg.get_text_config(decoder=True), "tie_word_embeddings", tied)
    return bool(tied)


def _check_no_tied_quantlinear(model: nn.Module) -> None:
    """A packed lm_head cannot stay tied: on load transformers re-ties ``lm_head.weight``, which QuantLinear lacks."""
    get_out = getattr(model, "get_output_embeddings", None)
    if get_out is not None and _ties_output_embedding(model) and isinstance(get_out(), QuantLinear):
        raise ValueError(
            "the output embedding (lm_head) is a QuantLinear but config.tie_word_embeddings=True: a tied lm_head "
            "cannot be packed. Quantize with include_lm_head=False, or untie it (config.tie_word_embeddings=False) first"
        )
