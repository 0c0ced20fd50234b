"""The WCT recipe under accelerate's FSDP2 with 2 CPU processes (recipes/configs/fsdp2_cpu2.yaml), on a tiny Llama:
the packed base is sharded (each rank reports half of it), the adapter and merged model come out of rank 0 and load,
and resuming from a sharded Trainer checkpoint ends with the same adapter as the uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_llama, make_tiny_tokenizer

import wct

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import random

    root = tmp_path_factory.mktemp("fsdp_recipe")
    make_tiny_llama().save_pretrained(root / "tiny")
    make_tiny_tokenizer().save_pretrained(root / "tiny")
    rng = random.Random(0)
    recs = []
    for _ in range(64):
        a, b = rng.randrange(100), rng.randrange(100)
        recs.append({"instruction": f"w{a} w{b}", "input": "", "output": f"w{(a + b) % 100}"})
    (root / "data.json").write_text(json.dumps(recs))
    return root


def _launch(root: Path, out: Path, *extra: str) -> str:
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(ROOT / "recipes/configs/fsdp2_cpu2.yaml"),
           "--main_process_port", str(_free_port()), str(ROOT / "recipes/wct_alpaca.py"),
           "--model_name_or_path", str(root / "tiny"), "--dataset_name", str(root / "data.json"),
           "--output_dir", str(out), "--max_steps", "4", "--quant_method", "owq", "--wbits", "3", "--target_bits", "3.5",
           "--calib_samples", "4", "--calib_seq_len", "32", "--eval_size", "8", "--per_device_train_batch_size", "2",
           "--per_device_eval_batch_size", "4", "--max_length", "32", "--report_to", "none", "--learning_rate", "1e-2",
           "--logging_steps", "1", "--gradient_checkpointing", "false", "--seed", "0", "--dataloader_num_workers", "0",
           "--save_strategy", "steps", "--save_steps", "2", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def run(tiny):
    out = tiny / "run"
    log = _launch(tiny, out)
    return out, log


def test_fsdp2_recipe_shards_the_packed_base_and_saves_loadable_results(run):
    out, log = run
    ranks = [json.loads(m) for m in re.findall(r'^\{"rank".*\}$', log, flags=re.M)]
    assert sorted(r["rank"] for r in ranks) == [0, 1], log[-3000:]
    for r in ranks:  # each rank holds about half of the packed base
        assert 0.45 <= r["packed_base_bytes_this_rank"] / r["packed_base_bytes_unsharded"] <= 0.56, r
    rec = json.loads((out / "adapter_checksum_rank0.txt").read_text())
    assert rec["world_size"] == 2
    wct.load_adapter(wct.load_quantized(out / "quantized_base"), out / "adapter")  # manifest and indices checked
    merged = wct.load_quantized(out / "merged")
    assert any(isinstance(m, wct.QuantLinear) and m.n_weak for m in merged.modules())
    assert (out / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()  # a sharded (DCP) Trainer checkpoint


def test_fsdp2_recipe_resumes_from_a_sharded_checkpoint(run, tiny):
    out, log = run
    full = (out / "adapter_checksum_rank0.txt").read_text()
    losses = re.findall(r"\{'loss': '([0-9.]+)'", log)
    resumed_log = _launch(tiny, out, "--resume_from_checkpoint", str(out / "checkpoint-2"))
    assert re.findall(r"\{'loss': '([0-9.]+)'", resumed_log) == losses[2:]
    assert (out / "adapter_checksum_rank0.txt").read_text() == full
