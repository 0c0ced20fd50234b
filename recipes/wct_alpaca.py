"""Weak Column Tuning on Alpaca with TRL's SFTTrainer.

quantize (or load a packed checkpoint) -> WCT instruction tuning -> adapter, merged packed
checkpoint, held-out loss.

    accelerate launch --config_file recipes/configs/cpu_1proc.yaml recipes/wct_alpaca.py \
        --dataset_name ../shared/data/alpaca/alpaca_5000.json --output_dir runs/wct --max_steps 100
    accelerate launch --config_file recipes/configs/cpu_ddp2.yaml recipes/wct_alpaca.py ...   # 2 CPU processes
    accelerate launch --config_file recipes/configs/fsdp2_cpu2.yaml recipes/wct_alpaca.py ... # FSDP2, 2 CPU processes
    python recipes/wct_alpaca.py --config recipes/configs/wct_alpaca.yaml

``--model_name_or_path`` takes a hub id, a local model, a packed wct checkpoint, or nothing for the
embedded SmolLM2-135M-Instruct; ``--dataset_name`` a local JSON/JSONL (Alpaca fields or chat
``messages``) or a hub name (``tatsu-lab/alpaca`` with internet).
"""

from __future__ import annotations

import json
import os
import sys

from trl import ModelConfig, ScriptArguments, SFTTrainer, TrlParser

import wct
from wct.data.instruct import load_instruction_dataset, load_instruction_records
from wct.integrations import fsdp as wct_fsdp
from wct.integrations.trl import (
    QuantArguments,
    ScalesLRMixin,
    WCTSFTConfig,
    prepare_base,
    save_final_adapter,
    scales_lr,
    write_adapter_checksum,
)


class WCTTrainer(ScalesLRMixin, SFTTrainer):
    """TRL's SFTTrainer; trained quantization scales at their own rate (``--wct_scales_lr``)."""


def main(argv: list[str] | None = None) -> dict:
    parser = TrlParser((ScriptArguments, WCTSFTConfig, ModelConfig, QuantArguments))
    script_args, sft_args, model_args, qargs = parser.parse_args_and_config(argv)
    if not script_args.dataset_name:
        script_args.dataset_name = "tatsu-lab/alpaca"
    records = load_instruction_records(script_args.dataset_name, script_args.dataset_train_split)
    train, held = load_instruction_dataset(records, n_eval=qargs.eval_size, seed=sft_args.seed)
    model, tok = prepare_base(model_args.model_name_or_path, qargs, sft_args.output_dir, train_records=records[:2000])
    wct.prepare_for_training(model, use_gradient_checkpointing=bool(sft_args.gradient_checkpointing))
    peft_config = wct.WCTConfig(trainable=qargs.wct_trainable, create_columns=qargs.wct_create_columns)
    trainer = WCTTrainer(model=model, args=sft_args, train_dataset=train, eval_dataset=held,
                         processing_class=tok, peft_config=peft_config)
    trainer.scales_lr = scales_lr(qargs, sft_args.learning_rate)
    if trainer.accelerator.is_main_process:
        trainer.model.print_trainable_parameters()
    # FSDP2 launch: on CPU accelerate alone would fall back to DDP (enable_fsdp2_on_cpu), on GPUs it is on already
    sharded = wct_fsdp.enable_fsdp2_on_cpu(trainer) or wct_fsdp.fsdp2_enabled()
    if sharded:  # packed layers in their own no-cast FSDP groups, before accelerate shards blocks and root
        wct_fsdp.shard_packed_layers(trainer.model)
    trainer.train(resume_from_checkpoint=sft_args.resume_from_checkpoint)
    metrics = trainer.evaluate()
    if sharded:
        return _finish_sharded(trainer, metrics, tok, qargs, sft_args, model_args.model_name_or_path)
    adapter_dir = save_final_adapter(trainer, sft_args.output_dir, tok)  # atomic, checksummed
    write_adapter_checksum(trainer.model, sft_args.output_dir, trainer.accelerator.process_index,
                           trainer.accelerator.num_processes)
    result = {"eval_loss": metrics.get("eval_loss"), "output_dir": sft_args.output_dir, "adapter_dir": adapter_dir}
    if trainer.accelerator.is_main_process:
        merged = trainer.model.merge_and_unload()
        merged_dir = qargs.merged_dir or os.path.join(sft_args.output_dir, "merged")
        wct.sync_quantization(merged)
        wct.save_pretrained(merged, merged_dir, overwrite=True, tokenizer=tok)
        result["merged_dir"] = merged_dir
        result["bits_per_weight"] = wct.model_bits(merged)["bits_per_weight"]
        print(json.dumps(result))
    return result


def _finish_sharded(trainer, metrics: dict, tok, qargs, sft_args, model_name_or_path) -> dict:
    """FSDP2: gather the full state on rank 0, rebuild the unsharded PEFT model there from the packed base on disk,
    and save the adapter and the merged model exactly as a single-process run does."""
    from peft import get_peft_model

    from wct.integrations.transformers import is_wct_checkpoint, load_quantized, save_pretrained

    acc = trainer.accelerator
    mem = wct_fsdp.packed_bytes_per_rank(trainer.model)
    import resource

    print(json.dumps({"rank": acc.process_index, "packed_base_bytes_this_rank": mem["local"],
                      "packed_base_bytes_unsharded": mem["full"],
                      "peak_rss_mb_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}), flush=True)
    full = wct_fsdp.full_state_dict(trainer.model)  # every rank takes part; rank 0 receives it
    out = sft_args.output_dir
    result = {"eval_loss": metrics.get("eval_loss"), "output_dir": out, "adapter_dir": os.path.join(out, "adapter")}
    if acc.is_main_process:
        src = qargs.quantized_base or (model_name_or_path if is_wct_checkpoint(model_name_or_path) else None)
        replica = get_peft_model(load_quantized(src or os.path.join(out, "quantized_base")),
                                 trainer.model.peft_config["default"])
        replica.load_state_dict(full, strict=True)
        save_pretrained(replica, result["adapter_dir"], overwrite=True, tokenizer=tok)
        write_adapter_checksum(replica, out, 0, acc.num_processes)  # the gathered adapter: one file for the job
        merged = replica.merge_and_unload()
        result["merged_dir"] = qargs.merged_dir or os.path.join(out, "merged")
        wct.sync_quantization(merged)
        wct.save_pretrained(merged, result["merged_dir"], overwrite=True, tokenizer=tok)
        result["bits_per_weight"] = wct.model_bits(merged)["bits_per_weight"]
        print(json.dumps(result))
    acc.wait_for_everyone()
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
