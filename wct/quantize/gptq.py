"""OPTQ/GPTQ (Frantar et al., 2023): quantize a Linear weight column by column,
spreading each column's rounding error onto the columns not yet quantized
through the inverse Hessian of the layer's reconstruction loss.

One small solver class, in the spirit of the original ``gptq.py``:
``add_batch`` accumulates ``H = 2/n · Σ x xᵀ``; ``solve`` runs the lazy-batch
Cholesky form.  OWQ plugs in by passing ``weak_columns``: they are moved to the
end of the processing order, never quantized, but still receive every error
update, and are returned (updated) to be stored in 16-bit.  Sparse outliers
(GWQ) are handled the SpQR way: their error is defined as 0, so they keep their
exact (updated) value and are returned in 16-bit.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from wct.formats.integer import IntegerFormat
from wct.nn import QuantLinear
from wct.nn.model_utils import CHECK_HINT, NonFiniteError, first_bad_sample, linear_weight

from .blockwise import BlockInputs, BlockStep, SharedInputHooks, run_block
from .config import QuantConfig


class GridFormat(Protocol):
    """What the GPTQ solver needs of a format: a uniform grid ``w ≈ scale · (q − zero)`` per row (and group).

    :class:`wct.formats.integer.IntegerFormat` is one; OutlierTune's symmetric weight grid is another.
    """

    group_size: int | None

    def n_groups(self, in_features: int) -> int: ...

    def range_params(self, w: torch.Tensor, search: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]: ...

    def quantize_values(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor: ...

    def dequantize_values(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor: ...


@dataclass
class GPTQResult:
    codes: torch.Tensor  # [out, in - k] integer codes of the kept columns (ascending column order)
    scales: torch.Tensor  # [out, groups]
    zeros: torch.Tensor  # [out, groups]
    dense: torch.Tensor  # [out, in] the final weight (quantized + kept weak columns/outliers, error-compensated)
    loss: float  # Σ (w - q)² / d² / 2, GPTQ's proxy loss


class GPTQ:
    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.in_features = in_features
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """Accumulate the running average ``H = 2/n Σ x xᵀ`` over the tokens of ``x [..., in]``."""
        x = x.reshape(-1, x.shape[-1]).float()
        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError("calibration activations contain NaN/Inf")
        n = x.shape[0]
        self.H.mul_(self.nsamples / (self.nsamples + n))
        self.nsamples += n
        x = x * math.sqrt(2.0 / self.nsamples)
        self.H.addmm_(x.t(), x)

    # ------------------------------------------------------------------------
    def _inverse_cholesky(self, H: torch.Tensor, percdamp: float) -> torch.Tensor:
        """Upper Cholesky factor of ``(H + λI)⁻¹``; raises the damping until it factorises."""
        damp = percdamp * torch.mean(torch.diag(H))
        eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        for _attempt in range(6):
            try:
                L = torch.linalg.cholesky(H + damp * eye)
                Hinv = torch.cholesky_inverse(L)
                return torch.linalg.cholesky(Hinv, upper=True)
            except RuntimeError:
                new = damp * 10 if damp > 0 else 1e-6
                warnings.warn(f"Hessian not positive definite with damping {float(damp):.3g}; retrying with {float(new):.3g}", stacklevel=2)
                damp = new
        raise FloatingPointError("Hessian could not be factorised even with heavy damping (degenerate calibration data?)")

    def solve(
        self,
        W: torch.Tensor,
        fmt: GridFormat,
        lazy_batch: int = 128,
        percdamp: float = 0.01,
        act_order: bool = False,
        range_search: str = "minmax",
        weak_columns: torch.Tensor | None = None,
        outlier_mask: torch.Tensor | None = None,
    ) -> GPTQResult:
        """Quantize ``W [out, in]`` (not modified).  See the module docstring."""
        W = W.detach().float().clone()
        out_f, in_f = W.shape
        H = self.H.clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        weak = torch.empty(0, dtype=torch.long, device=W.device) if weak_columns is None else weak_columns.long().sort().values
        is_weak = torch.zeros(in_f, dtype=torch.bool, device=W.device)
        is_weak[weak] = True
        kept = (~is_weak).nonzero().squeeze(1)  # ascending: the base's column order
        nq = kept.numel()
        kept_pos = torch.full((in_f,), -1, dtype=torch.long, device=W.device)
        kept_pos[kept] = torch.arange(nq, device=W.device)

        proc = kept
        if act_order:
            proc = kept[torch.argsort(torch.diag(H)[kept], descending=True)]
        order = torch.cat([proc, weak])  # processing order: kept columns, then weak columns
        W = W[:, order]
        H = H[order][:, order]
        mask = None if outlier_mask is None else outlier_mask[:, order].clone()

        Hinv = self._inverse_cholesky(H, percdamp)

        g = fmt.group_size
        n_groups = fmt.n_groups(nq)
        scales = torch.zeros(out_f, n_groups, device=W.device)
        zeros = torch.zeros(out_f, n_groups, device=W.device)
        have = torch.zeros(n_groups, dtype=torch.bool)

        def fit(cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # callers zero the outliers first, so they never stretch the range
            return fmt.range_params(cols, range_search)

        W_base = W[:, :nq]
        if mask is not None:
            W_fit = W_base.masked_fill(mask[:, :nq], 0.0)
        else:
            W_fit = W_base
        static = g is None or act_order
        if g is None:
            s, z = fit(W_fit)
            scales[:, 0], zeros[:, 0] = s, z
            have[:] = True
        elif act_order:  # static groups: fit once on the original weight, in storage order
            Wk = W_fit[:, torch.argsort(kept_pos[proc])]
            for gi in range(n_groups):
                s, z = fit(Wk[:, gi * g : (gi + 1) * g])
                scales[:, gi], zeros[:, gi] = s, z
            have[:] = True

        codes = torch.zeros(out_f, nq, device=W.device)
        losses = torch.zeros(out_f, device=W.device)
        for i1 in range(0, nq, lazy_batch):
            i2 = min(i1 + lazy_batch, nq)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(count):
                col = i1 + i
                storage_col = int(kept_pos[order[col]])
                gi = 0 if g is None else storage_col // g
                if not static and not have[gi]:
                    ahead = torch.cat([W1[:, i:], W[:, i2:nq]], dim=1)[:, : min(g, nq - col)]
                    if mask is not None:
                        ahead = ahead.masked_fill(mask[:, col : col + ahead.shape[1]], 0.0)
                    s, z = fit(ahead)
                    scales[:, gi], zeros[:, gi] = s, z
                    have[gi] = True
                w = W1[:, i]
                d = Hinv1[i, i]
                s, z = scales[:, gi], zeros[:, gi]
                q = fmt.quantize_values(w, s, z)
                wq = fmt.dequantize_values(q, s, z)
                if mask is not None:
                    m = mask[:, col]
                    q = torch.where(m, z, q)  # the base stores an exact zero under an outlier
                    wq = torch.where(m, w, wq)  # the outlier keeps its value: no error to spread
                codes[:, storage_col] = q
                losses += (w - wq) ** 2 / d**2 / 2
                err = (w - wq) / d
                W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
                W1[:, i] = wq
            W[:, i1:i2] = W1
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

        inv = torch.argsort(order)
        return GPTQResult(codes, scales, zeros, W[:, inv], float(losses.sum()))


class HessianCollector:
    """One GPTQ accumulator per distinct input of a block's layers (q/k/v share one, so do gate/up)."""

    def __init__(self, layers: dict[str, nn.Module], prefix: str = "") -> None:
        self.prefix = prefix  # the block's qualified name, for error messages
        self.stats: dict[str, GPTQ] = {}
        self.owner: dict[str, str] = {}
        self.hooks = SharedInputHooks(layers, self._add)

    def _add(self, name: str, x: torch.Tensor, owner: str, _norm: str | None) -> None:
        if owner != name:
            self.owner[name] = owner
            return
        if name not in self.stats:
            self.stats[name] = GPTQ(x.shape[-1], device=x.device)
        try:
            self.stats[name].add_batch(x)
        except FloatingPointError:
            bad = first_bad_sample(x) if x.dim() >= 3 else 0
            full = f"{self.prefix}.{name}" if self.prefix else name
            raise NonFiniteError(f"{full}: calibration inputs contain NaN/Inf (first bad sample "
                                 f"{self.hooks.first_window + max(bad, 0)}) — {CHECK_HINT}") from None

    def collect(self, block: nn.Module, inputs: BlockInputs) -> HessianCollector:
        try:
            run_block(block, inputs, self.hooks.new_forward)
        finally:
            self.hooks.remove()
        return self

    def hessian(self, name: str) -> GPTQ:
        return self.stats[self.owner.get(name, name)]


class GPTQSolver:
    """The ``gptq`` entry of the solver registry: every Linear of a block from its input Hessian.

    OWQ and GWQ extend it (:mod:`.owq`, :mod:`.gwq`): they choose what stays 16-bit, GPTQ quantizes the rest.
    """

    def __init__(self, config: QuantConfig, fmt: IntegerFormat) -> None:
        self.config, self.fmt = config, fmt
        self.range_search = config.range_search or "minmax"

    def memory(self, model: nn.Module, calibration: torch.Tensor) -> tuple[int, str]:
        """Bytes held besides the calibration activations for the whole run, and what they are."""
        return 0, ""

    def prepare(self, model: nn.Module, calibration: torch.Tensor, progress: bool) -> None:
        """Work on the float model before the first block is captured (nothing for GPTQ)."""

    def plan_block(self, step: BlockStep, layers: dict[str, nn.Module]) -> None:
        """Per-block decisions made before the block's layers are solved (nothing for GPTQ)."""

    def solve(self, name: str, linear: nn.Module, hessian: GPTQ) -> tuple[QuantLinear, dict]:
        return self._gptq(linear, hessian, weak=None, mask=None)

    def _gptq(self, linear: nn.Module, hessian: GPTQ, weak: torch.Tensor | None,
              mask: torch.Tensor | None) -> tuple[QuantLinear, dict]:
        cfg = self.config
        W = linear_weight(linear).detach().float()
        res = hessian.solve(W, self.fmt, lazy_batch=cfg.lazy_batch, percdamp=cfg.percdamp, act_order=cfg.act_order,
                            range_search=self.range_search, weak_columns=weak, outlier_mask=mask)
        layer = QuantLinear.from_linear(
            linear, self.fmt, weak_columns=weak, outlier_mask=mask, qweight=self.fmt.from_codes(res.codes, res.scales, res.zeros),
            weight=res.dense, outlier_dtype=cfg.outlier_dtype,
        )
        return layer, {"gptq_loss": res.loss}
