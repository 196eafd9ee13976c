"""The sensors that make the loop run by itself under the daemon (`make ui`).

* `queue_sensor` starts `qe_pipeline` (ingest → annotate → complete) when events wait in the
  queue, and reports the freshness checks between runs.
* `finetune_threshold_sensor` starts `qe_release` (publish a dataset version, check it, fine-tune
  on it) when the release rule says one is due: enough new samples are ready, or a committed
  version was never released; or its `model_evaluation` alone when the newest model's gate never
  ended.
* `phoenix_import_sensor` / `langfuse_import_sensor` (stopped by default) import judged traces
  into the queue on an interval (`qe import phoenix|langfuse`).

None holds the DuckDB writer lock: a queue's metadata, or a short read-only query.
"""

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime

import dagster as dg
import duckdb

from qe_assets.finetune.resource import FineTuneBackendResource
from qe_assets.ingest.backlog import look_at_queues, queue_freshness
from qe_assets.ingest.resource import QueueResource
from qe_assets.lib.resources import PipelineSettings
from qe_assets.lib.stages import Verdict
from qe_assets.ops.runs import (
    NOT_ENDED,
    REAPED_TAG,
    VERSION_TAG,
    reap_dead_runs,
    selection_without,
)
from qe_assets.release.readiness import settings_release_decision
from qe_assets.review.backlog import review_age, review_backlog
from qe_assets.rollout.assets import quiet_checks
from qe_assets.store import DatabaseBusy, connect

# Failed release runs of one version after which the sensor stops retrying it on its own (a fix
# and `qe run --cut-version`, or a launch from the UI, retry it). Runs of a killed `qe run` do
# not count: the version did nothing wrong.
MAX_RELEASE_FAILURES = 3
_ENDED_BADLY = [dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]
GATE_ASSET = dg.AssetKey("model_evaluation")


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


def _sensor(
    name: str, job_name: str, running_by_default: bool, interval_seconds: int, description: str
) -> Callable[..., dg.SensorDefinition]:
    """The decorator both sensors share: their job, interval and default status from settings."""
    return dg.sensor(
        name=name,
        job_name=job_name,
        minimum_interval_seconds=interval_seconds,
        default_status=(
            dg.DefaultSensorStatus.RUNNING if running_by_default else dg.DefaultSensorStatus.STOPPED
        ),
        description=description,
    )


def run_in_flight(instance: dg.DagsterInstance, job_name: str) -> str | None:
    """The id of a run of `job_name` that is queued or running, after failing the runs of a
    killed `qe run` (which would otherwise look in flight for ever)."""
    reap_dead_runs(instance)
    records = instance.get_run_records(
        filters=dg.RunsFilter(job_name=job_name, statuses=NOT_ENDED), limit=1
    )
    return records[0].dagster_run.run_id if records else None


def build_finetune_sensor(
    job_name: str, running_by_default: bool, interval_seconds: int
) -> dg.SensorDefinition:
    @_sensor(
        "finetune_threshold_sensor",
        job_name,
        running_by_default,
        interval_seconds,
        (
            "Counts ready samples (completed, not yet in a version) with a short read-only "
            "query; when they reach QE_FINETUNE_THRESHOLD it requests one run of the release "
            "job, which cuts the next dataset version and fine-tunes on it. A committed version "
            "whose release never ended (its run died) is released first, oldest first; a model "
            "whose evaluation never reached a decision (a kill, or too many failed items: at "
            "most 3 evaluations) gets a run of `model_evaluation` alone. Fires "
            "once per crossing (run key = version @ newest completion), never while a release "
            "run is in flight (runs of a dead `qe run` are marked failed first). Running by "
            "default; QE_FINETUNE_SENSOR_RUNNING=false starts it stopped (the toggle here "
            "overrides either)."
        ),
    )
    def finetune_threshold_sensor(
        context: dg.SensorEvaluationContext,
        settings: PipelineSettings,
        finetune: FineTuneBackendResource,
    ) -> dg.SensorResult | dg.SkipReason:
        in_flight = run_in_flight(context.instance, job_name)
        if in_flight:
            return dg.SkipReason(f"release run {in_flight} is still in flight")
        if not settings.database.exists():
            return dg.SkipReason(f"no database at {settings.database} yet")
        try:
            # Read-only and bounded: the sensor never holds the write lock and never waits long.
            with connect(settings.database, read_only=True, wait_seconds=5) as conn:
                decision = settings_release_decision(
                    conn, settings, backend=finetune.name, resume_gate=True
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
        gate = f"/gate{decision.gate_attempts}" if decision.gate else ""
        run_key = f"{version}@{decision.state.high}{gate}" + (f"/retry{ended}" if ended else "")
        cursor = json.loads(context.cursor) if context.cursor else {}
        if cursor.get("run_key") == run_key:
            return dg.SkipReason(f"already requested {run_key}; waiting for new samples")
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=run_key,
                    tags={VERSION_TAG: version, "qe/ready_samples": str(decision.ready)},
                    # A gate left unfinished: evaluate again, nothing to publish or train.
                    asset_selection=[GATE_ASSET] if decision.gate else None,
                )
            ],
            cursor=json.dumps({"run_key": run_key, "ready": decision.ready}),
        )

    return finetune_threshold_sensor


# A failed ingest run is retried after this long, not on the next tick: a broken producer or a
# full disk should not turn into a run every 30 s.
RETRY_FAILED_AFTER_SECONDS = 300
# Freshness verdicts are reported when they change, and at least this often while they hold.
REPORT_EVERY_SECONDS = 900


def _last_ended_run(instance: dg.DagsterInstance, job_name: str) -> dg.RunRecord | None:
    records = instance.get_run_records(
        filters=dg.RunsFilter(
            job_name=job_name,
            statuses=[
                dg.DagsterRunStatus.SUCCESS,
                dg.DagsterRunStatus.FAILURE,
                dg.DagsterRunStatus.CANCELED,
            ],
        ),
        limit=1,
    )
    return records[0] if records else None


def _review_verdict(settings: PipelineSettings) -> Verdict | None:
    """The review backlog's age, or None while there is no database yet or a writer holds it
    (the next tick says it)."""
    if not settings.database.exists():
        return None
    try:
        with connect(settings.database, read_only=True, wait_seconds=5) as conn:
            backlog = review_backlog(conn)
    except (DatabaseBusy, duckdb.CatalogException):
        return None
    return review_age(backlog, settings.max_review_age_seconds)


def _freshness_events(
    settings: PipelineSettings, look_verdict: Verdict, reported: dict[str, list[float]]
) -> list[dg.AssetCheckEvaluation]:
    """The freshness checks' evaluations worth reporting now: changed, or not said for a while."""
    verdicts = {("raw_events", "queue_freshness"): look_verdict}
    review = _review_verdict(settings)
    if review is not None:
        verdicts[("review_queue", "review_backlog_age")] = review
    events = []
    now = time.time()
    for (asset, check), verdict in verdicts.items():
        last = reported.get(check)
        unchanged = last is not None and bool(last[0]) == verdict.passed
        if unchanged and now - last[1] < REPORT_EVERY_SECONDS:
            continue
        reported[check] = [float(verdict.passed), now]
        events.append(
            dg.AssetCheckEvaluation(
                asset_key=dg.AssetKey(asset),
                check_name=check,
                passed=verdict.passed,
                severity=dg.AssetCheckSeverity.WARN,
                description=verdict.description,
                metadata={**verdict.metadata, "reported_by": "queue_sensor"},
            )
        )
    return events


def _ingest_request(
    context: dg.SensorEvaluationContext,
    job_name: str,
    waiting: str,
    settings: PipelineSettings | None = None,
) -> dg.RunRequest | str:
    """One run per backlog seen after the last ended run (its id is the run key), or why not."""
    last = _last_ended_run(context.instance, job_name)
    if last is not None and last.dagster_run.status == dg.DagsterRunStatus.FAILURE:
        ended = last.end_time or 0.0
        retry_at = ended + RETRY_FAILED_AFTER_SECONDS
        if time.time() < retry_at:
            when = datetime.fromtimestamp(retry_at, UTC).strftime("%H:%M:%S UTC")
            run_id = last.dagster_run.run_id
            return f"{waiting} waiting; the last run {run_id} failed, retrying at {when}"
    after = last.dagster_run.run_id if last is not None else "none"
    # A finished A/B test's check has said "no test running" once; it stays quiet after that.
    subset = None
    if settings is not None and context.repository_def is not None:
        leave_out = quiet_checks(context.instance, settings)
        subset = selection_without(context.repository_def.get_job(job_name), leave_out)
    return dg.RunRequest(
        run_key=f"ingest-after-{after}",
        tags={"qe/trigger": "queue_sensor", "qe/waiting": waiting},
        asset_selection=subset[0] if subset else None,
        asset_check_keys=subset[1] if subset else None,
    )


def build_queue_sensor(
    job_name: str, running_by_default: bool, interval_seconds: int
) -> dg.SensorDefinition:
    @_sensor(
        "queue_sensor",
        job_name,
        running_by_default,
        interval_seconds,
        (
            "Starts the ingest job when events wait in the queue (inbox files, Redis list "
            "length, Kafka consumer lag: metadata only, never the database lock). Never while a "
            "run of the job is queued or running; one run per backlog (run key: the last ended "
            "run); a failed run is retried after 5 minutes. Also reports the freshness checks "
            "(oldest waiting event vs QE_MAX_QUEUE_AGE, oldest pending review vs "
            "QE_MAX_REVIEW_AGE) between runs. Running by default; QE_QUEUE_SENSOR_RUNNING=false "
            "starts it stopped."
        ),
    )
    def queue_sensor(
        context: dg.SensorEvaluationContext, settings: PipelineSettings, queue: QueueResource
    ) -> dg.SensorResult:
        cursor = json.loads(context.cursor) if context.cursor else {}
        reported: dict[str, list[float]] = cursor.get("reported", {})
        look = look_at_queues(queue.queues())
        events = _freshness_events(
            settings, queue_freshness(look, settings.max_queue_age_seconds), reported
        )
        new_cursor = json.dumps({"reported": reported})
        in_flight = run_in_flight(context.instance, job_name)
        if look.unreachable:
            problems = "; ".join(f"{name}: {err}" for name, err in look.unreachable.items())
            request: dg.RunRequest | str = f"broker unreachable: {problems}"
        elif not look.has_work:
            request = "queue empty"
        elif in_flight:
            request = f"{look.describe()} waiting; run {in_flight} in flight"
        else:
            request = _ingest_request(context, job_name, look.describe(), settings)
        if isinstance(request, str):
            return dg.SensorResult(skip_reason=request, cursor=new_cursor, asset_events=events)
        return dg.SensorResult(run_requests=[request], cursor=new_cursor, asset_events=events)

    return queue_sensor


# Pages of root spans one tick of the Phoenix sensor reads at most: a long backlog is imported
# over several ticks, each well inside Dagster's sensor timeout.
IMPORT_PAGES_PER_TICK = 20


def build_import_sensor(
    source: str, running_by_default: bool, interval_seconds: int
) -> dg.SensorDefinition:
    """`phoenix_import_sensor` / `langfuse_import_sensor`: `qe import SOURCE` on an interval.

    It starts no run: the events it puts on the queue start the ingest job through
    `queue_sensor`. A server problem is the tick's skip reason (one line naming the setting),
    never an exception, and leaves the cursor where it was."""

    @dg.sensor(
        name=f"{source}_import_sensor",
        minimum_interval_seconds=interval_seconds,
        default_status=(
            dg.DefaultSensorStatus.RUNNING if running_by_default else dg.DefaultSensorStatus.STOPPED
        ),
        description=(
            f"Imports judged traces from {source.capitalize()} into the queue (`qe import "
            f"{source}`, docs/importing.md) every QE_IMPORT_INTERVAL_SECONDS; queue_sensor then "
            f"starts the ingest. Stopped by default; QE_{source.upper()}_SENSOR_RUNNING=true "
            "starts it running."
        ),
    )
    def import_sensor(
        context: dg.SensorEvaluationContext, settings: PipelineSettings
    ) -> dg.SkipReason:
        from qe_assets.imports.state import ImportFailed

        plain = settings.settings()
        try:
            if source == "phoenix":
                from qe_assets.imports.phoenix import import_phoenix

                outcome = import_phoenix(plain, max_pages=IMPORT_PAGES_PER_TICK)
            else:
                from qe_assets.imports.langfuse import import_langfuse

                outcome = import_langfuse(plain)
        except ImportFailed as exc:
            return dg.SkipReason(f"import {source} failed: {exc}; the cursor is unchanged")
        for problem in outcome.problems:
            context.log.warning(f"import {source}: {problem}")
        return dg.SkipReason(outcome.summary(source))

    return import_sensor
