"""Resource limits and numerical hygiene: fail early, with numbers and layer names."""

import json
import os
import struct
import warnings

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_opt

from wct import resources
from wct.actquant import ActQuantConfig, quantize_activations
from wct.formats import get_format
from wct.integrations.transformers import WCTCheckpointError, load_quantized, save_pretrained
from wct.nn import QuantLinear
from wct.nn.model_utils import NonFiniteError
from wct.quantize import QuantConfig
from wct.quantize import blockwise as blockwise_mod
from wct.quantize import gwq as gwq_mod
from wct.quantize import quantize_modules as quantize_model
from wct.quantize.gptq import GPTQ

CALIB = torch.randint(8, 128, (16, 32), generator=torch.Generator().manual_seed(0))  # token 7 never occurs


def fake_memory(monkeypatch, *values):
    """Make ``available_memory_bytes`` return ``values`` in turn (the last one forever after)."""
    calls = []

    def available(device=None):
        calls.append(device)
        return values[min(len(calls), len(values)) - 1]

    monkeypatch.setattr(resources, "available_memory_bytes", available)
    return calls


def no_quantlinear(model) -> bool:
    return not any(isinstance(m, QuantLinear) for m in model.modules())


# --- resources.py ------------------------------------------------------------------------------------------------------
def test_available_memory_env_and_meminfo_fallback(monkeypatch, tmp_path):
    monkeypatch.delenv(resources.FAKE_ENV, raising=False)
    assert resources.available_memory_bytes() > 0
    assert resources.available_memory_bytes("meta") is None  # unknown device: no check
    monkeypatch.setenv(resources.FAKE_ENV, "12345")
    assert resources.available_memory_bytes() == 12345
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:  1000 kB\nMemAvailable:   2048 kB\n")
    assert resources._meminfo_available(str(f)) == 2048 * 1024
    assert resources._meminfo_available(str(tmp_path / "absent")) is None


def test_check_memory_message_and_skip_switch(monkeypatch):
    fake_memory(monkeypatch, 100 * 2**20)
    resources.check_memory(50 * 2**20, "small")  # fits
    with pytest.raises(resources.InsufficientMemoryError) as e:
        resources.check_memory(3 * 2**30, "the thing")
    assert isinstance(e.value, MemoryError)
    msg = str(e.value)
    assert "the thing" in msg and "3.0 GiB" in msg and "100.0 MiB" in msg
    assert "fewer calibration samples" in msg and resources.SKIP_ENV in msg
    monkeypatch.setenv(resources.SKIP_ENV, "1")
    resources.check_memory(3 * 2**30, "the thing")  # disabled
    fake_memory(monkeypatch, None)
    monkeypatch.delenv(resources.SKIP_ENV)
    resources.check_memory(3 * 2**30, "unknown availability")  # unknown: no check


# --- quantizing --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["gptq", "gwq"])
def test_low_memory_fails_before_any_work(monkeypatch, method):
    fake_memory(monkeypatch, 100 * 1024)

    def never(*a, **k):
        raise AssertionError("the memory check should have failed before this")

    monkeypatch.setattr(blockwise_mod, "capture_block_inputs", never)
    monkeypatch.setattr(gwq_mod, "gradient_scores", never)
    model = make_tiny_llama()
    with pytest.raises(resources.InsufficientMemoryError) as e:
        quantize_model(model, QuantConfig(method=method, wbits=4), calibration=CALIB, progress=False)
    msg = str(e.value)
    # 16 samples × 32 tokens × 64 × 4 bytes, twice = 256 KiB (+ the GWQ scores)
    assert "16 samples × 32 tokens × 64 × 4 bytes" in msg and "KiB" in msg and "100.0 KiB" in msg
    assert ("GWQ" in msg) == (method == "gwq")
    assert no_quantlinear(model)


def test_per_block_estimate_counts_shared_hessians_and_names_the_block(monkeypatch):
    seen = []
    real = resources.check_memory

    def spy(needed, what, *a, **k):
        seen.append((needed, what))
        return real(needed, what, *a, **k)

    monkeypatch.setattr(resources, "check_memory", spy)
    fake_memory(monkeypatch, 10**12, 10**12, 1000)  # up front fine, block 0 fine, block 1 too small
    model = make_tiny_llama()
    with pytest.raises(resources.InsufficientMemoryError, match=r"quantizing model\.layers\.1 with gptq"):
        quantize_model(model, QuantConfig(method="gptq", wbits=4), calibration=CALIB, progress=False)
    assert seen[0][0] == 2 * 16 * 32 * 64 * 4
    # one Hessian for q/k/v, one for o, one for gate/up (64² fp32 each) and one for down (128²)
    assert "Hessians 112.0 KiB" in seen[1][1] and "block outputs 128.0 KiB" in seen[1][1]
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)  # block 0 was done
    assert not isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)  # block 1 was not started
    assert model.config.use_cache is True  # restored after the error


def test_skip_switch_lets_quantization_run(monkeypatch):
    fake_memory(monkeypatch, 1000)
    monkeypatch.setenv(resources.SKIP_ENV, "1")
    model = quantize_model(make_tiny_opt(layers=1), QuantConfig(method="gptq", wbits=4), calibration=CALIB[:4], progress=False)
    assert isinstance(model.model.decoder.layers[0].fc1, QuantLinear)


def test_low_memory_in_sequential_activation_quantization(monkeypatch):
    fake_memory(monkeypatch, 1000)
    with pytest.raises(resources.InsufficientMemoryError, match="outliertune calibration activations"):
        quantize_activations(make_tiny_llama(), ActQuantConfig(weight_solver="gptq"), calibration=CALIB, progress=False)


# --- loading -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = quantize_model(make_tiny_llama(), QuantConfig(method="rtn", wbits=4), progress=False)
    return save_pretrained(model, tmp_path_factory.mktemp("ckpt") / "ckpt")


def test_checkpoint_bytes_from_headers(checkpoint):
    n = resources.checkpoint_nbytes(checkpoint)
    size = os.path.getsize(os.path.join(checkpoint, "model.safetensors"))
    assert 0.9 * size < n <= size
    assert resources.checkpoint_nbytes(checkpoint, torch.float64) > n  # float tensors counted at the wider width
    assert resources.checkpoint_nbytes("some-org/some-hub-model") == 0  # nothing local to check


def test_load_with_low_memory_fails_with_numbers(checkpoint, monkeypatch):
    fake_memory(monkeypatch, 1000)
    with pytest.raises(resources.InsufficientMemoryError, match=r"loading the checkpoint .*needs about .*KiB.*1000 B"):
        load_quantized(checkpoint)
    fake_memory(monkeypatch, 10**12)
    assert any(isinstance(m, QuantLinear) for m in load_quantized(checkpoint).modules())


def _write_safetensors(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("offsets_end", [16, 4 * 10**12])
def test_absurd_header_shape_fails_cleanly_without_allocating(tmp_path, monkeypatch, offsets_end):
    d = tmp_path / "forged"
    d.mkdir()
    (d / "config.json").write_text(make_tiny_llama().config.to_json_string())
    header = {"model.embed_tokens.weight": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, offsets_end]}}
    _write_safetensors(d / "model.safetensors", header, b"\0" * 16)

    def no_alloc(*a, **k):
        raise AssertionError("nothing may be allocated for a forged header")

    for fn in ("empty", "zeros", "frombuffer", "from_file"):
        monkeypatch.setattr(torch, fn, no_alloc)
    with pytest.raises(WCTCheckpointError, match="corrupt safetensors header|truncated|is inconsistent"):
        load_quantized(d)


def test_negative_dimension_in_header_is_an_error(tmp_path):
    _write_safetensors(tmp_path / "model.safetensors", {"w": {"dtype": "F32", "shape": [-4, 4], "data_offsets": [0, 0]}}, b"")
    with pytest.raises(WCTCheckpointError, match="negative dimension|inconsistent"):
        resources.check_memory_for_checkpoint(tmp_path)


# --- numerical hygiene -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_nan_weight_names_the_layer_before_quantizing(method):
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    calib = CALIB if method == "gptq" else None
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.mlp\.down_proj: weight contains NaN/Inf \(1 of 8192"):
        quantize_model(model, QuantConfig(method=method, wbits=4), calibration=calib, progress=False)
    assert no_quantlinear(model)


def test_nan_calibration_inputs_name_the_layer_and_the_sample():
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[7] = float("nan")  # token 7 appears only in calibration sample 11
    calib = CALIB.clone()
    calib[11, 5] = 7
    with pytest.raises(FloatingPointError, match=r"^model\.layers\.0\.self_attn\.q_proj: calibration inputs contain "
                       r"NaN/Inf \(first bad sample 11\) — check the calibration data / the fp model"):
        quantize_model(model, QuantConfig(method="gptq", wbits=4), calibration=calib, progress=False)


def test_nan_block_output_is_reported_at_the_next_layer():
    model = make_tiny_llama()

    def poison(_m, _i, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[2, 3] = float("inf")
        return (h, *out[1:]) if isinstance(out, tuple) else h

    model.model.layers[0].register_forward_hook(poison)
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.self_attn\.q_proj: .*first bad sample 2\)"):
        quantize_model(model, QuantConfig(method="owq", wbits=3, target_bits=3.1), calibration=CALIB, progress=False)


def test_nan_gwq_gradient_names_the_layer():
    model = make_tiny_llama()
    model.model.layers[1].mlp.down_proj.weight.register_hook(lambda g: g * float("nan"))
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.mlp\.down_proj: GWQ gradients contain NaN/Inf \(the loss was finite\)"):
        quantize_model(model, QuantConfig(method="gwq", wbits=4), calibration=CALIB, progress=False)


def test_nan_activation_statistics_name_the_layer():
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[7] = float("nan")
    calib = CALIB.clone()
    calib[9, 0] = 7
    with pytest.raises(NonFiniteError, match=r"model\.layers\.0\.self_attn\.q_proj: .*first bad sample 9\)"):
        quantize_activations(model, ActQuantConfig(), calibration=calib, progress=False)


def test_singular_hessian_is_damped_with_a_warning():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 64, generator=g)
    X[:, 7] = X[:, 3]  # a duplicated input column: H is singular
    W = torch.randn(32, 64, generator=g)
    gptq = GPTQ(64)
    gptq.add_batch(X)
    with pytest.warns(UserWarning, match="not positive definite"):
        res = gptq.solve(W, get_format("int4", partial_groups=True), percdamp=0.0)
    assert torch.isfinite(res.dense).all() and torch.isfinite(res.scales).all()

    zero = GPTQ(64)
    zero.add_batch(torch.zeros(100, 64))  # all inputs zero: every column is dead
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = zero.solve(W, get_format("int4", partial_groups=True))
    assert torch.isfinite(res.dense).all()
