"""Headless runs (`qe run`) through the same Dagster definitions the UI loads."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
from dagster._utils.error import SerializableErrorInfo

from qe_assets.settings import Settings

# Written once into a fresh DAGSTER_HOME. Writers are serialised by the database's writer lock
# (`qe_assets.store.writer_lock`), not by a Dagster pool. Run monitoring lets the daemon
# (`make ui`) fail runs whose worker died; `qe run` has no daemon and reaps its own dead runs
# (`reap_dead_runs`).
DAGSTER_YAML = """\
telemetry:
  enabled: false
run_monitoring:
  enabled: true
  poll_interval_seconds: 30
"""
# Tags `qe run` puts on its runs, so a later `qe run` can tell whether their process still lives.
OWNER_HOST_TAG = "qe/host"
OWNER_PROCESS_TAG = "qe/process"

# Metadata shown per asset by `qe run`, in this order.
SUMMARY_KEYS = (
    "new_rows",
    "duplicates",
    "rejected",
    "queue_depth_left",
    "new_samples",
    "new_train",
    "new_review",
    "new_duplicates",
    "new_completions",
    "mode",
    "llm/calls",
    "llm/failed",
    "llm/estimated_cost",
    "version",
    "samples",
    "train",
    "validation",
    "jsonl_path",
    "run_id",
    "status",
    "model_id",
    "message",
)


def prepare_dagster_home(settings: Settings) -> Path:
    """DAGSTER_HOME from the environment, else `$QE_DATA_DIR/dagster_home`, with dagster.yaml."""
    home = Path(os.environ.get("DAGSTER_HOME") or settings.dagster_home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        # Atomically: two first-ever `qe run`s must not read each other's half-written file.
        temp = home / f".dagster.yaml.{os.getpid()}.tmp"
        temp.write_text(DAGSTER_YAML)
        os.replace(temp, config)
    return home


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


def _owner_tags() -> dict[str, str]:
    return {
        OWNER_HOST_TAG: socket.gethostname(),
        OWNER_PROCESS_TAG: _process_identity(os.getpid()) or str(os.getpid()),
    }


def reap_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Fail the runs a killed `qe run` on this host left STARTED, and free any concurrency slots
    they held, so the UI and the sensor (which waits while a release run is in flight) do not
    take them for live runs."""
    host = socket.gethostname()
    reaped = []
    for record in instance.get_run_records(
        dg.RunsFilter(
            statuses=[dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED],
            tags={OWNER_HOST_TAG: host},
        )
    ):
        run = record.dagster_run
        owner = run.tags.get(OWNER_PROCESS_TAG, "")
        if not owner or _process_identity(int(owner.split(":")[0])) == owner:
            continue
        instance.report_run_failed(run, "the `qe run` process that ran this run is gone")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        reaped.append(run.run_id)
    return reaped


@dataclass
class RunOutcome:
    success: bool
    run_id: str
    summary: list[str] = field(default_factory=list)
    error: str | None = None


def _summarise(result: dg.ExecuteInProcessResult) -> list[str]:
    lines = []
    for event in result.get_asset_materialization_events():
        materialization = event.materialization
        if materialization is None:
            continue
        metadata = materialization.metadata
        shown = [f"{key}={metadata[key].value}" for key in SUMMARY_KEYS if key in metadata]
        lines.append(f"{materialization.asset_key.to_user_string()}: {', '.join(shown)}")
    for evaluation in result.get_asset_check_evaluations():
        verdict = "passed" if evaluation.passed else f"FAILED ({evaluation.severity.value})"
        detail = f": {evaluation.description}" if evaluation.description else ""
        lines.append(f"check {evaluation.check_name}: {verdict}{detail}")
    return lines


def _with_root_cause(error: SerializableErrorInfo) -> str:
    """Dagster's step error names only the op; the cause at the bottom says what went wrong
    (`qe run` tells a full disk from it)."""
    root = error
    while root.cause is not None:
        root = root.cause
    message = error.message.strip()
    return message if root is error else f"{message} {root.message.strip()}"


def _execute(
    defs: dg.Definitions,
    job_name: str,
    instance: dg.DagsterInstance,
    outcome: RunOutcome,
    log_level: str,
) -> bool:
    result = defs.resolve_job_def(job_name).execute_in_process(
        instance=instance,
        raise_on_error=False,
        run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
        tags=_owner_tags(),
    )
    outcome.run_id = result.run_id
    outcome.summary.extend(_summarise(result))
    if not result.success:
        failures = [
            _with_root_cause(e.step_failure_data.error)
            for e in result.all_events
            if e.is_step_failure and e.step_failure_data and e.step_failure_data.error
        ]
        outcome.success = False
        outcome.error = "; ".join(failures) or "see the run's event log"
    return result.success


def run_pipeline(
    settings: Settings,
    *,
    cut_version: bool = False,
    instance: dg.DagsterInstance | None = None,
    log_level: str = "INFO",
) -> RunOutcome:
    """Ingest → annotate → complete; then, past the threshold or when asked, the release job
    (the one the sensor launches)."""
    from qe_assets.definitions import PIPELINE_JOB, RELEASE_JOB, build_definitions
    from qe_assets.readiness import ready_sample_count
    from qe_assets.store import connect

    defs = build_definitions(settings)
    if instance is None:
        instance = dg.DagsterInstance.from_config(str(prepare_dagster_home(settings)))
    outcome = RunOutcome(success=True, run_id="")
    for run_id in reap_dead_runs(instance):
        outcome.summary.append(f"run {run_id} of a killed `qe run` marked failed, its slots freed")
    if not _execute(defs, PIPELINE_JOB, instance, outcome, log_level):
        return outcome
    with connect(settings.database, read_only=True) as conn:
        ready = ready_sample_count(conn)
    if ready == 0:
        outcome.summary.append("no sample ready for a new dataset version")
    elif cut_version or ready >= settings.finetune_threshold:
        _execute(defs, RELEASE_JOB, instance, outcome, log_level)
    else:
        outcome.summary.append(
            f"{ready} samples ready, below the threshold of {settings.finetune_threshold}: "
            "no version cut (use --cut-version to cut one now)"
        )
    return outcome
