"""quant_method="wct" in transformers: save → from_pretrained round trips, checks on corrupt files, atomic save.

Quantized tiny models and their checkpoints are built once per module (quantizing is
the slow part) and only read by the tests; tests that tamper with files copy them first.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_opt
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.trainer_utils import validate_quantization_for_training

import wct  # noqa: F401  (registers quant_method="wct")
import wct.integrations.checkpoint as hf_checkpoint
import wct.integrations.transformers as hf
from wct.formats import CodebookFormat, IntegerFormat
from wct.integrations import (
    WCTHfQuantizer,
    WCTQuantizationConfig,
    load_quantized,
    quantize_model,
    save_pretrained,
    sync_quantization,
)
from wct.nn import QuantLinear
from wct.nn.model_utils import set_module
from wct.quantize import QuantConfig
from wct.quantize.api import QUANT_ATTR

CASES = {
    "rtn-int4-g32": QuantConfig(method="rtn", wbits=4, group_size=32),
    "rtn-int3": QuantConfig(method="rtn", wbits=3),
    "nf4": QuantConfig(method="nf4"),
    "bof4s-opq": QuantConfig(method="bof4s", opq=True),
    "owq": QuantConfig(method="owq", wbits=3, target_bits=3.1),
    "gwq": QuantConfig(method="gwq", wbits=3),
}
ARCHS = {"llama": make_tiny_llama, "opt": make_tiny_opt}
ROUND_TRIPS = [("llama", c) for c in CASES] + [("opt", "rtn-int4-g32"), ("opt", "bof4s-opq")]
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: with the 2 shared cores busy, 2 intra-op threads make the solvers ~25x slower than 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Built:
    """A quantized in-memory model, its reference logits and its saved checkpoint."""

    def __init__(self, model, logits, path):
        self.model, self.logits, self.path = model, logits, path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache: dict[tuple[str, str], Built] = {}

    def get(arch: str, case: str) -> Built:
        if (arch, case) not in cache:
            model = ARCHS[arch]()
            cfg = CASES[case]
            calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0)) if cfg.calibrated else None
            quantize_model(model, cfg, calibration=calib, progress=False)
            with torch.no_grad():
                logits = model(IDS).logits
            path = save_pretrained(model, tmp_path_factory.mktemp(f"{arch}-{case}") / "ckpt")
            cache[arch, case] = Built(model, logits, path)
        return cache[arch, case]

    return get


def bits_of(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def copy_ckpt(src: str, dst, keep_manifest: bool = False) -> str:
    """A copy to tamper with; without its checksum manifest (as if edited by a third-party tool) unless asked,
    so that the structural checks, not the sha256, are what a test exercises."""
    shutil.copytree(src, dst)
    if not keep_manifest:
        os.remove(os.path.join(dst, "wct_manifest.json"))
    return str(dst)


def rewrite(path: str, fn) -> None:
    """Load model.safetensors, let ``fn`` edit the dict, write it back (keeping the metadata)."""
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def first_with(model, attr: str) -> tuple[str, QuantLinear]:
    return next((n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear) and getattr(m, attr))


# --- round trips --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,case", ROUND_TRIPS, ids=[f"{a}-{c}" for a, c in ROUND_TRIPS])
def test_round_trip_is_bit_exact_and_never_requantizes(built, arch, case, monkeypatch):
    b = built(arch, case)

    def no_quantize(*args, **kwargs):
        raise AssertionError("loading must not quantize")

    for target in (IntegerFormat, CodebookFormat):
        monkeypatch.setattr(target, "quantize", no_quantize)
    monkeypatch.setattr(QuantLinear, "from_linear", classmethod(no_quantize))

    loaded, info = AutoModelForCausalLM.from_pretrained(b.path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert isinstance(loaded.hf_quantizer, WCTHfQuantizer) and loaded.is_quantized
    assert loaded.quantization_method == "wct"

    specs = {n: m.spec() for n, m in b.model.named_modules() if isinstance(m, QuantLinear)}
    got = {n: m.spec() for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert got == specs and specs
    ref_sd, new_sd = b.model.state_dict(), loaded.state_dict()
    assert set(ref_sd) == set(new_sd)
    for k, t in ref_sd.items():
        assert new_sd[k].dtype == t.dtype and new_sd[k].shape == t.shape, k
        assert bits_of(new_sd[k]) == bits_of(t), k
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, b.logits)
    assert getattr(loaded, QUANT_ATTR)["layers"] == specs
    saved = json.load(open(os.path.join(b.path, "config.json")))["quantization_config"]
    assert saved["quant_method"] == "wct" and saved["layers"] == specs
    assert saved["quant_config"] == CASES[case].to_dict() and saved["format_version"] == hf.FORMAT_VERSION


def test_biases_and_outliers_are_covered(built):
    opt = built("opt", "bof4s-opq").model
    assert all(m.bias is not None for m in opt.modules() if isinstance(m, QuantLinear))
    assert any(m.nnz for m in opt.modules() if isinstance(m, QuantLinear))
    assert any(m.n_weak for m in built("llama", "owq").model.modules() if isinstance(m, QuantLinear))
    assert any(m.nnz for m in built("llama", "gwq").model.modules() if isinstance(m, QuantLinear))


def test_resave_of_a_loaded_model_round_trips(built, tmp_path):
    b = built("llama", "owq")
    loaded = load_quantized(b.path)
    again = load_quantized(save_pretrained(loaded, tmp_path / "again"))
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, b.logits)
    a = json.load(open(os.path.join(b.path, "config.json")))["quantization_config"]
    assert json.load(open(tmp_path / "again" / "config.json"))["quantization_config"] == a


@pytest.mark.parametrize("case", ["rtn-int4-g32", "bof4s-opq", "owq", "gwq"])
def test_file_size_matches_bit_accounting(built, case):
    b = built("llama", case)
    model = b.model
    expected = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            expected += m.nbytes + (m.bias.numel() * m.bias.element_size() if m.bias is not None else 0)
    quant_ids = {id(t) for m in model.modules() if isinstance(m, QuantLinear) for _, t in m.named_storage()}
    expected += sum(p.numel() * p.element_size() for p in model.parameters()  # tied lm_head counted once
                    if id(p) not in quant_ids)
    persistent = set(model.state_dict(keep_vars=True))
    expected += sum(t.numel() * t.element_size() for n, t in model.named_buffers()
                    if id(t) not in quant_ids and n in persistent)
    size = os.path.getsize(os.path.join(b.path, "model.safetensors"))
    assert 0 <= size - expected < 64 * 1024, (size, expected)


def test_keep_in_fp32_modules_dtype_is_restored(built, monkeypatch):
    """Architectures may force modules to fp32 on load; fp16 buffers must come back as fp16, bit for bit."""
    b = built("llama", "owq")
    monkeypatch.setattr(LlamaForCausalLM, "_keep_in_fp32_modules_strict", ["mlp.down_proj"], raising=False)
    loaded = AutoModelForCausalLM.from_pretrained(b.path, dtype=torch.bfloat16)
    for name, m in b.model.named_modules():
        if isinstance(m, QuantLinear) and name.endswith("down_proj"):
            got = loaded.get_submodule(name)
            for buf, t in m.named_storage():
                assert getattr(got, buf).dtype == t.dtype and bits_of(getattr(got, buf)) == bits_of(t), (name, buf)


@pytest.mark.skipif(
    QuantLinear._apply is torch.nn.Module._apply, reason="needs the QuantLinear._apply dtype guard (see report)"
)
def test_model_to_bf16_keeps_packed_buffers(built):
    b = built("llama", "bof4s-opq")
    loaded = load_quantized(b.path)
    loaded.to(torch.bfloat16)
    for name, m in b.model.named_modules():
        if isinstance(m, QuantLinear):
            for buf, t in m.named_storage():
                assert bits_of(getattr(loaded.get_submodule(name), buf)) == bits_of(t), (name, buf)


def test_dequantize_gives_dense_linears(built):
    b = built("opt", "bof4s-opq")
    loaded = load_quantized(b.path)
    loaded.dequantize()
    assert not any(isinstance(m, QuantLinear) for m in loaded.modules())
    assert getattr(loaded, "quantization_config", None) is None and not loaded.is_quantized
    with torch.no_grad():
        assert torch.allclose(loaded(IDS).logits, b.logits, atol=1e-4)


# --- config and flags ---------------------------------------------------------------------------------------------
def test_config_json_round_trip_and_version_gate(built):
    qc = built("llama", "gwq").model.config.quantization_config
    d = json.loads(json.dumps(qc.to_dict()))
    again = WCTQuantizationConfig.from_dict(d)
    assert again.to_dict() == qc.to_dict()
    assert again.to_quant_config() == CASES["gwq"]
    with pytest.raises(ValueError, match="upgrade wct"):
        WCTQuantizationConfig.from_dict({**d, "format_version": hf.FORMAT_VERSION + 1})
    with pytest.raises(ValueError, match="no 'format'"):
        WCTQuantizationConfig(layers={"x": {"n_weak": 0}})


def test_from_pretrained_of_a_float_model_refuses_to_quantize(tmp_path):
    make_tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pre-quantized"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=WCTQuantizationConfig())


def test_trainer_gate_needs_an_adapter(built):
    model = built("llama", "rtn-int4-g32").model
    assert model.hf_quantizer.is_trainable and not model.hf_quantizer.is_qat_trainable
    with pytest.raises(ValueError, match="attach trainable adapters"):
        validate_quantization_for_training(model)


def test_tied_lm_head_is_refused_before_quantizing():
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="tied"):
        quantize_model(model, QuantConfig(method="rtn", include_lm_head=True), progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_sync_after_merge_writes_dense_layers_densely(tmp_path):
    model = quantize_model(make_tiny_llama(), QuantConfig(method="rtn", wbits=4, group_size=32), progress=False)
    name = "model.layers.0.self_attn.q_proj"
    q = model.get_submodule(name)
    dense = torch.nn.Linear(q.in_features, q.out_features, bias=False)  # what merge_and_unload produces
    with torch.no_grad():
        dense.weight.copy_(q.dequantize_weight())
    set_module(model, name, dense)
    sync_quantization(model)
    assert name not in model.config.quantization_config.layers
    with torch.no_grad():
        ref = model(IDS).logits
    loaded = load_quantized(save_pretrained(model, tmp_path / "mixed"))
    assert type(loaded.get_submodule(name)) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, ref)

    for n, m in list(model.named_modules()):  # everything merged: a plain model again
        if isinstance(m, QuantLinear):
            lin = torch.nn.Linear(m.in_features, m.out_features, bias=False)
            with torch.no_grad():
                lin.weight.copy_(m.dequantize_weight())
            set_module(model, n, lin)
    sync_quantization(model)
    assert not model.is_quantized and getattr(model, "hf_quantizer", None) is None
    out = save_pretrained(model, tmp_path / "plain")
    assert "quantization_config" not in json.load(open(os.path.join(out, "config.json")))


# --- corrupt and mismatched checkpoints ---------------------------------------------------------------------------
def test_wrong_buffer_shape_names_module_and_buffer(built, tmp_path):
    path = copy_ckpt(built("llama", "rtn-int4-g32").path, tmp_path / "c")
    key = "model.layers.1.mlp.up_proj.scales"
    rewrite(path, lambda t: t.__setitem__(key, t[key][:, :-1].contiguous()))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj: buffer 'scales'"):
        AutoModelForCausalLM.from_pretrained(path)


def test_missing_buffer_and_stale_layer_table(built, tmp_path):
    path = copy_ckpt(built("llama", "gwq").path, tmp_path / "missing")
    rewrite(path, lambda t: t.pop("model.layers.0.mlp.down_proj.sp_values"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj: buffer 'sp_values' is missing"):
        AutoModelForCausalLM.from_pretrained(path)

    path = copy_ckpt(built("llama", "nf4").path, tmp_path / "stale")
    cfg_file = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_file))
    del cfg["quantization_config"]["layers"]["model.layers.1.self_attn.o_proj"]
    json.dump(cfg, open(cfg_file, "w"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj.*does not list"):
        AutoModelForCausalLM.from_pretrained(path)


def test_column_index_out_of_range_names_module(built, tmp_path):
    b = built("llama", "owq")
    name, m = first_with(b.model, "n_weak")
    path = copy_ckpt(b.path, tmp_path / "c")

    def flip(t):
        t[f"{name}.col_idx"][-1] = m.in_features

    rewrite(path, flip)
    with pytest.raises(ValueError, match=rf"{name}: column outlier index out of range"):
        AutoModelForCausalLM.from_pretrained(path)


def test_sparse_index_out_of_range_names_module(built, tmp_path):
    b = built("opt", "bof4s-opq")
    name, m = first_with(b.model, "nnz")
    path = copy_ckpt(b.path, tmp_path / "c")

    def flip(t):
        t[f"{name}.sp_cols"][0] = m.in_features + 3

    rewrite(path, flip)
    with pytest.raises(ValueError, match=rf"{name}: sparse outlier column index out of range"):
        load_quantized(path)


@pytest.mark.parametrize("keep", [4, 100, -64])
def test_truncated_file_is_a_clear_error(built, tmp_path, keep):
    path = copy_ckpt(built("llama", "rtn-int3").path, tmp_path / "c")
    f = os.path.join(path, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(keep if keep > 0 else size + keep)
    with pytest.raises(ValueError, match="truncated"):
        load_quantized(path)


# --- atomic save ----------------------------------------------------------------------------------------------------
def test_save_refuses_non_empty_dir_and_overwrites_on_request(built, tmp_path):
    a, b = built("llama", "rtn-int3"), built("llama", "nf4")
    out = tmp_path / "out"
    out.mkdir()  # an existing empty directory is fine
    save_pretrained(a.model, out)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pretrained(b.model, out)
    with torch.no_grad():
        assert torch.equal(load_quantized(out)(IDS).logits, a.logits)
    save_pretrained(b.model, out, overwrite=True)
    with torch.no_grad():
        assert torch.equal(load_quantized(out)(IDS).logits, b.logits)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp or old copies left


def test_crash_mid_save_keeps_previous_copy(built, tmp_path, monkeypatch):
    a, b = built("llama", "rtn-int3"), built("llama", "nf4")
    out = tmp_path / "out"
    save_pretrained(a.model, out)
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    real_save = type(b.model).save_pretrained

    def crash(self, directory, **kwargs):
        real_save(self, directory, **kwargs)
        with open(os.path.join(directory, "model.safetensors"), "r+b") as fh:
            fh.truncate(1000)  # half-written weights, then the process dies
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(type(b.model), "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(b.model, out, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before


def test_tokenizer_is_saved_with_the_model(built, tmp_path):
    class Tok:
        def save_pretrained(self, d):
            open(os.path.join(d, "tokenizer.json"), "w").write("{}")

    out = save_pretrained(built("llama", "nf4").model, tmp_path / "t", tokenizer=Tok())
    assert {"tokenizer.json", "config.json", "model.safetensors"} <= set(os.listdir(out))


# --- loading guards -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("drop_config", [False, True])
def test_missing_registration_says_import_wct(built, monkeypatch, drop_config):
    path = built("llama", "nf4").path
    monkeypatch.delitem(AUTO_QUANTIZER_MAPPING, "wct")
    if drop_config:
        monkeypatch.delitem(AUTO_QUANTIZATION_CONFIG_MAPPING, "wct")
    with pytest.raises(RuntimeError, match="import wct"):
        load_quantized(path)


def test_model_loaded_without_quantizer_is_rejected(built, monkeypatch):
    """Remote repos cannot be checked before loading; the loaded model is checked instead."""
    path = built("llama", "nf4").path
    monkeypatch.delitem(AUTO_QUANTIZER_MAPPING, "wct")
    monkeypatch.delitem(AUTO_QUANTIZATION_CONFIG_MAPPING, "wct")
    monkeypatch.setattr(hf_checkpoint, "is_registered", lambda: True)  # the pre-load check passes; the post-load one must not
    with pytest.raises(RuntimeError, match="import wct"):
        load_quantized(path)


def test_pickle_checkpoints_are_refused(built, tmp_path):
    path = tmp_path / "pickled"
    path.mkdir()
    shutil.copy(os.path.join(built("llama", "nf4").path, "config.json"), path)
    (path / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(ValueError, match="pickle"):
        load_quantized(path)
    with pytest.raises(ValueError, match="safetensors checkpoints only"):
        load_quantized(built("llama", "nf4").path, use_safetensors=False)
