"""``QuantLinear``: a drop-in ``nn.Linear`` whose weight lives in packed storage.

Storage (saved in the state dict under these names, moved with ``.to``, never cast by it):

* frozen ``nn.Parameter`` s (``requires_grad=False``): the packed base (``qweight``, ``scales`` ... as the
  format names them), the weak columns' values ``col_values``, the sparse outliers' ``sp_cols`` and
  ``sp_values``, and the optional ``bias``.  Parameters, not buffers, so that FSDP2 (``fully_shard``) shards
  them like any weight (docs/distributed.md); frozen, so optimizers, DDP gradient buckets and PEFT leave them
  alone.
* buffers: the two structure indices ``col_idx`` (which input columns are weak, ``n_weak`` int32) and
  ``sp_rowptr`` (CSR row pointers, ``out + 1`` int32).  Both are O(out) or O(n_weak), independent of the
  input width (under 2% of a 3-bit layer's bytes), and tuners read them outside the layer's forward (to check
  an adapter's indices, to build its delta weight), where FSDP2 would show a parameter as a shard: kept
  whole on every rank.

The layer knows nothing about adapters.  A tuner that wants to train the
outlier values keeps its own parameters and passes them to :meth:`forward`
(``col_values=`` / ``sparse_values=``); merging writes them back with
:meth:`set_outlier_values`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from wct.formats import Format, QuantizedTensor, get_format
from wct.kernels import PackedWeight, layout_of, quant_linear_raw
from wct.kernels.torch_backend import scale_buffer_name
from wct.outliers import ColumnOutliers, SparseOutliers, index_dtype, keep_index

_OUTLIER_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _float_dtype(name: Any, field: str) -> torch.dtype:
    """A floating dtype from its name in a layer spec; anything else is a corrupt spec, not an AttributeError."""
    dt = getattr(torch, name, None) if isinstance(name, str) and name else None
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"layer spec field {field!r} must name a floating torch dtype (e.g. 'float32'), got {name!r}")
    return dt


def _refuse_cast_storage(layer: "QuantLinear", args: tuple) -> None:
    """Forward pre-hook: every stored tensor must reach the kernel in the dtype it was packed in.

    ``.to(dtype)`` cannot change them (:meth:`QuantLinear._apply`), but FSDP2's ``MixedPrecisionPolicy(param_dtype=
    torch.bfloat16)`` casts every floating parameter of its group while gathering it: fp16 scales and outliers would
    be rounded to bf16 in every forward, silently (integer codes are never cast).  Shard packed layers with
    ``wct.integrations.fsdp.shard_packed_layers`` (their own group, no cast) before sharding the blocks.
    """
    for name, want in layer._storage_dtypes.items():
        got = getattr(layer, name).dtype
        if got != want:
            raise TypeError(
                f"QuantLinear storage '{name}' arrived as {got}, but it is packed as {want}: something cast the packed "
                "weight (FSDP2 MixedPrecisionPolicy(param_dtype=...) on a group holding packed layers?). Casting would "
                "round the quantized weight silently; call wct.integrations.fsdp.shard_packed_layers(model) before "
                "fully_shard / accelerator.prepare (docs/distributed.md)"
            )


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: Format,
        bias: bool = False,
        n_weak: int = 0,
        nnz: int = 0,
        outlier_dtype: str = "float16",
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        """Build a layer with zero-filled storage of the right shapes (e.g. to load a checkpoint into).

        Use :meth:`from_linear` to quantize an existing ``nn.Linear``.
        """
        super().__init__()
        if not 0 <= n_weak < in_features:
            raise ValueError(f"n_weak={n_weak} must be in [0, in_features={in_features})")
        if not 0 <= nnz <= in_features * out_features:
            raise ValueError(f"nnz={nnz} must be in [0, {in_features * out_features}]")
        if outlier_dtype not in _OUTLIER_DTYPES:
            raise ValueError(f"outlier_dtype must be one of {sorted(_OUTLIER_DTYPES)}, got {outlier_dtype!r}")
        self.in_features, self.out_features = in_features, out_features
        self.fmt = fmt
        self.n_weak, self.nnz = n_weak, nnz
        self.outlier_dtype = outlier_dtype
        odt = _OUTLIER_DTYPES[outlier_dtype]
        base = fmt.empty((out_features, in_features - n_weak), device=device or "cpu")
        self._base_names = tuple(base.data)
        # the custom op's description of the packed base, built here: json is not traceable by torch.compile
        self._layout = layout_of(fmt, self._base_names, base.shape, in_features, out_features)
        for name, t in base.data.items():
            self._frozen(name, t)
        if n_weak:
            self.register_buffer("col_idx", torch.zeros(n_weak, dtype=torch.int32, device=device))
            self._frozen("col_values", torch.zeros(out_features, n_weak, dtype=odt, device=device))
        if nnz:
            self.register_buffer("sp_rowptr", torch.zeros(out_features + 1, dtype=torch.int32, device=device))
            self._frozen("sp_cols", torch.zeros(nnz, dtype=index_dtype(in_features), device=device))
            self._frozen("sp_values", torch.zeros(nnz, dtype=odt, device=device))
        self._frozen("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)
        self._storage_dtypes = {n: t.dtype for n, t in self.named_storage()}
        self.register_forward_pre_hook(_refuse_cast_storage)

    # --- storage -------------------------------------------------------------
    def _frozen(self, name: str, t: torch.Tensor | None) -> None:
        self.register_parameter(name, None if t is None else nn.Parameter(t, requires_grad=False))

    def named_storage(self) -> list[tuple[str, torch.Tensor]]:
        """Every tensor this layer stores (frozen parameters and index buffers), in state-dict order.

        The one list for code that copies, snapshots, checks or replaces a layer's storage: it does not care
        which tensors are parameters and which are buffers.
        """
        return [(n, t) for n, t in (*self._parameters.items(), *self._buffers.items()) if t is not None]

    def set_storage(self, name: str, t: torch.Tensor) -> None:
        """Replace stored tensor ``name`` (same kind as before: frozen parameter or buffer)."""
        if name in self._parameters and self._parameters[name] is not None:
            self._frozen(name, t.detach())
        elif name in self._buffers and self._buffers[name] is not None:
            self._buffers[name] = t
        else:
            raise KeyError(f"QuantLinear stores no tensor {name!r}")

    def freeze_storage_(self) -> "QuantLinear":
        """``requires_grad=False`` on every stored parameter (a loader may hand floats over as trainable)."""
        for p in self._parameters.values():
            if p is not None:
                p.requires_grad_(False)
        return self

    # --- construction --------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        fmt: Format,
        weak_columns: torch.Tensor | None = None,
        outlier_mask: torch.Tensor | None = None,
        qweight: QuantizedTensor | None = None,
        weight: torch.Tensor | None = None,
        outlier_dtype: str = "float16",
    ) -> "QuantLinear":
        """Quantize ``linear`` (round to nearest unless a solver passes ``qweight``).

        ``weak_columns``: input columns kept in 16-bit (removed from the base).
        ``outlier_mask``: ``[out, in]`` bool, elements kept in 16-bit (the base
        stores an exact zero there; they are zeroed before the scale search, as OPQ does).
        ``qweight``: an already solved base for the kept columns (GPTQ/OWQ).
        ``weight``: the dense weight to use instead of ``linear.weight`` (e.g. a
        solver's error-compensated weak columns).
        """
        w = (linear.weight if weight is None else weight).detach()
        if w.dim() != 2:
            raise ValueError(f"expected a 2-D weight, got {tuple(w.shape)}")
        out_f, in_f = w.shape
        w = w.float()
        odt = _OUTLIER_DTYPES.get(outlier_dtype)
        if odt is None:
            raise ValueError(f"outlier_dtype must be one of {sorted(_OUTLIER_DTYPES)}, got {outlier_dtype!r}")
        cols = None
        keep = torch.arange(in_f, device=w.device)
        if weak_columns is not None and len(weak_columns):
            cols = ColumnOutliers.from_weight(w, torch.as_tensor(weak_columns, device=w.device), odt)
            cols.validate(out_f, in_f)
            keep = keep_index(in_f, cols.idx)
        sparse = None
        if outlier_mask is not None:
            if outlier_mask.shape != w.shape:
                raise ValueError(f"outlier_mask shape {tuple(outlier_mask.shape)} != weight shape {tuple(w.shape)}")
            mask = outlier_mask.to(torch.bool).clone()
            if cols is not None:
                mask[:, cols.idx.long()] = False  # a weak column already keeps these
            if bool(mask.any()):
                sparse = SparseOutliers.from_mask(w, mask, odt)
        base_w = w[:, keep]
        if qweight is None:
            if sparse is not None:
                base_w = base_w.masked_fill(mask[:, keep], 0.0)
            qweight = fmt.quantize(base_w)
        elif tuple(qweight.shape) != (out_f, keep.numel()):
            raise ValueError(f"solver output shape {qweight.shape} != {(out_f, keep.numel())}")
        if sparse is not None:
            codes = qweight.codes()
            zero = fmt.zero_code(qweight.data, qweight.shape).expand_as(codes)
            m = mask[:, keep]
            qweight = fmt.with_codes(qweight, torch.where(m, zero, codes))
        has_bias = getattr(linear, "bias", None) is not None
        layer = cls(
            in_f, out_f, fmt, bias=has_bias,
            n_weak=cols.k if cols is not None else 0,
            nnz=sparse.nnz if sparse is not None else 0,
            outlier_dtype=outlier_dtype,
            bias_dtype=linear.bias.dtype if has_bias else torch.float32,
            device=w.device,
        )
        for name, t in qweight.data.items():
            getattr(layer, name).copy_(t)
        if cols is not None:
            layer.col_idx.copy_(cols.idx)
            layer.col_values.copy_(cols.values)
        if sparse is not None:
            layer.sp_rowptr.copy_(sparse.rowptr)
            layer.sp_cols.copy_(sparse.cols)
            layer.sp_values.copy_(sparse.values)
        if has_bias:
            layer.bias.copy_(linear.bias.detach())
        return layer

    @classmethod
    def from_spec(cls, in_features: int, out_features: int, spec: dict[str, Any], device=None) -> "QuantLinear":
        """Rebuild an empty layer from :meth:`spec` (used when loading a packed checkpoint)."""
        fmt = get_format(**spec["format"])
        return cls(
            in_features, out_features, fmt,
            bias=bool(spec.get("bias", False)),
            n_weak=int(spec.get("n_weak", 0)),
            nnz=int(spec.get("nnz", 0)),
            outlier_dtype=spec.get("outlier_dtype", "float16"),
            bias_dtype=_float_dtype(spec.get("bias_dtype", "float32"), "bias_dtype"),
            device=device,
        )

    def spec(self) -> dict[str, Any]:
        """JSON-serialisable description of this layer's storage (everything but the numbers)."""
        return {
            "format": self.fmt.to_dict(),
            "n_weak": self.n_weak,
            "nnz": self.nnz,
            "bias": self.bias is not None,
            "bias_dtype": str(self.bias.dtype).replace("torch.", "") if self.bias is not None else "float32",
            "outlier_dtype": self.outlier_dtype,
        }

    # --- views ---------------------------------------------------------------
    @property
    def base_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features - self.n_weak)

    def quantized_base(self) -> QuantizedTensor:
        return QuantizedTensor(self.fmt, self.base_shape, {n: getattr(self, n) for n in self._base_names})

    def column_outliers(self) -> ColumnOutliers | None:
        return ColumnOutliers(self.col_idx, self.col_values) if self.n_weak else None

    def sparse_outliers(self) -> SparseOutliers | None:
        if not self.nnz:
            return None
        return SparseOutliers(self.sp_rowptr, self.sp_cols, self.sp_values, (self.out_features, self.in_features))

    def packed_weight(self) -> PackedWeight:
        pw = PackedWeight(self.quantized_base(), self.in_features, self.out_features)
        if self.n_weak:
            pw.col_idx = self.col_idx.long()
            pw.keep = keep_index(self.in_features, self.col_idx)
        if self.nnz:
            sp = self.sparse_outliers()
            pw.sparse_rowptr = self.sp_rowptr.long()
            pw.sparse_rows = sp.row_index()
            pw.sparse_cols = self.sp_cols.long()
        return pw

    # --- compute -------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, col_values: torch.Tensor | None = None, sparse_values: torch.Tensor | None = None,
        scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x @ W.T + b`` through the ``torch.ops.wct.quant_linear`` custom op.

        The op gets the raw buffers: everything with a data-dependent size (kept columns, sparse
        rows) is derived inside it, so ``torch.compile`` sees one opaque node and no graph break.
        ``scales``: values used in place of the base's scale buffer (:attr:`scale_name`), e.g. a
        tuner's trainable copy; gradients reach it through the op.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the quantized weight expects {self.in_features}")
        if self.n_weak and col_values is None:
            col_values = self.col_values
        if self.nnz and sparse_values is None:
            sparse_values = self.sp_values
        base = [getattr(self, n) for n in self._base_names]
        if scales is not None:
            base[self._base_names.index(self.scale_name)] = scales
        return quant_linear_raw(
            x, base, self._layout, self.col_idx if self.n_weak else None, col_values,
            self.sp_rowptr if self.nnz else None, self.sp_cols if self.nnz else None, sparse_values, self.bias,
        )


    @property
    def scale_name(self) -> str | None:
        """The base buffer holding trainable scales: ``"scales"`` (integer formats), ``"absmax"`` (codebooks
        without double quantization), or None (double-quantized block scales are int8 codes of scales)."""
        name = scale_buffer_name(self.fmt)
        return name if name in self._base_names else None

    @torch.no_grad()
    def dequantize_weight(
        self,
        dtype: torch.dtype = torch.float32,
        col_values: torch.Tensor | None = None,
        sparse_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The dense ``[out, in]`` weight including outliers (for checks, merging and export)."""
        from wct.kernels.torch_backend import dense_tile

        cv = self.col_values if (self.n_weak and col_values is None) else col_values
        sv = self.sp_values if (self.nnz and sparse_values is None) else sparse_values
        return dense_tile(self.packed_weight(), 0, self.out_features, dtype, cv, sv)

    @torch.no_grad()
    def set_outlier_values(self, col_values: torch.Tensor | None = None, sparse_values: torch.Tensor | None = None):
        """Write (trained) outlier values back into the frozen storage."""
        if col_values is not None:
            self.col_values.copy_(col_values.to(self.col_values.dtype))
        if sparse_values is not None:
            self.sp_values.copy_(sparse_values.to(self.sp_values.dtype))

    def _apply(self, fn, recurse=True):
        """Follow device moves, never dtype casts.

        ``model.to(torch.bfloat16)`` would otherwise round the fp16 scales and outliers and the
        fp32 codebook/absmax tensors, silently changing the quantized weight; the layer computes
        in the input's dtype anyway.  Applies to the parameters and the buffers alike (the cast is
        refused per tensor, before ``nn.Module`` writes the result back in place).
        """

        def keep_dtype(t):
            out = fn(t)
            if out.dtype != t.dtype:
                out = t if out.device == t.device else t.to(device=out.device)
            return out

        return super()._apply(keep_dtype, recurse)

    # --- accounting ----------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Storage of the weight: packed base + outliers (bias not counted, as for any Linear)."""
        n = self.quantized_base().nbytes
        for part in (self.column_outliers(), self.sparse_outliers()):
            if part is not None:
                n += part.nbytes
        return n

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / (self.in_features * self.out_features)

    def validate(self, name: str = "") -> None:
        """Check the stored tensors against the layer spec: shapes, dtypes, index ranges, finite scales."""
        where = f"{name}: " if name else ""
        try:
            qt = self.quantized_base()
            self.fmt.validate(qt)
            for k, t in qt.data.items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"buffer '{k}' holds NaN/Inf")
            cols = self.column_outliers()
            if cols is not None:
                cols.validate(self.out_features, self.in_features)
            sp = self.sparse_outliers()
            if sp is not None:
                sp.validate()
        except ValueError as e:
            raise ValueError(f"{where}{e}") from None

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.name}"
        if self.n_weak:
            s += f", weak_columns={self.n_weak}"
        if self.nnz:
            s += f", sparse_outliers={self.nnz}"
        return s + f", bias={self.bias is not None}, bits/weight={self.bits_per_weight:.3f}"
