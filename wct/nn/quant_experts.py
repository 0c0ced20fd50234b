"""``QuantExperts``: every expert of a Mixture-of-Experts block in packed storage, under the block's own routing.

transformers 5 stores a block's experts as fused 3-D parameters (``gate_up_proj [E, 2I, H]``, ``down_proj
[E, H, I]``; transposed ``[E, in, out]`` in gpt-oss) inside one module whose forward takes the router's choice
``(hidden_states, top_k_index, top_k_weights)``.  ``QuantExperts`` replaces that module: it keeps the original's
gating (``_apply_gate``: SwiGLU, gpt-oss's clamped GLU, ...), activation and flags, and holds one linear layer per
expert and projection (``gate_up_proj.<e>`` / ``up_proj.<e>``, ``down_proj.<e>``).  Those are ``nn.Linear`` views
of the fused weights while a model is being quantized — so every expert is calibrated, with hooks, on exactly the
tokens routed to it — and :class:`~wct.nn.QuantLinear` afterwards, so the packed kernels, checkpoints, WCT and LoRA
treat an expert like any other layer.  The router is not touched (it stays 16-bit).

Calibration of rarely routed experts: an expert that receives few calibration tokens has a rank-deficient input
Hessian, and GPTQ would fit it to those few tokens.  ``calibrate_on_all_tokens`` names experts that, during
calibration forwards only, see *every* token of the batch with a routing weight of 0 where the router did not pick
them — the block's output is unchanged and their Hessians describe the block's real input distribution.
"""

from __future__ import annotations

import types
from collections.abc import Iterable

import torch
from torch import nn

from .quant_linear import QuantLinear

# the fused expert parameters of transformers' experts modules (``up_proj`` where there is no gate)
PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module with fused 3-D weights (``@use_experts_implementation`` classes)."""
    down = module._parameters.get("down_proj") if hasattr(module, "_parameters") else None
    return isinstance(down, torch.Tensor) and down.dim() == 3 and hasattr(module, "has_gate")


def fused_experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if is_fused_experts(m)}


class QuantExperts(nn.Module):
    """Every expert of one MoE block as separate (packed) linear layers, driven by the block's router."""

    def __init__(self, experts: nn.Module, layers: dict[str, list[nn.Module]]) -> None:
        super().__init__()
        cls = type(experts)
        self.source_class = f"{cls.__module__}.{cls.__qualname__}"
        # the original's flags and hyper-parameters (num_experts, has_gate, is_transposed, alpha, limit, config ...)
        for key, value in vars(experts).items():
            if not key.startswith("_") or key == "_is_expert_parallel":
                setattr(self, key, value)
        for key, child in experts.named_children():  # act_fn, post_expert_norm ...
            self.add_module(key, child)
        self._gate_fn = getattr(cls, "_apply_gate", None)
        self.has_gate = bool(getattr(experts, "has_gate", True))
        self.has_post_expert_norm = bool(getattr(experts, "has_post_expert_norm", False))
        self.num_experts = len(layers["down_proj"])
        for name, mods in layers.items():
            self.add_module(name, nn.ModuleList(mods))
        self.calibrate_on_all_tokens: set[int] = set()
        self.routed_tokens: torch.Tensor | None = None  # per expert, counted while ``count_routing`` is on
        self.count_routing = False

    # --- construction --------------------------------------------------------------------------------------
    @staticmethod
    def _fused(experts: nn.Module) -> dict[str, torch.Tensor]:
        return {p: experts._parameters[p] for p in PROJECTIONS if experts._parameters.get(p) is not None}

    @classmethod
    def from_experts(cls, experts: nn.Module) -> QuantExperts:
        """Float ``nn.Linear`` per expert, sharing the fused parameters' storage (no copy): the form a model is
        calibrated and quantized in."""
        if not is_fused_experts(experts):
            raise TypeError(f"{type(experts).__name__} is not a fused experts module")
        transposed = bool(getattr(experts, "is_transposed", False))
        layers: dict[str, list[nn.Module]] = {}
        for name, w3 in cls._fused(experts).items():
            bias3 = experts._parameters.get(f"{name}_bias")
            mods = []
            for e in range(w3.shape[0]):
                w = w3.data[e].t() if transposed else w3.data[e]  # [out, in]
                lin = nn.Linear(w.shape[1], w.shape[0], bias=bias3 is not None, device="meta")
                lin.weight = nn.Parameter(w, requires_grad=False)
                if bias3 is not None:
                    lin.bias = nn.Parameter(bias3.data[e], requires_grad=False)
                mods.append(lin)
            layers[name] = mods
        return cls(experts, layers)

    @classmethod
    def shell(cls, experts: nn.Module) -> QuantExperts:
        """Weightless (meta) ``nn.Linear`` of the right shapes where a checkpoint's packed expert layers will be set."""
        transposed = bool(getattr(experts, "is_transposed", False))
        layers = {}
        for name, w3 in cls._fused(experts).items():
            out_f, in_f = (w3.shape[2], w3.shape[1]) if transposed else (w3.shape[1], w3.shape[2])
            layers[name] = [nn.Linear(in_f, out_f, bias=False, device="meta") for _ in range(w3.shape[0])]
        return cls(experts, layers)

    def projections(self) -> dict[str, nn.ModuleList]:
        return {p: getattr(self, p) for p in PROJECTIONS if isinstance(getattr(self, p, None), nn.ModuleList)}

    # --- forward -------------------------------------------------------------------------------------------
    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self._gate_fn is not None:
            return types.MethodType(self._gate_fn, self)(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.has_gate:
            h = self._apply_gate(self.gate_up_proj[e](x))
        else:
            h = self.act_fn(self.up_proj[e](x))
        y = self.down_proj[e](h)
        return self.post_expert_norm(y) if self.has_post_expert_norm else y

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """The block's routing, one expert at a time: ``Σ_k w_k · expert_{i_k}(x)`` per token."""
        n_tokens, top_k = top_k_index.shape
        expert_ids = top_k_index.reshape(-1)
        token_ids = torch.arange(n_tokens, device=hidden_states.device).repeat_interleave(top_k)
        weights = top_k_weights.reshape(-1)
        if self.count_routing:
            counts = torch.bincount(expert_ids[expert_ids < self.num_experts].cpu(), minlength=self.num_experts)
            self.routed_tokens = counts if self.routed_tokens is None else self.routed_tokens + counts
        out = torch.zeros_like(hidden_states)
        hit = set(torch.unique(expert_ids).tolist()) | self.calibrate_on_all_tokens
        for e in sorted(hit):
            if e >= self.num_experts:  # expert-parallel sentinel: not on this rank
                continue
            sel = (expert_ids == e).nonzero().squeeze(1)
            if e in self.calibrate_on_all_tokens:
                w = torch.zeros(n_tokens, dtype=weights.dtype, device=weights.device)
                w.index_add_(0, token_ids[sel], weights[sel])
                y = self._expert(e, hidden_states) * w[:, None]
                out = out + y.to(out.dtype)
                continue
            y = self._expert(e, hidden_states[token_ids[sel]]) * weights[sel, None]
            out = out.index_add(0, token_ids[sel], y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        kinds = {p: type(m[0]).__name__ for p, m in self.projections().items() if len(m)}
        return f"num_experts={self.num_experts}, source={self.source_class.rsplit('.', 1)[-1]}, layers={kinds}"


def unfuse_experts_(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, QuantExperts]:
    """Replace fused experts modules (all, or those at ``names``) by :class:`QuantExperts` of float views."""
    from .model_utils import set_module

    done = {}
    for name, mod in list(fused_experts_modules(model).items()):
        if names is None or name in names:
            q = QuantExperts.from_experts(mod)
            set_module(model, name, q)
            done[name] = q
    return done


def packed_experts(model: nn.Module) -> dict[str, QuantExperts]:
    """The ``QuantExperts`` of ``model`` whose every expert layer is packed."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantExperts)
            and all(isinstance(x, QuantLinear) for ml in m.projections().values() for x in ml)}


def shell_experts_for(model: nn.Module, layer_names: Iterable[str]) -> int:
    """Before loading a checkpoint: give every fused experts module that the checkpoint holds packed expert layers
    for (``<experts>.down_proj.<e>``) its ``QuantExperts`` shell.  Returns how many were replaced."""
    from .model_utils import set_module

    wanted = set()
    for name in layer_names:
        parts = name.split(".")
        if len(parts) >= 3 and parts[-1].isdigit() and parts[-2] in PROJECTIONS:
            wanted.add(".".join(parts[:-2]))
    n = 0
    for name, mod in list(fused_experts_modules(model).items()):
        if name in wanted:
            set_module(model, name, QuantExperts.shell(mod))
            n += 1
    return n
