"""The Dagster code location: assets, checks, jobs, sensors and resources of qe_assets.

Importing this module builds nothing: `defs` is a `@dg.definitions` entry point that Dagster
(workspace.yaml, `dagster dev`) calls when it loads the code location, so the settings are read
and checked then, not at import. `build_definitions(settings)` builds the same thing for the CLI
and the tests.
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

from qe_assets.annotate.assets import annotated_samples
from qe_assets.annotate.complete import completions, judge_agreement
from qe_assets.evaluation.assets import candidate_beats_production, model_evaluation
from qe_assets.finetune.assets import fine_tuned_model
from qe_assets.finetune.resource import FineTuneBackendResource
from qe_assets.finetune.serving.resource import ModelServerResource
from qe_assets.ingest.assets import raw_events
from qe_assets.ingest.resource import QueueResource
from qe_assets.lib.resources import OpenAIResource, PipelineSettings, QeDuckDBResource
from qe_assets.ops.sensors import build_finetune_sensor, build_import_sensor, build_queue_sensor
from qe_assets.release.assets import tuning_dataset
from qe_assets.release.checks import DATASET_CHECKS
from qe_assets.release.published import published_dataset, superseded_copies_withdrawn
from qe_assets.rollout.assets import ab_test, candidate_not_worse
from qe_assets.settings import Settings
from qe_assets.store import WRITER_CONFIG

PIPELINE_JOB = "qe_pipeline"
RELEASE_JOB = "qe_release"
# ab_test (group release) runs with every ingest: new events and count records are its input.
PROCESSING_ASSETS = [raw_events, annotated_samples, completions, ab_test]
RELEASE_ASSETS = [tuning_dataset, published_dataset, fine_tuned_model, model_evaluation]
ASSETS = [*PROCESSING_ASSETS, *RELEASE_ASSETS]
RELEASE_CHECKS = [*DATASET_CHECKS, superseded_copies_withdrawn, candidate_beats_production]
ASSET_CHECKS = [*RELEASE_CHECKS, candidate_not_worse, judge_agreement]


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    """Definitions for the given settings (default: the environment), so tests and the CLI
    load exactly what the UI loads."""
    settings = settings or Settings.from_env()
    # One process, one step at a time: DuckDB has a single writer per file.
    pipeline = dg.define_asset_job(
        PIPELINE_JOB,
        selection=dg.AssetSelection.assets(*PROCESSING_ASSETS)
        | dg.AssetSelection.checks(candidate_not_worse),
        description=("Ingest the queue, annotate and complete what is new; look at the A/B test."),
        executor_def=dg.in_process_executor,
    )
    release_job = dg.define_asset_job(
        RELEASE_JOB,
        selection=dg.AssetSelection.assets(*RELEASE_ASSETS)
        | dg.AssetSelection.checks(*RELEASE_CHECKS),
        description=(
            "Publish a dataset version (the oldest committed one not released yet, else a new "
            "cut from every ready sample), check it and fine-tune on it."
        ),
        executor_def=dg.in_process_executor,
    )
    return dg.Definitions(
        assets=ASSETS,
        asset_checks=ASSET_CHECKS,
        jobs=[pipeline, release_job],
        sensors=[
            build_queue_sensor(
                PIPELINE_JOB, settings.queue_sensor_running, settings.sensor_interval_seconds
            ),
            build_finetune_sensor(
                RELEASE_JOB, settings.finetune_sensor_running, settings.sensor_interval_seconds
            ),
            build_import_sensor(
                "phoenix", settings.phoenix_sensor_running, settings.import_interval_seconds
            ),
            build_import_sensor(
                "langfuse", settings.langfuse_sensor_running, settings.import_interval_seconds
            ),
        ],
        resources=build_resources(settings),
        # "Materialize all" on the lineage page runs the implicit asset job, which would use the
        # multiprocess executor: a process per step (far slower, docs/performance.md) for steps
        # that take turns on DuckDB's single writer anyway.
        executor=dg.in_process_executor,
    )


@dg.definitions
def defs() -> dg.Definitions:
    """The code location as the UI loads it: the settings from the environment."""
    return build_definitions()


def build_resources(settings: Settings) -> dict[str, Any]:
    """The resources for `settings`, built without touching the disk: the database's directory
    is made by the first write connection (`store.writer_connection`), not here."""
    return {
        "duckdb": QeDuckDBResource(
            database=str(settings.database),
            connection_config={**WRITER_CONFIG, "memory_limit": settings.duckdb_memory_limit},
        ),
        "settings": PipelineSettings(**settings.model_dump()),
        "queue": QueueResource.from_settings(settings),
        "finetune": FineTuneBackendResource.from_settings(settings),
        "model_server": ModelServerResource.from_settings(settings),
        "openai": OpenAIResource(
            # Only a reference when the variable is set, so an offline setup loads without it.
            api_key=dg.EnvVar("OPENAI_API_KEY") if os.environ.get("OPENAI_API_KEY") else None,
            base_url=settings.openai_base_url,
            timeout_seconds=settings.llm_timeout_seconds,
            max_retries=settings.llm_max_retries,
        ),
    }
