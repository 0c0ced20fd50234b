"""TRL glue for the recipes: argument dataclasses and "quantize once, train everywhere".

Recipes stay short scripts over ``SFTTrainer``; what they share lives here:

* :class:`WCTSFTConfig`: TRL's ``SFTConfig`` whose ``bf16`` and activation-checkpointing
  defaults follow the hardware (TRL defaults to bf16, which refuses to start on a CPU-only
  machine, and to checkpointing, which buys GPU memory with much slower CPU steps: docs/peft.md).
* :class:`QuantArguments`: how the frozen base is made (method, bits, budget,
  calibration), as flags and YAML keys.
* :func:`prepare_base`: loads an already packed checkpoint, or quantizes the
  model once — on the main process, saved under ``output_dir/quantized_base`` —
  and lets the other processes of a DDP run load that copy, so every rank
  trains over bit-identical bases.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any

import torch
from trl import SFTConfig

from wct.quantize.options import quant_dataclass_fields


@dataclass
class WCTSFTConfig(SFTConfig):
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision (default: on when a CUDA GPU is present, off on CPU)."}
    )
    # TRL turns checkpointing on by default.  On a GPU that trades ~20 % compute for activation
    # memory; on CPU, where RAM is rarely the limit for the models people tune there, it re-runs
    # every forward and made `make train` steps 6.6 s instead of 4.0 s (SmolLM2-135M, batch 4 x 256).
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Deprecated alias of --activation_checkpointing (default: on with a CUDA GPU, off on CPU).",
                  "nargs": "?", "const": True},
    )

    def __post_init__(self) -> None:
        if self.bf16 is None:
            self.bf16 = bool(torch.cuda.is_available() and not self.fp16)
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = torch.cuda.is_available()
        if not torch.cuda.is_available():
            # makes accelerate's state CPU DDP (gloo) when several processes are launched
            self.use_cpu = True
        super().__post_init__()


# The recipes' own arguments, besides the quantization options.
_RECIPE_FIELDS = [
    ("calib", str | None, field(default=None, metadata={"help": "calibration file/dataset (default: the training data)"})),
    ("calib_samples", int, field(default=32, metadata={"help": "calibration windows"})),
    ("calib_seq_len", int, field(default=512, metadata={"help": "calibration window length"})),
    ("quantized_base", str | None, field(default=None, metadata={"help": "an already packed wct checkpoint to train on"})),
    ("wct_trainable", str, field(default="weak_columns", metadata={"help": "weak_columns | outliers | scales | all, or a '+'-join such as weak_columns+scales"})),
    ("wct_scales_lr", float | None, field(default=None, metadata={"help": "learning rate of trained quantization scales (--wct_trainable ...+scales); default 0.05 x --learning_rate: a scale moves a whole group of weights"})),
    ("wct_create_columns", int, field(default=0, metadata={"help": "split k 16-bit columns per layer out of a base without them"})),
    ("eval_size", int, field(default=500, metadata={"help": "records held out for evaluation (fixed shuffle by --seed)"})),
    ("merged_dir", str | None, field(default=None, metadata={"help": "where to save the merged packed model (default output_dir/merged)"})),
]


SCALES_LR_RATIO = 0.05  # scales' default rate relative to the columns' (PEQA trains scales at ~1e-5..1e-4)


def scales_lr(qargs, learning_rate: float) -> float:
    """The learning rate of trained quantization scales: ``--wct_scales_lr`` or ``SCALES_LR_RATIO x`` the rate."""
    return qargs.wct_scales_lr if qargs.wct_scales_lr is not None else SCALES_LR_RATIO * learning_rate


class ScalesLRMixin:
    """For a ``Trainer`` subclass: trained quantization scales get their own parameter group and learning rate.

    Everything else (columns, outliers, LoRA) keeps ``args.learning_rate``.  The optimizer is built where the
    Trainer builds it (after accelerate has wrapped or sharded the model), with the optimizer class and settings
    the arguments name; only the grouping differs.  Without trained scales this is the Trainer's own optimizer.
    """

    scales_lr: float | None = None

    def create_optimizer(self, *args, **kwargs):
        if self.optimizer is None and self.scales_lr is not None and any(
                p.requires_grad and ".wct_scales." in n for n, p in self.model.named_parameters()):
            from wct.tuners.wct import optimizer_groups

            opt_cls, opt_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            groups = optimizer_groups(self.model, self.args.learning_rate, self.scales_lr, self.args.weight_decay)
            self.optimizer = opt_cls(groups, **opt_kwargs)
            return self.optimizer
        return super().create_optimizer(*args, **kwargs)


_RECIPE_DEFAULTS = {"method": "owq", "wbits": 3, "target_bits": 3.01}


def _quant_config(self):
    """The ``QuantConfig`` these arguments describe.

    The recipes' defaults are OWQ's (wbits 3, target_bits 3.01): ``target_bits`` only reaches owq, and a codebook
    method keeps its 4 bits unless another ``wbits`` than that default was asked for (then QuantConfig refuses it).
    """
    from wct.quantize.config import CODEBOOK_METHODS
    from wct.quantize.options import config_from_namespace

    over = {"target_bits": self.target_bits if self.quant_method == "owq" else None}
    if self.quant_method in CODEBOOK_METHODS and self.wbits == _RECIPE_DEFAULTS["wbits"]:
        over["wbits"] = 4
    return config_from_namespace(self, rename={"method": "quant_method"}, **over)


# Every QuantConfig option, generated from its one definition (help text included), plus the recipes' own; the
# recipes default to OWQ 3.01 (Weak Column Tuning's base).  ``method`` is ``quant_method`` here: TRL has no clash
# with it, and it reads clearly next to the trainer's own arguments.
QuantArguments = make_dataclass(
    "QuantArguments",
    quant_dataclass_fields(defaults=_RECIPE_DEFAULTS,
                           rename={"method": "quant_method"}) + _RECIPE_FIELDS,
    namespace={"quant_config": _quant_config, "__module__": __name__,
               "__doc__": "Quantization options (from QuantConfig) and the recipes' own, for TrlParser / YAML."},
)


def _calibration(qargs: QuantArguments, tok, train_records: list[dict] | None):
    from wct.data import bos_token_id, get_calibration_windows, records_to_stream, sample_windows

    if qargs.calib:
        return get_calibration_windows(qargs.calib, tok, n_samples=qargs.calib_samples, seq_len=qargs.calib_seq_len)
    if not train_records:
        raise ValueError("no calibration data: pass --calib FILE or a training dataset")
    stream = records_to_stream(train_records, tok, seed=0, progress=False)
    return sample_windows(stream, qargs.calib_samples, min(qargs.calib_seq_len, stream.numel() // 2), seed=0,
                          bos_token_id=bos_token_id(tok))  # the tokenizer's convention (docs/methods.md)


@contextmanager
def lend_idle_cores(local_world_size: int, on_cpu: bool):
    """Let the main process use the cores of the ranks that wait for its quantized base.

    A CPU DDP launch gives each of the N local processes 1/N of the cores (torchrun sets
    OMP_NUM_THREADS=1 for N > 1).  While the main process quantizes, the others sleep in a
    barrier, so quantization would otherwise run on a fraction of the machine.
    """
    before = torch.get_num_threads()
    if on_cpu and local_world_size > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(before, min(cores, before * local_world_size)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def prepare_base(model_name_or_path: str | None, qargs: QuantArguments, output_dir: str,
                 train_records: list[dict] | None = None) -> tuple[Any, Any]:
    """(quantized model, tokenizer); quantizes on the main process only, others load its copy."""
    from accelerate import PartialState
    from transformers import AutoTokenizer

    from wct.integrations.transformers import is_wct_checkpoint, load_quantized, quantize_model, save_pretrained
    from wct.models import load_model

    src = qargs.quantized_base or (model_name_or_path if is_wct_checkpoint(model_name_or_path) else None)
    if src:
        return load_quantized(src), AutoTokenizer.from_pretrained(src)
    base_dir = Path(output_dir) / "quantized_base"
    state = PartialState()
    with state.main_process_first():
        if state.is_main_process and not is_wct_checkpoint(str(base_dir)):
            local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
            with lend_idle_cores(local_world_size, on_cpu=state.device.type == "cpu"):
                model, tok = load_model(model_name_or_path)
                calib = None
                cfg = qargs.quant_config()
                if cfg.calibrated:
                    calib = _calibration(qargs, tok, train_records)
                quantize_model(model, cfg, calibration=calib)
                save_pretrained(model, base_dir, overwrite=True, tokenizer=tok)
    return load_quantized(str(base_dir)), AutoTokenizer.from_pretrained(str(base_dir))


def adapter_checksum(model) -> str:
    """sha256 over the trainable parameters (names and bytes): equal on every DDP rank after training."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def write_adapter_checksum(model, output_dir: str, rank: int, world_size: int = 1) -> str:
    """Each rank writes ``adapter_checksum_rank{rank}.txt`` (JSON), so a run can prove its ranks agree."""
    import json

    digest = adapter_checksum(model)
    os.makedirs(output_dir, exist_ok=True)
    rec = {"sha256": digest, "rank": rank, "world_size": world_size}
    Path(output_dir, f"adapter_checksum_rank{rank}.txt").write_text(json.dumps(rec) + "\n")
    return digest


def save_final_adapter(trainer, output_dir: str, tokenizer=None) -> str:
    """Write the trained adapter to ``output_dir/adapter`` atomically (with a checksum manifest); returns the path.

    Why not ``trainer.save_model(output_dir)``: it writes the adapter files one by one over
    whatever a previous run left there, so a kill halfway mixes two adapters.  The folder
    is separate from the Trainer's ``checkpoint-N`` folders, and only the main process writes.
    """
    from wct.integrations.transformers import save_pretrained

    path = os.path.join(output_dir, "adapter")
    if trainer.accelerator.is_main_process:
        save_pretrained(trainer.model, path, overwrite=True, tokenizer=tokenizer)
    trainer.accelerator.wait_for_everyone()
    return path
