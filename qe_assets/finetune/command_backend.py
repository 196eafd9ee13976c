"""The `command` backend: a user's training command run through Dagster Pipes.

The command receives the recipe (dataset paths, split files, base model, hyperparameters,
weighting) as Pipes extras and reports its metrics and the model it produced with
`report_asset_materialization(metadata={"model_id" or "model_path": ..., ...})`.
"""

from __future__ import annotations

import shlex
import sys
from typing import Any

import dagster as dg
from dagster._core.errors import DagsterPipesExecutionError  # not exported by dagster

from qe_assets.finetune.inputs import TrainingInputs

MODEL_KEYS = ("model_id", "model_path")
# A command that starts with a bare `python` runs with the interpreter running Dagster: the one
# with the train extra installed. PATH's `python` is often not that one (a venv that was never
# activated, or none at all on a fresh box).
BARE_PYTHON = ("python", "python3")


def command_argv(command: str) -> list[str]:
    """`QE_FINETUNE_COMMAND` split like a shell would, a leading bare `python` made this
    environment's interpreter."""
    argv = shlex.split(command)
    if argv and argv[0] in BARE_PYTHON:
        argv[0] = sys.executable
    return argv


def run_command(
    context: dg.AssetExecutionContext, command: str, inputs: TrainingInputs
) -> dict[str, Any]:
    """Run the command; returns the metadata it reported (values unwrapped). A failed command
    raises with the exception the script reported through Pipes, when it reported one."""
    try:
        invocation = dg.PipesSubprocessClient().run(
            context=context,
            command=command_argv(command),
            extras=inputs.recipe(),
        )
    except DagsterPipesExecutionError as exc:
        reported = reported_exception(context)
        if reported is None:
            raise
        raise RuntimeError(f"{exc}: {reported}") from exc
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


def reported_exception(context: dg.AssetExecutionContext) -> str | None:
    """The last exception the external process reported when closing Pipes, e.g. a missing
    setting of the training script, as "Class: message"."""
    for record in reversed(
        context.instance.all_logs(context.run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
    ):
        event = record.dagster_event
        data = event.engine_event_data if event is not None else None
        if data is not None and data.error is not None and "pipes closed" in (event.message or ""):
            return data.error.message.strip()
    return None
