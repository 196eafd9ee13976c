"""Headless runs (`qe run`) through the same Dagster definitions the UI loads."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
from dagster._utils.error import SerializableErrorInfo

from qe_assets.ops.runs import VERSION_TAG, owner_tags, reap_dead_runs, selection_without
from qe_assets.settings import Settings

# Written once into a fresh DAGSTER_HOME. Writers are serialised by the database's writer lock
# (`qe_assets.store.writer_lock`), not by a Dagster pool. Run monitoring lets the daemon
# (`make ui`) fail runs whose worker died or that never started (start_timeout_seconds); `qe run`
# and the sensor also reap the runs of dead `qe run` processes (`reap_dead_runs`), daemon or not.
DAGSTER_YAML = """\
telemetry:
  enabled: false
run_monitoring:
  enabled: true
  poll_interval_seconds: 30
  start_timeout_seconds: 180
"""
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
    "new_queued",
    "new_low_confidence",
    "new_spot_check",
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
    "decision",
    "current_share",
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


@dataclass
class RunOutcome:
    success: bool
    run_id: str
    summary: list[str] = field(default_factory=list)
    error: str | None = None


def _summarise(result: dg.ExecuteInProcessResult) -> list[str]:
    lines = []
    # Observations too: an asset that made nothing (fine_tuned_model with backend none) says so
    # in one.
    asset_events = [
        *(e.materialization for e in result.get_asset_materialization_events()),
        *(
            e.asset_observation_data.asset_observation
            for e in result.get_asset_observation_events()
        ),
    ]
    for asset_event in asset_events:
        metadata = asset_event.metadata
        shown = [f"{key}={metadata[key].value}" for key in SUMMARY_KEYS if key in metadata]
        lines.append(f"{asset_event.asset_key.to_user_string()}: {', '.join(shown)}")
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
    tags: dict[str, str] | None = None,
    ops: dict[str, Any] | None = None,
    asset_selection: list[dg.AssetKey] | None = None,
    leave_out: frozenset[dg.AssetCheckKey] = frozenset(),
) -> bool:
    run_config: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    if ops:
        run_config["ops"] = ops
    job = defs.resolve_job_def(job_name)
    subset = selection_without(job, leave_out)
    if subset is not None:
        job = job.get_subset(asset_selection=set(subset[0]), asset_check_selection=set(subset[1]))
    result = job.execute_in_process(
        instance=instance,
        raise_on_error=False,
        run_config=run_config,
        tags={**owner_tags(), **(tags or {})},
        asset_selection=asset_selection,
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
    """Ingest → annotate → complete; then the release job (the one the sensor launches) as long
    as the release rule (`readiness.release_decision`, the sensor's too) says one is due."""
    from qe_assets.ops.definitions import PIPELINE_JOB, build_definitions
    from qe_assets.rollout.assets import quiet_checks

    defs = build_definitions(settings)
    if instance is None:
        instance = dg.DagsterInstance.from_config(str(prepare_dagster_home(settings)))
    outcome = RunOutcome(success=True, run_id="")
    for run_id in reap_dead_runs(instance):
        outcome.summary.append(f"run {run_id} of a killed `qe run` marked failed, its slots freed")
    # A finished A/B test's check has said "no test running" once; it stays quiet after that.
    quiet = quiet_checks(instance, settings)
    if _execute(defs, PIPELINE_JOB, instance, outcome, log_level, leave_out=quiet):
        _release(settings, defs, instance, outcome, log_level, cut_version)
    return outcome


def _release(
    settings: Settings,
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    outcome: RunOutcome,
    log_level: str,
    cut_version: bool,
) -> None:
    """One release run per due version (the rule in `readiness.release_while_due`)."""
    from qe_assets.ops.definitions import RELEASE_JOB
    from qe_assets.release.readiness import ReleaseDecision, release_while_due

    def release(decision: ReleaseDecision) -> bool:
        outcome.summary.append(f"release {decision.version}: {decision.reason}")
        tags = {VERSION_TAG: str(decision.version)}
        if decision.gate:
            # The version is published and trained: only its evaluation is left (the sensor's
            # run for it selects the same asset).
            gate = [dg.AssetKey("model_evaluation")]
            return _execute(defs, RELEASE_JOB, instance, outcome, log_level, tags, None, gate)
        # The same rule decides again inside the run; --cut-version lifts its threshold there.
        ops = {"tuning_dataset": {"config": {"force": cut_version}}}
        return _execute(defs, RELEASE_JOB, instance, outcome, log_level, tags, ops)

    done, last = release_while_due(settings, release, cut_version=cut_version)
    if not done:
        hint = " (use --cut-version to cut one now)" if not last.due and last.ready else ""
        outcome.summary.append(last.reason + hint)
