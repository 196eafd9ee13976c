"""Stage 5, fine-tune: the oldest dataset version without a finished run → a model, recorded in
the `fine_tune_runs` registry."""

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource

from qe_assets.assets import RELEASE_GROUP
from qe_assets.assets.dataset import tuning_dataset
from qe_assets.finetune.command_backend import model_of, run_command
from qe_assets.finetune.inputs import (
    DatasetInvalid,
    TrainingInputs,
    naive_refusal,
    prepare_inputs,
)
from qe_assets.finetune.openai_backend import (
    FineTuneFailed,
    FineTuneStillRunning,
    follow_job,
    start_job,
)
from qe_assets.finetune.registry import (
    attempts,
    latest_run,
    pending_version,
    previous_model,
    save_run,
)
from qe_assets.resources import OpenAIResource, PipelineSettings, duckdb_writer, exclusive_stage
from qe_assets.settings import Settings

SKIPPED_MESSAGE = "skipped: no backend configured"


def _inputs_from(row: dict[str, Any]) -> TrainingInputs:
    return TrainingInputs(**json.loads(row["recipe"]))


@dataclass(frozen=True)
class Claim:
    """The run a fine-tune works on: a new attempt, or an interrupted one resumed."""

    run_id: str
    version: str
    inputs: TrainingInputs
    job_id: str | None


def claim_run(
    conn: duckdb.DuckDBPyConnection,
    settings: Settings,
    dagster_run_id: str | None,
    log: Callable[[str], None],
) -> Claim | None:
    """Take the oldest version without a finished run: resume its `running` attempt (same run id
    and recipe, so a provider job created for it, even one whose id was never saved, is found and
    followed instead of starting another), else prepare a new attempt and record it `running`.
    Call it under the writer lock, so two runs never claim the same version."""
    backend = settings.finetune_backend
    version = pending_version(conn, backend)
    if version is None:
        log(f"every dataset version already has a finished {backend} run; nothing to do")
        return None
    last = latest_run(conn, version, backend)
    if last is not None and last["status"] == "running" and last["recipe"]:
        inputs = _inputs_from(last)
        log(f"resuming {last['run_id']} (job {last['job_id'] or 'not saved yet'})")
        folder = Path(inputs.train_chat_path).parent
        if not (folder / "recipe.json").exists() or not Path(inputs.train_chat_path).exists():
            # Its folder was removed (or is a pre-atomic half-written one): write it again.
            inputs = _prepare(conn, settings, version, last["run_id"])
        return Claim(last["run_id"], version, inputs, last["job_id"])
    refusal = naive_refusal(conn, version, backend, settings.finetune_allow_naive)
    if refusal is not None:
        raise dg.Failure(refusal)
    run_id = f"{version}-{backend}-{attempts(conn, version, backend) + 1}"
    inputs = _prepare(conn, settings, version, run_id)
    save_run(
        conn,
        run_id,
        dataset_version=version,
        backend=backend,
        status="running",
        base_model=inputs.base_model,
        recipe=inputs.recipe(),
        dagster_run_id=dagster_run_id,
    )
    return Claim(run_id, version, inputs, None)


def _prepare(
    conn: duckdb.DuckDBPyConnection, settings: Settings, version: str, run_id: str
) -> TrainingInputs:
    previous = previous_model(conn, settings.finetune_backend, version)
    try:
        return prepare_inputs(conn, settings, version, run_id, previous)
    except DatasetInvalid as exc:
        raise dg.Failure(str(exc)) from exc


@dg.asset(
    deps=[tuning_dataset],
    group_name=RELEASE_GROUP,
    kinds={"openai", "python"},
    output_required=False,
    description=(
        "A model fine-tuned on the oldest dataset version that has no finished run yet, with the "
        "configured backend: `openai` (upload, create the job, follow it with a deadline; a "
        "restarted run resumes the same job), `command` (your training script through Dagster "
        "Pipes) or `none` (the default: validates the version, writes the exact recipe and "
        "records the run as skipped — an observation, not a materialization: no model exists). "
        "A real backend refuses a version whose completions are mostly `naive` unless "
        "QE_FINETUNE_ALLOW_NAIVE=true. Every attempt is a row in `fine_tune_runs`."
    ),
)
def fine_tuned_model(
    context: dg.AssetExecutionContext,
    duckdb: DuckDBResource,
    settings: PipelineSettings,
    openai: OpenAIResource,
) -> Iterator[dg.MaterializeResult]:
    # Claimed under the writer lock (briefly; the training itself runs without it).
    with exclusive_stage(context, settings), duckdb_writer(duckdb) as conn:
        claim = claim_run(conn, settings, context.run.run_id, context.log.info)
    if claim is None:
        return

    def save(**fields: Any) -> None:
        with duckdb_writer(duckdb) as conn:
            save_run(conn, claim.run_id, **fields)

    trained = _train(context, settings, openai, claim, save)
    save(
        status=trained.status,
        model_id=trained.model_id,
        metrics=trained.metrics,
        message=trained.message,
    )
    metadata = _run_metadata(settings, claim, trained)
    if trained.status == "skipped":
        # Nothing was trained: no model to show as materialized, but the reason and the recipe
        # stay visible on the asset (an observation) and in the run's log.
        context.log.info(
            f"{claim.version}: {trained.message} (QE_FINETUNE_BACKEND=openai or command trains); "
            f"the recipe is at {metadata['recipe_path']}"
        )
        context.log_event(dg.AssetObservation(asset_key=context.asset_key, metadata=metadata))
        return
    yield dg.MaterializeResult(
        metadata=metadata,
        data_version=dg.DataVersion(trained.model_id or f"{claim.version}:{trained.status}"),
    )


@dataclass(frozen=True)
class Trained:
    """How an attempt ended: what `fine_tune_runs` records and the asset reports."""

    status: str
    model_id: str | None = None
    message: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    job_id: str | None = None


def _train(
    context: dg.AssetExecutionContext,
    settings: Settings,
    openai: OpenAIResource,
    claim: Claim,
    save: Callable[..., None],
) -> Trained:
    """Hand the claimed inputs to the configured backend; a failure is saved, then raised."""
    if settings.finetune_backend == "none":
        return Trained("skipped", message=SKIPPED_MESSAGE)
    if settings.finetune_backend == "openai":
        return _train_openai(context, settings, openai, claim, save)
    if not settings.finetune_command:
        raise dg.Failure("QE_FINETUNE_BACKEND=command needs QE_FINETUNE_COMMAND")
    try:
        metrics = run_command(context, settings.finetune_command, claim.inputs)
    except Exception as exc:
        save(status="failed", message=f"training command failed: {exc}"[:2000])
        raise
    return Trained("succeeded", model_id=model_of(metrics), metrics=metrics)


def _train_openai(
    context: dg.AssetExecutionContext,
    settings: Settings,
    openai: OpenAIResource,
    claim: Claim,
    save: Callable[..., None],
) -> Trained:
    """Start the job (unless the claim resumes one) and follow it up to the deadline."""
    client = openai.client()
    job_id = claim.job_id
    try:
        job_id = job_id or start_job(client, claim.inputs, save)
        outcome = follow_job(
            client,
            job_id,
            poll_seconds=settings.finetune_poll_seconds,
            deadline_seconds=settings.finetune_deadline_seconds,
            on_status=lambda s: context.log.info(f"job {job_id}: {s}"),
        )
    except FineTuneStillRunning as exc:
        save(message=str(exc))
        raise dg.Failure(str(exc)) from exc
    except FineTuneFailed as exc:
        # The provider's own status (failed or cancelled) and its events, for the post-mortem.
        failed = exc.outcome
        save(
            status=failed.status,
            message=str(exc),
            metrics={**failed.metrics, "events": failed.events},
        )
        raise dg.Failure(str(exc)) from exc
    metrics = {**outcome.metrics, "events": outcome.events}
    return Trained("succeeded", model_id=outcome.model_id, metrics=metrics, job_id=job_id)


def _run_metadata(
    settings: Settings, claim: Claim, trained: Trained
) -> "dict[str, dg.RawMetadataValue]":
    metadata: dict[str, dg.RawMetadataValue] = {
        "run_id": claim.run_id,
        "dataset_version": claim.version,
        "backend": settings.finetune_backend,
        "status": trained.status,
        "base_model": claim.inputs.base_model,
        "samples": claim.inputs.samples,
        "recipe_path": dg.MetadataValue.path(
            str(Path(settings.data_dir) / "finetune" / claim.run_id / "recipe.json")
        ),
    }
    job_id = trained.job_id or claim.job_id
    optional = {"model_id": trained.model_id, "job_id": job_id, "message": trained.message}
    metadata.update({k: v for k, v in optional.items() if v})
    numeric = {k: v for k, v in trained.metrics.items() if isinstance(v, int | float)}
    metadata.update({f"metric/{k}": v for k, v in numeric.items()})
    return metadata
