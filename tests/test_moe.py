"""Mixture-of-Experts: fused experts packed per expert, under the model's own routing.

Oracles: transformers' own experts forward (the fused 3-D weights), with the dequantized expert weights written
back into those 3-D parameters; and the routing itself, recomputed from the router.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GptOssConfig, MixtralConfig, OlmoeConfig, Qwen3MoeConfig

import wct
from wct.nn import QuantExperts, QuantLinear
from wct.nn.quant_experts import fused_experts_modules, unfuse_experts_
from wct.quantize import QuantConfig, model_bits, quantize_modules

CONFIGS = {
    "mixtral": lambda: MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2),
    "qwen3_moe": lambda: Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        num_experts=4, num_experts_per_tok=2, head_dim=16),
    "olmoe": lambda: OlmoeConfig(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2),
    "gpt_oss": lambda: GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                    num_experts_per_tok=2, head_dim=16,
                                    layer_types=["sliding_attention", "full_attention"]),
}
CALIB = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def make(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()
    for p in m.parameters():
        if p.dim() == 3:  # transformers leaves fused experts at init scale 0.02; make them matter
            torch.nn.init.normal_(p, std=0.05)
    return m


def logits(m, ids=IDS):
    with torch.no_grad():
        return m(ids).logits


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_unfused_experts_reproduce_the_fused_forward_exactly(arch):
    m = make(arch)
    ref = logits(m)
    assert len(unfuse_experts_(m)) == 2
    assert torch.equal(logits(m), ref)


def _write_back_dequantized(fused_model, packed_model) -> None:
    """Put each packed expert's dequantized weight into the fused model's 3-D parameters (transformers' own layout)."""
    fused = fused_experts_modules(fused_model)
    for name, q in packed_model.named_modules():
        if not isinstance(q, QuantExperts):
            continue
        f = fused[name]
        for proj, layers in q.projections().items():
            w3 = getattr(f, proj)
            for e, layer in enumerate(layers):
                w = layer.dequantize_weight(torch.float32)
                w3.data[e] = w.t() if f.is_transposed else w
                if layer.bias is not None:
                    getattr(f, f"{proj}_bias").data[e] = layer.bias.float()
        # every other weight of the block: the packed attention layers too
    for name, q in packed_model.named_modules():
        if isinstance(q, QuantLinear) and ".experts." not in name:
            fused_model.get_submodule(name).weight.data = q.dequantize_weight(torch.float32)


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("method", ["bof4s", "gptq", "owq"])
def test_packed_experts_equal_transformers_forward_on_the_dequantized_weights(arch, method):
    packed = make(arch)
    cfg = QuantConfig(method=method, wbits=4) if method != "owq" else QuantConfig(method="owq", wbits=3, target_bits=3.2)
    if method == "bof4s":
        cfg = QuantConfig(method="bof4s")
    quantize_modules(packed, cfg, calibration=CALIB, progress=False)
    experts = [m for m in packed.modules() if isinstance(m, QuantExperts)]
    assert len(experts) == 2 and all(isinstance(x, QuantLinear) for q in experts
                                     for layers in q.projections().values() for x in layers)
    ref = make(arch)
    _write_back_dequantized(ref, packed)
    assert torch.allclose(logits(packed), logits(ref), atol=2e-5, rtol=1e-4)
    bits = model_bits(packed)
    assert bits["coverage"] > 0.99 and bits["dense_block_weights"] > 0  # only the routers stay dense
    if method == "owq":
        assert any(x.n_weak for q in experts for layers in q.projections().values() for x in layers)


def test_each_expert_is_calibrated_on_its_routed_tokens():
    m = make("mixtral")
    unfuse_experts_(m)
    q = next(x for x in m.modules() if isinstance(x, QuantExperts))
    seen: dict[int, int] = {}
    hooks = [layer.register_forward_hook(lambda _m, i, _o, e=e: seen.__setitem__(e, seen.get(e, 0) + i[0].shape[0]))
             for e, layer in enumerate(q.gate_up_proj)]
    routed = []
    block = m.model.layers[0]
    h = block.mlp.gate.register_forward_hook(lambda _m, _i, out: routed.append(out[2]))
    logits(m)
    for x in hooks + [h]:
        x.remove()
    counts = torch.bincount(routed[0].reshape(-1), minlength=4)
    assert {e: seen.get(e, 0) for e in range(4)} == {e: int(c) for e, c in enumerate(counts)}


def test_rarely_routed_experts_see_every_token_without_changing_the_output():
    m = make("mixtral")
    unfuse_experts_(m)
    ref = logits(m)
    q = next(x for x in m.modules() if isinstance(x, QuantExperts))
    q.calibrate_on_all_tokens = {0, 1, 2, 3}
    n_tokens = IDS.numel()
    seen = []
    hook = q.down_proj[3].register_forward_hook(lambda _m, i, _o: seen.append(i[0].shape[0]))
    out = logits(m)
    hook.remove()
    assert seen == [n_tokens]
    assert torch.allclose(out, ref, atol=1e-5)


def test_quantize_report_names_experts_calibrated_on_all_tokens():
    from wct.quantize.calibrated import quantize_calibrated

    m = make("mixtral")
    unfuse_experts_(m)
    report = quantize_calibrated(m, QuantConfig(method="gptq", wbits=4, expert_min_tokens=10**6), CALIB, progress=False)
    rows = report["experts"]
    assert len(rows) == 2
    for row in rows.values():
        assert sum(row["routed_tokens"]) == CALIB.numel() * 2  # top-2 routing
        assert row["calibrated_on_all_tokens"] == [0, 1, 2, 3]


def test_unsupported_block_weights_are_refused_not_left_dense():
    m = make("mixtral")
    block = m.model.layers[0]
    block.register_parameter("mystery", torch.nn.Parameter(torch.randn(8, 8)))
    with pytest.raises(ValueError, match=r"would leave 1 decoder-block weight\(s\) dense .*mystery.*allow_dense"):
        quantize_modules(m, QuantConfig(method="bof4s"), progress=False)
    quantize_modules(m, QuantConfig(method="bof4s", allow_dense=True), progress=False)
    assert model_bits(m)["coverage"] < 1.0


def test_moe_checkpoint_round_trip(tmp_path):
    m = make("qwen3_moe")
    wct.quantize_model(m, QuantConfig(method="bof4s"))
    ref = logits(m)
    wct.save_pretrained(m, tmp_path / "ckpt")
    loaded = wct.load_quantized(tmp_path / "ckpt")
    assert any(isinstance(x, QuantExperts) for x in loaded.modules())
    assert torch.equal(logits(loaded), ref)


def test_inspect_shows_every_expert_packed(tmp_path, capsys):
    import json

    from wct.cli import main

    m = make("olmoe")
    wct.quantize_model(m, QuantConfig(method="bof4s"))
    wct.save_pretrained(m, tmp_path / "ckpt")
    assert main(["inspect", str(tmp_path / "ckpt"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    s = out["summary"]
    assert s["moe_blocks_packed"] == 2 and s["experts_packed"] == 8
    assert 0.99 < s["coverage"] < 1.0  # the routers stay 16-bit, and are counted
    expert_rows = [r for r in out["layers"] if ".experts." in r["layer"]]
    assert len(expert_rows) == 2 * 4 * 2  # blocks x experts x (gate_up, down)
    assert s["bits_per_weight"] > s["packed_bits_per_weight"]
