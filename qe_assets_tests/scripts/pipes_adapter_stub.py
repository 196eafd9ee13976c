"""A stand-in training command that writes an adapter folder holding only its config (rank 24,
like a real PEFT adapter_config.json) and reports it with the base it adapted: for serving tests
whose server never reads the weights (the stand-in `vllm`)."""

import json
import os
from pathlib import Path

from dagster_pipes import open_dagster_pipes

with open_dagster_pipes() as pipes:
    recipe = pipes.extras
    output = Path(os.environ["QE_TRL_OUTPUT_DIR"]) / recipe["run_id"]
    output.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 24, "lora_alpha": 48, "base_model_name_or_path": "tiny"}
    (output / "adapter_config.json").write_text(json.dumps(config), "utf-8")
    pipes.report_asset_materialization(
        metadata={
            "model_path": str(output),
            "base_model": os.environ["FAKE_BASE_MODEL"],
            "train_loss": 0.1,
        }
    )
