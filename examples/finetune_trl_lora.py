"""LoRA supervised fine-tuning with TRL, run by qe_assets' `command` backend through Dagster Pipes.

    pip install -e ".[train]"                 # torch, transformers, trl, peft, accelerate
    export QE_FINETUNE_BACKEND=command
    export QE_FINETUNE_COMMAND="python examples/finetune_trl_lora.py"
    export QE_TRL_MODEL=Qwen/Qwen2.5-0.5B-Instruct     # required: the model to adapt

The recipe arrives as Pipes extras (see qe_assets/finetune/inputs.py). `QE_TRL_DATA` picks the
file: `records` (default; prompt/completion with the sample's `weight`, trained as the chat
file's system and user turns and one assistant turn through the model's chat template, loss on
the completion only: the system message the evaluation sends) or `chat`
(the OpenAI chat lines, loss on the assistant turns only: `assistant_only_loss`). Either way each
sample's loss is multiplied by its `weight` (= the annotation confidence; seed §7.3: trust
confident samples more): a batch's loss is the weighted mean of its samples' mean token losses.

Hyperparameters (`QE_FINETUNE_HYPERPARAMETERS`): `n_epochs`, `learning_rate_multiplier`,
`batch_size` (OpenAI's names; `"auto"` keeps the default), `learning_rate`, `lora_r`,
`lora_alpha`, `max_length` (default 1024; a longer sample gives up context documents, lowest
score first, never its completion; one that still does not fit is named in the metrics, and the
run is refused when more than the recipe's `max_dropped_share` would be lost),
`gradient_accumulation_steps`, `gradient_checkpointing`, `max_steps`, `logging_steps` (the
first and last logged losses are reported as `train_loss_first` / `train_loss_last`). bf16 is
used only where the GPU supports it.

The adapter is saved under `$QE_TRL_OUTPUT_DIR/<run_id>` (default `data/models`) and reported as
`model_path` with `base_model` (the model it adapted), `train_loss`, `eval_loss` and
`base_eval_loss` (the validation loss before training) and the fitting counts as metrics;
qe_assets records them in `fine_tune_runs`. The next round continues from that adapter.
`QE_TRL_DRY_RUN=1` checks the records and trains nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dagster_pipes import PipesContext, open_dagster_pipes


def read_lines(path: str | None) -> list[dict[str, Any]]:
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


def hyper(recipe: dict[str, Any], key: str, default: Any, cast: type = float) -> Any:
    """A hyperparameter, or the default when it is missing or OpenAI's "auto"."""
    value = (recipe.get("hyperparameters") or {}).get(key)
    return default if value in (None, "auto") else cast(value)


def model_name() -> str:
    name = os.environ.get("QE_TRL_MODEL")
    if not name:
        # The recipe's base_model is the OpenAI backend's (gpt-4o-mini…): not loadable here.
        raise SystemExit("QE_TRL_MODEL must name the model to adapt (a Hugging Face id or folder)")
    return name


def weighted_loss(logits: Any, labels: Any, weights: Any) -> Any:
    """Σ wᵢ·lossᵢ / Σ wᵢ, lossᵢ = sample i's mean next-token loss over its labelled tokens."""
    import torch

    logits, labels = logits[:, :-1, :].float(), labels[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="none", ignore_index=-100
    ).view(labels.size())
    mask = (labels != -100).float()
    per_sample = (token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return (per_sample * weights).sum() / weights.sum().clamp(min=1e-6)


class WeightedCollator:
    """TRL's collator returns only input_ids, attention_mask and labels: carry `weight` past it."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        weights = torch.tensor([float(e.get("weight", 1.0)) for e in examples])
        batch = self.base([{k: v for k, v in e.items() if k != "weight"} for e in examples])
        batch["weight"] = weights
        return batch


def rows(recipe: dict[str, Any], split: str, data: str) -> list[dict[str, Any]]:
    """The split's samples as conversational TRL rows, each with its weight and sample id.

    Both formats take the prompt turns (the system message and the user's prompt) from the chat
    file, so training sees the same system message the evaluation gate sends; the chat lines are
    written in the same order as the records, whose weight comes along."""
    records = read_lines(recipe.get(f"{split}_records_path"))
    check_records(records, split)
    chats = read_lines(recipe.get(f"{split}_chat_path"))
    out = []
    for record, chat in zip(records, chats, strict=True):
        turns = chat["messages"]
        row: dict[str, Any] = {"weight": float(record["weight"])}
        if data == "chat":
            row["messages"] = turns
        else:
            row["prompt"] = [t for t in turns if t["role"] != "assistant"]
            row["completion"] = [{"role": "assistant", "content": record["completion"]}]
        out.append((row, str(record.get("sample_id", len(out) + 1))))
    return out  # type: ignore[return-value]


def _turns(row: dict[str, Any]) -> list[dict[str, Any]]:
    return row["messages"] if "messages" in row else [*row["prompt"], *row["completion"]]


def sequences(row: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """The conversations a row trains on: one for SFT; for a preference pair (DPO) the prompt
    with its chosen and with its rejected answer, each of which must fit."""
    if "chosen" in row:
        return [[*row["prompt"], *row["chosen"]], [*row["prompt"], *row["rejected"]]]
    return [_turns(row)]


def _with_user(row: dict[str, Any], prompt: str) -> dict[str, Any]:
    """The row with its (first) user turn's text replaced."""
    key = "messages" if "messages" in row else "prompt"
    turns, done = [], False
    for turn in row[key]:
        if turn["role"] == "user" and not done:
            turn, done = {**turn, "content": prompt}, True
        turns.append(turn)
    return {**row, key: turns}


def _user(row: dict[str, Any]) -> str:
    turns = row["messages"] if "messages" in row else row["prompt"]
    return next(t["content"] for t in turns if t["role"] == "user")


def token_count(tokenizer: Any, turns: list[dict[str, Any]]) -> int:
    ids = tokenizer.apply_chat_template(turns, tokenize=True)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)


def fit_rows(
    pipes: PipesContext,
    recipe: dict[str, Any],
    split: str,
    named: list[tuple[dict[str, Any], str]],
    tokenizer: Any,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`named` (row, sample id) with each row within max_length: a sample that is too long gives
    up its lowest-scored context documents, never its completion (nor a pair's chosen or
    rejected answer) (qe_assets.finetune.fitting); one that still does not fit is left out,
    counted and named. Refuses the run (SystemExit) when more than the recipe's
    max_dropped_share of the split would be lost."""
    from qe_assets.finetune.fitting import dropped_refusal, fit_samples

    # One token of room: TRL may add an end-of-sequence token the template does not write.
    budget = hyper(recipe, "max_length", 1024, int) - 1

    def fits(index: int, prompt: str) -> bool:
        row = _with_user(named[index][0], prompt)
        return all(token_count(tokenizer, turns) <= budget for turns in sequences(row))

    fitted = fit_samples([_user(r) for r, _ in named], [sid for _, sid in named], fits)
    share = float(recipe.get("max_dropped_share", 0.01))
    if refusal := dropped_refusal(split, fitted.dropped, len(named), share):
        raise SystemExit(refusal)
    kept = [
        _with_user(named[i][0], fitted.prompts[i]) if i in fitted.prompts else named[i][0]
        for i in fitted.kept
    ]
    if fitted.trimmed or fitted.dropped:
        pipes.log.warning(
            f"{split}: {fitted.trimmed} samples gave up context documents to fit max_length, "
            f"{len(fitted.dropped)} did not fit at all: {fitted.dropped[:5]}"
        )
    metrics = {
        f"{split}_samples": len(kept),
        f"{split}_trimmed_samples": fitted.trimmed,
        f"{split}_dropped_samples": len(fitted.dropped),
        f"{split}_dropped_sample_ids": fitted.dropped,
    }
    return kept, metrics


def fitted_rows(
    pipes: PipesContext, recipe: dict[str, Any], split: str, data: str, tokenizer: Any
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The split's SFT rows, fitted (`fit_rows`)."""
    return fit_rows(pipes, recipe, split, rows(recipe, split, data), tokenizer)


def load_model(recipe: dict[str, Any]) -> tuple[Any, Any]:
    """(model or its name, LoRA config): a new adapter on QE_TRL_MODEL, or the previous round's
    adapter (recipe `previous_model`, a folder this script wrote) trained further."""
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    previous = recipe.get("previous_model")
    if previous and (Path(previous) / "adapter_config.json").exists():
        base = AutoModelForCausalLM.from_pretrained(model_name())
        return PeftModel.from_pretrained(base, previous, is_trainable=True), None
    config = LoraConfig(
        r=hyper(recipe, "lora_r", 16, int),
        lora_alpha=hyper(recipe, "lora_alpha", 32, int),
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    return model_name(), config


def common_args(recipe: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """TrainingArguments shared by the SFT and DPO examples."""
    import torch

    return {
        "output_dir": str(output_dir),
        "num_train_epochs": hyper(recipe, "n_epochs", 1.0),
        "max_steps": hyper(recipe, "max_steps", -1, int),
        "learning_rate": hyper(recipe, "learning_rate", 2e-4)
        * hyper(recipe, "learning_rate_multiplier", 1.0),
        "per_device_train_batch_size": hyper(recipe, "batch_size", 4, int),
        "per_device_eval_batch_size": hyper(recipe, "batch_size", 4, int),
        "gradient_accumulation_steps": hyper(recipe, "gradient_accumulation_steps", 1, int),
        # TRL's default saves GPU memory; on a tiny model it only costs time.
        "gradient_checkpointing": hyper(recipe, "gradient_checkpointing", True, bool),
        "max_length": hyper(recipe, "max_length", 1024, int),
        # TRL turns bf16 on by default; CPUs and pre-Ampere GPUs cannot run it.
        "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        "report_to": [],
        "logging_steps": hyper(recipe, "logging_steps", 10, int),
        "save_strategy": "no",
        "seed": 0,
    }


def train(pipes: PipesContext, recipe: dict[str, Any]) -> dict[str, Any]:
    # Imported here so a dry run needs none of the heavy packages.
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    data = os.environ.get("QE_TRL_DATA", "records")
    output_dir = Path(os.environ.get("QE_TRL_OUTPUT_DIR", "data/models")) / recipe["run_id"]

    class WeightedSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
            weights = inputs.pop("weight").to(model.device)
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            loss = weighted_loss(outputs.logits, labels, weights)
            return (loss, outputs) if return_outputs else loss

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name())
    train_rows, fit_metrics = fitted_rows(pipes, recipe, "train", data, tokenizer)
    eval_rows, eval_fit = fitted_rows(pipes, recipe, "validation", data, tokenizer)
    fit_metrics.update(eval_fit)
    model, peft_config = load_model(recipe)
    trainer = WeightedSFTTrainer(
        model=model,
        args=SFTConfig(
            **common_args(recipe, output_dir),
            completion_only_loss=data == "records",
            assistant_only_loss=data == "chat",
            remove_unused_columns=False,  # keep `weight` for the collator
        ),
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.data_collator = WeightedCollator(trainer.data_collator)
    # Our loss is a batch mean, not scaled by the token count of the whole accumulated step:
    # the trainer must divide it by the accumulation steps (else loss and gradients double).
    trainer.loss_is_scaled_for_ga = False
    # Every row was fitted above: TRL must have kept each one whole (it drops or cuts silently).
    for name, given, dataset in (
        ("train", train_rows, trainer.train_dataset),
        ("validation", eval_rows, trainer.eval_dataset),
    ):
        if dataset is None:
            continue
        cut = sum(len(ids) >= trainer.args.max_length for ids in dataset["input_ids"])
        if len(dataset) != len(given) or cut:
            raise SystemExit(
                f"{name}: the trainer kept {len(dataset)} of {len(given)} fitted samples, "
                f"{cut} at max_length={trainer.args.max_length}: the chat template counts "
                "differently from the fitting"
            )
    truncated = 0  # kept for older readers of the metrics: nothing is cut any more
    metrics: dict[str, Any] = {"data": data, "truncated_samples": truncated, **fit_metrics}
    if eval_rows:
        metrics["base_eval_loss"] = float(trainer.evaluate()["eval_loss"])
    metrics["train_loss"] = float(trainer.train().training_loss)
    # The first and last logged training losses (every `logging_steps` steps): how it went.
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if logged:
        metrics["train_loss_first"], metrics["train_loss_last"] = logged[0], logged[-1]
    if eval_rows:
        metrics["eval_loss"] = float(trainer.evaluate()["eval_loss"])
    trainer.save_model(str(output_dir))
    return {"model_path": str(output_dir), "base_model": model_name(), **metrics}


def main() -> None:
    with open_dagster_pipes() as pipes:
        recipe = pipes.extras
        if os.environ.get("QE_TRL_DRY_RUN") == "1":
            train_rows = read_lines(recipe["train_records_path"])
            eval_rows = read_lines(recipe.get("validation_records_path"))
            check_records(train_rows, "train")
            check_records(eval_rows, "validation")
            weights = [float(r["weight"]) for r in train_rows]
            pipes.report_asset_materialization(
                metadata={
                    "dry_run": True,
                    "train_records": len(train_rows),
                    "validation_records": len(eval_rows),
                    "mean_weight": sum(weights) / len(weights) if weights else 0.0,
                }
            )
            return
        pipes.log.info(f"{recipe['version']}: {recipe['train']} train / {recipe['validation']} val")
        pipes.report_asset_materialization(metadata=train(pipes, recipe))


if __name__ == "__main__":
    main()
