"""The sensor that starts a release (publish a dataset version, check it, fine-tune on it) when one
is due: enough new samples are ready, or a committed version was never released."""

import json

import dagster as dg

from qe_assets.readiness import release_decision
from qe_assets.resources import PipelineSettings
from qe_assets.runner import NOT_ENDED, REAPED_TAG, VERSION_TAG, reap_dead_runs
from qe_assets.store import DatabaseBusy, connect

# Failed release runs of one version after which the sensor stops retrying it on its own (a fix
# and `qe run --cut-version`, or a launch from the UI, retry it). Runs of a killed `qe run` do
# not count: the version did nothing wrong.
MAX_RELEASE_FAILURES = 3
_ENDED_BADLY = [dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]


def _ended_badly(instance: dg.DagsterInstance, job_name: str, version: str) -> tuple[int, int]:
    """(release runs of `version` that failed or were cancelled, those not of a killed run)."""

    def count(**tags: str) -> int:
        return instance.get_runs_count(
            dg.RunsFilter(
                job_name=job_name, tags={VERSION_TAG: version, **tags}, statuses=_ENDED_BADLY
            )
        )

    ended = count()
    return ended, ended - count(**{REAPED_TAG: "true"})


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
            "job, which cuts the next dataset version and fine-tunes on it. A committed version "
            "whose release never ended (its run died) is released first, oldest first. Fires "
            "once per crossing (run key = version @ newest completion), never while a release "
            "run is in flight (runs of a dead `qe run` are marked failed first). Stopped by "
            "default: turn it on here (Automation → this sensor → toggle) or set "
            "QE_FINETUNE_SENSOR_RUNNING=true."
        ),
    )
    def finetune_threshold_sensor(
        context: dg.SensorEvaluationContext, settings: PipelineSettings
    ) -> dg.SensorResult | dg.SkipReason:
        for run_id in reap_dead_runs(context.instance):
            context.log.info(f"run {run_id} of a killed `qe run` marked failed")
        in_flight = context.instance.get_run_records(
            filters=dg.RunsFilter(job_name=job_name, statuses=NOT_ENDED), limit=1
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
                decision = release_decision(
                    conn, settings.finetune_threshold, settings.finetune_backend
                )
        except DatabaseBusy:
            return dg.SkipReason("the database is busy with a writer; looking again next tick")
        if not decision.due or decision.version is None:
            return dg.SkipReason(decision.reason)
        version = decision.version
        ended, failed = _ended_badly(context.instance, job_name, version)
        if failed >= MAX_RELEASE_FAILURES:
            return dg.SkipReason(
                f"{failed} release runs of {version} failed; not retrying it on my own "
                "(see those runs; `qe run --cut-version` retries it)"
            )
        # A failed run's key is spent: the retry needs a new one, or the daemon drops it.
        run_key = f"{version}@{decision.state.high}" + (f"/retry{ended}" if ended else "")
        cursor = json.loads(context.cursor) if context.cursor else {}
        if cursor.get("run_key") == run_key:
            return dg.SkipReason(f"already requested {run_key}; waiting for new samples")
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=run_key,
                    tags={VERSION_TAG: version, "qe/ready_samples": str(decision.ready)},
                )
            ],
            cursor=json.dumps({"run_key": run_key, "ready": decision.ready}),
        )

    return finetune_threshold_sensor
