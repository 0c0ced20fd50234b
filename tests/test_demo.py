"""``make demo``'s code path end to end on a tiny local model (the real run is minutes on the embedded model)."""

import importlib.util
import json
from pathlib import Path

from conftest import make_tiny_llama, make_tiny_tokenizer

import wct


def main(argv):
    """scripts/demo.py's main (the demo is a script, not part of the installed library)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "demo.py"
    spec = importlib.util.spec_from_file_location("wct_demo_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


def test_demo_end_to_end_on_tiny_model(tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "demo"
    rc = main(["--model", str(model_dir), "--out", str(out), "--n-train", "64", "--n-heldout", "8", "--steps", "3",
               "--batch-size", "4", "--calib-samples", "4", "--calib-seq-len", "64", "--target-bits", "3.5"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "owq+wct" in text and "exact match" in text
    rows = json.loads((out / "demo_results.json").read_text())
    assert set(rows) == {"owq", "owq+wct"}
    assert rows["owq+wct"]["trainable_params"] > 0
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    merged = wct.load_quantized(str(out / "merged"))
    assert any(isinstance(m, wct.QuantLinear) and m.n_weak for m in merged.modules())
