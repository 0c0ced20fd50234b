"""Floor 5: activation-quantized (OutlierTune / baseline) models on disk and on the command line.

An activation-quantized model has ``ActQuantLinear`` layers (int8 codes + activation
quantizer) instead of the weight-only ``QuantLinear``, so it has its own checkpoint layout:

    DIR/config.json                 the Hugging Face model config (architecture)
    DIR/outliertune.json            format tag, ActQuantConfig, per-layer specs
    DIR/outliertune.safetensors     every parameter and buffer (tied weights stored once)
    DIR/tokenizer*                  the tokenizer, when given

The weights file is deliberately *not* called ``model.safetensors``: a plain
``from_pretrained(DIR)`` fails loudly instead of loading a model with random Linears.
Load with :func:`load_outliertune`.  Writes are atomic (temp folder beside the target,
then rename), and only safetensors are read back (no pickle).

Works on an unquantized model and on a merged WCT model (Linears that are
``wct.nn.QuantLinear``): the latter are first dequantized into ``nn.Linear`` (their
merged weights) and then re-quantized with the activation quantizer.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wct.actquant import ActQuantConfig, model_act_quant_bytes, quantize_activations
from wct.checkpoint_io import atomic_folder, verify_manifest
from wct.nn.act_quant_linear import ActQuantLinear
from wct.nn.model_utils import set_module

FORMAT = "wct-outliertune"
VERSION = 1
CONFIG_FILE = "outliertune.json"
WEIGHTS_FILE = "outliertune.safetensors"


def is_outliertune_checkpoint(path: str | os.PathLike | None) -> bool:
    """True when ``path`` is a folder written by :func:`save_outliertune`."""
    if not path or not os.path.isdir(path):
        return False
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        return False
    try:
        return json.loads(f.read_text()).get("format") == FORMAT
    except (OSError, json.JSONDecodeError):
        return False


def layer_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {n: m.spec() for n, m in model.named_modules() if isinstance(m, ActQuantLinear)}


def save_outliertune(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    config: ActQuantConfig | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
    report: dict | None = None,
) -> Path:
    """Write an activation-quantized model to ``path`` (see the module docstring); returns the path."""
    from safetensors.torch import save_model

    specs = layer_specs(model)
    if not specs:
        raise ValueError("the model has no ActQuantLinear layers; run quantize_activations first")
    target = Path(path)
    with atomic_folder(target, overwrite=overwrite) as tmp_dir:
        tmp = Path(tmp_dir)
        model.config.save_pretrained(tmp)
        meta = {
            "format": FORMAT, "version": VERSION, "config": None if config is None else config.to_dict(),
            "layers": specs, "model_class": type(model).__name__,
            "report": {k: v for k, v in (report or {}).items() if k != "layers"},
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
        save_model(model, str(tmp / WEIGHTS_FILE))  # drops the duplicate of tied tensors
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return target


def load_outliertune(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_outliertune` (architecture from ``config.json``)."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not is_outliertune_checkpoint(path):
        raise ValueError(f"{path} is not an OutlierTune checkpoint (no {CONFIG_FILE} with format {FORMAT!r})")
    verify_manifest(path)
    meta = json.loads((path / CONFIG_FILE).read_text())
    if int(meta.get("version", 0)) > VERSION:
        raise ValueError(f"{path} was written by a newer wct (format version {meta['version']} > {VERSION})")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing")
    hf_config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    for name, spec in meta["layers"].items():
        try:
            model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"{path}: layer {name!r} does not exist in {type(model).__name__}") from e
        set_module(model, name, ActQuantLinear.from_spec(spec))
    # Folding β into a bias-free Linear (fold_gamma) adds parameters: recreate those slots first.
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())
    for key in keys:
        mod_name, _, attr = key.rpartition(".")
        if attr == "bias" and mod_name:
            mod = model.get_submodule(mod_name)
            if isinstance(mod, nn.Linear) and mod.bias is None:
                mod.bias = nn.Parameter(torch.zeros(mod.out_features), requires_grad=False)
    missing, unexpected = load_model(model, str(weights), strict=False)
    # transformers' non-persistent buffers (rotary inv_freq ...) are rebuilt by from_config
    missing = [k for k in missing if k in dict(model.state_dict())]
    if missing or unexpected:
        raise ValueError(f"{weights} does not match the architecture: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    model.to(device).eval()
    return model


def quantize_outliertune_cli(model: nn.Module, tokenizer: Any, args: Any) -> int:
    """``wct quantize --method outliertune --wbits 8 --abits 8 --calib FILE --out DIR``."""
    from wct.data import get_calibration_windows

    if getattr(args, "calib", None) is None or (isinstance(args.calib, str) and not args.calib):
        print("error: --method outliertune needs --calib FILE|DATASET (static activation ranges)", file=sys.stderr)
        return 2
    cfg = ActQuantConfig(method="outliertune", wbits=args.wbits, abits=args.abits)
    t0 = time.time()
    calib = get_calibration_windows(args.calib, tokenizer, n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed)
    report = quantize_activations(model, cfg, calib)
    seconds = time.time() - t0
    out = save_outliertune(model, args.out, config=cfg, tokenizer=tokenizer, overwrite=args.overwrite, report=report)
    sizes = model_act_quant_bytes(model)
    static = sum(1 for v in report["layers"].values() if v["act_mode"] == "static")
    print(json.dumps({
        "out": str(out), "method": "outliertune", "bits": cfg.tag, "layers": len(report["layers"]),
        "static_per_channel_layers": static, "dequantized_quantlinears": report["dequantized_quantlinears"],
        "model_mb": round(sizes["total_bytes"] / 2**20, 2), "quantize_seconds": round(seconds, 1),
    }))
    return 0


__all__ = ["is_outliertune_checkpoint", "load_outliertune", "quantize_outliertune_cli", "save_outliertune"]
