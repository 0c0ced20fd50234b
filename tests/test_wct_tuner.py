"""Weak Column Tuning as a PEFT method: shapes, training, save/load, merge, checkpoints, errors."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil

import pytest
import torch
from conftest import make_tiny_llama
from peft import PeftModel, get_peft_model, mapping
from safetensors.torch import load_file, save_file

from wct.integrations.peft import load_adapter, register_wct_peft
from wct.integrations.transformers import load_quantized, quantize_model, save_pretrained
from wct.nn import QuantLinear
from wct.quantize import QuantConfig
from wct.tuners.wct import (
    WCT_STORED_PEFT_TYPE,
    WCTConfig,
    WCTLayer,
    create_weak_columns,
    expected_quant_error,
    prepare_for_training,
    split_weak_columns,
)

CAL = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
BATCH = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
CONFIGS = {
    "owq": QuantConfig(method="owq", wbits=4, target_bits=4.25),
    "gwq": QuantConfig(method="gwq", wbits=4),
    "opq": QuantConfig(method="bof4s", opq=True, opq_quantile=0.9),
    "nf4": QuantConfig(method="nf4"),
    "int4": QuantConfig(method="rtn", wbits=4),
}
_CACHE: dict[tuple[str, int], torch.nn.Module] = {}


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_registered():
    """The CI box has 2 shared cores: one thread per test process is much faster than oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    register_wct_peft()
    yield
    torch.set_num_threads(threads)


def quantized(kind: str, seed: int = 0) -> torch.nn.Module:
    """A fresh copy of a quantized tiny Llama (quantized once per module)."""
    key = (kind, seed)
    if key not in _CACHE:
        cfg = CONFIGS[kind]
        _CACHE[key] = quantize_model(make_tiny_llama(seed=seed), cfg, calibration=CAL if cfg.calibrated else None,
                                     progress=False)
    return copy.deepcopy(_CACHE[key])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=BATCH).logits


def quant_layers(model) -> dict[str, QuantLinear]:
    return {n.replace(".base_layer", "").removeprefix("base_model.model."): m
            for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def base_checksums(model) -> dict[str, str]:
    """sha256 of every base tensor (packed buffers, outlier values, norms, embeddings), adapter tensors excluded."""
    out = {}
    for name, t in model.state_dict().items():
        if ".wct_" in name or ".lora_" in name:
            continue
        key = name.replace(".base_layer", "").removeprefix("base_model.model.")
        out[key] = hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
    return out


def train(model, steps: int = 30, lr: float = 1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=BATCH, labels=BATCH).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses, opt


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An OWQ base tuned for 30 steps, saved; shared by the tests that only read it."""
    base = quantized("owq")
    before = base_checksums(base)
    base_logits = logits(base)
    pm = get_peft_model(base, WCTConfig(task_type="CAUSAL_LM"))
    init_logits = logits(pm)
    losses, opt = train(pm)
    out = tmp_path_factory.mktemp("wct_adapter")
    pm.save_pretrained(out)
    return {"model": pm, "dir": str(out), "losses": losses, "opt": opt, "before": before,
            "base_logits": base_logits, "init_logits": init_logits, "tuned": logits(pm)}


# --- shapes ----------------------------------------------------------------------------------------------------------
def test_trainable_parameters_are_the_weak_columns(trained):
    pm = trained["model"]
    layers = quant_layers(pm)
    expected = sum(m.n_weak * m.out_features for m in layers.values())
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert expected > 0 and sum(p.numel() for p in trainable.values()) == expected
    assert all(".wct_col_values." in n for n in trainable)
    wrapped = {n for n, m in pm.named_modules() if isinstance(m, WCTLayer)}
    assert len(wrapped) == sum(m.n_weak > 0 for m in layers.values())
    assert not isinstance(pm.get_base_model().lm_head, WCTLayer)
    # zero change at initialisation: the adapter starts from the base's own values
    assert torch.equal(trained["init_logits"], trained["base_logits"])


def test_outliers_over_gwq_train_the_sparse_values():
    base = quantized("gwq")
    nnz = sum(m.nnz for m in quant_layers(base).values())
    pm = get_peft_model(base, WCTConfig(trainable="outliers"))
    trainable = [p for n, p in pm.named_parameters() if p.requires_grad]
    assert nnz > 0 and sum(p.numel() for p in trainable) == nnz
    losses, _ = train(pm, steps=10)
    assert losses[-1] < losses[0]


def test_outliers_over_opq_base_count_nnz():
    base = quantized("opq")
    nnz = sum(m.nnz for m in quant_layers(base).values())
    pm = get_peft_model(base, WCTConfig(trainable="outliers"))
    assert nnz > 0 and sum(p.numel() for p in pm.parameters() if p.requires_grad) == nnz


def test_all_trains_columns_and_outliers_and_merges_exactly():
    base = quantized("opq")
    create_weak_columns(base, 2, calibration=CAL, progress=False)
    layers = quant_layers(base)
    expected = sum(m.n_weak * m.out_features + m.nnz for m in layers.values())
    pm = get_peft_model(base, WCTConfig(trainable="all"))
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == expected
    losses, _ = train(pm, steps=8)
    assert losses[-1] < losses[0]
    kinds = {n.split(".wct_")[1].split(".")[0] for n, p in pm.named_parameters() if p.requires_grad}
    assert kinds == {"col_values", "sparse_values"}
    tuned = logits(pm)
    assert torch.equal(logits(pm.merge_and_unload()), tuned)


# --- training --------------------------------------------------------------------------------------------------------
def test_training_lowers_loss_and_changes_only_adapter_values(trained):
    losses = trained["losses"]
    assert losses[-1] < losses[0] - 0.05
    pm = trained["model"]
    assert base_checksums(pm) == trained["before"]
    adapter = {id(p) for n, p in pm.named_parameters() if ".wct_col_values." in n}
    assert set(map(id, trained["opt"].state)) == adapter  # optimizer state exists for adapter values only
    assert not torch.equal(trained["tuned"], trained["base_logits"])


def test_gradient_checkpointing_step_matches_plain_step():
    def grads(checkpointing: bool):
        base = quantized("owq")
        if checkpointing:
            prepare_for_training(base, use_gradient_checkpointing=True)
            assert base.is_gradient_checkpointing
        pm = get_peft_model(base, WCTConfig())
        pm.train()
        pm(input_ids=BATCH, labels=BATCH).loss.backward()
        return {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and plain
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], atol=1e-6, rtol=1e-4), n
    assert any(g.abs().sum() > 0 for g in ckpt.values())


def test_modules_to_save_train_and_round_trip(tmp_path):
    pm = get_peft_model(quantized("owq"), WCTConfig(modules_to_save=["model.norm"]))
    names = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert any("model.norm.modules_to_save" in n for n in names)
    train(pm, steps=3)
    tuned = logits(pm)
    pm.save_pretrained(tmp_path)
    assert torch.equal(logits(load_adapter(quantized("owq"), tmp_path)), tuned)


# --- save / load -----------------------------------------------------------------------------------------------------
def test_save_load_round_trip_is_exact(trained):
    files = set(os.listdir(trained["dir"]))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    cfg = json.load(open(os.path.join(trained["dir"], "adapter_config.json")))
    assert cfg["peft_type"] == WCT_STORED_PEFT_TYPE and len(cfg["base_fingerprint"]) == 64
    keys = load_file(os.path.join(trained["dir"], "adapter_model.safetensors")).keys()
    assert any(k.endswith(".wct_col_idx") for k in keys) and any(k.endswith(".wct_col_values") for k in keys)
    loaded = PeftModel.from_pretrained(quantized("owq"), trained["dir"])
    assert torch.equal(logits(loaded), trained["tuned"])
    checked = load_adapter(quantized("owq"), trained["dir"], is_trainable=True)
    assert torch.equal(logits(checked), trained["tuned"])
    assert any(p.requires_grad for p in checked.parameters())


def test_load_adapter_registers_wct_itself(trained):
    saved = {m: getattr(mapping, m).pop("WCT") for m in
             ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING")}
    try:
        with pytest.raises(KeyError):  # what a bare PEFT call gives without `import wct`
            PeftModel.from_pretrained(quantized("owq"), trained["dir"])
        assert torch.equal(logits(load_adapter(quantized("owq"), trained["dir"])), trained["tuned"])
    finally:
        for m, v in saved.items():
            getattr(mapping, m)["WCT"] = v


# --- merging ---------------------------------------------------------------------------------------------------------
def test_merge_unmerge_are_exact(trained):
    pm = load_adapter(quantized("owq"), trained["dir"])
    before = base_checksums(pm)
    pm.base_model.merge_adapter()
    assert torch.equal(logits(pm), trained["tuned"])  # the forward already used the fp16-rounded values
    assert base_checksums(pm) != before
    pm.base_model.unmerge_adapter()
    assert base_checksums(pm) == before
    with pm.disable_adapter():
        assert torch.equal(logits(pm), trained["base_logits"])


def test_merged_packed_checkpoint_reloads_with_the_same_logits(trained, tmp_path):
    pm = load_adapter(quantized("owq"), trained["dir"])
    merged = pm.merge_and_unload()
    assert all(isinstance(m, QuantLinear) for m in quant_layers(merged).values())
    assert not any(isinstance(m, WCTLayer) for m in merged.modules())
    assert torch.equal(logits(merged), trained["tuned"])
    save_pretrained(merged, tmp_path / "merged")
    reloaded = load_quantized(tmp_path / "merged")
    assert torch.equal(logits(reloaded), trained["tuned"])


# --- creating weak columns -------------------------------------------------------------------------------------------
def test_create_columns_from_the_config_over_nf4(tmp_path):
    base = quantized("nf4")
    pm = get_peft_model(base, WCTConfig(create_columns=4))
    layers = quant_layers(pm)
    assert all(m.n_weak == 4 for m in layers.values())
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == 4 * sum(m.out_features for m in layers.values())
    assert base.wct_quantization["layers"]["model.layers.0.self_attn.q_proj"]["n_weak"] == 4
    train(pm, steps=3)
    tuned = logits(pm)
    pm.save_pretrained(tmp_path)
    # loading re-splits the same columns of a fresh nf4 base (deterministic), then checks them against the file
    assert torch.equal(logits(PeftModel.from_pretrained(quantized("nf4"), tmp_path)), tuned)


def test_create_weak_columns_with_calibration():
    base = quantized("nf4")
    ref = logits(base)
    chosen = create_weak_columns(base, {"q_proj": 4, "down_proj": 6}, calibration=CAL, progress=False)
    assert set(chosen) == {f"model.layers.{i}.{p}" for i in (0, 1) for p in ("self_attn.q_proj", "mlp.down_proj")}
    layers = quant_layers(base)
    assert layers["model.layers.0.mlp.down_proj"].n_weak == 6 and layers["model.layers.0.self_attn.k_proj"].n_weak == 0
    out = logits(base)  # blocks realign: a small requantization of the rest of the base
    assert (out - ref).pow(2).mean().sqrt() < 0.05 * ref.pow(2).mean().sqrt()
    with pytest.raises(ValueError, match="needs calibration"):
        create_weak_columns(quantized("nf4"), 4, score="activation", progress=False)


def test_split_is_exact_for_per_channel_integers_and_scores_are_sane():
    layer = next(iter(quant_layers(quantized("int4")).values()))
    err = expected_quant_error(layer)
    assert err.shape == (layer.in_features,) and bool((err > 0).all())
    cols = torch.tensor([3, 17, 40])
    new = split_weak_columns(layer, cols)
    assert new.n_weak == 3 and new.quantized_base().shape == (layer.out_features, layer.in_features - 3)
    # the packed codes and scales are kept; only the split columns are rounded to their fp16 storage
    assert torch.allclose(new.dequantize_weight(), layer.dequantize_weight(), rtol=1e-3, atol=0)


# --- errors ----------------------------------------------------------------------------------------------------------
def test_a_base_without_weak_columns_says_how_to_get_them():
    with pytest.raises(ValueError, match="create_columns"):
        get_peft_model(quantized("nf4"), WCTConfig())
    with pytest.raises(ValueError, match="create_weak_columns"):
        WCTConfig(create_columns=2, create_score="hessian_error")
    with pytest.raises(ValueError, match="trainable"):
        WCTConfig(trainable="everything")


def test_wrong_base_is_refused(trained, tmp_path):
    other = quantized("owq", seed=1)
    with pytest.raises(ValueError, match="adapter was trained on a different base"):
        PeftModel.from_pretrained(other, trained["dir"])
    # without a fingerprint, the saved indices still catch a base with other weak columns
    shutil.copy(os.path.join(trained["dir"], "adapter_model.safetensors"), tmp_path)
    cfg = json.load(open(os.path.join(trained["dir"], "adapter_config.json")))
    cfg["base_fingerprint"] = None
    json.dump(cfg, open(tmp_path / "adapter_config.json", "w"))
    with pytest.raises(ValueError, match="adapter was trained on a different base"):
        PeftModel.from_pretrained(other, tmp_path)


@pytest.mark.filterwarnings("ignore:Found missing adapter keys")
def test_missing_or_corrupt_adapter_files_are_clear_errors(trained, tmp_path):
    src = trained["dir"]
    weights = open(os.path.join(src, "adapter_model.safetensors"), "rb").read()

    def adapter_dir(name, config=True, blob=weights):
        d = tmp_path / name
        d.mkdir()
        if config:
            shutil.copy(os.path.join(src, "adapter_config.json"), d)
        if blob is not None:
            (d / "adapter_model.safetensors").write_bytes(blob)
        return d

    with pytest.raises(ValueError, match="no adapter weights"):
        load_adapter(quantized("owq"), adapter_dir("no_weights", blob=None))
    with pytest.raises(ValueError, match="has no adapter_config.json"):
        load_adapter(quantized("owq"), adapter_dir("no_config", config=False))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_adapter(quantized("owq"), adapter_dir("truncated", blob=weights[:-64]))
    bad_json = adapter_dir("bad_json")
    (bad_json / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json is corrupt"):
        load_adapter(quantized("owq"), bad_json)
    tensors = load_file(os.path.join(src, "adapter_model.safetensors"))
    del tensors[next(k for k in tensors if k.endswith("wct_col_values"))]
    partial = adapter_dir("partial", blob=None)
    save_file(tensors, partial / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="lacks 1 of the adapter's"):
        load_adapter(quantized("owq"), partial)


def test_only_one_wct_adapter_may_be_active(trained):
    pm = load_adapter(quantized("owq"), trained["dir"])
    pm.load_adapter(trained["dir"], adapter_name="other")
    pm.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="only one can be active"):
        logits(pm)
    pm.set_adapter("other")
    assert torch.equal(logits(pm), trained["tuned"])
