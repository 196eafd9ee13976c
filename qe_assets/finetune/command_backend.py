"""The `command` backend: a user's training command run through Dagster Pipes.

The command receives the recipe (dataset paths, split files, base model, hyperparameters,
weighting) as Pipes extras and reports its metrics and the model it produced with
`report_asset_materialization(metadata={"model_id" or "model_path": ..., ...})`.
"""

from __future__ import annotations

import shlex
from typing import Any

import dagster as dg

from qe_assets.finetune.inputs import TrainingInputs

MODEL_KEYS = ("model_id", "model_path")


def run_command(
    context: dg.AssetExecutionContext, command: str, inputs: TrainingInputs
) -> dict[str, Any]:
    """Run the command; returns the metadata it reported (values unwrapped)."""
    invocation = dg.PipesSubprocessClient().run(
        context=context,
        command=shlex.split(command),
        extras=inputs.recipe(),
    )
    reported: dict[str, Any] = {}
    for result in invocation.get_results():
        for key, value in (getattr(result, "metadata", None) or {}).items():
            reported[key] = getattr(value, "value", value)
    return reported


def model_of(reported: dict[str, Any]) -> str | None:
    for key in MODEL_KEYS:
        if reported.get(key):
            return str(reported[key])
    return None
