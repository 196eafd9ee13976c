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
        print("out of GPU memory", file=sys.stderr)
        sys.exit(3)
    pipes.log.info(f"training on {len(rows)} records of {recipe['version']}")
    pipes.report_asset_materialization(
        metadata={
            "model_path": f"/models/{recipe['run_id']}",
            "train_loss": 0.42,
            "train_records": len(rows),
            "weight_sum": round(sum(r["weight"] for r in rows), 4),
            "base_model": recipe["base_model"],
        }
    )
