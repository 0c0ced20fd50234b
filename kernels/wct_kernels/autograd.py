"""The one autograd function behind every quantized matmul.

``y = x @ deq(W_base).T  (+ x[..., idx] @ W_cols.T)  (+ sparse part)  (+ b)``

Gradients flow to the input and to the outlier values only; the packed base is
frozen.  Backward recomputes dequantized tiles instead of saving a dense weight:
the only tensors saved for backward are the input (or just its weak columns)
and the outlier values.
"""

from __future__ import annotations

import functools
import os

import torch

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


class QuantLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, col_values, sparse_values, bias, packed: PackedWeight):
        x2d = x.reshape(-1, x.shape[-1])
        be = _backend(x)
        y = be.forward(packed, x2d, col_values, sparse_values)
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.packed = packed
        ctx.x_shape = x.shape
        need_cols = col_values is not None and col_values.requires_grad
        need_sparse = sparse_values is not None and sparse_values.requires_grad
        saved_x = x2d if need_sparse else (x2d[:, packed.col_idx] if need_cols else None)
        ctx.save_for_backward(saved_x, col_values, sparse_values)
        ctx.need = (need_cols, need_sparse, bias is not None and bias.requires_grad)
        return y.reshape(*x.shape[:-1], packed.out_features)

    @staticmethod
    def backward(ctx, grad_y):
        saved_x, col_values, sparse_values = ctx.saved_tensors
        packed: PackedWeight = ctx.packed
        need_cols, need_sparse, need_bias = ctx.need
        gy = grad_y.reshape(-1, packed.out_features)
        be = _backend(gy)
        gx = gc = gs = gb = None
        if ctx.needs_input_grad[0]:
            gx = be.grad_input(packed, gy, col_values, sparse_values)
            gx = gx.reshape(ctx.x_shape)
        if need_cols:
            xc = saved_x[:, packed.col_idx] if need_sparse else saved_x
            gc = (gy.t() @ xc.to(gy.dtype)).to(col_values.dtype)
        if need_sparse:
            gs = be.grad_sparse_values(packed, gy, saved_x.to(gy.dtype)).to(sparse_values.dtype)
        if need_bias:
            gb = gy.sum(0)
        return gx, gc, gs, gb, None


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
    return QuantLinearFunction.apply(x, col_values, sparse_values, bias, packed)
