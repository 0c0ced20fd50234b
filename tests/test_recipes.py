"""Recipes end to end on a tiny local model: one process, two DDP processes, resume, and the LoRA baselines."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer

from wct.tuners.wct import WCT_STORED_PEFT_TYPE

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


OWQ_ARGS = ("--quant_method", "owq", "--wbits", "3", "--target_bits", "3.5")


def _args(model_dir, data, out, steps=3, extra=(), quant=OWQ_ARGS):
    return [
        "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(out),
        "--max_steps", str(steps), *quant,
        "--calib_samples", "4", "--calib_seq_len", "32", "--eval_size", "8", "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "4", "--max_length", "32", "--report_to", "none", "--learning_rate", "1e-2",
        "--logging_steps", "1", "--gradient_checkpointing", "false", "--seed", "0", "--dataloader_num_workers", "0",
        "--save_strategy", "no", *extra,
    ]


def _assert_finite_loss(res: dict) -> None:
    """The recipe's held-out loss is a finite number (NaN or Inf: training diverged or nothing was scored)."""
    loss = res["eval_loss"]
    assert isinstance(loss, float) and math.isfinite(loss), f"held-out loss is {loss!r}, expected a finite number"


def test_wct_recipe_one_process(tiny_setup, tmp_path):
    import wct_alpaca

    import wct

    model_dir, data = tiny_setup
    out = tmp_path / "run"
    res = wct_alpaca.main(_args(model_dir, data, out))
    _assert_finite_loss(res)
    adapter = out / "adapter"
    assert res["adapter_dir"] == str(adapter)
    assert {"adapter_config.json", "adapter_model.safetensors", "wct_manifest.json"} <= {p.name for p in adapter.iterdir()}
    merged = wct.load_quantized(res["merged_dir"])
    assert any(isinstance(m, wct.QuantLinear) and m.n_weak for m in merged.modules())
    assert (out / "adapter_checksum_rank0.txt").exists()


@pytest.mark.parametrize("extra,want_scales_lr", [((), 0.05 * 1e-2), (("--wct_scales_lr", "3e-4"), 3e-4)])
def test_recipe_trains_scales_at_their_own_rate(tiny_setup, tmp_path, monkeypatch, extra, want_scales_lr):
    """``--wct_trainable weak_columns+scales``: the scales get their own optimizer group (a scale moves a whole group
    of weights), at ``--wct_scales_lr`` or 0.05 x the rate; the columns keep ``--learning_rate``; the merged packed
    model carries the trained scales."""
    import wct_alpaca

    import wct

    seen = {}
    create = wct_alpaca.WCTTrainer.create_optimizer

    def spy(self, *a, **k):
        opt = create(self, *a, **k)
        seen["groups"] = {g["initial_lr"] if "initial_lr" in g else g["lr"]: sum(p.numel() for p in g["params"])
                          for g in opt.param_groups}
        seen["scales"] = sum(p.numel() for n, p in self.model.named_parameters()
                             if p.requires_grad and ".wct_scales." in n)
        return opt

    monkeypatch.setattr(wct_alpaca.WCTTrainer, "create_optimizer", spy)
    model_dir, data = tiny_setup
    res = wct_alpaca.main(_args(model_dir, data, tmp_path / "run", steps=2,
                                extra=("--wct_trainable", "weak_columns+scales", *extra)))
    _assert_finite_loss(res)
    assert seen["scales"] > 0
    assert sorted(seen["groups"]) == pytest.approx(sorted([1e-2, want_scales_lr]))
    assert seen["groups"][min(seen["groups"])] == seen["scales"]
    base = wct.load_quantized(tmp_path / "run" / "quantized_base")
    merged = wct.load_quantized(res["merged_dir"])
    changed = [n for n, m in merged.named_modules() if isinstance(m, wct.QuantLinear)
               and not torch.equal(m.scales, base.get_submodule(n).scales)]
    assert changed, "the merged model should carry the trained scales"


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
    assert init["peft_type"] == WCT_STORED_PEFT_TYPE


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


def _trained_lora_b(adapter_dir: Path) -> dict:
    """The LoRA B matrices of a saved adapter (PEFT initialises them to zero: non-zero means trained)."""
    from safetensors.torch import load_file

    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return {k: v for k, v in tensors.items() if "lora_B" in k}


def test_qlora_recipe_trains_lora_over_bitsandbytes_nf4(tiny_setup, tmp_path, monkeypatch):
    import bitsandbytes as bnb
    import qlora_alpaca
    from peft import PeftModel

    seen = {}
    swap = qlora_alpaca.to_bnb_nf4_

    def spy(model, *a, **k):  # record what the recipe trains over
        seen["n"] = swap(model, *a, **k)
        seen["layers"] = [type(m) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        return seen["n"]

    monkeypatch.setattr(qlora_alpaca, "to_bnb_nf4_", spy)
    model_dir, data = tiny_setup
    out = tmp_path / "qlora"
    res = qlora_alpaca.main(_args(model_dir, data, out, quant=()))
    _assert_finite_loss(res)
    assert seen["n"] == len(seen["layers"]) > 0
    adapter = Path(res["adapter_dir"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16
    lora_b = _trained_lora_b(adapter)
    assert len(lora_b) == seen["n"] and all(v.abs().max() > 0 for v in lora_b.values())
    # the saved adapter loads back onto a fresh NF4 base
    from wct.models import load_model

    base, _ = load_model(str(model_dir))
    swap(base)
    PeftModel.from_pretrained(base, str(adapter))


def test_lora_over_bof4_recipe_trains_lora_over_quantlinear(tiny_setup, tmp_path):
    import lora_over_bof4

    import wct

    model_dir, data = tiny_setup
    out = tmp_path / "lora-bof4"
    res = lora_over_bof4.main(_args(model_dir, data, out, quant=("--block_size", "32")))
    _assert_finite_loss(res)
    adapter = Path(res["adapter_dir"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    lora_b = _trained_lora_b(adapter)
    assert lora_b and all(v.abs().max() > 0 for v in lora_b.values())
    # the base the recipe saved is a packed BOF4-S checkpoint, and the adapter applies to it
    from peft import PeftModel

    base_dirs = [p for p in out.rglob("config.json") if "quantization_config" in p.read_text()]
    assert base_dirs, "the recipe should save its packed base beside the adapter"
    base = wct.load_quantized(base_dirs[0].parent)
    fmts = {m.fmt.name for m in base.modules() if isinstance(m, wct.QuantLinear)}
    assert fmts and all(f.startswith("bof4s") for f in fmts), fmts
    PeftModel.from_pretrained(base, str(adapter))


def test_sft_config_defaults_follow_the_hardware(monkeypatch, tmp_path):
    """bf16 and activation checkpointing: off on CPU (TRL's defaults are GPU ones), on with CUDA; a flag wins."""
    import warnings

    import torch
    import trl
    from trl import TrlParser

    from wct.integrations.trl import WCTSFTConfig

    base = ["--output_dir", str(tmp_path)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the default must not go through the deprecated alias
        (args,) = TrlParser((WCTSFTConfig,)).parse_args_and_config(base)
    assert args.activation_checkpointing is False and args.bf16 is False
    assert args.gradient_checkpointing is False  # the alias mirrors the resolved value (the recipes read it)
    for flag in (["--gradient_checkpointing", "true"], ["--activation_checkpointing"]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            (args,) = TrlParser((WCTSFTConfig,)).parse_args_and_config(base + flag)
        assert args.activation_checkpointing is True and args.gradient_checkpointing is True

    # with CUDA: TRL's GPU defaults.  TrainingArguments' own checks need a real GPU, so stop before them.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(trl.SFTConfig, "__post_init__", lambda self: None)
    args = WCTSFTConfig(output_dir=str(tmp_path))
    assert args.activation_checkpointing is True and args.bf16 is True


def test_main_process_borrows_the_waiting_ranks_cores_to_quantize():
    """In a CPU DDP run the other ranks sleep while rank 0 quantizes: it gets their threads, then gives them back."""
    import os

    import torch

    from wct.integrations.trl import lend_idle_cores

    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        torch.set_num_threads(1)
        with lend_idle_cores(local_world_size=2, on_cpu=True):
            assert torch.get_num_threads() == min(cores, 2)
        assert torch.get_num_threads() == 1
        for world, on_cpu in ((1, True), (2, False)):  # one process, or a GPU run: nothing to borrow
            with lend_idle_cores(local_world_size=world, on_cpu=on_cpu):
                assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
