"""LoRA over packed QuantLinear: dispatch, "all-linear", training, save/load, (lossy) merge."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from conftest import make_tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model

from wct.integrations.peft import register_wct_peft
from wct.integrations.transformers import load_quantized, quantize_model, save_pretrained
from wct.nn import QuantLinear
from wct.quantize import QuantConfig
from wct.tuners.lora import QuantLoraLinear

CAL = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
BATCH = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
FORMATS = {
    "int4": QuantConfig(method="rtn", wbits=4),
    "int3": QuantConfig(method="rtn", wbits=3, group_size=32),
    "nf4": QuantConfig(method="nf4"),
    "af4": QuantConfig(method="af4"),
    "bof4": QuantConfig(method="bof4"),
    "bof4s": QuantConfig(method="bof4s", opq=True),
    "owq": QuantConfig(method="owq", wbits=4, target_bits=4.25),
}
N_LINEAR = 14  # 7 Linear per block x 2 blocks; lm_head is the (tied, unquantized) output embedding
_CACHE: dict[str, torch.nn.Module] = {}
pytestmark = pytest.mark.filterwarnings("ignore:Merging LoRA into a packed wct QuantLinear")

# Merge tolerance (documented in wct/tuners/lora.py): requantizing deq(W) + BA loses the part of the update that is
# smaller than half a quantization step.  After 15 steps on the tiny model the merged model must keep >= 80% of the
# loss improvement, and its logits must stay closer to the adapter model's than the adapter's own effect (relative
# RMS < 0.5; measured about 0.17 at 4 bits and 0.33 at 3 bits).
KEEP_IMPROVEMENT = 0.8
MAX_REL_LOGIT_ERR = 0.5


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_registered():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    register_wct_peft()
    yield
    torch.set_num_threads(threads)


def quantized(kind: str) -> torch.nn.Module:
    if kind not in _CACHE:
        cfg = FORMATS[kind]
        _CACHE[kind] = quantize_model(make_tiny_llama(), cfg, calibration=CAL if cfg.calibrated else None, progress=False)
    return copy.deepcopy(_CACHE[kind])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=BATCH).logits


def loss_of(model) -> float:
    with torch.no_grad():
        return model(input_ids=BATCH, labels=BATCH).loss.item()


def packed_checksums(model) -> dict[str, str]:
    return {
        n.replace(".base_layer", "").removeprefix("base_model.model."):
            hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
        for n, t in model.state_dict().items() if ".lora_" not in n
    }


def lora_config(**kw) -> LoraConfig:
    return LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear", **kw)


def train(model, steps: int = 15, lr: float = 1e-2) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=BATCH, labels=BATCH).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("kind", list(FORMATS))
def test_lora_over_every_format(kind, tmp_path):
    base = quantized(kind)
    before = packed_checksums(base)
    base_loss = loss_of(base)
    pm = get_peft_model(base, lora_config())
    wrapped = {n for n, m in pm.named_modules() if isinstance(m, QuantLoraLinear)}
    assert len(wrapped) == N_LINEAR and not any("lm_head" in n for n in wrapped)  # "all-linear" found them
    assert all(isinstance(pm.get_submodule(n).get_base_layer(), QuantLinear) for n in wrapped)
    losses = train(pm)
    assert losses[-1] < losses[0] - 0.1
    assert packed_checksums(pm) == before  # the packed base never moves during training
    tuned, tuned_loss = logits(pm), loss_of(pm)

    pm.save_pretrained(tmp_path)
    assert torch.equal(logits(PeftModel.from_pretrained(quantized(kind), tmp_path)), tuned)

    with pm.disable_adapter():
        base_logits = logits(pm)
    merged = pm.merge_and_unload()
    layers = [m for m in merged.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == N_LINEAR and not any(isinstance(m, QuantLoraLinear) for m in merged.modules())
    assert [m.spec() for m in layers] == [m.spec() for m in _CACHE[kind].modules() if isinstance(m, QuantLinear)]
    merged_logits = logits(merged)
    rel = (merged_logits - tuned).pow(2).mean().sqrt() / (tuned - base_logits).pow(2).mean().sqrt()
    assert rel < MAX_REL_LOGIT_ERR, rel
    assert base_loss - loss_of(merged) >= KEEP_IMPROVEMENT * (base_loss - tuned_loss)


def test_merged_lora_checkpoint_reloads_exactly(tmp_path):
    pm = get_peft_model(quantized("owq"), lora_config())
    train(pm, steps=3)
    merged = pm.merge_and_unload()
    expected = logits(merged)
    save_pretrained(merged, tmp_path / "merged")
    assert torch.equal(logits(load_quantized(tmp_path / "merged")), expected)


@pytest.mark.parametrize("kind", ["int4", "int3", "nf4", "bof4s", "owq"])
def test_merging_a_zero_adapter_changes_nothing(kind):
    """At initialisation B = 0: requantizing deq(W) must give back the very same packed buffers."""
    base = quantized(kind)
    before = packed_checksums(base)
    merged = get_peft_model(base, lora_config()).merge_and_unload()
    assert packed_checksums(merged) == before


def test_unmerge_restores_the_packed_base_exactly():
    pm = get_peft_model(quantized("owq"), lora_config())
    train(pm, steps=3)
    before, tuned = packed_checksums(pm), logits(pm)
    pm.base_model.merge_adapter()
    assert packed_checksums(pm) != before
    pm.base_model.unmerge_adapter()
    assert packed_checksums(pm) == before and torch.equal(logits(pm), tuned)


def test_weak_columns_take_their_share_of_the_delta_exactly():
    pm = get_peft_model(quantized("owq"), lora_config(init_lora_weights="gaussian"))
    layer = next(m for m in pm.modules() if isinstance(m, QuantLoraLinear) and m.get_base_layer().n_weak)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.05)
    base = layer.get_base_layer()
    idx = base.col_idx.long()
    want = (base.dequantize_weight()[:, idx] + layer.get_delta_weight("default")[:, idx]).half()
    layer.merge()
    assert torch.equal(base.col_values, want)


def test_all_linear_on_a_partly_quantized_model_takes_both_kinds():
    cfg = QuantConfig(method="nf4", skip_modules=("down_proj",))
    model = quantize_model(make_tiny_llama(), cfg, progress=False)
    pm = get_peft_model(model, lora_config())
    kinds = {type(m.get_base_layer()).__name__ for m in pm.modules() if hasattr(m, "lora_A") and m.lora_A}
    assert kinds == {"QuantLinear", "Linear"}
    assert sum(1 for m in pm.modules() if hasattr(m, "lora_A") and m.lora_A) == N_LINEAR
    assert not hasattr(pm.get_base_model().lm_head, "lora_A")


def test_unsupported_lora_options_are_clear_errors():
    with pytest.raises(ValueError, match="not supported over a packed wct QuantLinear"):
        get_peft_model(quantized("nf4"), lora_config(use_dora=True))
    with pytest.raises(ValueError, match="reads the dense base weight"):
        get_peft_model(quantized("nf4"), lora_config(init_lora_weights="pissa"))


def test_mixed_adapter_batch():
    pm = get_peft_model(quantized("int4"), lora_config(init_lora_weights="gaussian"))
    with torch.no_grad():
        for m in pm.modules():
            if isinstance(m, QuantLoraLinear):
                m.lora_B["default"].weight.normal_(0, 0.05)
    pm.eval()  # PEFT refuses adapter_names in training mode
    tuned = logits(pm)
    with pm.disable_adapter():
        base = logits(pm)
    with torch.no_grad():
        mixed = pm(input_ids=BATCH, adapter_names=["default", "__base__", "default", "__base__"]).logits
    assert torch.allclose(mixed[0::2], tuned[0::2], atol=1e-5) and torch.allclose(mixed[1::2], base[1::2], atol=1e-5)


def test_registration_is_idempotent_and_rides_on_every_lora_config():
    from peft.tuners.lora.model import LoraModel

    from wct.integrations.peft import is_registered

    post_init, prepare = LoraConfig.__post_init__, LoraModel._prepare_model
    register_wct_peft()
    register_wct_peft()
    assert is_registered()
    assert LoraConfig.__post_init__ is post_init and LoraModel._prepare_model is prepare  # wrapped once only
    assert LoraConfig(r=2)._custom_modules == {QuantLinear: QuantLoraLinear}
