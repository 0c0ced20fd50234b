"""Exact model rewrites before activation quantization: packed layers back to Linear, a norm's γ/β into the
Linears it feeds, SmoothQuant's per-channel factors."""

from __future__ import annotations

import torch
from torch import nn

from wct.nn.model_utils import linear_weight, packed_layers, set_module
from wct.quantize.blockwise import InputGroup

from .stats import MIN_RANGE, ChannelStats


@torch.no_grad()
def dequantize_quant_linears(model: nn.Module) -> int:
    """Replace every ``wct.nn.QuantLinear`` by an fp32 ``nn.Linear`` holding its dequantized weight.

    Returns how many were replaced.  A model with LoRA adapters still attached must be merged
    first (``merge_and_unload``): the adapters would otherwise be silently dropped.
    """
    if any(hasattr(m, "lora_A") for m in model.modules()):
        raise ValueError("the model still has LoRA adapters; merge them first (merge_and_unload) so the "
                         "merged weights are what gets activation-quantized")
    targets = packed_layers(model)
    for name, q in targets.items():
        device = q.qweight.device
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=device)
        lin.weight.copy_(q.dequantize_weight(torch.float32))
        if q.bias is not None:
            lin.bias.copy_(q.bias.float())
        set_module(model, name, lin)
    return len(targets)


@torch.no_grad()
def fold_norm_into_linears(norm: nn.Module, linears: list[nn.Module]) -> None:
    """Fold ``norm``'s γ (and β) into the Linears that read its output: ``W ← W·diag(γ)``, ``b ← b + W·β``.

    The norm is left with ``γ = 1`` (and ``β = 0``).  Exact in exact arithmetic for a pre-norm
    block (the norm output feeds only these Linears); :func:`quantize_activations` verifies it.
    """
    gamma = norm.weight.detach().double()
    beta = getattr(norm, "bias", None)
    beta = None if beta is None else beta.detach().double()
    for lin in linears:
        W = linear_weight(lin)
        Wd = W.detach().double()
        if beta is not None:
            extra = Wd @ beta
            if lin.bias is None:
                lin.bias = nn.Parameter(extra.to(W.dtype), requires_grad=False)
            else:
                lin.bias.copy_((lin.bias.double() + extra).to(lin.bias.dtype))
        W.copy_((Wd * gamma[None, :]).to(W.dtype))
    norm.weight.fill_(1.0)
    if beta is not None:
        norm.bias.zero_()


def smoothing_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s_c = max|X_c|^α / max|W_{:,c}|^(1−α)`` over all Linears reading the input."""
    w_absmax = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(0).cpu()
    s = act_absmax.float().clamp(min=MIN_RANGE).pow(alpha) / w_absmax.clamp(min=MIN_RANGE).pow(1 - alpha)
    return s.clamp(min=MIN_RANGE)


@torch.no_grad()
def fold_gammas(
    block: nn.Module, groups: list[InputGroup], prefix: str, stats: dict[str, ChannelStats] | None = None
) -> dict[str, ChannelStats] | None:
    """The reference's Llama variant: γ (and β) into the Linears after each norm, checked on random inputs.

    ``stats`` recorded on the norm outputs are mapped to the folded inputs ``(x − β)/γ``.
    """
    out = dict(stats) if stats is not None else None
    for g in groups:
        if g.norm is None:
            continue
        norm = block.get_submodule(g.norm)
        lins = [block.get_submodule(n) for n in g.names]
        gamma = norm.weight.detach().clone()
        beta = getattr(norm, "bias", None)
        beta = None if beta is None else beta.detach().clone()
        x = torch.randn(4, gamma.numel(), generator=torch.Generator().manual_seed(0)).to(gamma)
        before = [lin(norm(x)) for lin in lins]
        fold_norm_into_linears(norm, lins)
        after = [lin(norm(x)) for lin in lins]
        for n, b0, a0 in zip(g.names, before, after):
            err = float((a0 - b0).norm() / b0.norm().clamp(min=1e-12))
            if err > 1e-4:
                raise ValueError(f"{prefix}.{g.norm}: folding its γ into {n} changed the output (relative error "
                                 f"{err:.2e}); this norm cannot be folded (e.g. a (1 + γ) parametrization)")
        if out is not None and g.names[0] in out:
            out[g.names[0]] = out[g.names[0]].affine_inverse(gamma, beta)
    return out
