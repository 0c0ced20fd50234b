"""scripts/bench_train.py end to end on a tiny local model: child processes, records, report, plot, cache."""

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
from conftest import make_tiny_llama, make_tiny_tokenizer, tiny_text

ROOT = Path(__file__).resolve().parents[1]
# wct-owq-3.01 is left out: at 3.01 bits a model this small gets no weak column (OWQ allocates them in pairs)
ROWS = "wct-owq-3.1,wct-bof4s,lora-bof4s,bnb-qlora-nf4"
CONTRACT = ("trainable_params", "step_seconds", "tokens_per_second", "peak_rss_mb", "eval_loss", "eval_loss_before",
            "bits_per_weight", "lr", "steps", "batch_size", "seq_len", "quantize_seconds", "threads")


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "scripts" / "bench_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def tiny_bench(tmp_path):
    model_dir = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    rng = random.Random(0)
    recs = []
    for _ in range(48):
        a, b = rng.randrange(100), rng.randrange(100)
        recs.append({"instruction": f"w{a} w{b}", "input": "", "output": f"w{(a + b) % 100}"})
    data = tmp_path / "data.json"
    data.write_text(json.dumps(recs))
    calib = tmp_path / "calib.txt"
    calib.write_text(tiny_text(2000))
    return model_dir, data, calib


def test_bench_train_end_to_end(tiny_bench, tmp_path, capsys):
    bench = _load_script()
    model_dir, data, calib = tiny_bench
    out = tmp_path / "bench"
    argv = ["--model", str(model_dir), "--data", str(data), "--calib", str(calib), "--only", ROWS, "--steps", "3",
            "--batch-size", "2", "--seq-len", "32", "--holdout", "8", "--eval-size", "8", "--calib-samples", "4",
            "--calib-seq-len", "32", "--threads", "1", "--out-dir", str(out), "--no-progress"]
    assert bench.main(argv) == 0
    recs = json.loads((out / "train.json").read_text())
    assert [r["method"] for r in recs] == ROWS.split(",")
    for r in recs:
        for key in CONTRACT:
            assert math.isfinite(r[key]), (r["method"], key, r[key])
        assert r["trainable_params"] > 0 and r["step_seconds"] > 0 and r["tokens_per_second"] > 0
        assert r["steps"] == 3 and r["batch_size"] == 2 and r["seq_len"] == 32 and r["threads"] == 1
        assert r["eval_records"] == 8 and r["train_records"] == 40
    by = {r["method"]: r for r in recs}
    assert by["wct-owq-3.1"]["lr"] == by["wct-bof4s"]["lr"] == 1e-3 and by["lora-bof4s"]["lr"] == 2e-4
    assert by["wct-owq-3.1"]["trainable_params"] < by["lora-bof4s"]["trainable_params"]
    assert by["wct-owq-3.1"]["calib_samples"] == 4 and by["wct-owq-3.1"]["quantize_seconds"] > 0
    assert 3.0 < by["wct-owq-3.1"]["bits_per_weight"] < 4.0
    # one created column per layer: the 14 decoder Linears of the tiny model, 2 x (64+32+32+64+128+128+64) outputs
    assert by["wct-bof4s"]["create_columns"] == 1 and by["wct-bof4s"]["trainable_params"] == 2 * 512
    assert 4.1 < by["bnb-qlora-nf4"]["bits_per_weight"] < 4.2  # NF4 + double-quantized block-64 scales, as stored
    # bitsandbytes 0.50 expands the scales to bf16 for its CPU kernel after an eval forward (docs/upstream.md)
    resident = by["bnb-qlora-nf4"]["resident_bits_per_weight"]
    assert resident == pytest.approx(4.25) or resident == pytest.approx(by["bnb-qlora-nf4"]["bits_per_weight"], abs=1e-3)
    # LoRA over BOF4-S and over bnb NF4 train the same modules with the same rank
    assert by["lora-bof4s"]["trainable_params"] == by["bnb-qlora-nf4"]["trainable_params"]

    md = (out / "train.md").read_text()
    assert "## What we expected" in md and "## What we saw" in md
    assert all(f"| {m} |" in md for m in ROWS.split(","))
    assert "lora-bof4s ended at" in md  # computed from the records
    assert (out / "train_loss.png").stat().st_size > 0

    # resumable: same settings -> cached rows are not re-run
    capsys.readouterr()
    assert bench.main(argv[:argv.index("--only") + 1] + ["wct-owq-3.1"] + argv[argv.index("--only") + 2:]) == 0
    assert "wct-owq-3.1: cached" in capsys.readouterr().out
    assert json.loads((out / "train.json").read_text()) == recs
