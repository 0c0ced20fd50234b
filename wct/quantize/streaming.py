"""Quantize a dense safetensors checkpoint folder without ever holding the dense model in RAM.

``wct.quantize_model("path/to/dense_folder", config, calibration)`` (a path instead of a model) comes here:

1. :func:`open_checkpoint` builds the model's skeleton with its parameters on the meta device (no memory), then
   reads what lives outside the decoder blocks from the safetensors files: embeddings, final norm, ``lm_head``
   (re-tied to the embedding where the config ties them).  Buffers computed at construction (rotary
   frequencies) are real from the start.
2. The blockwise runner asks :class:`CheckpointBlocks` for each block in turn: its weights are read from the files
   (``safe_open``, tensor by tensor) just before its turn, cast to the chosen dtype, checked for NaN/Inf, optionally
   moved to a calibration device; the block is calibrated, packed and run to produce the next block's inputs; its
   dense Linears are then unreferenced (replaced by packed layers) and freed.

RAM then holds the packed blocks done so far, one dense block, the layers outside the blocks and the calibration
activations (docs/distributed.md, Calibration, gives the formula).  The result is bit-identical to quantizing the
fully loaded model with the same calibration: the same tensors, the same order of operations.

Refused, with the fix: hub ids (download first), folders without ``config.json`` or without ``.safetensors``
files (``.bin`` checkpoints: re-save with ``save_pretrained``), already quantized checkpoints, GWQ (its gradient
pass needs the whole model), fused MoE experts, and checkpoints whose tensor names are not the model's own.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from wct import resources
from wct.checkpoint_io import read_safetensors_header
from wct.models import check_local_model_path
from wct.nn.model_utils import check_finite_weights, find_blocks, find_linears
from wct.nn.quant_experts import fused_experts_modules

from .config import QuantConfig
from .offload import Placement, module_bytes, move_block

STREAM_HINT = ("or load the model (wct.load_model / from_pretrained) and pass it to wct.quantize_model; "
               "calibration_device= then still keeps all but one block off the accelerator")


def tensor_index(folder: str | os.PathLike) -> dict[str, str]:
    """Tensor name → the ``.safetensors`` file of ``folder`` that holds it (from the headers alone)."""
    index: dict[str, str] = {}
    for f in resources.checkpoint_files(folder):
        for name in read_safetensors_header(f):
            index[name] = f
    return index


def _dtype_of(config, dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if found is None:
            return torch.float32
        return found if isinstance(found, torch.dtype) else getattr(torch, str(found).replace("torch.", ""))
    got = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(got, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype (e.g. 'bfloat16', torch.float16, 'auto')")
    return got


def _check_folder(path: str | os.PathLike) -> Path:
    local = check_local_model_path(path, label="quantize_model's checkpoint path",
                                   default_hint="wct.default_model_dir()")
    if local is None:
        raise ValueError(
            f"{str(path)!r} looks like a hub id: quantizing from disk streams a local folder of dense safetensors "
            f"files. Download it first (e.g. `hf download {path} --local-dir DIR`) and pass DIR, " + STREAM_HINT)
    if not local.is_dir() or not (local / "config.json").is_file():
        raise ValueError(f"{local} is not a model folder with a config.json: pass the folder that "
                         "save_pretrained wrote (config.json and *.safetensors), " + STREAM_HINT)
    if not resources.checkpoint_files(local):
        others = sorted(p.name for p in local.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".gguf"))
        found = f" (found {', '.join(others[:3])})" if others else ""
        raise ValueError(f"{local} holds no .safetensors files{found}: streaming reads safetensors only (never "
                         "pickle). Re-save it with model.save_pretrained(DIR) (safetensors is the default), " + STREAM_HINT)
    cfg = json.loads((local / "config.json").read_text())
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        raise ValueError(f"{local} is already quantized (quantization_config.quant_method={method!r}); streaming "
                         "quantization reads a dense checkpoint")
    return local


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=mod._parameters[attr].requires_grad)
    else:
        mod._buffers[attr] = value


def _read(files: dict[str, list[tuple[str, str]]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``{file: [(tensor name, key to return)]}`` → the tensors, floats cast to ``dtype``."""
    from safetensors import safe_open

    out = {}
    for f, names in files.items():
        with safe_open(f, framework="pt", device="cpu") as fh:
            for name, key in names:
                t = fh.get_tensor(name)
                # a copy: never a view of the mapped file (it would keep every page read resident)
                out[key] = t.to(dtype, copy=True) if t.is_floating_point() else t.clone()
    return out


def open_checkpoint(path: str | os.PathLike, config: QuantConfig | None = None, dtype="auto",
                    calibration_device=None) -> tuple[nn.Module, CheckpointBlocks]:
    """The model of a dense safetensors folder with every decoder block on the meta device and everything else
    loaded, and the :class:`CheckpointBlocks` that reads the blocks for the runner.

    ``dtype``: ``"auto"`` (the config's ``dtype``, else float32) or a torch dtype; ``calibration_device`` (default:
    ``config.calibration_device``): where each block is calibrated once read.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = _check_folder(path)
    if config is not None and config.method == "gwq":
        raise ValueError("GWQ scores weights by loss gradients over the whole model before the first block, which "
                         "needs every weight in memory; it cannot stream from disk. Use gptq or owq, " + STREAM_HINT)
    hf_config = AutoConfig.from_pretrained(folder)
    dtype = _dtype_of(hf_config, dtype)
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary frequencies) computed
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.eval()
    if (folder / "generation_config.json").is_file():  # what from_pretrained would carry, so save_pretrained keeps it
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    fused = fused_experts_modules(model)
    if fused:
        raise ValueError(f"{type(model).__name__} has fused MoE experts ({next(iter(fused))}, ...): their checkpoint "
                         "tensors are renamed and fused on load, which streaming does not do yet; " + STREAM_HINT)
    index = tensor_index(folder)
    block_name, _blocks = find_blocks(model)
    outside = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta
               and not n.startswith(block_name + ".")]
    files: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for n in outside:
        if n in index:
            files[index[n]].append((n, n))
    for n, t in _read(files, dtype).items():
        _set_tensor(model, n, t)
    model.tie_weights()
    missing = [n for n, t in (*model.named_parameters(), *model.named_buffers())
               if t.is_meta and not n.startswith(block_name + ".")]
    if missing:
        raise ValueError(f"{folder}: the checkpoint lacks {', '.join(missing[:4])} (the model's own names are read; "
                         "checkpoints renamed on load are not streamed), " + STREAM_HINT)
    device = calibration_device if calibration_device is not None else getattr(config, "calibration_device", None)
    return model, CheckpointBlocks(index, dtype, device)


class CheckpointBlocks(Placement):
    """Reads each decoder block's weights from the safetensors files just before its turn (see the module doc)."""

    def __init__(self, index: dict[str, str], dtype: torch.dtype, device=None) -> None:
        super().__init__(device)
        self.index, self.dtype = index, dtype
        self.read_blocks: list[str] = []

    def home(self, model: nn.Module) -> torch.device:
        return torch.device("cpu")

    def enter(self, index: int, prefix: str, block: nn.Module) -> None:
        wanted = [n for n, t in (*block.named_parameters(), *block.named_buffers()) if t.is_meta]
        missing = [f"{prefix}.{n}" for n in wanted if f"{prefix}.{n}" not in self.index]
        if missing:
            raise ValueError(f"the checkpoint lacks {', '.join(missing[:4])}" + (f" and {len(missing) - 4} more"
                             if len(missing) > 4 else "") + " (streaming reads the model's own tensor names), "
                             + STREAM_HINT)
        resources.check_memory(module_bytes(block), f"reading {prefix} from the checkpoint (its dense weights)",
                               hint=resources.LOAD_HINT)
        files: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for n in wanted:
            files[self.index[f"{prefix}.{n}"]].append((f"{prefix}.{n}", n))
        for n, t in _read(files, self.dtype).items():
            _set_tensor(block, n, t)
        check_finite_weights({f"{prefix}.{n}": m for n, m in find_linears(block).items()})
        self.read_blocks.append(prefix)
        if self.device is not None and self.device.type != "cpu":
            resources.check_memory(module_bytes(block), f"moving {prefix} to {self.device} for calibration",
                                   device=self.device)
            move_block(block, self.device)

    def leave(self, index: int, prefix: str, block: nn.Module) -> None:
        if self.device is not None and self.device.type != "cpu":
            move_block(block, torch.device("cpu"))

    def finish(self, model: nn.Module) -> None:
        left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
        if left:
            raise RuntimeError(f"after streaming, {len(left)} tensor(s) were never read: {', '.join(left[:4])}")


__all__ = ["CheckpointBlocks", "open_checkpoint", "tensor_index"]
