"""Task-aware weak columns (issue 20): ``create_weak_columns(..., score="fisher", data=...)``.

A constructed model where the fine-tuning data and the calibration text load different input
columns: the Fisher score (gradients on the task batches) picks the task's column, the Hessian
scores (activations on calibration text) pick the other; with an unquantized ``reference`` the
exact ``ΔW`` decides and the split column takes its dense values.  Then the real path: a tiny
Llama, tensor and dict batches, the same budget as the Hessian choice, and WCT training on top.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_llama
from peft import get_peft_model
from torch import nn

from wct.formats import get_format
from wct.integrations.peft import register_wct_peft
from wct.integrations.transformers import quantize_model
from wct.nn import QuantLinear
from wct.quantize import QuantConfig
from wct.tuners.wct import WCTConfig, create_weak_columns

TASK_COL, CALIB_COL = 5, 11


class Toy(nn.Module):
    """Token -> fixed features -> one linear layer -> cross-entropy over 8 classes.

    Tokens 0-3 ("the task") put a large value on input column 5, tokens 4-7 ("calibration text") on
    column 11; every other column carries small noise.
    """

    def __init__(self, quantized: bool = True, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        emb = 0.05 * torch.randn(8, 16, generator=g)
        emb[:4, TASK_COL] = 4.0 * torch.tensor([1.0, -1.0, 1.0, -1.0])
        emb[4:, CALIB_COL] = 4.0 * torch.tensor([1.0, -1.0, 1.0, -1.0])
        self.embed = nn.Embedding.from_pretrained(emb)
        lin = nn.Linear(16, 8, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(8, 16, generator=g))
        self.proj = QuantLinear.from_linear(lin, get_format("int3")) if quantized else lin

    def forward(self, input_ids, labels=None):
        logits = self.proj(self.embed(input_ids))
        if labels is None:
            return logits
        return {"loss": nn.functional.cross_entropy(logits.reshape(-1, 8), labels.reshape(-1) % 8)}


def _ids(lo: int, hi: int, n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(lo, hi, (n, 10), generator=torch.Generator().manual_seed(seed))


def test_fisher_picks_the_column_the_task_uses_hessian_the_calibration_one():
    fisher = Toy()
    chosen = create_weak_columns(fisher, 1, score="fisher", data=_ids(0, 4), progress=False)
    assert chosen["proj"].tolist() == [TASK_COL]
    assert fisher.proj.n_weak == 1 and fisher.proj.col_idx.tolist() == [TASK_COL]
    for score in ("hessian_error", "activation"):
        hess = Toy()
        assert create_weak_columns(hess, 1, calibration=_ids(4, 8), score=score, progress=False)["proj"].tolist() == [
            CALIB_COL]


def test_fisher_with_a_reference_uses_the_exact_error_and_restores_dense_values():
    """Both columns are loaded by the data; only column 11's quantization error is large in the reference."""
    model = Toy()
    reference = Toy(quantized=False)
    with torch.no_grad():
        reference.proj.weight.copy_(model.proj.dequantize_weight())  # ΔW = 0 ...
        reference.proj.weight[:, CALIB_COL] += 1.0  # ... except in column 11
    data = torch.cat([_ids(0, 4, 3), _ids(4, 8, 3, seed=1)])
    chosen = create_weak_columns(model, 1, score="fisher", data=data, reference=reference, progress=False)
    assert chosen["proj"].tolist() == [CALIB_COL]
    torch.testing.assert_close(model.proj.col_values.float(), reference.proj.weight[:, [CALIB_COL]].half().float())
    # the rest of the base is untouched (per-channel integers: the split is exact)
    keep = [j for j in range(16) if j != CALIB_COL]
    torch.testing.assert_close(model.proj.dequantize_weight()[:, keep], Toy().proj.dequantize_weight()[:, keep])


def test_fisher_needs_data_and_a_loss():
    with pytest.raises(ValueError, match="fine-tuning data"):
        create_weak_columns(Toy(), 1, score="fisher", progress=False)
    with pytest.raises(ValueError, match="labels"):
        create_weak_columns(Toy(), 1, score="fisher", data=[{"input_ids": _ids(0, 4)}], progress=False)


def test_fisher_on_a_tiny_llama_same_budget_then_wct_trains():
    register_wct_peft()
    cal = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    batch = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(1))
    base = quantize_model(make_tiny_llama(), QuantConfig(method="bof4s"), progress=False)
    budget = {"q_proj": 3, "down_proj": 5}
    hess = create_weak_columns(copy.deepcopy(base), budget, calibration=cal, progress=False)
    labels = batch.clone()
    labels[:, :12] = -100  # completion-only batches, as a collator gives them
    model = copy.deepcopy(base)
    def flags():  # of the dense parameters (norms, embeddings), which the Fisher passes freeze and restore
        return {n: p.requires_grad for n, p in model.named_parameters() if "norm" in n or "embed" in n}

    before = flags()
    fish = create_weak_columns(model, budget, score="fisher", progress=False, max_batches=2,
                               data=[{"input_ids": batch[:2], "labels": labels[:2]},
                                     {"input_ids": batch[2:], "labels": labels[2:]},
                                     {"input_ids": batch, "labels": labels}])
    assert fish.keys() == hess.keys()
    assert all(fish[n].numel() == hess[n].numel() for n in fish)  # the same budget, layer by layer
    assert any(not torch.equal(fish[n], hess[n]) for n in fish)
    assert flags() == before and any(before.values())
    assert all(p.grad is None for p in model.parameters())
    pm = get_peft_model(model, WCTConfig(task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = pm(input_ids=batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
