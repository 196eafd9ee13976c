"""LoRA supervised fine-tuning with TRL, run by qe_assets' `command` backend through Dagster Pipes.

    export QE_FINETUNE_BACKEND=command
    export QE_FINETUNE_COMMAND="python examples/finetune_trl_lora.py"
    export QE_TRL_MODEL=Qwen/Qwen2.5-0.5B-Instruct     # a Hugging Face model to adapt
    pip install "trl>=0.20" peft transformers datasets torch accelerate   # on the GPU box

The recipe arrives as Pipes extras: `train_records_path` / `validation_records_path` (the seed's
records: prompt, completion, label, confidence, score, weight), the chat files, the dataset version
and `hyperparameters` (`n_epochs`, `learning_rate_multiplier` are mapped; `lora_r`, `lora_alpha`,
`learning_rate`, `batch_size` are read too). Each sample's loss is multiplied by its `weight`
(= the annotation confidence; seed §7.3: trust confident samples more). The adapter is saved under
`$QE_TRL_OUTPUT_DIR/<run_id>` (default `data/models`) and reported as `model_path` with the final
losses as metrics; qe_assets records both in `fine_tune_runs`.

`QE_TRL_DRY_RUN=1` reads and checks the records, reports their counts and weights, and trains
nothing: handy to try the wiring on a machine without a GPU (the test suite does this).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dagster_pipes import PipesContext, open_dagster_pipes


def read_records(path: str | None) -> list[dict[str, Any]]:
    if not path:
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def check_records(records: list[dict[str, Any]], name: str) -> None:
    for number, record in enumerate(records, start=1):
        for key in ("prompt", "completion", "weight"):
            if key not in record:
                raise ValueError(f"{name} line {number}: missing {key}")
        if not 0.0 <= float(record["weight"]) <= 1.0:
            raise ValueError(f"{name} line {number}: weight {record['weight']} outside [0, 1]")


def train(pipes: PipesContext, recipe: dict[str, Any], train_rows: list, eval_rows: list) -> None:
    # Imported here so a dry run needs none of the heavy packages.
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    hyper = recipe.get("hyperparameters") or {}
    model_name = os.environ.get("QE_TRL_MODEL") or recipe["base_model"]
    output_dir = Path(os.environ.get("QE_TRL_OUTPUT_DIR", "data/models")) / recipe["run_id"]

    class WeightedSFTTrainer(SFTTrainer):
        """Per-sample loss × weight, averaged over the batch."""

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):  # type: ignore[override]
            weights = inputs.pop("weight").to(model.device, dtype=torch.float32)
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            logits = outputs.logits[:, :-1, :].contiguous()
            labels = inputs["labels"][:, 1:].contiguous()
            token_loss = torch.nn.functional.cross_entropy(
                logits.view(-1, logits.size(-1)),
                labels.view(-1),
                reduction="none",
                ignore_index=-100,
            ).view(labels.size())
            mask = (labels != -100).float()
            per_sample = (token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
            loss = (per_sample * weights).sum() / weights.sum().clamp(min=1e-6)
            return (loss, outputs) if return_outputs else loss

    def to_dataset(rows: list[dict[str, Any]]) -> Dataset:
        return Dataset.from_list(
            [
                {"prompt": r["prompt"], "completion": r["completion"], "weight": float(r["weight"])}
                for r in rows
            ]
        )

    config = SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=float(hyper.get("n_epochs", 1)),
        learning_rate=float(hyper.get("learning_rate", 2e-4))
        * float(hyper.get("learning_rate_multiplier", 1.0)),
        per_device_train_batch_size=int(hyper.get("batch_size", 4)),
        completion_only_loss=True,
        remove_unused_columns=False,  # keep `weight` for compute_loss
        report_to=[],
        logging_steps=10,
    )
    trainer = WeightedSFTTrainer(
        model=model_name,
        args=config,
        train_dataset=to_dataset(train_rows),
        eval_dataset=to_dataset(eval_rows) if eval_rows else None,
        peft_config=LoraConfig(
            r=int(hyper.get("lora_r", 16)),
            lora_alpha=int(hyper.get("lora_alpha", 32)),
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    result = trainer.train()
    metrics = {"train_loss": float(result.training_loss)}
    if eval_rows:
        metrics["eval_loss"] = float(trainer.evaluate()["eval_loss"])
    trainer.save_model(str(output_dir))
    pipes.report_asset_materialization(
        metadata={"model_path": str(output_dir), "base_model": model_name, **metrics}
    )


def main() -> None:
    with open_dagster_pipes() as pipes:
        recipe = pipes.extras
        train_rows = read_records(recipe["train_records_path"])
        eval_rows = read_records(recipe.get("validation_records_path"))
        check_records(train_rows, "train")
        check_records(eval_rows, "validation")
        weights = [float(r["weight"]) for r in train_rows]
        pipes.log.info(
            f"{recipe['version']}: {len(train_rows)} train / {len(eval_rows)} validation records"
        )
        if os.environ.get("QE_TRL_DRY_RUN") == "1":
            pipes.report_asset_materialization(
                metadata={
                    "dry_run": True,
                    "train_records": len(train_rows),
                    "validation_records": len(eval_rows),
                    "mean_weight": sum(weights) / len(weights) if weights else 0.0,
                }
            )
            return
        train(pipes, recipe, train_rows, eval_rows)


if __name__ == "__main__":
    main()
