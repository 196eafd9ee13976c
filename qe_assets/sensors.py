"""The sensor that starts a fine-tuning round once enough new samples are ready."""

import json

import dagster as dg

from qe_assets.export import version_name
from qe_assets.readiness import ready_sample_count, version_state
from qe_assets.resources import PipelineSettings
from qe_assets.store import DatabaseBusy, connect

IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def build_finetune_sensor(job_name: str, running_by_default: bool) -> dg.SensorDefinition:
    @dg.sensor(
        name="finetune_threshold_sensor",
        job_name=job_name,
        minimum_interval_seconds=60,
        default_status=dg.DefaultSensorStatus.RUNNING
        if running_by_default
        else dg.DefaultSensorStatus.STOPPED,
        description=(
            "Counts ready samples (completed, not yet in a version) with a short read-only "
            "query; when they reach QE_FINETUNE_THRESHOLD it requests one run of the release "
            "job, which cuts the next dataset version and fine-tunes on it. Fires once per "
            "crossing (run key = next version @ newest completion), never while a release run is "
            "in flight. Stopped by default: turn it on here (Automation → this sensor → toggle) "
            "or set QE_FINETUNE_SENSOR_RUNNING=true."
        ),
    )
    def finetune_threshold_sensor(
        context: dg.SensorEvaluationContext, settings: PipelineSettings
    ) -> dg.SensorResult | dg.SkipReason:
        in_flight = context.instance.get_run_records(
            filters=dg.RunsFilter(job_name=job_name, statuses=IN_FLIGHT), limit=1
        )
        if in_flight:
            return dg.SkipReason(
                f"release run {in_flight[0].dagster_run.run_id} is still in flight"
            )
        if not settings.database.exists():
            return dg.SkipReason(f"no database at {settings.database} yet")
        try:
            # Read-only and bounded: the sensor never holds the write lock and never waits long.
            with connect(settings.database, read_only=True, wait_seconds=5) as conn:
                state = version_state(conn)
                ready = ready_sample_count(conn, state)
        except DatabaseBusy:
            return dg.SkipReason("the database is busy with a writer; looking again next tick")
        threshold = settings.finetune_threshold
        if ready < threshold:
            return dg.SkipReason(f"{ready} ready samples, below the threshold of {threshold}")
        version = version_name(state.next_number)
        run_key = f"{version}@{state.high}"
        cursor = json.loads(context.cursor) if context.cursor else {}
        if cursor.get("run_key") == run_key:
            return dg.SkipReason(f"already requested {run_key}; waiting for new samples")
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=run_key,
                    tags={"qe/dataset_version": version, "qe/ready_samples": str(ready)},
                )
            ],
            cursor=json.dumps({"run_key": run_key, "ready": ready}),
        )

    return finetune_threshold_sensor
