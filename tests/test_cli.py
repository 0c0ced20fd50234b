"""The ``wct`` console script end to end on a tiny local model."""

import json

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer, tiny_text

from wct.cli import main


@pytest.fixture
def tiny_dir(tmp_path):
    d = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(d)
    make_tiny_tokenizer().save_pretrained(d)
    txt = tmp_path / "calib.txt"
    txt.write_text(tiny_text(3000))
    return d, txt


def _json_out(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["quantize", "--help"], ["eval", "ppl", "--help"], ["inspect", "--help"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_quantize_inspect_eval(tiny_dir, tmp_path, capsys):
    model_dir, txt = tiny_dir
    out = tmp_path / "q"
    rc = main(["quantize", "--model", str(model_dir), "--method", "owq", "--wbits", "3", "--target-bits", "3.5",
               "--calib", str(txt), "--n-samples", "8", "--seq-len", "32", "--out", str(out)])
    assert rc == 0
    rec = _json_out(capsys)
    assert rec["method"] == "owq" and 3.0 < rec["bits_per_weight"] < 4.5
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "wct"
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["summary"]["layers"] == 14
    assert info["summary"]["weak_columns"] > 0
    assert abs(info["summary"]["bits_per_weight"] - rec["bits_per_weight"]) < 1e-3
    assert main(["eval", "ppl", "--model", str(out), "--data", str(txt), "--seq-len", "32", "--windows", "4", "--json"]) == 0
    assert _json_out(capsys)["ppl"] > 1


def test_quantize_stream_equals_loading_the_model(tiny_dir, tmp_path, capsys):
    """``--stream`` reads the dense folder block by block and saves the same packed checkpoint as a full load."""
    from safetensors.torch import load_file

    model_dir, txt = tiny_dir
    common = ["--model", str(model_dir), "--method", "gptq", "--wbits", "4", "--group-size", "32", "--calib", str(txt),
              "--n-samples", "4", "--seq-len", "32"]
    assert main(["quantize", *common, "--out", str(tmp_path / "full")]) == 0
    assert main(["quantize", *common, "--stream", "--out", str(tmp_path / "stream")]) == 0
    full, streamed = (load_file(tmp_path / d / "model.safetensors") for d in ("full", "stream"))
    assert full.keys() == streamed.keys()
    assert all(torch.equal(full[k], streamed[k]) for k in full)


def test_quantize_stream_refuses_what_it_cannot_stream(tiny_dir, tmp_path, capsys):
    model_dir, txt = tiny_dir
    assert main(["quantize", "--method", "nf4", "--stream", "--out", str(tmp_path / "a")]) == 2
    assert "--model must be a local folder of dense safetensors" in capsys.readouterr().err
    assert main(["quantize", "--model", str(model_dir), "--method", "outliertune", "--calib", str(txt), "--stream",
                 "--out", str(tmp_path / "b")]) == 2
    assert "outliertune reads the whole model" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_out_dir_is_not_overwritten_silently(tiny_dir, tmp_path, capsys):
    model_dir, txt = tiny_dir
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    rc = main(["quantize", "--model", str(model_dir), "--method", "nf4", "--out", str(out)])
    assert rc == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    assert main(["quantize", "--model", str(model_dir), "--method", "nf4", "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists()


def test_calibrated_method_without_calib_and_bad_inspect(tiny_dir, tmp_path, capsys):
    model_dir, _ = tiny_dir
    assert main(["quantize", "--model", str(model_dir), "--method", "gptq", "--out", str(tmp_path / "x")]) == 2
    assert "--calib" in capsys.readouterr().err
    assert main(["inspect", str(model_dir)]) == 2
    assert "not a wct checkpoint" in capsys.readouterr().err


def test_outliertune_checkpoint_evaluates_through_the_cli(tiny_dir, tmp_path, capsys):
    """`wct eval ppl` must recognise an OutlierTune folder (not a wct weight-only checkpoint)."""
    model_dir, txt = tiny_dir
    out = tmp_path / "ot"
    rc = main(["quantize", "--model", str(model_dir), "--method", "outliertune", "--wbits", "8", "--abits", "8",
               "--calib", str(txt), "--n-samples", "4", "--seq-len", "32", "--out", str(out)])
    assert rc == 0
    capsys.readouterr()
    assert main(["eval", "ppl", "--model", str(out), "--data", str(txt), "--seq-len", "32", "--windows", "2", "--json"]) == 0
    assert 1 < _json_out(capsys)["ppl"] < 1e6


def test_act_order_is_on_by_default_and_can_be_turned_off():
    from wct.cli import build_parser
    from wct.quantize import QuantConfig

    p = build_parser()
    base = ["quantize", "--method", "gptq", "--out", "x"]
    assert p.parse_args(base).act_order is True and QuantConfig(method="gptq").act_order is True
    assert p.parse_args([*base, "--no-act-order"]).act_order is False


# ---- issue #16 item 5: errors a new user meets (each one exit 2, one line, no traceback) ----


def _no_load(monkeypatch):
    """Replace the CLI's model loader by one that records the call and fails: the checks must come first."""
    calls = []

    def fake_load_any(name):
        calls.append(name)
        raise AssertionError(f"the model {name!r} was loaded before the arguments were checked")

    monkeypatch.setattr("wct.cli.load_any", fake_load_any)
    return calls


@pytest.mark.parametrize("kind", ["relative", "absolute", "home"])
def test_missing_local_model_path_says_it_does_not_exist(kind, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    model = {"relative": "./does/not/exist", "absolute": str(tmp_path / "x" / "nope"), "home": "~/nope"}[kind]
    for argv in (["quantize", "--model", model, "--method", "nf4", "--out", str(tmp_path / "q")],
                 ["eval", "ppl", "--model", model, "--data", "wikitext"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --model") and f"{model!r} does not exist" in err
        assert "Repo id" not in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "q").exists()


def test_local_path_or_hub_id(tmp_path, monkeypatch):
    from wct.models import check_local_model_path, load_model, looks_like_local_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for hub_id in ("gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert not looks_like_local_path(hub_id) and check_local_model_path(hub_id) is None
    for local in ("./x", "../x", ".", "/x/y", "~/x", "a/b/c", "org/", "models/tiny", tmp_path / "x"):
        assert looks_like_local_path(local), local
    assert check_local_model_path(str(tmp_path / "models")) == tmp_path / "models"
    with pytest.raises(FileNotFoundError, match=r"'models/tiny' does not exist .*models exists but has no 'tiny'"):
        load_model("models/tiny")


def test_out_naming_an_existing_file(tiny_dir, tmp_path, capsys):
    model_dir, _ = tiny_dir
    f = tmp_path / "out.txt"
    f.write_text("keep")
    for out in (f, f / "sub"):
        assert main(["quantize", "--model", str(model_dir), "--method", "nf4", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert str(f) in err and "--out must be a directory path" in err and "Traceback" not in err
    assert f.read_text() == "keep"


@pytest.mark.parametrize("method", ["nf4", "af4", "bof4", "bof4s"])
@pytest.mark.parametrize("target", ["3.01", "4.5"])
def test_target_bits_with_a_codebook_method(method, target, tmp_path, monkeypatch, capsys):
    calls = _no_load(monkeypatch)
    assert main(["quantize", "--method", method, "--target-bits", target, "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert f"codebook format {method}" in err and "owq" in err and "wbits=" not in err
    assert calls == []


def test_target_bits_with_other_integer_methods_and_at_wbits(tmp_path, monkeypatch, capsys):
    calls = _no_load(monkeypatch)
    out = str(tmp_path / "q")
    for method in ("rtn", "gptq", "gwq"):
        assert main(["quantize", "--method", method, "--target-bits", "4.5", "--calib", "x", "--out", out]) == 2
        assert f"applies only to --method owq (16-bit weak columns); --method {method}" in capsys.readouterr().err
    # target == wbits would silently give zero weak columns
    assert main(["quantize", "--method", "owq", "--wbits", "3", "--target-bits", "3", "--calib", "x", "--out", out]) == 2
    assert "must be above --wbits 3" in capsys.readouterr().err
    assert calls == []


def test_inspect_missing_path_says_it_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["inspect", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"{missing} does not exist" in err and "not a wct checkpoint" not in err


@pytest.mark.parametrize("bad, expect", [
    (["--method", "gptq", "--wbits", "5"], "wbits=5 is not supported"),
    (["--method", "owq", "--wbits", "4", "--target-bits", "3.5"], "--target-bits 3.5 must be above --wbits 4"),
    (["--method", "nf4", "--opq", "--opq-quantile", "1.5"], "opq_quantile must be in (0, 1)"),
    (["--method", "gwq", "--outlier-ratio", "1.5"], "outlier_ratio"),
    (["--method", "outliertune", "--wbits", "3"], "wbits"),
    (["--method", "gptq", "--calib", "missing.txt"], "--calib missing.txt: file not found"),
    (["--method", "owq", "--calib", "./data"], "--calib ./data: file not found"),
    (["--method", "gptq", "--n-samples", "0"], "--n-samples must be a positive integer"),
    (["--method", "gptq", "NO-CALIB"], "needs --calib"),
    (["--method", "nf4", "--out", "FILE"], "--out must be a directory path"),
])
def test_arguments_are_checked_before_the_model_loads(bad, expect, tiny_dir, tmp_path, monkeypatch, capsys):
    model_dir, txt = tiny_dir
    monkeypatch.chdir(tmp_path)
    calls = _no_load(monkeypatch)
    (tmp_path / "FILE").write_text("")
    calib = [] if "NO-CALIB" in bad else ["--calib", str(txt)]  # a later --calib / --out in `bad` wins
    argv = ["quantize", "--model", str(model_dir), *calib, "--out", str(tmp_path / "q"), *(a for a in bad if a != "NO-CALIB")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err
    assert calls == []


def test_owq_without_target_bits_uses_wbits_plus_001(tiny_dir, tmp_path, monkeypatch, capsys):
    """Without --target-bits OWQ would keep no weak columns (nothing for WCT to train): default wbits + 0.01."""
    import wct.integrations.transformers as hf

    model_dir, txt = tiny_dir
    seen = []

    def fake_quantize_model(model, cfg, calibration=None, **kw):
        seen.append(cfg)
        raise RuntimeError("stop here")

    monkeypatch.setattr(hf, "quantize_model", fake_quantize_model)
    for wbits, target in (("3", 3.01), ("4", 4.01)):
        with pytest.raises(RuntimeError, match="stop here"):
            main(["quantize", "--model", str(model_dir), "--method", "owq", "--wbits", wbits, "--calib", str(txt),
                  "--n-samples", "2", "--seq-len", "16", "--out", str(tmp_path / "q")])
        assert seen.pop().target_bits == target
        assert f"owq: --target-bits not given, using {target} (wbits + 0.01" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    assert "wbits + 0.01" in " ".join(capsys.readouterr().out.split())


def test_owq_warns_when_the_budget_buys_no_weak_column(tiny_dir, tmp_path, capsys):
    """On the 64-wide tiny model 3.01 bits is less than one weak column per layer: say so."""
    model_dir, txt = tiny_dir
    assert main(["quantize", "--model", str(model_dir), "--method", "owq", "--wbits", "3", "--calib", str(txt),
                 "--n-samples", "4", "--seq-len", "32", "--out", str(tmp_path / "q")]) == 0
    err = capsys.readouterr().err
    assert "using 3.01" in err and "owq kept no 16-bit weak columns at --target-bits 3.01" in err
