"""The Dagster code location: assets, checks, jobs, sensors and resources of qe_assets."""

from __future__ import annotations

import dagster as dg

from qe_assets.assets.capture import raw_events
from qe_assets.resources import build_resources
from qe_assets.settings import Settings

PIPELINE_JOB = "qe_pipeline"


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    """Definitions for the given settings (default: the environment), so tests and the CLI
    load exactly what the UI loads."""
    settings = settings or Settings.from_env()
    assets = [raw_events]
    pipeline = dg.define_asset_job(
        PIPELINE_JOB,
        selection=dg.AssetSelection.assets(*assets),
        description="One pass of the loop: ingest the queue and process what is new.",
        # One process, one step at a time: DuckDB has a single writer per file.
        executor_def=dg.in_process_executor,
    )
    return dg.Definitions(
        assets=assets,
        jobs=[pipeline],
        resources=build_resources(settings),
    )


defs = build_definitions()
