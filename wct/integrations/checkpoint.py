"""Saving and loading wct checkpoints: atomic, checksummed, safetensors only, and loud when wct is missing.

``model.save_pretrained`` / ``from_pretrained`` work on their own once the quantizer is
registered (:mod:`.hf_quantizer`); these two functions are the *checked* way:

* :func:`save_pretrained` syncs the layer table with the modules being saved, writes
  into a temporary sibling folder, adds the no-``import wct`` guard and a sha256
  manifest, then swaps the folder into place (:mod:`wct.checkpoint_io`);
* :func:`load_quantized` verifies the manifest and the safetensors headers, checks the
  memory the load needs, refuses pickle weights, and refuses to return a model that
  silently lost its quantization (transformers without the ``"wct"`` registration
  only logs a warning and builds randomly initialised dense Linears).
"""

from __future__ import annotations

import json
import os
import traceback
from typing import Any

from torch import nn

from wct.checkpoint_io import (
    MANIFEST,
    WCTCheckpointError,
    atomic_folder,
    interrupted_copy,
    missing_path_message,
    read_safetensors_header,
    verify_manifest,
)
from wct.resources import check_memory_for_checkpoint

from .hf_config import (
    LOAD_GUARD_FIELD,
    LOAD_GUARD_PREFIX,
    QUANT_METHOD,
    layer_specs,
    load_guard_supported,
    transformers_version,
    write_load_guard,
)
from .hf_quantizer import WCTHfQuantizer, is_registered
from .record import is_peft, sync_quantization


def save_pretrained(
    model: nn.Module,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    tokenizer: Any = None,
    **kwargs: Any,
) -> str:
    """Save ``model`` (and ``tokenizer``) to ``out_dir`` atomically; returns the directory.

    Why atomic: a checkpoint is several files; a crash or a full disk halfway must
    never leave a directory that looks complete.  Everything is written into a
    temporary sibling (same filesystem, so ``rename`` is atomic), fsynced, then
    swapped into place (:mod:`wct.checkpoint_io`).  With ``overwrite=True``
    the old copy stays at the path until the new one is complete.  A
    ``wct_manifest.json`` records the sha256 of every file, checked on load.
    """
    if kwargs.pop("push_to_hub", False):
        raise ValueError("save_pretrained(push_to_hub=True) is not atomic: save first, then call model.push_to_hub(...)")
    if kwargs.get("safe_serialization") is False:
        raise ValueError("wct checkpoints are safetensors only (no pickle): drop safe_serialization=False")
    if not is_peft(model):  # a PEFT wrapper saves only its adapter; the base's table is not written
        sync_quantization(model)  # the spec table must describe exactly the modules being saved
    if not is_peft(model):
        # every tensor under the name of the module that owns it (per-expert packed layers included): transformers'
        # "original format" would try to re-fuse per-expert tensors that have no fused packed form; the wct
        # quantizer loads these names as they are (WCTHfQuantizer.update_weight_conversions)
        kwargs.setdefault("save_original_format", False)
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, **kwargs)
        write_load_guard(tmp)  # before the manifest: plain transformers must refuse the folder, not load garbage
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    out = os.path.abspath(os.fspath(out_dir))
    return out


def load_quantized(path: str | os.PathLike, auto_class: Any = None, **kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **kwargs)`` with wct's checks.

    Refuses pickle checkpoints, and refuses to return a model that silently lost
    its quantization: without the ``"wct"`` registration transformers only logs a
    warning and builds randomly initialised dense Linears.  ``auto_class``: another
    auto class or model class (default ``AutoModelForCausalLM``).
    """
    if auto_class is None:
        from transformers import AutoModelForCausalLM as auto_class  # lazy: half a second at import time
    if kwargs.get("use_safetensors") is False:
        raise ValueError("wct loads safetensors checkpoints only (no pickle): drop use_safetensors=False")
    kwargs["use_safetensors"] = True
    path = os.fspath(path)
    expects_wct = False
    if not os.path.exists(path):
        looks_local = os.path.isabs(path) or path.startswith(".") or path.count("/") > 1  # hub ids are "org/name"
        if looks_local or interrupted_copy(path):
            raise FileNotFoundError(missing_path_message(path))
    verified = False  # True once the manifest vouches that every file is exactly as saved
    if os.path.isdir(path):
        verified = verify_manifest(path)
        for name in sorted(os.listdir(path)):
            if name.endswith(".safetensors"):  # before transformers opens them: errors name the file
                read_safetensors_header(os.path.join(path, name))
        # headers only: fails early, with the numbers, instead of being killed halfway through the load
        check_memory_for_checkpoint(path, kwargs.get("dtype", kwargs.get("torch_dtype")))
        names = os.listdir(path)
        if not any(n.endswith(".safetensors") for n in names):
            pickles = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
            if pickles:
                raise ValueError(
                    f"{path} holds only pickle weights ({', '.join(pickles)}); wct loads safetensors only because "
                    "unpickling can run arbitrary code. Convert it in a trusted environment: load it with "
                    "transformers and re-save with wct.integrations.save_pretrained"
                )
        cfg_file = os.path.join(path, "config.json")
        if os.path.isfile(cfg_file):
            try:
                with open(cfg_file, encoding="utf-8") as f:
                    cfg = json.load(f)
                if not isinstance(cfg, dict):
                    raise ValueError("not a JSON object")
            except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
                raise WCTCheckpointError(f"{cfg_file} is corrupt ({e}); restore it from a good copy or re-save the model") from None
            qc = cfg.get("quantization_config") or {}
            expects_wct = isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD
            if expects_wct and not is_registered():
                raise RuntimeError(_unregistered_message(path))
    try:
        model = auto_class.from_pretrained(path, **kwargs)
    except ValueError as e:
        if isinstance(e, WCTCheckpointError) or LOAD_GUARD_PREFIX not in str(e):
            raise
        # transformers refused LOAD_GUARD: nothing dropped it, so the "wct" quantizer did not run
        if is_registered() and not load_guard_supported():
            raise RuntimeError(
                f"{path} is a wct checkpoint, and wct is imported, but transformers {transformers_version()} reads "
                f"config.json's {LOAD_GUARD_FIELD!r} before wct's quantizer runs: upgrade transformers (>= 5), or "
                f"pass config=AutoConfig.from_pretrained(path) after `del config.{LOAD_GUARD_FIELD}`"
            ) from e
        raise RuntimeError(_unregistered_message(path)) from e
    except (ArithmeticError, AssertionError, AttributeError, IndexError, KeyError, TypeError) as e:
        raise _internal_failure(path, e, verified) from e
    qc = getattr(model.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if expects_wct or method == QUANT_METHOD:
        if not isinstance(getattr(model, "hf_quantizer", None), WCTHfQuantizer) or not layer_specs(model):
            raise RuntimeError(_unregistered_message(path))
    return model


def _internal_failure(path: str, e: BaseException, verified: bool) -> Exception:
    """The error for an exception raised inside transformers, saying where it happened and what it does (not) mean.

    With a verified manifest the files are byte for byte what was saved, so the failure is not corruption: it is
    wct meeting an architecture (or a ``from_pretrained`` argument) it does not handle, and the message says so
    instead of sending the user to restore good files.  Without one, corruption stays a possible cause.
    """
    where = _failure_site(e)
    what = f"{type(e).__name__}: {e}" + (f", in {where}" if where else "")
    if verified:
        return RuntimeError(
            f"{path}: the files are intact (every checksum in {MANIFEST} matches), but loading them failed inside "
            f"transformers {transformers_version()} ({what}). This is not a corrupt checkpoint: wct does not handle "
            "something in this architecture's loading code, or a from_pretrained argument does not fit this model. "
            "Please report it to wct with the traceback above"
        )
    return WCTCheckpointError(
        f"{path}: loading failed inside transformers {transformers_version()} ({what}); the folder has no verified "
        f"{MANIFEST}, so config.json or the weights may be corrupt or inconsistent — restore them from a good copy or "
        "re-save the model. If the files are known to be good, a from_pretrained argument does not fit this model, "
        "or wct does not handle this architecture's loading code: report it with the traceback above"
    )


def _failure_site(e: BaseException) -> str:
    """``file.py:line in function`` of the innermost frame outside torch (torch's ``__getattr__`` says little)."""
    frames = traceback.extract_tb(e.__traceback__)
    outside = [f for f in frames if f"{os.sep}torch{os.sep}" not in f.filename] or frames
    if not outside:
        return ""
    f = outside[-1]
    return f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}"


def _unregistered_message(path: str) -> str:
    return (
        f"{path} is a wct checkpoint (quantization_config.quant_method='wct'), but the 'wct' quantizer is not "
        "registered with transformers, so its packed layers would load as randomly initialised Linears. "
        "Run `import wct` before loading it."
    )
