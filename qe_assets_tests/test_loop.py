"""The loop's triggers and safety rails, against real instances, files, DuckDB and Redis:
the queue sensor, the freshness and backlog checks, "Materialize all" below the threshold, a
skipped fine-tune that does not pass for a model, and the refusal to train on naive completions.

The daemon running them by itself is `test_hands_free.py`."""

from __future__ import annotations

import json
import os
import time

import dagster as dg
import pytest
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.utils import make_new_run_id

from qe_assets.ingest.queues import FileInbox, RedisQueue
from qe_assets.ingest.queues.kafka_queue import KafkaQueue
from qe_assets.ingest.resource import QueueResource
from qe_assets.lib.resources import PipelineSettings
from qe_assets.ops.definitions import PIPELINE_JOB, build_definitions
from qe_assets.ops.sensors import RETRY_FAILED_AFTER_SECONDS, build_queue_sensor
from qe_assets.settings import Settings, SettingsError
from qe_assets.store import connect
from qe_assets_tests.conftest import KafkaBroker, RedisServer, free_port
from qe_assets_tests.runs import checks, materialize, metadata, scalar
from qe_assets_tests.test_finetune import processed, run_requests, skip_message
from qe_assets_tests.test_kafka_queue import EXACT_DEPTH
from qe_assets_tests.test_pipeline import batch


def evaluate(settings: Settings, instance: dg.DagsterInstance, cursor: str | None = None):
    sensor = build_queue_sensor(PIPELINE_JOB, running_by_default=True, interval_seconds=30)
    context = dg.build_sensor_context(
        instance=instance,
        cursor=cursor,
        resources={
            "settings": PipelineSettings(**settings.model_dump()),
            "queue": QueueResource.from_settings(settings),
        },
    )
    return sensor(context)


def evaluations(result: dg.SensorResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.asset_events or []}


def add_run(instance: dg.DagsterInstance, status: dg.DagsterRunStatus) -> str:
    run_id = make_new_run_id()
    instance.add_run(DagsterRun(job_name=PIPELINE_JOB, run_id=run_id, status=status))
    return run_id


def test_queue_sensor_fires_on_waiting_files_once_per_backlog(settings: Settings) -> None:
    with dg.instance_for_test() as instance:
        result = evaluate(settings, instance)
        assert skip_message(result) == "queue empty"
        assert evaluations(result)["queue_freshness"].passed

        FileInbox(settings.inbox_dir).put(batch("a", 5))
        result = evaluate(settings, instance, result.cursor)
        (request,) = run_requests(result)
        assert request.run_key == "ingest-after-none"
        assert request.tags["qe/waiting"] == "1 file in inbox"

        # A run is in flight: the sensor waits for it, whatever waits in the queue.
        queued = add_run(instance, dg.DagsterRunStatus.STARTED)
        result = evaluate(settings, instance, result.cursor)
        assert skip_message(result) == f"1 file in inbox waiting; run {queued} in flight"
        # An unchanged verdict is not reported again on every tick.
        assert "queue_freshness" not in evaluations(result)

        # It ended: new work after it gets a new key (the daemon drops a key it has seen).
        instance.report_run_failed(instance.get_run_by_id(queued))  # type: ignore[arg-type]
        result = evaluate(settings, instance, result.cursor)
        assert "failed, retrying at" in skip_message(result)
        succeeded = add_run(instance, dg.DagsterRunStatus.SUCCESS)
        result = evaluate(settings, instance, result.cursor)
        (request,) = run_requests(result)
        assert request.run_key == f"ingest-after-{succeeded}"


def test_queue_sensor_retries_a_failed_run_after_a_pause(settings: Settings) -> None:
    FileInbox(settings.inbox_dir).put(batch("a", 3))
    with dg.instance_for_test() as instance:
        failed = add_run(instance, dg.DagsterRunStatus.STARTED)
        instance.report_run_failed(instance.get_run_by_id(failed))  # type: ignore[arg-type]
        assert "retrying at" in skip_message(evaluate(settings, instance))
        record = instance.get_run_records(dg.RunsFilter(run_ids=[failed]))[0]
        assert record.end_time is not None
        assert RETRY_FAILED_AFTER_SECONDS >= 60  # a broken producer is not hammered


def test_queue_sensor_names_an_unreachable_broker_and_fails_freshness(
    settings: Settings,
) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    down = settings.model_copy(update={"queue_url": closed})
    with dg.instance_for_test() as instance:
        result = evaluate(down, instance)
        assert skip_message(result).startswith("broker unreachable: redis: redis queue")
        freshness = evaluations(result)["queue_freshness"]
        assert not freshness.passed and "unreachable" in (freshness.description or "")
        assert freshness.severity == dg.AssetCheckSeverity.WARN


def test_queue_sensor_reads_redis_depth_and_age_without_claiming(
    settings: Settings, redis_server: RedisServer, redis_url: str
) -> None:
    on_redis = settings.model_copy(update={"queue_url": redis_url})
    queue = RedisQueue(redis_url)
    old = {"timestamp": "2020-01-01T00:00:00Z"}
    queue.put([json.dumps({**json.loads(e), **old}) for e in batch("r", 4)])
    with dg.instance_for_test() as instance:
        result = evaluate(on_redis, instance)
        (request,) = run_requests(result)
        assert request.tags["qe/waiting"] == "4 events in redis"
        freshness = evaluations(result)["queue_freshness"]
        assert not freshness.passed
        assert "over QE_MAX_QUEUE_AGE" in (freshness.description or "")
    assert queue.depth() == 4  # looked at, not claimed


def test_freshness_reports_an_old_inbox_file_and_an_old_review(settings: Settings) -> None:
    inbox = FileInbox(settings.inbox_dir)
    # Four low-confidence events: they wait for a reviewer.
    inbox.put(batch("r", 4, score=0.2))
    assert materialize(settings, selection=["raw_events", "annotated_samples"]).success
    with connect(settings.database) as conn:
        conn.execute("UPDATE review_queue SET queued_at = queued_at - INTERVAL 3 DAY")
    inbox.put(batch("w", 2))
    (waiting,) = inbox.pending_files()
    two_hours_ago = time.time() - 7_200
    os.utime(waiting, (two_hours_ago, two_hours_ago))
    with dg.instance_for_test() as instance:
        found = evaluations(evaluate(settings, instance))
    assert not found["queue_freshness"].passed
    assert "has waited 2.0 h" in (found["queue_freshness"].description or "")
    assert not found["review_backlog_age"].passed
    assert found["review_backlog_age"].metadata["reported_by"].value == "queue_sensor"

    # The same checks run with the assets: the review age fails there too (a warning).
    small = settings.model_copy(update={"max_review_backlog": 3})
    result = materialize(small, selection=["raw_events", "annotated_samples", "review_queue"])
    found_in_run = checks(result)
    assert found_in_run["queue_freshness"].passed  # the ingest drained it
    assert not found_in_run["review_backlog_age"].passed
    assert not found_in_run["review_backlog_size"].passed
    assert found_in_run["review_backlog_size"].severity == dg.AssetCheckSeverity.WARN
    assert metadata(result, "review_queue")["pending"] == 4


def test_reject_share_warns_per_queue(settings: Settings) -> None:
    FileInbox(settings.inbox_dir).put(batch("g", 20) + ["{broken"] * 10)
    result = materialize(settings, selection=["raw_events", "rejected_events"])
    share = checks(result)["reject_share_by_source"]
    assert not share.passed
    assert "inbox 33% of 30" in (share.description or "")
    assert share.metadata["reject_share/inbox"].value == pytest.approx(1 / 3, abs=1e-4)
    assert metadata(result, "rejected_events")["rejected_total"] == 10


def test_materialize_all_below_the_threshold_cuts_nothing(settings: Settings) -> None:
    FileInbox(settings.inbox_dir).put(batch("a", 12))
    result = materialize(settings, force=False)  # the lineage page's "Materialize all"
    assert result.success
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "tuning_dataset" not in materialized and "fine_tuned_model" not in materialized
    assert scalar(settings, "SELECT count(*) FROM dataset_versions") == 0
    # The same run with force (what `qe run --cut-version` passes) cuts v001.
    assert materialize(settings, force=True).success
    assert scalar(settings, "SELECT count(*) FROM dataset_versions") == 1


def test_definitions_default_to_the_in_process_executor_and_two_groups() -> None:
    defs = build_definitions(Settings())
    assert defs.resolve_implicit_global_asset_job_def().executor_def.name == "in_process"
    graph = defs.resolve_asset_graph()
    groups = {key.to_user_string(): graph.get(key).group_name for key in graph.get_all_asset_keys()}
    assert groups == {
        "raw_events": "pipeline",
        "rejected_events": "pipeline",
        "annotated_samples": "pipeline",
        "review_queue": "pipeline",
        "completions": "pipeline",
        "tuning_dataset": "release",
        "published_dataset": "release",
        "fine_tuned_model": "release",
        "model_evaluation": "release",
        "ab_test": "release",
    }
    sensors = {s.name: s for s in defs.sensors}
    assert sensors["queue_sensor"].default_status == dg.DefaultSensorStatus.RUNNING
    assert sensors["finetune_threshold_sensor"].default_status == dg.DefaultSensorStatus.RUNNING
    off = build_definitions(
        Settings(queue_sensor_running=False, finetune_sensor_running=False)
    ).sensors
    assert {s.default_status for s in off} == {dg.DefaultSensorStatus.STOPPED}


def test_sensor_settings_fail_at_load_naming_the_variable() -> None:
    with pytest.raises(SettingsError, match="QE_MAX_QUEUE_AGE must be a duration"):
        Settings.from_env({"QE_MAX_QUEUE_AGE": "soon"})
    with pytest.raises(SettingsError, match="QE_SENSOR_INTERVAL_SECONDS"):
        Settings.from_env({"QE_SENSOR_INTERVAL_SECONDS": "1"})
    assert Settings.from_env({"QE_MAX_QUEUE_AGE": "90m"}).max_queue_age_seconds == 5_400


def test_a_skipped_fine_tune_is_an_observation_not_a_model(settings: Settings) -> None:
    processed(settings, 12)
    result = materialize(settings, selection=["tuning_dataset", "fine_tuned_model"])
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == {"tuning_dataset"}
    (observation,) = result.get_asset_observation_events()
    seen = observation.asset_observation_data.asset_observation
    assert seen.asset_key == dg.AssetKey("fine_tuned_model")
    assert seen.metadata["status"].value == "skipped"
    assert "no backend configured" in seen.metadata["message"].value


def test_a_real_backend_refuses_naive_completions_unless_allowed(settings: Settings) -> None:
    processed(settings, 12)
    command = settings.model_copy(
        update={"finetune_backend": "command", "finetune_command": "true"}
    )
    result = materialize(
        command, selection=["tuning_dataset", "fine_tuned_model"], raise_on_error=False
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.message  # type: ignore[union-attr]
    assert "12 of 12 completions are naive" in message
    assert "QE_FINETUNE_ALLOW_NAIVE=true" in message
    # Nothing was claimed: no half-started run for the version.
    assert scalar(command, "SELECT count(*) FROM fine_tune_runs") == 0


def test_queue_sensor_reads_kafka_lag_without_consuming(
    settings: Settings, kafka_broker: KafkaBroker
) -> None:
    topic = kafka_broker.new_topic(partitions=1)
    url = kafka_broker.url(topic, **EXACT_DEPTH)
    queue = KafkaQueue(url)
    queue.put(batch("k", 3))
    on_kafka = settings.model_copy(update={"queue_url": url})
    with dg.instance_for_test() as instance:
        result = evaluate(on_kafka, instance)
        (request,) = run_requests(result)
        assert request.tags["qe/waiting"] == "3 events in kafka"
        freshness = evaluations(result)["queue_freshness"]
        assert freshness.passed and "unknown (kafka)" in (freshness.description or "")
    assert queue.depth() == 3  # the group's offsets did not move
