"""Checks of a wct checkpoint against its layer table, before and after transformers loads it.

Why before: a packed code with a flipped bit, a stale file or a hand-edited
``config.json`` is still a tensor of the right dtype, and transformers would load it
without complaint.  So the safetensors *headers* (names, shapes, dtypes; no data is
read) are compared with the empty :class:`~wct.nn.QuantLinear` skeletons built from
``quantization_config.layers``, and a mismatch fails naming the module and the buffer.
Why after: transformers may widen buffer dtypes (``_keep_in_fp32_modules``), which is
undone here only where the round trip is exact.

The functions take the model and the layer table and know nothing of the quantizer
that calls them.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import torch
from torch import nn

from wct.checkpoint_io import WCTCheckpointError, read_safetensors_header
from wct.nn import QuantLinear

# torch dtype -> the safetensors header's dtype string
_ST_DTYPE = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def name_candidates(model: nn.Module, name: str) -> list[str]:
    """``name`` as written at save time, and with/without the base-model prefix (CausalLM vs bare model)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    cands = [name]
    if prefix:
        if name.startswith(prefix + "."):
            cands.append(name[len(prefix) + 1:])
        else:
            cands.append(f"{prefix}.{name}")
    return cands


def resolve_module(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    """(name as found in ``model``, module) for a layer listed in ``quantization_config.layers``."""
    for cand in name_candidates(model, name):
        try:
            return cand, model.get_submodule(cand)
        except AttributeError:
            continue
    raise WCTCheckpointError(
        f"quantization_config lists layer {name!r}, but {type(model).__name__} has no such module: the checkpoint "
        "was saved from a different architecture, or its config.json was edited"
    )


def linear_shape(name: str, module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or a transformers ``Conv1D`` (weight stored ``[in, out]``)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nx") and hasattr(module, "nf"):
        return int(module.nx), int(module.nf)
    raise WCTCheckpointError(
        f"{name}: quantization_config lists it as a quantized Linear, but the model has a {type(module).__name__} there"
    )


def check_files_against_model(model: nn.Module, layers: dict[str, dict], files: Iterable) -> None:
    """Compare the safetensors headers with the QuantLinear skeletons: every buffer present, right shape and dtype."""
    files = [os.fspath(f) for f in files if os.fspath(f).endswith(".safetensors")]
    if not files:
        return
    tensors: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in files:
        tensors.update(read_safetensors_header(f))
    listed: set[str] = set()
    for name in layers:
        where, module = resolve_module(model, name)
        in_file = next((c for c in name_candidates(model, where) if f"{c}.qweight" in tensors), where)
        listed.add(in_file)
        expected = {b: (tuple(t.shape), _ST_DTYPE.get(t.dtype, str(t.dtype))) for b, t in module.named_storage()}
        for buf, (shape, dtype) in expected.items():
            got = tensors.get(f"{in_file}.{buf}")
            if got is None:
                raise WCTCheckpointError(
                    f"{where}: buffer '{buf}' is missing from the checkpoint; the file does not match its "
                    "quantization_config (partial copy, or saved without sync_quantization)"
                )
            if got[0] != shape or got[1] != dtype:
                raise WCTCheckpointError(
                    f"{where}: buffer '{buf}' in the checkpoint is {list(got[0])} {got[1]}, but its layer spec needs "
                    f"{list(shape)} {dtype}; the file is corrupt or does not belong to this config.json"
                )
        extra = sorted(k for k in tensors if k.startswith(in_file + ".") and k[len(in_file) + 1:] not in expected)
        extra = [k for k in extra if "." not in k[len(in_file) + 1:]]
        if extra:
            raise WCTCheckpointError(
                f"{where}: the checkpoint holds {extra} that a packed layer with this spec does not have; "
                "the config.json and the weights are out of sync"
            )
    stale = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight") and k[: -len(".qweight")] not in listed)
    if stale:
        raise WCTCheckpointError(
            f"the checkpoint holds packed weights for {stale[:5]}{' ...' if len(stale) > 5 else ''} that "
            "quantization_config.layers does not list; re-save with wct.integrations.save_pretrained (it syncs "
            "the layer table)"
        )


def restore_buffer_dtypes(name: str, module: QuantLinear, spec: dict[str, Any]) -> None:
    """Undo dtype overrides of the loader (``_keep_in_fp32_modules`` loads fp16 buffers as fp32).

    The reference is the layer spec from config.json, not the module (whose bias
    dtype may itself have been widened).  Only exact round trips are undone
    (fp16 -> fp32 -> fp16 is lossless); any other mismatch is an error.
    """
    ref = QuantLinear.from_spec(module.in_features, module.out_features, spec, device="meta")
    have_all = dict(module.named_storage())
    for buf, want in ref.named_storage():
        have = have_all.get(buf)
        if have is None:
            raise WCTCheckpointError(f"{name}: buffer '{buf}' was not loaded")
        if tuple(have.shape) != tuple(want.shape):
            raise WCTCheckpointError(
                f"{name}: buffer '{buf}' has shape {list(have.shape)}, but its layer spec needs {list(want.shape)}"
            )
        if have.dtype == want.dtype:
            continue
        if have.is_floating_point() and want.is_floating_point():
            back = have.to(want.dtype)
            if torch.equal(back.to(have.dtype), have):
                module.set_storage(buf, back)
                continue
        raise WCTCheckpointError(
            f"{name}: buffer '{buf}' loaded as {have.dtype}, but its layer spec needs {want.dtype} and the values do "
            "not convert exactly; the checkpoint does not match its config"
        )
