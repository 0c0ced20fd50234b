"""Finding the parts of a Hugging Face decoder-only model, generically: the one home of model helpers.

No per-architecture table: the decoder blocks are the longest ``nn.ModuleList``
whose children all share one class (``model.layers`` in Llama/Mistral/Qwen2,
``model.decoder.layers`` in OPT, ``transformer.h`` in GPT-2 ...).  Quantizers, tuners,
integrations and evaluation all walk models through these functions, so a new
architecture quirk is handled once.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D  # GPT-2 style models use a transposed Linear

from wct.resources import model_device  # noqa: F401  (re-exported: the model helpers' home)

from .quant_linear import QuantLinear


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the decoder blocks.

    Candidates are ``ModuleList``s of identical, non-Linear modules that contain Linear layers; lists nested inside
    another candidate (the experts of a Mixture-of-Experts block, one MLP or one layer per expert) are not blocks,
    however many experts there are.
    """
    cands = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            classes = {type(c) for c in mod}
            if (len(classes) == 1 and not is_linear(mod[0]) and type(mod[0]).__name__ != "QuantLinear"
                    and any(is_linear(m) or type(m).__name__ == "QuantLinear" for m in mod[0].modules())):
                cands.append((name, mod))
    outer = [(n, m) for n, m in cands if not any(o != n and n.startswith(o + ".") for o, _ in cands)]
    if not outer:
        raise ValueError(
            f"could not find the decoder blocks of {type(model).__name__}: expected an nn.ModuleList of identical "
            "blocks containing Linear layers"
        )
    return max(outer, key=lambda c: len(c[1]))


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def linear_weight(module: nn.Module) -> torch.Tensor:
    """``[out, in]`` weight of an ``nn.Linear`` or a transformers ``Conv1D`` (stored ``[in, out]``)."""
    if isinstance(module, nn.Linear):
        return module.weight
    return module.weight.t()


def find_linears(block: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """Linear-like layers inside ``block`` by qualified name, in forward-ish (registration) order."""
    return {f"{prefix}{n}" if not prefix else f"{prefix}.{n}": m for n, m in block.named_modules() if n and is_linear(m)}


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (``""`` parents are the root itself)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def packed_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """Every ``QuantLinear`` of ``model`` by qualified name, in registration order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def ties_output_embedding(model: nn.Module) -> bool:
    """Whether the config ties lm_head to the input embedding (the text config's flag for multimodal configs)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return False
    tied = getattr(cfg, "tie_word_embeddings", False)
    if callable(getattr(cfg, "get_text_config", None)):
        tied = getattr(cfg.get_text_config(decoder=True), "tie_word_embeddings", tied)
    return bool(tied)


def layer_specs(model: nn.Module) -> dict[str, dict]:
    """Module name -> ``QuantLinear.spec()`` for every packed layer: the table a checkpoint's state dict follows."""
    return {n: m.spec() for n, m in packed_layers(model).items()}


def output_embedding(model: nn.Module) -> nn.Module | None:
    """The module that produces the logits (``lm_head``), or ``None`` for models without that API."""
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def quantizable_linears(model: nn.Module, include_lm_head: bool = False, skip: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """All Linear layers of the decoder blocks (plus ``lm_head`` if asked), minus names matching ``skip``."""
    block_name, _ = find_blocks(model)
    out = {}
    for name, mod in model.named_modules():
        if not is_linear(mod):
            continue
        in_blocks = name.startswith(block_name + ".")
        is_head = name.split(".")[-1] in ("lm_head", "embed_out", "output")
        if (in_blocks or (include_lm_head and is_head)) and not any(s and s in name for s in skip):
            out[name] = mod
    return out


class NonFiniteError(FloatingPointError, ValueError):
    """NaN/Inf in a weight, a calibration activation or a gradient; the message names the layer."""


CHECK_HINT = "check the calibration data / the fp model"


def first_bad_sample(x: torch.Tensor) -> int:
    """Index along dim 0 of the first row of ``x`` holding a NaN/Inf (-1 if none)."""
    bad = (~torch.isfinite(x.reshape(x.shape[0], -1))).any(1).nonzero()
    return int(bad[0]) if bad.numel() else -1


@torch.no_grad()
def check_finite_weights(layers: dict[str, nn.Module]) -> None:
    """Raise :class:`NonFiniteError` naming the first Linear (of ``layers``, by name) whose weight holds NaN/Inf."""
    for name, mod in layers.items():
        w = linear_weight(mod)
        finite = torch.isfinite(w)
        if not bool(finite.all()):
            n_bad = int((~finite).sum())
            first = (~finite).nonzero()[0].tolist()
            raise NonFiniteError(
                f"{name}: weight contains NaN/Inf ({n_bad} of {w.numel()} values, first at [out, in] = {first}) — "
                "the floating-point model is corrupt (a broken checkpoint or training run); nothing was quantized"
            )
