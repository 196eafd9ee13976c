"""LoRA preference fine-tuning (DPO) with TRL, run by qe_assets' `command` backend through Pipes.

    pip install -e ".[train]"
    export QE_FINETUNE_BACKEND=command QE_FINETUNE_METHOD=dpo
    export QE_FINETUNE_COMMAND="python examples/finetune_trl_dpo.py"
    export QE_TRL_MODEL=Qwen/Qwen2.5-0.5B-Instruct

Trains on the version's preference pairs (recipe `train_preference_path` /
`validation_preference_path`, TRL's conversational preference format): *chosen* is a human's edit
or a judge-approved rewrite, *rejected* the original answer that triggered the quality event. The
reference model is the base model itself (the LoRA adapter switched off), so no second copy is
loaded. Hyperparameters as in finetune_trl_lora.py, plus `beta` (DPO's, default 0.1). Reports
`model_path`, `train_loss`, `eval_loss` and `base_eval_loss` (log 2 when the adapter starts at
zero), and the validation reward accuracy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dagster_pipes import open_dagster_pipes
from finetune_trl_lora import common_args, hyper, load_model, model_name, read_lines


def train(recipe: dict[str, Any]) -> dict[str, Any]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    train_rows = read_lines(recipe.get("train_preference_path"))
    if not train_rows:
        raise SystemExit(f"{recipe['version']}: no preference pairs on the train side")
    eval_rows = read_lines(recipe.get("validation_preference_path"))
    output_dir = Path(os.environ.get("QE_TRL_OUTPUT_DIR", "data/models")) / recipe["run_id"]
    model, peft_config = load_model(recipe)
    trainer = DPOTrainer(
        model=model,
        args=DPOConfig(**common_args(recipe, output_dir), beta=hyper(recipe, "beta", 0.1)),
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        peft_config=peft_config,
    )
    metrics: dict[str, Any] = {"method": "dpo", "pairs": len(train_rows) + len(eval_rows)}
    if eval_rows:
        metrics["base_eval_loss"] = float(trainer.evaluate()["eval_loss"])
    metrics["train_loss"] = float(trainer.train().training_loss)
    if eval_rows:
        after = trainer.evaluate()
        metrics["eval_loss"] = float(after["eval_loss"])
        metrics["eval_reward_accuracy"] = float(after.get("eval_rewards/accuracies", 0.0))
    trainer.save_model(str(output_dir))
    return {"model_path": str(output_dir), "base_model": model_name(), **metrics}


def main() -> None:
    with open_dagster_pipes() as pipes:
        recipe = pipes.extras
        pipes.log.info(f"{recipe['version']}: {recipe.get('preference_pairs', 0)} pairs, DPO")
        pipes.report_asset_materialization(metadata=train(recipe))


if __name__ == "__main__":
    main()
