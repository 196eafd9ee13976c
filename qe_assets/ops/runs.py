"""Run hygiene shared by `qe run` and the sensors: who owns a run, and failing the runs of dead
`qe run` processes. Kept apart from the runner so the sensors need not import the definitions."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import dagster as dg

# Tags `qe run` puts on its runs, so a later `qe run` can tell whether their process still lives.
OWNER_HOST_TAG = "qe/host"
OWNER_PROCESS_TAG = "qe/process"
# The dataset version a release run is for (set by the sensor and by `qe run`).
VERSION_TAG = "qe/dataset_version"
# Put on the runs `reap_dead_runs` failed: a killed process, not a fault of the version.
REAPED_TAG = "qe/reaped"
# Every status a run can be left in by a process that died: `execute_in_process` creates the run
# NOT_STARTED and a kill before it starts leaves it there.
NOT_ENDED = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def _process_identity(pid: int) -> str | None:
    """pid plus its start time (Linux), so a recycled pid does not pass for the old process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return f"{pid}"
    # Field 22 (start time) counted after the parenthesised command name, which may hold spaces.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie holds no slot and does no work
        return None
    return f"{pid}:{fields[19]}"


def owner_tags() -> dict[str, str]:
    return {
        OWNER_HOST_TAG: socket.gethostname(),
        OWNER_PROCESS_TAG: _process_identity(os.getpid()) or str(os.getpid()),
    }


def reap_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Fail the runs a killed `qe run` on this host left in any status short of an end (created,
    starting, started, canceling), and free any concurrency slots they held, so the UI and the
    sensor (which waits while a release run is in flight) do not take them for live runs. Both
    `qe run` and the sensor call it before they look at what is in flight."""
    host = socket.gethostname()
    reaped = []
    for record in instance.get_run_records(
        dg.RunsFilter(statuses=NOT_ENDED, tags={OWNER_HOST_TAG: host})
    ):
        run = record.dagster_run
        owner = run.tags.get(OWNER_PROCESS_TAG, "")
        if not owner or _process_identity(int(owner.split(":")[0])) == owner:
            continue
        instance.add_run_tags(run.run_id, {REAPED_TAG: "true"})
        instance.report_run_failed(run, "the `qe run` process that ran this run is gone")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        reaped.append(run.run_id)
    return reaped


def selection_without(
    job: dg.JobDefinition, leave_out: frozenset[dg.AssetCheckKey]
) -> tuple[list[dg.AssetKey], list[dg.AssetCheckKey]] | None:
    """Every asset and check of `job` but the checks in `leave_out` (sorted, so a run request
    is the same for the same state), or None when nothing is left out (the whole job)."""
    graph = job.asset_layer.asset_graph
    checks = set(graph.asset_check_keys)
    if not leave_out & checks:
        return None
    assets = sorted(job.asset_layer.executable_asset_keys, key=lambda k: k.to_user_string())
    kept = sorted(checks - leave_out, key=lambda k: (k.asset_key.to_user_string(), k.name))
    return assets, kept
