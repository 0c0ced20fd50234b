"""What every export reads: a packed wct model, its config and its tokenizer files, checked before anything is written.

Why one loader: the three targets must refuse the same bad inputs the same way (a missing path,
a folder that is not a wct checkpoint, a PEFT adapter instead of a merged model, a corrupt or
partial copy) and they must do it *before* the output folder is touched.  A wct checkpoint is
loaded through :func:`wct.integrations.load_quantized`, which verifies the sha256 manifest and
every safetensors header, so a flipped bit or a truncated file fails here with the file named.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wct.nn import QuantExperts, QuantLinear, packed_layers

# Files of a checkpoint folder that describe the tokenizer / generation, copied as they are into every export.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)


class ExportSourceError(ValueError):
    """The source cannot be exported as it is (not a wct model, a PEFT adapter, corrupt, partial)."""


@dataclass
class ExportSource:
    """A loaded packed model plus everything an exporter copies from its folder."""

    model: nn.Module
    config: dict[str, Any]  # config.json as a dict, without wct's quantization fields
    path: Path | None = None  # the checkpoint folder (None for an in-memory model)
    tokenizer: Any = None
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)  # name -> bytes, copied into the export

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else type(self.model).__name__

    def quant_layers(self) -> dict[str, QuantLinear]:
        """Module name -> QuantLinear, in model order."""
        return packed_layers(self.model)

    def packed_experts(self) -> list[str]:
        """Names of MoE blocks whose experts are packed (``QuantExperts``)."""
        return [n for n, m in self.model.named_modules() if isinstance(m, QuantExperts)]

    def dense_tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter/buffer that is not part of a QuantLinear, as saved by ``save_pretrained``.

        Tied weights appear once (the input embedding), as transformers writes them; non-persistent
        buffers (rotary tables) are not part of a checkpoint.
        """
        quant_prefixes = tuple(f"{n}." for n in self.quant_layers())
        out: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, t in self.model.state_dict(keep_vars=False).items():
            if name.startswith(quant_prefixes):
                continue
            key = t.untyped_storage().data_ptr() if t.numel() else id(t)
            if key in seen and t.numel():
                continue  # a tied weight (lm_head.weight shares the embedding)
            seen.add(key)
            out[name] = t
        return out

    def dense_linears(self) -> dict[str, nn.Linear]:
        """``nn.Linear`` modules inside the decoder blocks that are *not* packed (e.g. skipped or LoRA-merged)."""
        out_emb = getattr(self.model, "get_output_embeddings", lambda: None)()
        return {n: m for n, m in self.model.named_modules() if isinstance(m, nn.Linear) and m is not out_emb}

    def tied_embeddings(self) -> bool:
        cfg = getattr(self.model, "config", None)
        return bool(getattr(cfg, "tie_word_embeddings", False)) if cfg is not None else False


def clean_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """config.json without wct's quantization fields (a fresh dict)."""
    from wct.integrations.transformers import LOAD_GUARD_FIELD

    cfg = json.loads(json.dumps(cfg))
    cfg.pop("quantization_config", None)
    cfg.pop(LOAD_GUARD_FIELD, None)
    cfg.pop("_is_quantized", None)
    return cfg


def _read_tokenizer_files(folder: Path) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in TOKENIZER_FILES if (folder / n).is_file()}


def load_source(source: str | os.PathLike | nn.Module, tokenizer: Any = None) -> ExportSource:
    """Load and check what to export: a wct checkpoint folder, or an in-memory packed model.

    Raises :class:`ExportSourceError` / :class:`FileNotFoundError` with the fix named.
    """
    if isinstance(source, nn.Module):
        return _from_model(source, tokenizer)
    from wct.checkpoint_io import CheckpointIntegrityError, WCTCheckpointError, missing_path_message
    from wct.integrations.transformers import is_wct_checkpoint, load_quantized

    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"cannot export: {missing_path_message(path)}")
    if not path.is_dir():
        raise ExportSourceError(f"cannot export {path}: it is a file; pass the checkpoint folder (the --out of "
                                "`wct quantize`, or the merged/ folder a recipe writes)")
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise ExportSourceError(
            f"{path} is a PEFT adapter, not a model: merge it into its packed base first (model = "
            "get_peft_model(...).merge_and_unload(); wct.sync_quantization(model); wct.save_pretrained(model, DIR)) "
            "or pass the merged/ folder the recipes write, then export that folder"
        )
    if not (path / "config.json").is_file():
        raise ExportSourceError(f"cannot export {path}: no config.json, so it is not a model folder (or the copy is "
                                "incomplete); pass the --out folder of `wct quantize`")
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportSourceError(f"cannot export {path}: config.json is corrupt ({e}); restore it from a good copy") from None
    if not is_wct_checkpoint(path):
        raise ExportSourceError(
            f"{path} is not a wct checkpoint (config.json has no quantization_config with quant_method 'wct'): "
            "`wct export` converts packed wct models; quantize it first with `wct quantize --out DIR`"
        )
    try:
        model = load_quantized(path, dtype=torch.float32)
    except (CheckpointIntegrityError, WCTCheckpointError) as e:
        raise ExportSourceError(f"cannot export {path}: the checkpoint is corrupt or incomplete: {e}") from None
    model.eval()
    tok_files = _read_tokenizer_files(path)
    if tokenizer is None and "tokenizer_config.json" in tok_files:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    return ExportSource(model=model, config=clean_config(cfg), path=path, tokenizer=tokenizer,
                        tokenizer_files=tok_files)


def _from_model(model: nn.Module, tokenizer: Any) -> ExportSource:
    if any(c.__name__ in ("PeftModel", "PeftMixedModel") for c in type(model).__mro__):
        raise ExportSourceError(
            f"got a {type(model).__name__}: call merge_and_unload() first (then wct.sync_quantization(model)), so "
            "the trained values are in the packed layers"
        )
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ExportSourceError("the model holds no wct QuantLinear layer: quantize it first (wct.quantize_model)")
    cfg_obj = getattr(model, "config", None)
    if cfg_obj is None or not hasattr(cfg_obj, "to_dict"):
        raise ExportSourceError(f"{type(model).__name__} has no transformers config: export needs a PreTrainedModel")
    files: dict[str, bytes] = {}
    if tokenizer is not None:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            tokenizer.save_pretrained(d)
            files = _read_tokenizer_files(Path(d))
    gen = getattr(model, "generation_config", None)
    if gen is not None and "generation_config.json" not in files:
        files["generation_config.json"] = (gen.to_json_string(use_diff=True)).encode()
    return ExportSource(model=model, config=clean_config(cfg_obj.to_dict()), path=None, tokenizer=tokenizer,
                        tokenizer_files=files)


__all__ = ["ExportSource", "ExportSourceError", "TOKENIZER_FILES", "clean_config", "load_source"]
