"""PEFT's conventions over packed models (issue 18, items 1, 3 and 5).

* LoRA ``target_modules="all-linear"`` lands on every packed layer, every expert of a packed MoE block included, and
  never on a router (PEFT's transformers-5 MoE config conversion would otherwise send it to the router and the fused
  expert parameters a packed model no longer has).
* LoRA and WCT over packed experts train, save, load and merge.
* ``WCTConfig`` takes the fields PEFT's tools pass to every tuner; the standard operations work for LoRA and WCT.
* A model with no ``nn.Parameter`` left takes LoRA and WCT.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_llama
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

import wct
from wct.formats import get_format
from wct.integrations.peft import register_wct_peft
from wct.nn import QuantLinear
from wct.quantize import QuantConfig
from wct.tuners.lora import QuantLoraLinear
from wct.tuners.wct import WCTConfig, WCTLayer

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
CAL = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
MOE = {
    "mixtral": lambda: MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2),
    "qwen3_moe": lambda: Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        num_experts=4, num_experts_per_tok=2, head_dim=16),
}
QUANT = {
    "bof4s": QuantConfig(method="bof4s"),
    "owq_moe": QuantConfig(method="owq", wbits=3, target_bits=3.2),
    "owq": QuantConfig(method="owq", wbits=4, target_bits=4.25),
    "nf4": QuantConfig(method="nf4"),
}
_CACHE: dict[tuple[str, str], torch.nn.Module] = {}
pytestmark = [
    pytest.mark.filterwarnings("ignore:Merging LoRA into a packed wct QuantLinear"),
    pytest.mark.filterwarnings("ignore:All adapters are already merged"),  # merging twice, on purpose
]


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_wct_peft()


def make_moe(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(MOE[arch]()).eval()
    for p in m.parameters():
        if p.dim() == 3:  # transformers leaves fused experts at init scale 0.02; make them matter
            torch.nn.init.normal_(p, std=0.05)
    return m


def quantized(arch: str, method: str) -> torch.nn.Module:
    """A fresh copy of a quantized tiny model (quantized once per module)."""
    key = (arch, method)
    if key not in _CACHE:
        cfg = QUANT[method]
        model = make_tiny_llama() if arch == "llama" else make_moe(arch)
        _CACHE[key] = wct.quantize_model(model, cfg, calibration=CAL if cfg.calibrated else None, progress=False)
    return copy.deepcopy(_CACHE[key])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def one_step(model, lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()


def short(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def packed_names(model) -> set[str]:
    """Every QuantLinear of a bare model except the output embedding (what "all-linear" must target)."""
    head = model.get_output_embeddings()
    return {n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m is not head}


def buffers(model) -> dict[str, torch.Tensor]:
    """Every packed layer's storage (frozen parameters and index buffers), by short name."""
    return {short(f"{mn}.{n}"): t.detach().clone() for mn, m in model.named_modules() if isinstance(m, QuantLinear)
            for n, t in m.named_storage()}


def lora_wrapped(peft_model) -> set[str]:
    return {short(n) for n, m in peft_model.named_modules() if isinstance(m, QuantLoraLinear)}


def all_lora(**kw) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **kw)


# ---------------------------------------------------------------------------------------------------------------------
# A. LoRA "all-linear" over packed layers, experts included
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "mixtral", "qwen3_moe"])
def test_all_linear_lora_lands_on_every_packed_layer_and_never_on_a_router(arch):
    model = quantized(arch, "bof4s")
    targets = packed_names(model)
    assert any(".experts." in n for n in targets) == (arch != "llama")
    before = buffers(model)
    pm = get_peft_model(model, all_lora())

    assert lora_wrapped(pm) == targets
    others = {short(n) for n, m in pm.named_modules() if isinstance(m, LoraLayer) and not isinstance(m, QuantLoraLinear)}
    assert not others, f"LoRA outside the packed layers (router / fused parameters): {sorted(others)}"
    assert not pm.peft_config["default"].target_parameters

    b0 = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_B" in n}
    one_step(pm)
    unchanged = [n for n, p in pm.named_parameters() if "lora_B" in n and torch.equal(p, b0[n])]
    assert not unchanged, f"one AdamW step left these LoRA B unchanged: {unchanged[:4]}"
    after = buffers(pm)
    assert all(torch.equal(after[n], b) for n, b in before.items()), "the packed base changed in training"


def test_model_bits_ignore_adapter_weights():
    """``model_bits`` describes the packed base; LoRA/WCT matrices beside it are not dense block weights."""
    model = quantized("mixtral", "bof4s")
    bits = wct.model_bits(model)
    pm = get_peft_model(model, all_lora())
    one_step(pm)
    assert wct.model_bits(pm) == bits

    model = quantized("llama", "owq")
    bits = wct.model_bits(model)
    pm = get_peft_model(model, WCTConfig())
    assert wct.model_bits(pm) == bits


def test_a_router_that_is_a_plain_linear_is_no_all_linear_target():
    """Off transformers' MoE classes too: a dense nn.Linear named like a router stays without LoRA."""
    torch.manual_seed(0)
    fmt = get_format("bof4s", block_size=64)
    model = torch.nn.Module()
    model.proj = QuantLinear.from_linear(torch.nn.Linear(64, 64), fmt)
    model.gate = torch.nn.Linear(64, 4)
    model.shared_expert_gate = torch.nn.Linear(64, 1)
    model.dense = torch.nn.Linear(64, 64)
    pm = get_peft_model(model, all_lora())
    wrapped = {short(n) for n, m in pm.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == {"proj", "dense"}


def test_named_expert_projections_mean_every_expert():
    """``target_modules=["q_proj", "down_proj"]`` names the experts' ModuleList: LoRA on each expert's down_proj."""
    model = quantized("qwen3_moe", "bof4s")
    want = {n for n in packed_names(model) if n.endswith("q_proj") or ".experts.down_proj." in n}
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    assert lora_wrapped(pm) == want and len(want) == 2 + 2 * 4
    assert not pm.peft_config["default"].target_parameters


@pytest.mark.parametrize("kw", [dict(target_modules=["q_proj"], target_parameters=["experts.down_proj"]),
                                dict(target_modules=["w2"])])  # transformers-4 Mixtral name, rewritten by PEFT
def test_target_parameters_on_packed_experts_name_what_to_use(kw):
    """Fused-expert parameter targets match nothing once the experts are packed: an error, not LoRA without experts."""
    with pytest.raises(ValueError, match=r"packed into one QuantLinear per expert.*target_modules=\['down_proj'\]"):
        get_peft_model(quantized("mixtral", "bof4s"), LoraConfig(r=4, **kw))


def test_lora_standard_operations_over_packed_experts(tmp_path):
    base = quantized("mixtral", "bof4s")
    ref = logits(base)
    torch.manual_seed(0)
    pm = get_peft_model(copy.deepcopy(base), all_lora(init_lora_weights=False))
    pm.add_adapter("two", all_lora(init_lora_weights=False))
    assert {n for n in lora_wrapped(pm) if ".experts." in n}
    one_step(pm)  # trains "default"
    a = logits(pm)
    pm.set_adapter("two")
    b = logits(pm)
    assert not torch.allclose(a, ref) and not torch.allclose(b, ref) and not torch.allclose(a, b)
    pm.set_adapter("default")
    assert torch.equal(logits(pm), a)
    with pm.disable_adapter():
        assert torch.equal(logits(pm), ref)
    assert torch.equal(logits(pm), a)

    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    loaded.load_adapter(tmp_path / "two", adapter_name="two")
    assert {n for n in lora_wrapped(loaded) if ".experts." in n} == {n for n in lora_wrapped(pm) if ".experts." in n}
    assert torch.equal(logits(loaded), a)
    loaded.set_adapter("two")
    assert torch.equal(logits(loaded), b)

    pm.delete_adapter("two")
    assert "two" not in pm.peft_config and torch.equal(logits(pm), a)
    pm.merge_adapter()
    merged = logits(pm)
    state = {k: v.clone() for k, v in pm.state_dict().items()}
    pm.merge_adapter()  # merging twice is a no-op
    assert torch.equal(logits(pm), merged)
    assert all(torch.equal(v, pm.state_dict()[k]) for k, v in state.items())
    pm.unmerge_adapter()
    assert torch.equal(logits(pm), a)
    assert torch.equal(logits(copy.deepcopy(pm).unload()), ref)
    assert torch.equal(logits(pm.merge_and_unload(safe_merge=True)), merged)


# ---------------------------------------------------------------------------------------------------------------------
# B. WCT over packed experts
# ---------------------------------------------------------------------------------------------------------------------
def test_wct_trains_expert_weak_columns_and_merges_bit_exactly():
    model = quantized("mixtral", "owq_moe")
    experts = {n for n, m in model.named_modules() if isinstance(m, QuantLinear) and ".experts." in n and m.n_weak}
    assert experts
    frozen = {n: b for n, b in buffers(model).items() if not n.endswith(("col_values", "sp_values"))}
    pm = get_peft_model(model, WCTConfig())
    tuned = {short(n) for n, m in pm.named_modules() if isinstance(m, WCTLayer)}
    assert experts <= tuned
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    one_step(pm)
    moved = {short(n).rsplit(".wct_col_values", 1)[0] for n, p in pm.named_parameters()
             if p.requires_grad and not torch.equal(p, before[n])}
    assert experts <= moved
    adapted = logits(pm)
    merged = pm.merge_and_unload(safe_merge=True)
    assert torch.equal(logits(merged), adapted)
    after = buffers(merged)
    assert all(torch.equal(after[n], b) for n, b in frozen.items()), "merging touched the packed base"


def test_wct_expert_targets_by_projection_name_and_layer():
    model = quantized("mixtral", "owq_moe")
    want = {n for n, m in model.named_modules()
            if isinstance(m, QuantLinear) and n.startswith("model.layers.1.mlp.experts.down_proj.") and m.n_weak}
    pm = get_peft_model(model, WCTConfig(target_modules=["down_proj"], layers_to_transform=[1]))
    assert {short(n) for n, m in pm.named_modules() if isinstance(m, WCTLayer)} == want and want


# ---------------------------------------------------------------------------------------------------------------------
# C. PEFT's tuner conventions for WCT
# ---------------------------------------------------------------------------------------------------------------------
def test_wct_config_takes_the_fields_peft_passes_to_every_tuner(tmp_path):
    cfg = WCTConfig(init_weights=False, layers_to_transform=[0, 1], layers_pattern="layers",
                    exclude_modules=["o_proj"], inference_mode=False, revision="main",
                    trainable_token_indices=[3, 5], target_parameters=None, base_model_name_or_path="tiny")
    cfg.save_pretrained(tmp_path)
    back = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(back, WCTConfig)
    for field in ("init_weights", "layers_to_transform", "layers_pattern", "revision", "trainable_token_indices"):
        assert getattr(back, field) == getattr(cfg, field), field
    assert back.exclude_modules == {"o_proj"}


def test_wct_config_refuses_what_does_not_apply():
    with pytest.raises(ValueError, match=r"target_parameters.*QuantLinear per expert"):
        WCTConfig(target_parameters=["experts.down_proj"])
    with pytest.raises(ValueError, match="init_weights must be True"):
        WCTConfig(init_weights="gaussian")
    with pytest.raises(ValueError, match="layers_to_transform cannot be used with a regex"):
        WCTConfig(target_modules=r".*q_proj", layers_to_transform=[0])
    with pytest.raises(ValueError, match="layers_pattern needs layers_to_transform"):
        WCTConfig(layers_pattern="layers")


def test_wct_init_weights():
    base = quantized("llama", "owq")
    ref = logits(base)
    assert torch.equal(logits(get_peft_model(copy.deepcopy(base), WCTConfig())), ref)
    torch.manual_seed(0)
    assert not torch.allclose(logits(get_peft_model(copy.deepcopy(base), WCTConfig(init_weights=False))), ref)


def test_wct_layers_to_transform_with_all_linear():
    model = quantized("llama", "owq")
    pm = get_peft_model(model, WCTConfig(layers_to_transform=1))
    tuned = {short(n) for n, m in pm.named_modules() if isinstance(m, WCTLayer)}
    assert tuned and all(n.startswith("model.layers.1.") for n in tuned)


def test_wct_trainable_token_indices(tmp_path):
    base = quantized("llama", "owq")
    pm = get_peft_model(copy.deepcopy(base), WCTConfig(trainable_token_indices=[3, 5]))
    assert any("trainable_tokens" in n for n, p in pm.named_parameters() if p.requires_grad)
    one_step(pm)
    adapted = logits(pm)
    pm.save_pretrained(tmp_path)
    assert torch.equal(logits(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)), adapted)
    assert torch.equal(logits(pm.merge_and_unload()), adapted)


def test_wct_standard_operations(tmp_path):
    base = quantized("llama", "owq")
    ref = logits(base)
    torch.manual_seed(0)
    pm = get_peft_model(copy.deepcopy(base), WCTConfig(init_weights=False))
    pm.add_adapter("two", WCTConfig(init_weights=False))
    one_step(pm)
    a = logits(pm)
    pm.set_adapter("two")
    b = logits(pm)
    assert not torch.allclose(a, ref) and not torch.allclose(b, ref) and not torch.allclose(a, b)
    pm.set_adapter("default")
    assert torch.equal(logits(pm), a)
    with pm.disable_adapter():
        assert torch.equal(logits(pm), ref)

    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    loaded.load_adapter(tmp_path / "two", adapter_name="two")
    assert torch.equal(logits(loaded), a)
    loaded.set_adapter("two")
    assert torch.equal(logits(loaded), b)

    pm.delete_adapter("two")
    assert "two" not in pm.peft_config and torch.equal(logits(pm), a)
    pm.merge_adapter()
    assert torch.equal(logits(pm), a)  # exact: the trained values are written as the forward pass rounded them
    state = {k: v.clone() for k, v in pm.state_dict().items()}
    pm.merge_adapter()
    assert all(torch.equal(v, pm.state_dict()[k]) for k, v in state.items())
    pm.unmerge_adapter()
    assert torch.equal(logits(copy.deepcopy(pm).unload()), ref)
    assert torch.equal(logits(pm.merge_and_unload(safe_merge=True)), a)


def test_adapters_with_different_created_columns_are_refused():
    base = quantized("llama", "nf4")
    pm = get_peft_model(base, WCTConfig(create_columns=4))
    pm.add_adapter("same", WCTConfig(create_columns=4))
    with pytest.raises(ValueError, match=r"created 4 weak columns, and create_columns=8"):
        pm.add_adapter("other", WCTConfig(create_columns=8))


# ---------------------------------------------------------------------------------------------------------------------
# a model with no nn.Parameter left
# ---------------------------------------------------------------------------------------------------------------------
def parameterless_llama() -> torch.nn.Module:
    """Every block and the head packed (untied lm_head included), embeddings and norms stored as buffers."""
    model = make_tiny_llama()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    wct.quantize_model(model, QuantConfig(method="bof4s", include_lm_head=True), progress=False)
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                del mod._parameters[name]
                mod.register_buffer(name, p.detach())
    assert not list(model.parameters()) and isinstance(model.lm_head, QuantLinear)
    return model


@pytest.mark.parametrize("kind", ["lora", "wct"])
def test_a_model_without_parameters_takes_adapters(kind):
    model = parameterless_llama()
    targets = packed_names(model)
    base = logits(model)
    if kind == "lora":
        pm = get_peft_model(model, all_lora())
        assert lora_wrapped(pm) == targets and "lm_head" not in targets
    else:  # the base has no weak columns: split 4 per layer out of it (the split base is what the adapter sits on)
        pm = get_peft_model(model, WCTConfig(create_columns=4))
    ref = logits(pm)
    if kind == "lora":
        assert torch.equal(ref, base)
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    assert before
    one_step(pm)
    assert any(not torch.equal(p, before[n]) for n, p in pm.named_parameters() if p.requires_grad)
    with pm.disable_adapter():
        assert torch.equal(logits(pm), ref)
