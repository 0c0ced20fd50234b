"""Load an exported folder back with the *engines'* loaders, to measure what a user will actually run.

Nothing here reads the files with wct's own code: ``dense`` goes through plain transformers,
``gptq`` through transformers + GPTQModel (+ PEFT for ``adapter/``), ``gguf`` through
llama-cpp-python when it is installed, else transformers' GGUF loader (which dequantizes with
the ``gguf`` package) with the LoRA of ``adapter.gguf`` added as llama.cpp adds it.
An engine that is not installed raises :class:`EngineUnavailable` naming the package.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

import torch


class EngineUnavailable(RuntimeError):
    """The loader for this format is not installed here (the message names the package)."""


def have(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def load_dense(folder: str | os.PathLike) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def load_gptq(folder: str | os.PathLike, adapter: str | None = "adapter") -> torch.nn.Module:
    """transformers + GPTQModel (CPU torch kernel) + PEFT for the weak-column adapter."""
    if not have("gptqmodel", "optimum"):
        raise EngineUnavailable("loading a GPTQ checkpoint needs gptqmodel and optimum: the export-check extra, "
                                "installed as docs/deploy.md says (a venv of its own, no build isolation)")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu").eval()
    if adapter and (Path(folder) / adapter).is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(Path(folder) / adapter)).eval()
    return model


def load_gguf_transformers(folder: str | os.PathLike, model_file: str = "model.gguf",
                           adapter_file: str | None = "adapter.gguf") -> torch.nn.Module:
    """transformers' GGUF loader, plus ``adapter.gguf`` added to the weights as llama.cpp applies it."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=model_file, dtype=torch.float32).eval()
    if adapter_file and (folder / adapter_file).is_file():
        add_gguf_lora(model, folder / adapter_file)
    return model


@torch.no_grad()
def add_gguf_lora(model: torch.nn.Module, path: Path) -> None:
    """``W += scale * B @ A`` for every ``*.lora_a``/``*.lora_b`` pair, with llama.cpp's ``scale = alpha / rank``.

    transformers un-permutes ``attn_q``/``attn_k`` rows when it reads a GGUF model, so B's rows
    are un-permuted the same way before the product.
    """
    import gguf

    from .gguf_target import rope_row_permutation

    reader = gguf.GGUFReader(str(path))
    alpha_field = reader.fields.get(gguf.Keys.Adapter.LORA_ALPHA)
    alpha = float(alpha_field.contents()) if alpha_field is not None else 0.0
    tensors = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()) for t in reader.tensors}
    cfg = model.config
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    to_hf = {}
    for hf_name, _ in model.named_parameters():
        g = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if g is not None:
            to_hf[g] = hf_name
    for name, a in tensors.items():
        if not name.endswith(".lora_a"):
            continue
        base = name[: -len(".lora_a")]
        b = tensors[base + ".lora_b"]
        rank = b.shape[1]
        scale = alpha / rank if alpha else 1.0
        hf = to_hf[base]
        w = model.get_parameter(hf)
        module = hf.rsplit(".", 1)[0]
        if module.endswith("self_attn.q_proj") or module.endswith("self_attn.k_proj"):
            heads = cfg.num_attention_heads if module.endswith("q_proj") else cfg.num_key_value_heads
            perm = rope_row_permutation(b.shape[0], heads)
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(perm.numel())
            b = b[inv]
        w += scale * (b.float() @ a.float())


def load_llama_cpp(folder: str | os.PathLike, n_ctx: int = 512, model_file: str = "model.gguf",
                   adapter_file: str | None = "adapter.gguf"):
    """llama-cpp-python's ``Llama`` over the exported file(s), with every position's logits kept."""
    if not have("llama_cpp"):
        raise EngineUnavailable("llama-cpp-python is not installed: the export-check extra, installed as "
                                "docs/deploy.md says (it compiles llama.cpp)")
    from llama_cpp import Llama

    folder = Path(folder)
    lora = str(folder / adapter_file) if adapter_file and (folder / adapter_file).is_file() else None
    return Llama(model_path=str(folder / model_file), lora_path=lora, n_ctx=n_ctx, logits_all=True, verbose=False,
                 n_threads=max(1, (os.cpu_count() or 1)), seed=0)


def llama_cpp_logits(llm: Any, tokens: list[int]) -> torch.Tensor:
    """``[len(tokens), vocab]`` logits of llama.cpp for one sequence (a fresh context each call)."""
    import numpy as np

    llm.reset()
    llm.eval(tokens)
    return torch.from_numpy(np.array(llm.scores[: len(tokens)], dtype=np.float32))


def llama_cpp_perplexity(llm: Any, windows: torch.Tensor) -> float:
    nll = 0.0
    for w in windows:
        logits = llama_cpp_logits(llm, w.tolist())[:-1]
        nll += torch.nn.functional.cross_entropy(logits.double(), w[1:].long()).item()
    return math.exp(nll / windows.shape[0])


def load_export(folder: str | os.PathLike, format: str) -> tuple[Any, str]:
    """(model, loader name) for ``format``; the model is a torch module except for llama.cpp."""
    if format == "dense":
        return load_dense(folder), "transformers"
    if format == "gptq":
        return load_gptq(folder), "transformers+gptqmodel+peft"
    if format == "gguf":
        if have("llama_cpp"):
            return load_llama_cpp(folder), "llama-cpp-python"
        return load_gguf_transformers(folder), "transformers-gguf+adapter"
    raise ValueError(f"unknown format {format!r}")


__all__ = ["EngineUnavailable", "add_gguf_lora", "have", "llama_cpp_logits", "llama_cpp_perplexity", "load_dense",
           "load_export", "load_gguf_transformers", "load_gptq", "load_llama_cpp"]
