"""Recipes end to end on a tiny local model: one process, two DDP processes, resume."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_llama, make_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))


@pytest.fixture
def tiny_setup(tmp_path):
    model_dir = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    import random

    rng = random.Random(0)
    recs = []
    for _ in range(64):
        a, b = rng.randrange(100), rng.randrange(100)
        recs.append({"instruction": f"w{a} w{b}", "input": "", "output": f"w{(a + b) % 100}"})
    data = tmp_path / "data.json"
    data.write_text(json.dumps(recs))
    return model_dir, data


def _args(model_dir, data, out, steps=3, extra=()):
    return [
        "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(out),
        "--max_steps", str(steps), "--quant_method", "owq", "--wbits", "3", "--target_bits", "3.5",
        "--calib_samples", "4", "--calib_seq_len", "32", "--eval_size", "8", "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "4", "--max_length", "32", "--report_to", "none", "--learning_rate", "1e-2",
        "--logging_steps", "1", "--gradient_checkpointing", "false", "--seed", "0", "--dataloader_num_workers", "0",
        "--save_strategy", "no", *extra,
    ]


def test_wct_recipe_one_process(tiny_setup, tmp_path):
    import wct_alpaca

    import wct

    model_dir, data = tiny_setup
    out = tmp_path / "run"
    res = wct_alpaca.main(_args(model_dir, data, out))
    assert res["eval_loss"] == res["eval_loss"]  # finite, not NaN
    adapter = out / "adapter"
    assert res["adapter_dir"] == str(adapter)
    assert {"adapter_config.json", "adapter_model.safetensors", "wct_manifest.json"} <= {p.name for p in adapter.iterdir()}
    merged = wct.load_quantized(res["merged_dir"])
    assert any(isinstance(m, wct.QuantLinear) and m.n_weak for m in merged.modules())
    assert (out / "adapter_checksum_rank0.txt").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes_end_with_identical_adapters(tiny_setup, tmp_path):
    model_dir, data = tiny_setup
    out = tmp_path / "ddp"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(ROOT / "recipes/configs/cpu_ddp2.yaml"),
           "--main_process_port", str(_free_port()), str(ROOT / "recipes/wct_alpaca.py"), *_args(model_dir, data, out, steps=4)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads((out / f"adapter_checksum_rank{r}.txt").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in recs] == [2, 2]  # really one DDP job, not two single runs
    assert recs[0]["sha256"] == recs[1]["sha256"]
    init = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert init["peft_type"] == "WCT"


def test_resume_from_trainer_checkpoint(tiny_setup, tmp_path):
    import wct_alpaca

    model_dir, data = tiny_setup
    out = tmp_path / "resume"
    save = ["--save_strategy", "steps", "--save_steps", "2"]
    wct_alpaca.main(_args(model_dir, data, out, steps=4, extra=save))
    full = (out / "adapter_checksum_rank0.txt").read_text()
    assert (out / "checkpoint-2").is_dir()
    wct_alpaca.main(_args(model_dir, data, out, steps=4, extra=[*save, "--resume_from_checkpoint", str(out / "checkpoint-2")]))
    assert (out / "adapter_checksum_rank0.txt").read_text() == full
