"""``WCTModel``: the PEFT tuner that wraps targeted ``QuantLinear`` layers in ``WCTLayer``.

Most of the work is PEFT's generic ``BaseTuner`` (matching, trainable marking,
saving everything on a tuner layer except ``base_layer``, unloading).  What is
specific to WCT:

* ``"all-linear"`` means every ``QuantLinear`` except the output embedding, every
  packed expert included (PEFT's own expansion only sees ``nn.Linear``); a target
  naming a packed experts container means its expert layers; ``layers_to_transform``
  applies to all of these (:func:`wct.tuners.targets.resolve_targets`);
* the base fingerprint is recorded when an adapter is created and checked when
  one is loaded (:func:`base_fingerprint`);
* ``create_columns`` splits weak columns out of bases that have none.  The split
  base is the base the adapter sits on: ``disable_adapter`` and ``unload`` give it
  back, which is the original packed model exactly for per-channel integer formats
  and up to one requantization of the remaining weights otherwise (group-wise and
  codebook blocks realign, see :mod:`.create`).  Keeping the unsplit layers to undo
  that would hold a second packed copy of the model.  Adapters on one base share its
  columns, so a further adapter asking for a different ``create_columns`` is refused.

* ``trainable`` naming ``"scales"`` refuses targets whose format has no trainable
  scale buffer (double-quantized codebooks) with the supported formats in the error,
  and leaves the scales out of the fingerprint (merging them changes the base the way
  merging columns does); :func:`optimizer_groups` gives scales their own learning rate.

The standard PEFT operations (several adapters, ``set_adapter``, ``delete_adapter``,
``disable_adapter``, save/load, ``merge_adapter``/``unmerge_adapter``, ``unload``,
``merge_and_unload(safe_merge=True)``) all work; merging is exact and idempotent.
Only one WCT adapter can be active or merged at a time, because WCT values replace
the stored values rather than add to them (a clear ``ValueError`` otherwise).

Also here: :func:`prepare_for_training`, the ``prepare_model_for_kbit_training``
counterpart for wct models.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule, check_target_module_exists
from torch import nn

from wct.nn import QuantLinear

from ..targets import resolve_targets
from .config import ALL_LINEAR, SCALE_FORMATS, WCT_PREFIX, WCTConfig, trainable_parts
from .create import column_scores, output_embedding, pick_columns, record_layer_spec, split_weak_columns
from .layer import WCTLayer, trains_any

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# finding and fingerprinting the targets
# ---------------------------------------------------------------------------------------------------------------------
def quant_linear_layers(model: nn.Module, include_output_embedding: bool = False) -> dict[str, QuantLinear]:
    """Name -> ``QuantLinear`` for every quantized layer, seen through existing tuner wrappers.

    A ``QuantLinear`` already wrapped by a tuner layer is reported under the
    wrapper's name (that is the name PEFT matches), never as ``….base_layer``.
    """
    out_emb = None if include_output_embedding else output_embedding(model)
    found: dict[str, QuantLinear] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, BaseTunerLayer):
            inside.append(name + ".")
            base = module.get_base_layer()
            if isinstance(base, QuantLinear) and module is not out_emb and base is not out_emb:
                found[name] = base
        elif isinstance(module, QuantLinear) and module is not out_emb:
            found[name] = module
    return found


def _targets(config: WCTConfig, model: nn.Module) -> dict[str, QuantLinear]:
    return {
        n: m for n, m in quant_linear_layers(model, include_output_embedding=True).items()
        if (r := check_target_module_exists(config, n)) and not isinstance(r, _ExcludedModule)
    }


def _tensor_bytes(t: torch.Tensor):
    t = t.detach().contiguous().cpu().reshape(-1)
    return t.view(torch.uint8).numpy()


def base_fingerprint(layers: dict[str, QuantLinear], skip_scales: bool = False) -> str:
    """sha256 over the frozen part of ``layers``: names, specs, packed buffers, outlier indices, bias.

    The trainable outlier *values* are left out on purpose: they are what an
    adapter (or a merge) changes, while everything hashed here must be identical
    for an adapter to mean the same thing.  ``skip_scales``: leave the scale
    buffers out too (an adapter that trains them; adapters that do not keep the
    fingerprint they always had).  Cost: one pass over the packed bytes
    (about 1 GB/s), i.e. seconds for a 7B model.
    """
    h = hashlib.sha256()
    for name in sorted(layers):
        layer = layers[name]
        h.update(name.encode())
        h.update(json.dumps(layer.spec(), sort_keys=True).encode())
        tensors = dict(layer.quantized_base().data)
        if skip_scales and layer.scale_name is not None:
            del tensors[layer.scale_name]
        for extra in ("col_idx", "sp_rowptr", "sp_cols", "bias"):
            t = getattr(layer, extra, None)
            if t is not None:
                tensors[extra] = t
        for key in sorted(tensors):
            t = tensors[key]
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(_tensor_bytes(t))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# the tuner
# ---------------------------------------------------------------------------------------------------------------------
class WCTModel(BaseTuner):
    """Creates Weak Column Tuning adapters; use through ``get_peft_model(model, WCTConfig(...))``."""

    prefix: str = WCT_PREFIX
    tuner_layer_cls = WCTLayer
    target_module_mapping: dict[str, list[str]] = {}  # target_modules=None means "all-linear"

    def _prepare_adapter_config(self, peft_config: WCTConfig, model_config: dict) -> WCTConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = ALL_LINEAR
        return peft_config

    def _prepare_model(self, peft_config: WCTConfig, model: nn.Module) -> None:
        """Resolve "all-linear", check there is something to train, and record/verify the base fingerprint."""
        resolve_targets(peft_config, model, quant_linear_layers)
        targets = _targets(peft_config, model)
        if not targets:
            raise ValueError(
                f"WCT found no QuantLinear matching target_modules={peft_config.target_modules!r}: WCT tunes the "
                "16-bit parts of wct-quantized layers, so quantize the model first (wct.quantize_model) and target "
                "those layers"
            )
        parts = trainable_parts(peft_config.trainable)
        if "scales" in parts:
            fixed = sorted(n for n, m in targets.items() if m.scale_name is None)
            if fixed:
                fmts = sorted({targets[n].fmt.name + (" (double-quantized)" if getattr(targets[n].fmt, "double_quant",
                                                                                       False) else "") for n in fixed})
                raise ValueError(
                    f"trainable={peft_config.trainable!r}: {len(fixed)} targeted layers ({fixed[0]}, ...) are stored in "
                    f"{', '.join(fmts)}, which has no trainable scales. Scales train for {SCALE_FORMATS}. Quantize "
                    "without double_quant, or exclude those layers (exclude_modules)"
                )
        wants_cols = "weak_columns" in parts
        if not any(
            trains_any(m, peft_config.trainable) or (wants_cols and peft_config.create_columns and m.n_weak == 0)
            for m in targets.values()
        ):
            names = {"weak_columns": "weak columns", "outliers": "sparse outliers", "scales": "scales"}
            kinds = " or ".join(names[p] for p in sorted(parts))
            raise ValueError(
                f"none of the {len(targets)} targeted QuantLinear layers has {kinds} to train. "
                "Use a base that stores them (method='owq' with target_bits for weak columns; 'gwq' or opq=True for "
                "sparse outliers), or create weak columns: WCTConfig(create_columns=k) or "
                "wct.tuners.wct.create_weak_columns(model, k, calibration=...)"
            )
        fingerprint = base_fingerprint(targets, skip_scales="scales" in parts)
        if peft_config.base_fingerprint is None:
            peft_config.base_fingerprint = fingerprint
        elif peft_config.base_fingerprint != fingerprint:
            raise ValueError(
                "adapter was trained on a different base: its base_fingerprint "
                f"{peft_config.base_fingerprint[:12]}… does not match this model's {fingerprint[:12]}… (sha256 of the "
                f"packed weights and outlier indices of the {len(targets)} targeted layers). Load it onto the quantized "
                "model it was trained on (same checkpoint, and the same create_weak_columns call if weak columns were "
                "created); to start a new adapter from this config on purpose, set config.base_fingerprint = None"
            )

    def _create_and_replace(
        self,
        peft_config: WCTConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        trainable = peft_config.trainable
        init = peft_config.init_weights
        if isinstance(target, WCTLayer):
            base = target.get_base_layer()
            want = min(peft_config.create_columns, base.in_features - 1)
            if (target.created_columns and want and want != target.created_columns
                    and "weak_columns" in trainable_parts(trainable)):
                raise ValueError(
                    f"{current_key}: an adapter on this base created {target.created_columns} weak columns, and "
                    f"create_columns={peft_config.create_columns} asks for {want}. Adapters on one base share its "
                    "columns: use the same create_columns, or split the columns once with "
                    "wct.tuners.wct.create_weak_columns(model, k) before get_peft_model"
                )
            if trains_any(base, trainable):
                target.update_layer(adapter_name, trainable, peft_config.adapter_dtype, init_weights=init)
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(f"{current_key} is already a {type(target).__name__}; WCT cannot stack on another tuner")
        if not isinstance(target, QuantLinear):
            raise TypeError(
                f"WCT tunes wct QuantLinear layers only, but target_modules matched {current_key} "
                f"({type(target).__name__}); narrow target_modules or use exclude_modules"
            )
        base = target
        created = 0
        if peft_config.create_columns and base.n_weak == 0 and "weak_columns" in trainable_parts(trainable):
            created = min(peft_config.create_columns, base.in_features - 1)
            cols = pick_columns(column_scores(base, peft_config.create_score), created)
            base = split_weak_columns(base, cols)
            record_layer_spec(self.model, current_key, base)
        if not trains_any(base, trainable):
            log.debug("wct: %s holds nothing to train for trainable=%r; left unwrapped", current_key, trainable)
            return
        new = WCTLayer(base, adapter_name, trainable=trainable, adapter_dtype=peft_config.adapter_dtype, init_weights=init)
        new.created_columns = created
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)  # adding a further adapter: not trainable until set_adapter
        self._replace_module(parent, target_name, new, base)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Plain swap.  BaseTuner's version copies ``child.weight`` when unloading and moves adapters next to
        ``weight``; a QuantLinear has no ``weight``, and WCTLayer already creates its tensors on the base's device."""
        setattr(parent, child_name, new_module)

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Optional[list[str]] = None
    ) -> nn.Module:
        """Write the tuned values into the QuantLinears and return the model with plain (packed) QuantLinears.

        Exact: the packed base is untouched and the values are stored as trained
        (the forward pass already rounded them to the storage dtype).
        """
        return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)


# ---------------------------------------------------------------------------------------------------------------------
# training preparation
# ---------------------------------------------------------------------------------------------------------------------
def optimizer_groups(model: nn.Module, lr: float, scales_lr: Optional[float] = None,
                     weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups for a WCT model: the trained scales apart, at ``scales_lr``.

    A scale multiplies a whole row (or group, or block) of codes, so one step moves many
    weights at once: scales usually want a smaller learning rate than 16-bit columns (PEQA
    trains them at ~1e-5 to 1e-4).  ``weight_decay`` applies to every group; keep it 0 for
    scales (WCT trains values, not deltas: decay pulls a scale, and its whole group, to 0).
    ``torch.optim.AdamW(optimizer_groups(model, 1e-3, 5e-5))``, or hand the optimizer to a
    ``Trainer`` with ``optimizers=(opt, None)``.
    """
    scales, others = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (scales if ".wct_scales." in name else others).append(p)
    groups = [{"params": others, "lr": lr, "weight_decay": weight_decay}] if others else []
    if scales:
        groups.append({"params": scales, "lr": lr if scales_lr is None else scales_lr, "weight_decay": weight_decay})
    if not groups:
        raise ValueError("the model has no trainable parameter")
    return groups


def prepare_for_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Optional[dict[str, Any]] = None,
    upcast_small_params: bool = True,
) -> nn.Module:
    """Get a wct-quantized model ready for adapter training (call it before ``get_peft_model``).

    * freezes every parameter (the adapter's own are created trainable afterwards);
    * ``upcast_small_params``: 1-D 16-bit parameters (norm weights, biases) go to fp32,
      as ``prepare_model_for_kbit_training`` does for stability, except the packed layers'
      own storage (its dtypes are part of the quantized weight); the embedding
      matrices are left alone (large, frozen, and fp32 buys them nothing);
    * gradient checkpointing with ``use_reentrant=False`` (the reentrant variant
      drops gradients when no *input* requires grad, and re-runs hooks twice), plus
      ``enable_input_require_grads`` so the reentrant variant also works if asked for.
      QuantLinear's backward recomputes its dequantized tiles anyway, so
      checkpointing costs only the recomputed activations.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    if upcast_small_params:
        # never the packed layers' own storage (frozen parameters too, e.g. 1-D fp16 sparse outlier values): their
        # dtype is part of the quantized weight, and QuantLinear refuses a cast one
        packed = {id(p) for m in model.modules() if isinstance(m, QuantLinear) for p in m.parameters(recurse=False)}
        for p in model.parameters():
            if p.dim() <= 1 and p.dtype in (torch.float16, torch.bfloat16) and id(p) not in packed:
                p.data = p.data.float()
    if use_gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise TypeError(
                f"{type(model).__name__} has no gradient_checkpointing_enable(); pass use_gradient_checkpointing=False "
                "or use a transformers PreTrainedModel"
            )
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "use_cache", None):
            config.use_cache = False  # the KV cache is incompatible with checkpointing in training
    return model
