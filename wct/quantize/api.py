"""``quantize_modules(model, config)``: one verb that turns a model's Linears into ``QuantLinear``.

Round-to-nearest and codebook methods need no data and run layer by layer (:mod:`.rtn`); calibrated methods
(GPTQ, OWQ, GWQ) go through the blockwise runner with their solver (:mod:`.calibrated`).  The Hugging Face
facing ``wct.quantize_model`` calls this and attaches what ``save_pretrained`` needs.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from wct.nn import QuantLinear
from wct.nn.model_utils import (
    check_finite_weights,
    find_blocks,
    layer_specs,
    packed_layers,
    quantizable_linears,
    set_module,
)
from wct.nn.quant_experts import unfuse_experts_

from .calibrated import quantize_calibrated
from .config import QuantConfig
from .offload import Offload, Placement, release_freed_memory
from .rtn import quantize_linear

QUANT_ATTR = "wct_quantization"  # model attribute: {"config": QuantConfig, "layers": {name: spec}}


def record_quantization(model: nn.Module, config: QuantConfig | None) -> dict:
    """Attach the config and per-layer specs to the model: the quantization record checkpoints serialise."""
    info = {"config": config, "layers": layer_specs(model)}
    setattr(model, QUANT_ATTR, info)
    return info


def quantize_modules(
    model: nn.Module,
    config: QuantConfig | None = None,
    calibration: torch.Tensor | None = None,
    progress: bool = True,
    placement: Placement | None = None,
) -> nn.Module:
    """Quantize ``model`` in place and return it.

    ``calibration``: ``LongTensor [n_samples, seq_len]`` token windows, required by
    the calibrated methods (see :func:`wct.data.get_calibration_windows`).
    ``placement``: where each decoder block is quantized (:mod:`.offload`): by default where the model is, or on
    ``config.calibration_device`` one block at a time; :mod:`.streaming` passes one that reads each block from disk.
    """
    config = config or QuantConfig()
    unfuse_experts_(model)  # fused MoE experts -> one (float, then packed) layer per expert; a no-op elsewhere
    _refuse_dense_block_weights(model, config)
    if placement is None and config.calibration_device:
        placement = Offload(config.calibration_device)
    if config.calibrated:
        if calibration is None:
            raise ValueError(
                f"method {config.method!r} needs calibration data: pass calibration=get_calibration_windows(...)"
            )
        quantize_calibrated(model, config, calibration, progress=progress, placement=placement)
    else:
        targets = quantizable_linears(model, config.include_lm_head, config.skip_modules)
        if not targets:
            raise ValueError("no Linear layers found to quantize")
        if placement is None:
            check_finite_weights(targets)  # NaN/Inf named by layer, before any layer is replaced
            for name, lin in tqdm(targets.items(), desc=f"quantize {config.method}", disable=not progress):
                set_module(model, name, quantize_linear(lin, config))
        else:
            _quantize_by_block(model, config, targets, placement, progress)
    record_quantization(model, config)
    return model


def _quantize_by_block(model: nn.Module, config: QuantConfig, targets: dict[str, nn.Module], placement: Placement,
                       progress: bool) -> None:
    """Round to nearest one decoder block at a time where ``placement`` puts it; the layers outside the blocks
    (``lm_head``) where they are."""
    block_name, blocks = find_blocks(model)
    for bi in tqdm(range(len(blocks)), desc=f"quantize {config.method} blocks", disable=not progress):
        prefix = f"{block_name}.{bi}"
        placement.enter(bi, prefix, blocks[bi])
        mine = {n: m for n, m in quantizable_linears(model, config.include_lm_head, config.skip_modules).items()
                if n.startswith(prefix + ".")}
        check_finite_weights(mine)
        for name, lin in mine.items():
            set_module(model, name, quantize_linear(lin, config))
        placement.leave(bi, prefix, blocks[bi])
        release_freed_memory()
    rest = {n: m for n, m in targets.items() if not n.startswith(block_name + ".")}
    check_finite_weights(rest)
    for name, lin in rest.items():
        set_module(model, name, quantize_linear(lin, config))
    placement.finish(model)


def _is_router(module: nn.Module) -> bool:
    """MoE routers stay 16-bit by design (tiny, and every token's path depends on them)."""
    name = type(module).__name__.lower()
    return "router" in name or name.endswith("gate")


def dense_block_weights(model: nn.Module, planned: set[str] | None = None) -> dict[str, int]:
    """Matrices (2-D and up) of the decoder blocks that are not packed (and not in ``planned``), routers aside."""
    block_name, blocks = find_blocks(model)
    out = {}
    for name, mod in blocks.named_modules():
        full = f"{block_name}.{name}" if name else block_name
        if isinstance(mod, QuantLinear) or (planned and full in planned) or _is_router(mod):
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if p.dim() >= 2:
                out[f"{full}.{pname}"] = p.numel()
    return out


def _refuse_dense_block_weights(model: nn.Module, config: QuantConfig) -> None:
    targets = set(quantizable_linears(model, config.include_lm_head, config.skip_modules))
    left = {n: k for n, k in dense_block_weights(model, targets).items()
            if not any(s and s in n for s in config.skip_modules)}
    if left and not config.allow_dense:
        names = ", ".join(list(left)[:4]) + (f" and {len(left) - 4} more" if len(left) > 4 else "")
        total = sum(left.values())
        raise ValueError(
            f"{type(model).__name__}: {config.method} would leave {len(left)} decoder-block weight(s) dense "
            f"({total:,} weights: {names}); wct has no packed form for these modules. Pass allow_dense=True "
            "(--allow-dense) to quantize the rest knowingly (bits per weight and coverage will show it), or list "
            "them in skip_modules")


def _adapter_parts(root: nn.Module) -> set[str]:
    """The adapter side of PEFT tuner layers (``….q_proj.lora_A``, ``….wct_col_values``: every child beside
    ``base_layer``): trained next to the base model, not weights of it."""
    out = set()
    for name, mod in root.named_modules():
        if isinstance(getattr(mod, "base_layer", None), nn.Module) and callable(getattr(mod, "get_base_layer", None)):
            out.update(f"{name}.{child}" if name else child for child, _ in mod.named_children() if child != "base_layer")
    return out


def _inside(name: str, parts: set[str]) -> bool:
    pieces = name.split(".")
    return any(".".join(pieces[:i]) in parts for i in range(1, len(pieces) + 1))


def model_bits(model: nn.Module) -> dict[str, float]:
    """Bits per weight over every weight matrix of the decoder blocks (packed or not) and any packed layer outside
    them (e.g. ``lm_head``), with the share held packed.

    ``bits_per_weight``: all of those weights, dense ones at their dtype's width; ``packed_bits_per_weight``: the
    packed layers alone; ``coverage``: packed weights / all block weights (1.0 when every block matrix is packed;
    MoE routers, 16-bit by design, count as dense); ``nbytes`` / ``numel``: the packed layers' storage and weights.
    """
    nbytes = numel = 0
    for m in packed_layers(model).values():
        nbytes += m.nbytes
        numel += m.in_features * m.out_features
    dense_bytes = dense_numel = 0
    block_name, blocks = find_blocks(model)
    adapters = _adapter_parts(blocks)
    for name, mod in blocks.named_modules():
        if isinstance(mod, QuantLinear) or (adapters and _inside(name, adapters)):
            continue
        for p in mod.parameters(recurse=False):
            if p.dim() >= 2:
                dense_numel += p.numel()
                dense_bytes += p.numel() * p.element_size()
    packed_in_blocks = sum(m.in_features * m.out_features for n, m in packed_layers(model).items()
                           if n.startswith(block_name + "."))
    total = numel + dense_numel
    return {
        "bits_per_weight": 8.0 * (nbytes + dense_bytes) / total if total else float("nan"),
        "packed_bits_per_weight": 8.0 * nbytes / numel if numel else float("nan"),
        "coverage": packed_in_blocks / (packed_in_blocks + dense_numel) if packed_in_blocks + dense_numel else 0.0,
        "nbytes": nbytes, "numel": numel, "dense_block_weights": dense_numel,
    }
