"""The ``wct`` console script end to end on a tiny local model."""

import json

import pytest
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
