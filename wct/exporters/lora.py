"""OWQ / WCT weak columns as a LoRA adapter, exactly: ``W = deq(base with weak columns at 0) + B·A``.

A layer with ``k`` weak columns at input indices ``idx`` and 16-bit values ``V [out, k]`` is the
rank-``k`` product ``B·A`` with ``A = onehot(idx) [k, in]`` (row ``i`` selects column ``idx[i]``)
and ``B = V [out, k]``: ``(B·A)[:, idx[i]] = V[:, i]`` and zero elsewhere.  With scaling 1
(``lora_alpha = r``) every engine that implements LoRA adds exactly the weak-column term, and the
one-hot ``A`` makes ``A·x`` a gather, which no rounding touches.

Two PEFT folders are written, because engines disagree on per-layer ranks:

* ``adapter/``: each layer its own rank ``k`` (``rank_pattern``/``alpha_pattern``, alpha = k, so
  scaling 1 everywhere; the global ``r``/``lora_alpha`` are the largest ``k``).  PEFT/transformers read it.
* ``adapter-padded/``: one rank ``r = max k`` for every targeted layer, ``A`` padded with zero rows
  and ``B`` with zero columns (still exact), for engines that ignore ``rank_pattern`` (vLLM, SGLang).

Layers without weak columns carry no adapter (they are not in ``target_modules``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

ADAPTER_DIR = "adapter"
PADDED_ADAPTER_DIR = "adapter-padded"
PEFT_PREFIX = "base_model.model."


@dataclass
class WeakColumns:
    """One layer's weak columns: indices into ``in_features`` and their values (as stored)."""

    name: str
    in_features: int
    idx: torch.Tensor  # [k] int64 ascending
    values: torch.Tensor  # [out, k] 16-bit

    @property
    def k(self) -> int:
        return int(self.idx.numel())

    @property
    def out_features(self) -> int:
        return int(self.values.shape[0])

    def lora_pair(self, rank: int | None = None, row_perm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [r, in], B [out, r])`` with ``B·A`` = the weak-column term; ``rank > k`` pads with zeros.

        ``row_perm`` reorders B's rows (GGUF stores q/k rows in llama.cpp's rope order).
        """
        r = self.k if rank is None else rank
        if r < self.k:
            raise ValueError(f"{self.name}: rank {r} < its {self.k} weak columns")
        a = torch.zeros(r, self.in_features, dtype=self.values.dtype)
        a[torch.arange(self.k), self.idx.cpu()] = 1
        b = torch.zeros(self.out_features, r, dtype=self.values.dtype)
        b[:, : self.k] = self.values.cpu()
        if row_perm is not None:
            b = b[row_perm.cpu()]
        return a, b

    def delta(self) -> torch.Tensor:
        """The dense ``[out, in]`` fp32 term ``B·A`` (for checks)."""
        d = torch.zeros(self.out_features, self.in_features)
        d[:, self.idx.cpu()] = self.values.float().cpu()
        return d


def write_peft_adapter(folder: str | os.PathLike, weak: list[WeakColumns], padded: bool) -> dict[str, int]:
    """Write one PEFT LoRA folder for ``weak`` (see the module docstring); returns module name -> rank."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    if not weak:
        raise ValueError("no layer has weak columns: there is no adapter to write")
    os.makedirs(folder, exist_ok=True)
    r = max(w.k for w in weak)
    ranks = {w.name: (r if padded else w.k) for w in weak}
    pattern = {} if padded else {n: k for n, k in ranks.items() if k != r}
    cfg = LoraConfig(
        r=r, lora_alpha=r, target_modules=sorted(ranks), rank_pattern=dict(pattern), alpha_pattern=dict(pattern),
        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", use_rslora=False, init_lora_weights=True,
        inference_mode=True,
    )
    cfg.save_pretrained(os.fspath(folder))
    tensors = {}
    for w in weak:
        a, b = w.lora_pair(rank=ranks[w.name])
        tensors[f"{PEFT_PREFIX}{w.name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{w.name}.lora_B.weight"] = b.contiguous()
    save_file(tensors, os.path.join(os.fspath(folder), "adapter_model.safetensors"), metadata={"format": "pt"})
    return ranks


__all__ = ["ADAPTER_DIR", "PADDED_ADAPTER_DIR", "PEFT_PREFIX", "WeakColumns", "write_peft_adapter"]
