"""QLoRA-style LoRA over our BOF4-S base, with TRL's SFTTrainer.

    accelerate launch --config_file recipes/configs/cpu_1proc.yaml recipes/lora_over_bof4.py \
        --dataset_name ../shared/data/alpaca/alpaca_5000.json --output_dir runs/lora-bof4s --max_steps 100

``import wct`` makes PEFT's ``LoraConfig`` wrap ``QuantLinear`` layers (and ``all-linear`` find them);
merging is dequantize -> add -> requantize (lossy), so the default export is the unmerged adapter.
"""

from __future__ import annotations

import json
import sys

from peft import LoraConfig
from trl import ModelConfig, ScriptArguments, SFTTrainer, TrlParser

import wct
from wct.data.instruct import load_instruction_dataset, load_instruction_records
from wct.integrations.trl import QuantArguments, WCTSFTConfig, prepare_base, save_final_adapter


def main(argv: list[str] | None = None) -> dict:
    parser = TrlParser((ScriptArguments, WCTSFTConfig, ModelConfig, QuantArguments))
    parser.set_defaults(quant_method="bof4s", target_bits=None)  # this recipe's default base
    script_args, sft_args, model_args, qargs = parser.parse_args_and_config(argv)
    records = load_instruction_records(script_args.dataset_name or "tatsu-lab/alpaca", script_args.dataset_train_split)
    train, held = load_instruction_dataset(records, n_eval=qargs.eval_size, seed=sft_args.seed)
    model, tok = prepare_base(model_args.model_name_or_path, qargs, sft_args.output_dir, train_records=records[:2000])
    wct.prepare_for_training(model, use_gradient_checkpointing=bool(sft_args.gradient_checkpointing))
    peft_config = LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                             target_modules=model_args.lora_target_modules or "all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=train, eval_dataset=held,
                         processing_class=tok, peft_config=peft_config)
    trainer.train(resume_from_checkpoint=sft_args.resume_from_checkpoint)
    metrics = trainer.evaluate()
    adapter_dir = save_final_adapter(trainer, sft_args.output_dir, tok)  # atomic, checksummed
    result = {"eval_loss": metrics.get("eval_loss"), "output_dir": sft_args.output_dir, "adapter_dir": adapter_dir}
    if trainer.accelerator.is_main_process:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
