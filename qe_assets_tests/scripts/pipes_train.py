"""A stand-in training command for the `command` backend: reads the recipe through Dagster Pipes,
checks its files, and reports metrics and a model path like a real trainer would."""

import json
import os
import sys

from dagster_pipes import open_dagster_pipes

with open_dagster_pipes() as pipes:
    recipe = pipes.extras
    with open(recipe["train_records_path"], encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    if os.environ.get("FAKE_TRAIN_FAIL"):
        # Lines a dying trainer writes without reporting an exception through Pipes.
        print("loading the model\rloading the model: 100%", file=sys.stderr)
        print("torch.OutOfMemoryError: out of GPU memory", file=sys.stderr)
        sys.exit(3)
    pipes.log.info(f"training on {len(rows)} records of {recipe['version']}")
    pipes.report_asset_materialization(
        metadata={
            "model_path": f"/models/{recipe['run_id']}",
            "train_loss": 0.42,
            "train_records": len(rows),
            "weight_sum": round(sum(r["weight"] for r in rows), 4),
            # A real trainer reports the model it adapted (finetune_trl_lora.py: QE_TRL_MODEL).
            "base_model": os.environ.get("FAKE_BASE_MODEL", recipe["base_model"]),
        }
    )
