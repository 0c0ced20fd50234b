"""``WCTLayer``: trainable outlier values (and scales) over a frozen ``QuantLinear``.

The base layer already stores its weak columns and sparse outliers in 16-bit
and accepts override values in ``forward(x, col_values=, sparse_values=, scales=)``.
The adapter is therefore just a trainable copy of those values; the packed codes and
all indices stay frozen buffers.  With ``trainable`` naming ``"scales"`` the copy also
covers the base's scale buffer (``scales`` of an integer format, ``absmax`` of a codebook
without double quantization, :attr:`QuantLinear.scale_name`): PEQA-style scale tuning,
its gradient computed by the op tile by tile (no dense weight, see ``wct.kernels.autograd``).

Design choices (and why):

* **Values, not deltas.**  The adapter holds the full values, initialised from
  the base, so training starts at the base model exactly.  This is full
  fine-tuning of those entries: AdamW's weight decay pulls them toward 0, like it
  pulls any full weight (use ``weight_decay=0`` for these parameters if you want a
  pull toward the base instead).  A consequence: two WCT adapters cannot be
  *summed* on one layer; only one may be active (or merged) at a time.
* **What you train is what you ship.**  The forward pass sees the values rounded
  to the base's storage dtype (fp16 by default) with a straight-through
  gradient, while the optimizer keeps fp32 master values.  Merging writes that
  same rounding into the base, so merged and unmerged outputs agree bit for bit.
* **Indices are saved with the adapter** (``wct_col_idx``, ``wct_sp_rowptr``,
  ``wct_sp_cols``, persistent ``BufferDict``s) and compared with the base's own
  indices whenever a state dict is loaded: values trained for other columns must
  never be applied silently.
* **Unmerge is exact**: the original values are kept (not saved) and written back.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from wct.kernels.torch_backend import dense_tile
from wct.nn import QuantLinear

from .config import trainable_parts

_INDEX_BUFFERS = {"wct_col_idx": "col_idx", "wct_sp_rowptr": "sp_rowptr", "wct_sp_cols": "sp_cols"}


def trains_columns(layer: QuantLinear, trainable: str) -> bool:
    return "weak_columns" in trainable_parts(trainable) and layer.n_weak > 0


def trains_sparse(layer: QuantLinear, trainable: str) -> bool:
    return "outliers" in trainable_parts(trainable) and layer.nnz > 0


def trains_scales(layer: QuantLinear, trainable: str) -> bool:
    return "scales" in trainable_parts(trainable) and layer.scale_name is not None


def trains_any(layer: QuantLinear, trainable: str) -> bool:
    return trains_columns(layer, trainable) or trains_sparse(layer, trainable) or trains_scales(layer, trainable)


def _stored_rounding(values: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    """``values`` rounded to the storage dtype in the forward pass, identity in the backward pass."""
    if values.dtype == storage:
        return values
    return values + (values.to(storage).to(values.dtype) - values).detach()


def _initial(stored: torch.Tensor, dtype: torch.dtype, init_weights: bool) -> torch.Tensor:
    """The adapter's starting values: the stored ones, or (``init_weights=False``) those plus 10%-of-RMS noise."""
    values = stored.to(dtype).clone()
    if init_weights is False:
        ref = stored.detach().float()
        scale = 0.1 * float(ref.pow(2).mean().sqrt()) if ref.numel() else 0.0
        with torch.no_grad():
            values += (torch.randn(ref.shape, device=ref.device) * scale).to(dtype)
    return values


class WCTLayer(nn.Module, BaseTunerLayer):
    """Wraps one ``QuantLinear``; one entry per adapter name in each container."""

    adapter_layer_names = ("wct_col_values", "wct_sparse_values", "wct_scales")
    other_param_names = tuple(_INDEX_BUFFERS)

    def __init__(self, base_layer: QuantLinear, adapter_name: str, trainable: str = "weak_columns",
                 adapter_dtype: str = "float32", init_weights: bool = True, **kwargs: Any) -> None:
        super().__init__()
        if not isinstance(base_layer, QuantLinear):
            raise TypeError(f"WCTLayer wraps wct QuantLinear layers, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.wct_col_values = nn.ParameterDict({})
        self.wct_sparse_values = nn.ParameterDict({})
        self.wct_scales = nn.ParameterDict({})
        # persistent=True: BufferDict defaults to non-persistent, which would leave the indices out of the adapter file
        self.wct_col_idx = BufferDict({}, persistent=True)
        self.wct_sp_rowptr = BufferDict({}, persistent=True)
        self.wct_sp_cols = BufferDict({}, persistent=True)
        # the values the base held before any merge; kept for unmerge, not saved
        self.register_buffer("wct_original_cols", self._copy(base_layer, "col_values"), persistent=False)
        self.register_buffer("wct_original_sparse", self._copy(base_layer, "sp_values"), persistent=False)
        self.register_buffer("wct_original_scales", None, persistent=False)  # copied when a scale adapter arrives
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self._active_adapter = adapter_name
        self.created_columns = 0  # weak columns split out of the base when this layer was made (create_columns)
        self.register_load_state_dict_pre_hook(_check_loaded_indices)
        self.update_layer(adapter_name, trainable, adapter_dtype, init_weights=init_weights)

    @staticmethod
    def _copy(layer: QuantLinear, name: str) -> Optional[torch.Tensor]:
        t = getattr(layer, name, None)
        return None if t is None else t.detach().clone()

    # --- adapters --------------------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, trainable: str, adapter_dtype: str = "float32", init_weights: bool = True,
                     **kwargs: Any) -> None:
        """Add adapter ``adapter_name``: trainable copies of the chosen outlier values, plus their indices.

        ``init_weights=False`` perturbs the copies (PEFT's convention for a non-trivial adapter, see ``WCTConfig``).
        """
        base = self.get_base_layer()
        dtype = getattr(torch, adapter_dtype)
        cols, sparse, scales = trains_columns(base, trainable), trains_sparse(base, trainable), trains_scales(base, trainable)
        if not (cols or sparse or scales):
            raise ValueError(
                f"nothing to train for trainable={trainable!r} on a layer with {base.n_weak} weak columns, "
                f"{base.nnz} sparse outliers and {'no' if base.scale_name is None else 'trainable'} scales"
            )
        if cols:
            self.wct_col_values[adapter_name] = nn.Parameter(_initial(self.wct_original_cols, dtype, init_weights))
            self.wct_col_idx[adapter_name] = base.col_idx.detach().clone()
        if sparse:
            self.wct_sparse_values[adapter_name] = nn.Parameter(_initial(self.wct_original_sparse, dtype, init_weights))
            self.wct_sp_rowptr[adapter_name] = base.sp_rowptr.detach().clone()
            self.wct_sp_cols[adapter_name] = base.sp_cols.detach().clone()
        if scales:
            if self.wct_original_scales is None:
                self.wct_original_scales = self._copy(base, base.scale_name)
            self.wct_scales[adapter_name] = nn.Parameter(_initial(self.wct_original_scales, dtype, init_weights))
        self.set_adapter(self.active_adapters)

    def _values(self, name: str) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The (column, sparse, scale) values adapter ``name`` feeds the base, rounded as the base stores them."""
        base = self.get_base_layer()
        cv = self.wct_col_values[name] if name in self.wct_col_values else None
        sv = self.wct_sparse_values[name] if name in self.wct_sparse_values else None
        sc = self.wct_scales[name] if name in self.wct_scales else None
        if cv is not None:
            cv = _stored_rounding(cv, base.col_values.dtype)
        if sv is not None:
            sv = _stored_rounding(sv, base.sp_values.dtype)
        if sc is not None:
            sc = _stored_rounding(sc, self.wct_original_scales.dtype)
        return cv, sv, sc

    def _has(self, name: str) -> bool:
        return name in self.wct_col_values or name in self.wct_sparse_values or name in self.wct_scales

    def _active_here(self) -> Optional[str]:
        names = [n for n in self.active_adapters if self._has(n)]
        if len(names) > 1:
            raise ValueError(
                f"WCT adapters {names} are active on the same layer, but WCT values replace the stored values rather "
                "than add to them, so only one can be active: call model.set_adapter(<one name>)"
            )
        return names[0] if names else None

    # --- compute ---------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("WCT does not support mixed-adapter batches (adapter_names=...): WCT values replace the "
                             "stored values, call set_adapter instead")
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x, *args, **kwargs)
        if self.merged:
            return base(x, *args, **kwargs)
        name = self._active_here()
        if name is None:
            return base(x, *args, **kwargs)
        cv, sv, sc = self._values(name)
        return base(x, col_values=cv, sparse_values=sv, scales=sc)

    def _dense(self, cv, sv, sc) -> torch.Tensor:
        """Dense fp32 ``[out, in]`` weight of the base with these values (None: the original ones)."""
        base = self.get_base_layer()
        pw = base.packed_weight()
        if sc is None:
            sc = self.wct_original_scales  # None: no scale adapter ever came, the stored scales are the original
        if sc is not None:
            pw.qweight.data[base.scale_name] = sc
        cv = self.wct_original_cols if cv is None else cv
        sv = self.wct_original_sparse if sv is None else sv
        return dense_tile(pw, 0, self.out_features, torch.float32, cv, sv)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """Dense ``[out, in]`` fp32 change this adapter makes to the base weight (for inspection)."""
        with torch.no_grad():
            cv, sv, sc = (None if t is None else t.detach() for t in self._values(adapter))
            return self._dense(cv, sv, sc) - self._dense(None, None, None)

    # --- merging ---------------------------------------------------------------------------------------------------
    def _write(self, cv, sv, sc) -> None:
        base = self.get_base_layer()
        base.set_outlier_values(col_values=cv, sparse_values=sv)
        if sc is not None:
            with torch.no_grad():
                stored = getattr(base, base.scale_name)
                stored.copy_(sc.to(stored.dtype))

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write the adapter's (storage-rounded) values into the base; exact, no requantization."""
        adapter_names = [n for n in check_adapters_to_merge(self, adapter_names) if self._has(n)]
        if not adapter_names:
            return
        if len(adapter_names) > 1 or self.merged:
            raise ValueError(
                f"cannot merge {adapter_names} on top of {self.merged_adapters}: WCT values replace the stored values, "
                "so at most one WCT adapter can be merged; unmerge first"
            )
        name = adapter_names[0]
        cv, sv, sc = (None if t is None else t.detach() for t in self._values(name))
        if safe_merge:
            for t in (cv, sv, sc):
                if t is not None and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"NaN/Inf in adapter {name!r}: it is broken, refusing to merge it")
        self._write(cv, sv, sc)
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the base's original values (exact)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self._write(self.wct_original_cols, self.wct_original_sparse, self.wct_original_scales)
        self.merged_adapters.clear()

    def __repr__(self) -> str:
        return "wct." + super().__repr__()


def _check_loaded_indices(module: WCTLayer, state_dict: dict, prefix: str, *args: Any) -> None:
    """Refuse adapter indices that differ from the base's own (the adapter was trained on another base)."""
    base = module.get_base_layer()
    for attr, base_name in _INDEX_BUFFERS.items():
        ref = getattr(base, base_name, None)
        head = f"{prefix}{attr}."
        for key in [k for k in state_dict if k.startswith(head)]:
            got = state_dict[key]
            same = ref is not None and tuple(got.shape) == tuple(ref.shape) and torch.equal(
                got.detach().to(ref.device).long(), ref.long()
            )
            if not same:
                layer = prefix.rstrip(".").removeprefix("base_model.model.")
                raise ValueError(
                    f"adapter was trained on a different base: the {base_name} indices saved for {layer} do not match "
                    "this model's. Load the adapter onto the quantized model it was trained on (same checkpoint, and "
                    "the same create_weak_columns call if weak columns were created)"
                )
