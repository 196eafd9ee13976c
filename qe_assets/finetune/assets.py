"""Stage 5, fine-tune: the oldest dataset version without a finished run → a model, recorded in
the `fine_tune_runs` registry."""

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource

from qe_assets.finetune.inputs import (
    DatasetInvalid,
    TrainingInputs,
    naive_refusal,
    prepare_inputs,
)
from qe_assets.finetune.resource import (
    SKIPPED_MESSAGE,
    Claim,
    FineTuneBackendResource,
    Trained,
)
from qe_assets.finetune.serving.folders import ServingError
from qe_assets.finetune.serving.resource import ModelServerResource
from qe_assets.lib.resources import OpenAIResource, PipelineSettings, duckdb_writer, exclusive_stage
from qe_assets.lib.stages import RELEASE_GROUP
from qe_assets.release.assets import tuning_dataset
from qe_assets.settings import Settings
from qe_assets.store.finetune_runs import (
    attempts,
    latest_run,
    pending_version,
    previous_model,
    save_run,
)

__all__ = ["SKIPPED_MESSAGE", "Claim", "Trained", "claim_run", "fine_tuned_model"]


@dataclass(frozen=True)
class FormatVerdict:
    """A passed `dataset_format_valid`: the version and the stamps of the files it read."""

    version: str
    stamps: dict[str, Any]


FORMAT_CHECK = dg.AssetCheckKey(tuning_dataset.key, "dataset_format_valid")


def format_verdict(instance: dg.DagsterInstance) -> FormatVerdict | None:
    """The latest `dataset_format_valid` evaluation, if it passed on files nothing was writing.

    In a release run the blocking check has just parsed every line of the version; its verdict
    lets the fine-tune skip parsing them again (the stamps say whether they are still the same
    files, see `prepare_inputs`)."""
    record = instance.event_log_storage.get_latest_asset_check_execution_by_key([FORMAT_CHECK]).get(
        FORMAT_CHECK
    )
    event = record.event if record is not None else None
    evaluation = event.dagster_event.event_specific_data if event and event.dagster_event else None
    if not isinstance(evaluation, dg.AssetCheckEvaluation) or not evaluation.passed:
        return None
    version = evaluation.metadata.get("version")
    stamps = evaluation.metadata.get("checked_files")
    if version is None or stamps is None or not stamps.value:
        return None
    return FormatVerdict(str(version.value), dict(stamps.value))


def _inputs_from(row: dict[str, Any]) -> TrainingInputs:
    return TrainingInputs(**json.loads(row["recipe"]))


def claim_run(
    conn: duckdb.DuckDBPyConnection,
    settings: Settings,
    backend: FineTuneBackendResource,
    dagster_run_id: str | None,
    log: Callable[[str], None],
    format_checked: FormatVerdict | None = None,
) -> Claim | None:
    """Take the oldest version without a finished run of `backend`: resume its `running` attempt
    (same run id and recipe, so a provider job created for it, even one whose id was never saved,
    is found and followed instead of starting another), else prepare a new attempt and record it
    `running`. Call it under the writer lock, so two runs never claim the same version."""
    name = backend.name
    version = pending_version(conn, name)
    if version is None:
        log(f"every dataset version already has a finished {name} run; nothing to do")
        return None
    last = latest_run(conn, version, name)
    if last is not None and last["status"] == "running" and last["recipe"]:
        inputs = _inputs_from(last)
        log(f"resuming {last['run_id']} (job {last['job_id'] or 'not saved yet'})")
        folder = Path(inputs.train_chat_path).parent
        if not (folder / "recipe.json").exists() or not Path(inputs.train_chat_path).exists():
            # Its folder was removed (or is a pre-atomic half-written one): write it again.
            inputs = _prepare(conn, settings, backend, version, last["run_id"], format_checked, log)
        return Claim(last["run_id"], version, inputs, last["job_id"])
    refusal = naive_refusal(conn, version, name, backend.allow_naive)
    if refusal is not None:
        raise dg.Failure(refusal)
    run_id = f"{version}-{name}-{attempts(conn, version, name) + 1}"
    inputs = _prepare(conn, settings, backend, version, run_id, format_checked, log)
    save_run(
        conn,
        run_id,
        dataset_version=version,
        backend=name,
        status="running",
        base_model=inputs.base_model,
        recipe=inputs.recipe(),
        dagster_run_id=dagster_run_id,
    )
    return Claim(run_id, version, inputs, None)


def _prepare(
    conn: duckdb.DuckDBPyConnection,
    settings: Settings,
    backend: FineTuneBackendResource,
    version: str,
    run_id: str,
    format_checked: FormatVerdict | None,
    log: Callable[[str], None],
) -> TrainingInputs:
    previous = previous_model(conn, backend.name, version)
    stamps = format_checked.stamps if format_checked and format_checked.version == version else None
    try:
        return prepare_inputs(conn, settings, backend, version, run_id, previous, stamps, log)
    except DatasetInvalid as exc:
        raise dg.Failure(str(exc)) from exc


@dg.asset(
    deps=[tuning_dataset],
    group_name=RELEASE_GROUP,
    kinds={"openai", "python"},
    output_required=False,
    description=(
        "A model fine-tuned on the oldest dataset version that has no finished run yet, with the "
        "backend of the `finetune` resource (QE_FINETUNE_BACKEND; a run may override it): "
        "`openai` (upload, create the job, follow it with a deadline; a "
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
    finetune: FineTuneBackendResource,
    openai: OpenAIResource,
    model_server: ModelServerResource,
) -> Iterator[dg.MaterializeResult]:
    verdict = format_verdict(context.instance)
    # Claimed under the writer lock (briefly; the training itself runs without it).
    with exclusive_stage(context, settings), duckdb_writer(duckdb) as conn:
        claim = claim_run(conn, settings, finetune, context.run.run_id, context.log.info, verdict)
    if claim is None:
        return

    def save(**fields: Any) -> None:
        with duckdb_writer(duckdb) as conn:
            save_run(conn, claim.run_id, **fields)

    trained = finetune.train(context, claim, openai, save)
    trained = _served(context, model_server, claim, trained)
    # A training command reports the model it really adapted (QE_TRL_MODEL), which is what the
    # gate must ask as the baseline, not QE_FINETUNE_BASE_MODEL (an OpenAI model name).
    reported_base = {"base_model": trained.base_model} if trained.base_model else {}
    save(
        status=trained.status,
        model_id=trained.model_id,
        metrics=trained.metrics,
        message=trained.message,
        **reported_base,
    )
    metadata = _run_metadata(settings, finetune, claim, trained)
    if trained.status == "skipped":
        # Nothing was trained: no model to show as materialized, but the reason and the recipe
        # stay visible on the asset (an observation) and in the run's log.
        context.log.info(
            f"{claim.version}: {trained.message} (QE_FINETUNE_BACKEND=openai or command trains); "
            f"the recipe is at {metadata['recipe_path'].path}"
        )
        context.log_event(dg.AssetObservation(asset_key=context.asset_key, metadata=metadata))
        return
    yield dg.MaterializeResult(
        metadata=metadata,
        data_version=dg.DataVersion(trained.model_id or f"{claim.version}:{trained.status}"),
    )


def _served(
    context: dg.AssetExecutionContext,
    model_server: ModelServerResource,
    claim: Claim,
    trained: Trained,
) -> Trained:
    """A locally trained adapter registered on the model server under `model_rag_qa_vNNN`
    (QE_MODEL_SERVER), its names added to the run's metrics. A server that cannot take it is a
    warning, not a lost model: the adapter is trained and recorded either way."""
    if trained.status != "succeeded" or not trained.model_id or finetune_is_hosted(trained):
        return trained
    base = trained.base_model or claim.inputs.base_model
    try:
        registration = model_server.register(trained.model_id, claim.version, base)
    except ServingError as exc:
        context.log.warning(f"{trained.model_id} is trained but not served: {exc}")
        return replace(trained, metrics={**trained.metrics, "serving_error": str(exc)})
    if registration is None:
        return trained
    if registration.note:
        context.log.warning(registration.note)
    else:
        context.log.info(f"{trained.model_id} served as {registration.name}")
    return replace(trained, metrics={**trained.metrics, **registration.metadata()})


def finetune_is_hosted(trained: Trained) -> bool:
    """An `ft:` model lives at the provider: nothing to serve here."""
    return bool(trained.model_id and trained.model_id.startswith("ft:"))


def _run_metadata(
    settings: Settings, finetune: FineTuneBackendResource, claim: Claim, trained: Trained
) -> "dict[str, dg.RawMetadataValue]":
    metadata: dict[str, dg.RawMetadataValue] = {
        "run_id": claim.run_id,
        "dataset_version": claim.version,
        "backend": finetune.name,
        "status": trained.status,
        "base_model": trained.base_model or claim.inputs.base_model,
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
