"""The one custom op behind every quantized matmul: ``torch.ops.wct.quant_linear``.

``y = x @ deq(W_base).T  (+ x[..., idx] @ W_cols.T)  (+ sparse part)``  (bias added outside, in aten)

Why a ``torch.library`` custom op and not a plain ``autograd.Function``: ``torch.compile`` cannot
trace into the kernels (Python loops over tiles, data-dependent index building, Triton launches)
and broke the graph at every layer (52 breaks in a 2-layer Llama, ``fullgraph=True`` failed).  An
op with a fake (meta) implementation is one opaque node the compiler keeps in the graph: it only
needs the output's shape and dtype, which the fake functions below give without touching data.

Gradients flow to the input, to the outlier values and, when the caller passes a scale tensor that
requires grad in place of the base's scale buffer (``scales`` of an integer format, ``absmax`` of a
codebook without double quantization), to the scales; the codes stay frozen.  Backward recomputes
dequantized tiles (``grad_x = grad_y @ W``, its own op) instead of saving a dense weight: the only
activations saved are the input's weak columns, or the whole input when the sparse outliers or the
scales train (their gradients read any column).  The scale gradient is its own op too
(``wct::quant_linear_grad_scales``: tile-wise ``(gy.T @ x) · U`` reduced per group or block,
``U`` the unscaled codes); it always runs on the torch backend's tile math, which works on CUDA
tensors as well (the Triton backend has no kernel for it).

A base tensor may arrive in another floating dtype than the format stores (an fp32 master copy of
fp16 scales): the op casts it to the stored dtype before any backend reads it, so the Triton
kernels always see the dtypes they were built for, and values already rounded to that dtype (what
``wct.tuners.wct`` passes) go through unchanged.  Float64 scales on CPU are the exception: the torch
backend then dequantizes in float64 without rounding them (what ``gradcheck`` needs).

The packed weight crosses the op boundary as its raw buffers plus a ``layout`` string (the
format's ``to_dict()``, buffer names, shapes; built once per layer by :func:`layout_of`), because
custom ops take tensors and primitives only.  Index vectors derived from the raw buffers (the kept
columns, the row of each sparse value) have data-dependent sizes, so they are built *inside* the
op, where the compiler never sees them.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from wct.formats import QuantizedTensor, get_format
from wct.outliers import keep_index

from . import torch_backend
from .spec import PackedWeight


@functools.cache
def _triton_backend():
    """The Triton backend module, or None (not installed, broken, or ``WCT_KERNELS=torch``).

    Imported lazily, on the first CUDA tensor: CPU-only runs never build (or need) the kernels.
    """
    if os.environ.get("WCT_KERNELS", "").lower() == "torch":
        return None
    try:
        from . import triton_backend
    except Exception:  # a broken triton must never break the torch path
        return None
    return triton_backend if triton_backend.HAS_TRITON else None


def _backend(x: torch.Tensor):
    """Triton kernels for CUDA tensors when Triton is importable; the torch backend anywhere else.

    (The Triton backend itself hands formats its kernels do not read back to the torch backend.)
    """
    if x.is_cuda:
        tb = _triton_backend()
        if tb is not None:
            return tb
    return torch_backend


# --------------------------------------------------------------------------- layout <-> PackedWeight
def layout_of(fmt, names, base_shape, in_features: int, out_features: int) -> str:
    """The op's description of a packed base: format, buffer names (in the order passed) and shapes.

    Build it once per layer, outside any compiled region (``json`` is not traceable).
    """
    return json.dumps({"format": fmt.to_dict(), "names": list(names), "shape": list(base_shape),
                       "in": in_features, "out": out_features}, sort_keys=True)


@functools.lru_cache(maxsize=None)
def _parse_layout(layout: str):
    d = json.loads(layout)
    return get_format(**d["format"]), tuple(d["names"]), tuple(d["shape"]), int(d["in"]), int(d["out"])


def _packed(base: list[torch.Tensor], layout: str, col_idx: Optional[torch.Tensor],
            sp_rowptr: Optional[torch.Tensor], sp_cols: Optional[torch.Tensor]) -> PackedWeight:
    """Rebuild the backends' :class:`PackedWeight` (with derived index vectors) from the op's inputs."""
    fmt, names, shape, n_in, n_out = _parse_layout(layout)
    if len(base) != len(names):
        raise ValueError(f"layout names {len(names)} packed buffers {names}, got {len(base)} tensors")
    base = [t if t.dtype == d or (t.dtype == torch.float64 and not t.is_cuda) else t.to(d)
            for t, d in zip(base, _stored_dtypes(layout))]  # (fp64 on CPU: the torch backend's exact path)
    pw = PackedWeight(QuantizedTensor(fmt, shape, dict(zip(names, base))), n_in, n_out)
    if col_idx is not None:
        pw.col_idx, pw.keep = _derived(col_idx, ("cols", n_in), lambda: (col_idx.long(), keep_index(n_in, col_idx)))
    if sp_rowptr is not None:
        pw.sparse_rowptr, pw.sparse_rows = _derived(sp_rowptr, ("rows", n_out),
                                                    lambda: (sp_rowptr.long(), _rows(sp_rowptr.long(), n_out)))
        pw.sparse_cols = _derived(sp_cols, ("cols64",), lambda: (sp_cols.long(),))[0]
    return pw


@functools.lru_cache(maxsize=None)
def _stored_dtypes(layout: str) -> tuple:
    """The dtype the format stores each base buffer in, in the layout's order."""
    fmt, names, shape, _, _ = _parse_layout(layout)
    specs = fmt.buffer_specs(shape)
    return tuple(specs[n][1] for n in names)


@functools.lru_cache(maxsize=None)
def _scale_slot(layout: str) -> tuple[Optional[int], tuple]:
    """(position of the trainable scale buffer among the base tensors or None, its shape)."""
    fmt, names, shape, _, _ = _parse_layout(layout)
    name = torch_backend.scale_buffer_name(fmt)
    if name is None or name not in names:
        return None, ()
    return names.index(name), tuple(fmt.buffer_specs(shape)[name][0])


_DERIVED = WeakIdKeyDictionary()


def _derived(src: torch.Tensor, what: tuple, build) -> tuple:
    """Index vectors derived from a frozen buffer, cached per buffer until it changes in place.

    Building them costs a host synchronisation on a GPU (``nonzero``, ``repeat_interleave``: sizes
    known only from the data), once per layer and call otherwise.  Keyed weakly on the buffer, checked
    against its version counter (a ``load_state_dict`` into the same buffer rebuilds them).
    """
    entry = _DERIVED.get(src)
    if entry is not None and entry[0] == src._version and what in entry[1]:
        return entry[1][what]
    if entry is None or entry[0] != src._version:
        entry = (src._version, {})
        _DERIVED[src] = entry
    with torch.inference_mode(False):  # never cache inference tensors (see torch_dequant.outside_inference_mode)
        entry[1][what] = tuple(build())
    return entry[1][what]


def _rows(rowptr: torch.Tensor, n_out: int) -> torch.Tensor:
    """Row of every sparse value, expanded from the CSR row pointer."""
    return torch.repeat_interleave(torch.arange(n_out, device=rowptr.device), rowptr[1:] - rowptr[:-1])


def _out_features(layout: str) -> int:
    return _parse_layout(layout)[4]


def _in_features(layout: str) -> int:
    return _parse_layout(layout)[3]


# --------------------------------------------------------------------------- the ops
@torch.library.custom_op("wct::quant_linear", mutates_args=())
def _quant_linear_op(
    x: torch.Tensor, base: list[torch.Tensor], layout: str, col_idx: Optional[torch.Tensor],
    col_values: Optional[torch.Tensor], sp_rowptr: Optional[torch.Tensor], sp_cols: Optional[torch.Tensor],
    sparse_values: Optional[torch.Tensor],
) -> torch.Tensor:
    """``x [..., in] -> [..., out]`` in ``x``'s dtype (no bias).

    The output is a tensor of its own, never a view: in-place ops on it must work, and a view
    breaks two of them.  Autograd forbids in-place changes of a view created inside a custom
    function (Falcon's ``mlp_output += attention_output`` raised "is a view and is being modified
    inplace"), and FSDP2 registers its pre-backward hook on a module's output, which an in-place
    op on a view drops silently (the all-gather in backward is then skipped: wrong gradients).
    So the backends' ``[tokens, out]`` result is reshaped here and detached from its 2-D base (same
    memory, no copy; only a backend that handed back a view of something else is copied).
    """
    packed = _packed(base, layout, col_idx, sp_rowptr, sp_cols)
    y = _backend(x).forward(packed, x.reshape(-1, x.shape[-1]), col_values, sparse_values)
    if y._base is not None or not y.is_contiguous():
        y = y.clone(memory_format=torch.contiguous_format)
    return y.view(*x.shape[:-1], packed.out_features).detach()


@_quant_linear_op.register_fake
def _(x, base, layout, col_idx, col_values, sp_rowptr, sp_cols, sparse_values):
    return x.new_empty(*x.shape[:-1], _out_features(layout))


@torch.library.custom_op("wct::quant_linear_grad_input", mutates_args=())
def _grad_input_op(
    gy: torch.Tensor, base: list[torch.Tensor], layout: str, col_idx: Optional[torch.Tensor],
    col_values: Optional[torch.Tensor], sp_rowptr: Optional[torch.Tensor], sp_cols: Optional[torch.Tensor],
    sparse_values: Optional[torch.Tensor],
) -> torch.Tensor:
    """``grad_x = grad_y @ W``: ``[tokens, out] -> [tokens, in]`` in ``gy``'s dtype."""
    packed = _packed(base, layout, col_idx, sp_rowptr, sp_cols)
    return _backend(gy).grad_input(packed, gy, col_values, sparse_values)


@_grad_input_op.register_fake
def _(gy, base, layout, col_idx, col_values, sp_rowptr, sp_cols, sparse_values):
    return gy.new_empty(gy.shape[0], _in_features(layout))


@torch.library.custom_op("wct::quant_linear_grad_sparse", mutates_args=())
def _grad_sparse_op(gy: torch.Tensor, x: torch.Tensor, layout: str, sp_rowptr: torch.Tensor,
                    sp_cols: torch.Tensor) -> torch.Tensor:
    """``dL/dv_e = sum_t gy[t, row_e] * x[t, col_e]`` for every sparse outlier ``e``: ``[nnz]``."""
    n_out = _out_features(layout)
    rowptr = sp_rowptr.long()
    packed = PackedWeight(None, _in_features(layout), n_out, sparse_rowptr=rowptr, sparse_rows=_rows(rowptr, n_out),
                          sparse_cols=sp_cols.long())  # the sparse structure is all this product reads
    return _backend(gy).grad_sparse_values(packed, gy, x)


@_grad_sparse_op.register_fake
def _(gy, x, layout, sp_rowptr, sp_cols):
    return gy.new_empty(sp_cols.shape[0])


@torch.library.custom_op("wct::quant_linear_grad_scales", mutates_args=())
def _grad_scales_op(gy: torch.Tensor, x: torch.Tensor, base: list[torch.Tensor], layout: str,
                    col_idx: Optional[torch.Tensor]) -> torch.Tensor:
    """``dL/dscale`` of the packed base, the shape of its scale buffer (fp32; fp64 for fp64 inputs).

    Always the torch backend's tile math (:func:`torch_backend.grad_scales`), on CPU and CUDA alike.
    """
    packed = _packed(base, layout, col_idx, None, None)  # outliers never enter: their positions hold code 0
    return torch_backend.grad_scales(packed, gy, x)


@_grad_scales_op.register_fake
def _(gy, x, base, layout, col_idx):
    return gy.new_empty(_scale_slot(layout)[1], dtype=torch.promote_types(gy.dtype, torch.float32))


def _setup_context(ctx, inputs, output) -> None:
    """Save what backward needs: the frozen buffers, the outlier values, and of the input only the
    weak columns, or all of it when the sparse values or the scales train (their gradients read any column)."""
    x, base, layout, col_idx, col_values, sp_rowptr, sp_cols, sparse_values = inputs
    # (ctx.needs_input_grad is indexed by the *flattened* inputs, ``base`` expanded: ask the tensors)
    need_x, need_cols, need_sparse = (t is not None and t.requires_grad for t in (x, col_values, sparse_values))
    slot = _scale_slot(layout)[0]
    wants = [i for i, t in enumerate(base) if t.requires_grad]
    if wants and wants != [slot]:
        names = _parse_layout(layout)[1]
        raise ValueError(
            f"only the scale buffer of a packed base can train, but {[names[i] for i in wants]} require grad "
            f"(trainable here: {names[slot] if slot is not None else 'nothing, this format has no trainable scales'})"
        )
    need_scales = bool(wants)
    x2d = x.reshape(-1, x.shape[-1])
    saved_x = x2d if (need_sparse or need_scales) else (x2d[:, col_idx.long()] if need_cols else None)
    ctx.layout, ctx.n_base, ctx.x_shape = layout, len(base), x.shape
    ctx.need = (need_x, need_cols, need_sparse, need_scales)
    ctx.save_for_backward(saved_x, col_idx, col_values, sp_rowptr, sp_cols, sparse_values, *base)


def _backward(ctx, grad_y):
    saved_x, col_idx, col_values, sp_rowptr, sp_cols, sparse_values, *base = ctx.saved_tensors
    need_x, need_cols, need_sparse, need_scales = ctx.need
    gy = grad_y.reshape(-1, grad_y.shape[-1])
    gx = gc = gs = None
    gbase = [None] * ctx.n_base
    if need_x:
        gx = _grad_input_op(gy, base, ctx.layout, col_idx, col_values, sp_rowptr, sp_cols, sparse_values)
        gx = gx.reshape(ctx.x_shape)
    if need_cols:
        xc = saved_x[:, col_idx.long()] if (need_sparse or need_scales) else saved_x
        gc = (gy.t() @ xc.to(gy.dtype)).to(col_values.dtype)
    if need_sparse:
        gs = _grad_sparse_op(gy, saved_x.to(gy.dtype), ctx.layout, sp_rowptr, sp_cols).to(sparse_values.dtype)
    if need_scales:
        slot = _scale_slot(ctx.layout)[0]
        gbase[slot] = _grad_scales_op(gy, saved_x, base, ctx.layout, col_idx).to(base[slot].dtype)
    return gx, gbase, None, None, gc, None, None, gs


torch.library.register_autograd("wct::quant_linear", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public entry points
def quant_linear_raw(
    x: torch.Tensor,
    base: list[torch.Tensor],
    layout: str,
    col_idx: Optional[torch.Tensor] = None,
    col_values: Optional[torch.Tensor] = None,
    sp_rowptr: Optional[torch.Tensor] = None,
    sp_cols: Optional[torch.Tensor] = None,
    sparse_values: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The op on raw buffers (what ``QuantLinear.forward`` calls: nothing data-dependent outside it)."""
    y = _quant_linear_op(x, base, layout, col_idx, col_values, sp_rowptr, sp_cols, sparse_values)
    return y if bias is None else y + bias.to(y.dtype)


def quant_linear(
    x: torch.Tensor,
    packed: PackedWeight,
    col_values: torch.Tensor | None = None,
    sparse_values: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Functional quantized linear layer (see module docstring)."""
    if x.shape[-1] != packed.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the quantized weight expects {packed.in_features}")
    if packed.col_idx is not None and col_values is None:
        raise ValueError("this weight has weak columns: pass their values as col_values")
    if packed.sparse_rows is not None and sparse_values is None:
        raise ValueError("this weight has sparse outliers: pass their values as sparse_values")
    qt = packed.qweight
    layout = layout_of(qt.format, qt.data, qt.shape, packed.in_features, packed.out_features)
    return quant_linear_raw(x, list(packed.qweight.data.values()), layout, packed.col_idx, col_values,
                            packed.sparse_rowptr, packed.sparse_cols, sparse_values, bias)
