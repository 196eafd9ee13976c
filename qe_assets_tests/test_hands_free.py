"""The loop runs by itself: a real `dagster dev` (webserver + daemon) on a temporary
DAGSTER_HOME, the sensors running as `make ui` starts them, and no click, no `qe run`.

Events dropped into the inbox (or pushed to a real Redis) are ingested, a version is cut once
the ready samples reach the threshold, the fine-tune backend records its run and the blocking
checks run; a second drop below the threshold is ingested and cuts nothing; "Materialize all"
launched through GraphQL below the threshold cuts nothing and runs in process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from qe_assets.ingest.queues import FileInbox, RedisQueue
from qe_assets.ops.runner import prepare_dagster_home
from qe_assets.settings import Settings
from qe_assets.store import DatabaseBusy, connect
from qe_assets_tests.conftest import RedisServer
from qe_assets_tests.dagster_dev import DagsterDev
from qe_assets_tests.test_pipeline import batch

pytestmark = [pytest.mark.timeout(600)]

THRESHOLD = 20
INTERVAL = 5  # seconds between sensor ticks (QE_SENSOR_INTERVAL_SECONDS' minimum)
WAIT = 180.0  # a bound on each hands-free step; each takes a few ticks here


@pytest.fixture
def dev(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., DagsterDev]]:
    servers: list[DagsterDev] = []

    def start(**env_extra: str) -> DagsterDev:
        data_dir = tmp_path / "data"
        home = tmp_path / "dagster_home"
        monkeypatch.setenv("DAGSTER_HOME", str(home))
        prepare_dagster_home(Settings(data_dir=str(data_dir)))  # dagster.yaml as `make ui`
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("QE_", "OPENAI_", "DAGSTER_"))
        }
        # Only the threshold and the tick interval differ from `make ui`'s defaults.
        env.update(
            QE_DATA_DIR=str(data_dir),
            QE_FINETUNE_THRESHOLD=str(THRESHOLD),
            QE_SENSOR_INTERVAL_SECONDS=str(INTERVAL),
            **env_extra,
        )
        server = DagsterDev(home, env, tmp_path / "dagster_dev.log")
        servers.append(server)
        server.start(timeout=120)
        return server

    yield start
    for server in servers:
        server.stop()
        print(f"\ndagster dev log: {server.log_path}")


def count(settings: Settings, query: str) -> int:
    """A read-only count, 0 while the database does not exist yet or a run holds it."""
    if not settings.database.exists():
        return 0
    try:
        with connect(settings.database, read_only=True, wait_seconds=2) as conn:
            return int(conn.execute(query).fetchall()[0][0])
    except DatabaseBusy:
        return -1


def wait_until(
    what: str, done: Callable[[], bool], server: DagsterDev, timeout: float = WAIT
) -> float:
    """Seconds until `done()`; fails with the dev server's log after `timeout`."""
    start = time.monotonic()
    while not done():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout:.0f}s: {what}\n{server.log_tail()}")
        time.sleep(1)
    return time.monotonic() - start


def instance_of(server: DagsterDev) -> dg.DagsterInstance:
    return dg.DagsterInstance.from_config(str(server.dagster_home))


def check_evaluations(instance: dg.DagsterInstance, job: str) -> dict[str, bool]:
    result: dict[str, bool] = {}
    for record in instance.get_run_records(dg.RunsFilter(job_name=job)):
        for entry in instance.all_logs(
            record.dagster_run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
        ):
            evaluation = entry.get_dagster_event().event_specific_data
            result[evaluation.check_name] = evaluation.passed  # type: ignore[union-attr]
    return result


def runs_of(server: DagsterDev, job: str) -> list[dict[str, Any]]:
    return [r for r in server.runs() if r["jobName"] == job]


def released(settings: Settings, server: DagsterDev) -> bool:
    return count(
        settings, "SELECT count(*) FROM fine_tune_runs WHERE status = 'skipped'"
    ) == 1 and not [r for r in runs_of(server, "qe_release") if r["status"] not in ("SUCCESS",)]


def test_inbox_drop_to_version_with_no_click(
    dev: Callable[..., DagsterDev], tmp_path: Path
) -> None:
    server = dev()
    settings = Settings(data_dir=str(tmp_path / "data"))
    dropped = time.monotonic()
    FileInbox(settings.inbox_dir).put(batch("a", 40))

    wait_until(
        "40 events ingested",
        lambda: count(settings, "SELECT count(*) FROM raw_events") == 40,
        server,
    )
    wait_until(
        "v001 cut", lambda: count(settings, "SELECT count(*) FROM dataset_versions") == 1, server
    )
    print(f"\ndrop → v001 cut: {time.monotonic() - dropped:.1f} s")
    wait_until("v001 handed to the backend", lambda: released(settings, server), server)
    with instance_of(server) as instance:
        checks = check_evaluations(instance, "qe_release")
        assert checks["dataset_format_valid"] and checks["dataset_no_leakage"], checks
        pipeline_runs = instance.get_run_records(dg.RunsFilter(job_name="qe_pipeline"))
        assert pipeline_runs and all(
            r.dagster_run.tags.get("qe/trigger") == "queue_sensor" for r in pipeline_runs
        )

    # Below the threshold: ingested, nothing cut, however many ticks pass.
    FileInbox(settings.inbox_dir).put(batch("b", 10))
    wait_until(
        "50 events ingested",
        lambda: count(settings, "SELECT count(*) FROM raw_events") == 50,
        server,
    )
    wait_until(
        "the pipeline run finished",
        lambda: (
            not [
                r
                for r in runs_of(server, "qe_pipeline")
                if r["status"] not in ("SUCCESS", "FAILURE", "CANCELED")
            ]
        ),
        server,
    )
    time.sleep(3 * INTERVAL)
    assert count(settings, "SELECT count(*) FROM dataset_versions") == 1
    assert len(runs_of(server, "qe_release")) == 1

    # "Materialize all" from the lineage page, below the threshold: in process, nothing cut.
    run_id = launch_materialize_all(server)
    finished = wait_for(server, run_id)
    assert finished["status"] == "SUCCESS", finished
    with instance_of(server) as instance:
        messages = [
            e.message for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
        ]
    assert any("Executing steps in process" in m for m in messages), messages
    assert count(settings, "SELECT count(*) FROM dataset_versions") == 1


def test_redis_push_to_version_with_no_click(
    dev: Callable[..., DagsterDev], tmp_path: Path, redis_server: RedisServer, redis_url: str
) -> None:
    server = dev(QE_QUEUE_URL=redis_url)
    settings = Settings(data_dir=str(tmp_path / "data"))
    RedisQueue(redis_url).put(batch("r", 30))
    wait_until(
        "30 events ingested",
        lambda: count(settings, "SELECT count(*) FROM raw_events") == 30,
        server,
    )
    wait_until("v001 cut and handed to the backend", lambda: released(settings, server), server)
    assert RedisQueue(redis_url).depth() == 0


def launch_materialize_all(server: DagsterDev) -> str:
    repos = server.graphql(
        "query { repositoriesOrError { ... on RepositoryConnection "
        "{ nodes { name location { name } } } } }"
    )["repositoriesOrError"]["nodes"]
    (repo,) = repos
    keys = server.graphql("query { assetNodes { assetKey { path } } }")["assetNodes"]
    data = server.graphql(
        """
        mutation($params: ExecutionParams!) {
          launchPipelineExecution(executionParams: $params) {
            __typename
            ... on LaunchRunSuccess { run { runId } }
            ... on PythonError { message }
            ... on RunConfigValidationInvalid { errors { message } }
          }
        }
        """,
        {
            "params": {
                "selector": {
                    "repositoryLocationName": repo["location"]["name"],
                    "repositoryName": repo["name"],
                    "pipelineName": "__ASSET_JOB",
                    "assetSelection": [k["assetKey"] for k in keys],
                },
                "mode": "default",
                "runConfigData": {},
            }
        },
    )["launchPipelineExecution"]
    assert data["__typename"] == "LaunchRunSuccess", data
    return data["run"]["runId"]


def wait_for(server: DagsterDev, run_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        (run,) = [r for r in server.runs() if r["runId"] == run_id]
        if run["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
            return run
        time.sleep(1)
    raise AssertionError(f"run {run_id} did not finish:\n{server.log_tail()}")
