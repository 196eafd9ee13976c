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

The pairs keep their data the way the SFT example keeps its samples (`fit_rows`): TRL cuts a
pair at `max_length` from the end (the end of the chosen and rejected answers, what DPO compares)
and drops one whose prompt alone fills it. Here a pair that is too long gives up its context
documents, lowest score first, never a character of the chosen or rejected answer; a pair that
still does not fit is left out, counted and named (`train pair 12`: its line in the split's
preference file) in the metrics, and the run is refused when more than the recipe's
`max_dropped_share` (QE_TRAIN_MAX_DROPPED_SHARE) would be lost. The prompt turns are the
preference file's, written like the chat file's: the system message the evaluation sends.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dagster_pipes import PipesContext, open_dagster_pipes
from finetune_trl_lora import common_args, fit_rows, hyper, load_model, model_name, read_lines


def pairs(recipe: dict[str, Any], split: str) -> list[tuple[dict[str, Any], str]]:
    """The split's preference pairs, each named by its line in the file."""
    lines = read_lines(recipe.get(f"{split}_preference_path"))
    for number, line in enumerate(lines, start=1):
        for key in ("prompt", "chosen", "rejected"):
            if not line.get(key):
                raise SystemExit(f"{split} preference line {number}: missing {key}")
    return [(line, f"{split} pair {number}") for number, line in enumerate(lines, start=1)]


def check_kept(trainer: Any, name: str, given: list[dict[str, Any]], dataset: Any) -> None:
    """Every pair was fitted: TRL must have kept each one whole (it drops or cuts silently)."""
    if dataset is None:
        return
    limit = trainer.args.max_length
    cut = sum(
        len(prompt) + max(len(chosen), len(rejected)) > limit
        for prompt, chosen, rejected in zip(
            dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True
        )
    )
    if len(dataset) != len(given) or cut:
        raise SystemExit(
            f"{name}: the trainer kept {len(dataset)} of {len(given)} fitted pairs, {cut} over "
            f"max_length={limit}: the chat template counts differently from the fitting"
        )


def train(pipes: PipesContext, recipe: dict[str, Any]) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    train_pairs = pairs(recipe, "train")
    if not train_pairs:
        raise SystemExit(f"{recipe['version']}: no preference pairs on the train side")
    eval_pairs = pairs(recipe, "validation")
    tokenizer = AutoTokenizer.from_pretrained(model_name())
    train_rows, fit_metrics = fit_rows(pipes, recipe, "train", train_pairs, tokenizer)
    eval_rows, eval_fit = fit_rows(pipes, recipe, "validation", eval_pairs, tokenizer)
    fit_metrics.update(eval_fit)
    output_dir = Path(os.environ.get("QE_TRL_OUTPUT_DIR", "data/models")) / recipe["run_id"]
    model, peft_config = load_model(recipe)
    trainer = DPOTrainer(
        model=model,
        args=DPOConfig(**common_args(recipe, output_dir), beta=hyper(recipe, "beta", 0.1)),
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    check_kept(trainer, "train", train_rows, trainer.train_dataset)
    check_kept(trainer, "validation", eval_rows, trainer.eval_dataset)
    metrics: dict[str, Any] = {
        "method": "dpo",
        "pairs": len(train_pairs) + len(eval_pairs),
        **fit_metrics,
    }
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
        pipes.report_asset_materialization(metadata=train(pipes, recipe))


if __name__ == "__main__":
    main()
