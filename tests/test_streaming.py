"""Calibration past one device: blocks offloaded to a calibration device, and dense checkpoints streamed from disk.

Both must give the packed model the plain run gives, bit for bit; on CPU the "calibration device" is the CPU, so
a spy on the one place blocks move (``wct.quantize.offload.move_block``) shows the blocks travel.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_opt

import wct
from wct.nn import QuantLinear
from wct.quantize import QuantConfig, quantize_modules, streaming
from wct.quantize import offload as offload_mod


def _cfg(method="gptq", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # owq's default target_bits
        return QuantConfig(method=method, wbits=4, group_size=32, **kw)


def _calib(vocab=128, n=4, seq=16, seed=0):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _packed(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _spy_moves(monkeypatch):
    moves = []
    real = offload_mod.move_block

    def spy(block, device):
        moves.append((id(block), torch.device(device)))
        real(block, device)

    monkeypatch.setattr(offload_mod, "move_block", spy)
    monkeypatch.setattr(streaming, "move_block", spy)
    return moves


# --------------------------------------------------------------------------------------------- offload
@pytest.mark.parametrize("method", ["gptq", "owq"])
def test_offload_equals_plain_run_and_moves_each_block_there_and_back(monkeypatch, method):
    calib = _calib()
    plain = quantize_modules(make_tiny_llama(), _cfg(method), calib, progress=False)
    moves = _spy_moves(monkeypatch)
    seen = []
    real_enter = offload_mod.Offload.enter

    def enter(self, index, prefix, block):
        real_enter(self, index, prefix, block)
        seen.append((prefix, {t.device for t in block.parameters()}))

    monkeypatch.setattr(offload_mod.Offload, "enter", enter)
    model = make_tiny_llama()
    blocks = list(model.model.layers)
    off = quantize_modules(model, _cfg(method, calibration_device="cpu"), calib, progress=False)
    _assert_same(_packed(plain), _packed(off))
    # each block: to the calibration device, then back home, in order
    assert moves == [m for b in blocks for m in ((id(b), torch.device("cpu")), (id(b), torch.device("cpu")))]
    assert [p for p, _ in seen] == ["model.layers.0", "model.layers.1"]
    assert all(devs == {torch.device("cpu")} for _, devs in seen)


def test_offload_reaches_the_config_and_stays_out_of_the_record():
    cfg = _cfg(calibration_device="cuda:0")
    assert cfg.calibration_device == "cuda:0"
    assert "calibration_device" not in cfg.to_dict()
    assert QuantConfig.from_dict(cfg.to_dict()).calibration_device is None
    with pytest.raises(ValueError, match="is not a device"):
        _cfg(calibration_device="gpu0")


def test_offload_to_a_missing_cuda_device_is_refused_with_the_fix():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        quantize_modules(make_tiny_llama(), _cfg(calibration_device="cuda"), _calib(), progress=False)


def test_calibration_device_flag_is_generated():
    import argparse

    from wct.quantize.options import add_quant_arguments, config_from_namespace

    p = argparse.ArgumentParser()
    add_quant_arguments(p)
    ns = p.parse_args(["--method", "gptq", "--calibration-device", "cpu"])
    assert config_from_namespace(ns).calibration_device == "cpu"


# --------------------------------------------------------------------------------------------- streaming
def _save(model, path):
    model.save_pretrained(path)  # safetensors
    return path


@pytest.mark.parametrize("method", ["gptq", "owq"])
def test_streaming_equals_quantizing_the_loaded_model(tmp_path, method):
    from transformers import AutoModelForCausalLM

    folder = _save(make_tiny_llama(seed=3), tmp_path / "dense")
    calib = _calib()
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ref = wct.quantize_model(loaded, _cfg(method), calib, progress=False)
    got = wct.quantize_model(str(folder), _cfg(method), calib, progress=False, dtype=torch.float32)
    assert isinstance(got.model.layers[1].mlp.down_proj, QuantLinear)
    assert not any(t.is_meta for t in got.state_dict().values())
    _assert_same(_packed(ref), _packed(got))
    assert got.config.quantization_config.layers == ref.config.quantization_config.layers
    assert got.generation_config.to_dict() == loaded.generation_config.to_dict()
    x = _calib(n=2, seed=1)
    wct.save_pretrained(got, tmp_path / "packed")
    back = wct.load_quantized(tmp_path / "packed")
    with torch.no_grad():
        assert torch.equal(ref(x).logits, got(x).logits)
        assert torch.equal(ref(x).logits, back(x).logits)


def test_streaming_reads_each_block_once_in_order_and_holds_no_later_block(tmp_path, monkeypatch):
    folder = _save(make_tiny_llama(seed=1, layers=3), tmp_path / "dense")
    states = []
    real = streaming.CheckpointBlocks.enter

    def enter(self, index, prefix, block):
        model_blocks = self.model_blocks
        states.append([all(t.is_meta for t in b.parameters() if t.dim() >= 2) for b in model_blocks])
        real(self, index, prefix, block)

    real_open = streaming.open_checkpoint

    def open_checkpoint(*a, **k):
        model, placement = real_open(*a, **k)
        placement.model_blocks = list(model.model.layers)
        return model, placement

    monkeypatch.setattr(streaming.CheckpointBlocks, "enter", enter)
    monkeypatch.setattr(streaming, "open_checkpoint", open_checkpoint)
    wct.quantize_model(folder, _cfg(), _calib(), progress=False, dtype=torch.float32)
    # before block i is read: the blocks after it are still on the meta device, the ones before are packed
    assert states == [[True, True, True], [False, True, True], [False, False, True]]


def test_streaming_opt_with_rtn_and_gptq_and_a_cpu_calibration_device(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    folder = _save(make_tiny_opt(seed=2), tmp_path / "opt")
    moves = _spy_moves(monkeypatch)
    for cfg in (QuantConfig(method="rtn", wbits=4, group_size=32, calibration_device="cpu"),
                _cfg("gptq", calibration_device="cpu")):
        ref = wct.quantize_model(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
                                 QuantConfig.from_dict(cfg.to_dict()), _calib(), progress=False)
        got = wct.quantize_model(folder, cfg, _calib(), progress=False, dtype="float32")
        _assert_same(_packed(ref), _packed(got))
    assert moves == []  # read on the CPU, calibrated on the CPU: nothing moves


def test_streaming_refusals(tmp_path):
    with pytest.raises(ValueError, match="looks like a hub id.*Download it first"):
        wct.quantize_model("someorg/somemodel", _cfg(), _calib(), progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        wct.quantize_model(str(tmp_path / "nothere"), _cfg(), _calib(), progress=False)
    model = make_tiny_llama()
    folder = tmp_path / "bin"
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no \.safetensors files \(found pytorch_model\.bin\).*never pickle"):
        wct.quantize_model(folder, _cfg(), _calib(), progress=False)
    dense = _save(make_tiny_llama(), tmp_path / "dense")
    with pytest.raises(ValueError, match="GWQ .* cannot stream from disk"):
        wct.quantize_model(dense, _cfg("gwq"), _calib(), progress=False)
    packed = tmp_path / "packed"
    wct.save_pretrained(wct.quantize_model(make_tiny_llama(), _cfg(), _calib(), progress=False), packed)
    with pytest.raises(ValueError, match="already quantized"):
        wct.quantize_model(packed, _cfg(), _calib(), progress=False)


def test_streaming_names_a_missing_block_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    dense = _save(make_tiny_llama(), tmp_path / "dense")
    f = dense / "model.safetensors"
    sd = load_file(f)
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks model\.layers\.1\.mlp\.up_proj\.weight"):
        wct.quantize_model(dense, _cfg(), _calib(), progress=False)
