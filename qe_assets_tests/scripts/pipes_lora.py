"""A stand-in training command that writes a real PEFT adapter without training: a LoRA on
QE_TRL_MODEL whose B matrices are drawn at random (seeded), so the adapted model answers
differently from its base. For serving tests, which need a real adapter, not a trained one."""

import os
from pathlib import Path

import torch
from dagster_pipes import open_dagster_pipes
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

with open_dagster_pipes() as pipes:
    recipe = pipes.extras
    base = os.environ["QE_TRL_MODEL"]
    output = Path(os.environ["QE_TRL_OUTPUT_DIR"]) / recipe["run_id"]
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    torch.manual_seed(int(recipe["version"][1:]))
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.5)
    model.save_pretrained(output)
    AutoTokenizer.from_pretrained(base).save_pretrained(output)
    pipes.report_asset_materialization(
        metadata={"model_path": str(output), "base_model": base, "train_loss": 0.0}
    )
