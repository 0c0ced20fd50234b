"""The baseline users know: LoRA over bitsandbytes NF4 (QLoRA), same data and budget as wct_alpaca.py.

    accelerate launch --config_file recipes/configs/cpu_1proc.yaml recipes/qlora_alpaca.py \
        --dataset_name ../shared/data/alpaca/alpaca_5000.json --output_dir runs/qlora --max_steps 100

The model's decoder Linears are replaced by ``bitsandbytes.nn.Linear4bit`` (NF4, block 64, fp32
compute on CPU / bf16 on GPU); LoRA r=16 on all of them, as in the QLoRA paper.
"""

from __future__ import annotations

import json
import sys

import torch
from peft import LoraConfig
from trl import ModelConfig, ScriptArguments, SFTTrainer, TrlParser

from wct.data.instruct import load_instruction_dataset, load_instruction_records
from wct.integrations.trl import QuantArguments, WCTSFTConfig, save_final_adapter
from wct.models import load_model


def to_bnb_nf4_(model, compute_dtype=torch.float32, blocksize: int = 64) -> int:
    """Swap the decoder Linears for bitsandbytes NF4 layers; returns how many were swapped."""
    from wct.integrations.bnb import import_bitsandbytes
    from wct.nn.model_utils import quantizable_linears, set_module

    bnb = import_bitsandbytes()
    n = 0
    for name, lin in quantizable_linears(model).items():
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", quant_storage=torch.uint8)
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4", blocksize=blocksize)
        if lin.bias is not None:
            q.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        q = q.to(lin.weight.device)  # Params4bit quantizes when moved to a device
        if not getattr(q.weight, "bnb_quantized", False):
            q.weight = q.weight._quantize(lin.weight.device)
        set_module(model, name, q)
        n += 1
    model.is_loaded_in_4bit = True
    return n


def main(argv: list[str] | None = None) -> dict:
    parser = TrlParser((ScriptArguments, WCTSFTConfig, ModelConfig, QuantArguments))
    script_args, sft_args, model_args, qargs = parser.parse_args_and_config(argv)
    records = load_instruction_records(script_args.dataset_name or "tatsu-lab/alpaca", script_args.dataset_train_split)
    train, held = load_instruction_dataset(records, n_eval=qargs.eval_size, seed=sft_args.seed)
    model, tok = load_model(model_args.model_name_or_path)
    to_bnb_nf4_(model, torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    peft_config = LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                             target_modules="all-linear", task_type="CAUSAL_LM")
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
