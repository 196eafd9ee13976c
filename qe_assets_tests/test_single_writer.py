"""Two runs launched together queue for DuckDB instead of failing on its lock.

Requirement: a sensor run and a UI run started at the same moment must not fail on the DuckDB file
lock, because every writing asset is in the `qe_duckdb_writer` pool and the `dagster.yaml` that
`make ui` / `qe run` write gives that pool one slot.

The test launches two real `qe run --cut-version` processes at the same instant against one data
directory and one DAGSTER_HOME (the headless equivalent of two launches recorded in the UI's
instance; the pool is enforced by the instance, whatever launched the run), over a file inbox of
demo events ingested in small batches, so each run holds many short write transactions for
seconds. It proves:

* both processes exit 0, no output mentions a DuckDB lock error, every Dagster run succeeded;
* no two pooled steps overlapped in time, across both runs (their STEP_START..STEP_SUCCESS
  intervals, from the instance's event log, are disjoint). Only pooled steps: fine_tuned_model
  and the dataset checks open DuckDB outside the pool and rely on the connection retries;
* the pool was really in force and really contended: its limit is 1, a poller never saw more
  than one claimed slot, and the event log holds a "Step blocked by limit for pool" event;
  a waiting step left unassigned next to a free slot fails the test at once instead of hanging;
* nothing was lost or doubled: every distinct valid request_id once in raw_events, every
  malformed line once in rejected_events, one annotated sample per event, the queue drained,
  and exactly one dataset version holding every ready sample (the second cut found nothing).
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError

from qe_assets.definitions import ASSET_CHECKS, ASSETS
from qe_assets.demo import generate_events
from qe_assets.events import validate_event
from qe_assets.queues import FileInbox
from qe_assets.resources import WRITER_POOL
from qe_assets.runner import DAGSTER_YAML, prepare_dagster_home
from qe_assets.settings import Settings
from qe_assets.store import connect

ROOT = Path(__file__).resolve().parents[1]
EVENTS = 1_000
# Small batches: a run holds many short write transactions, as under production traffic.
BATCH_ENV = {"QE_INGEST_BATCH_SIZE": "100", "QE_EXPORT_BATCH_SIZE": "200"}
RUN_TIMEOUT = 150.0
POLL_SECONDS = 0.1
STALL_SECONDS = 10.0
WRITING_STEPS = {"raw_events", "annotated_samples", "completions", "tuning_dataset"}
BLOCKED_MESSAGE = f"Step blocked by limit for pool {WRITER_POOL}"
# What DuckDB, our store helpers and Dagster print when the file lock is not obtained.
LOCK_FAILURE = re.compile(
    r"could not set lock|conflicting lock|ioexception|io error|stayed locked|databasebusy",
    re.IGNORECASE,
)


@dataclass
class PoolObservations:
    """What a poller of the instance saw while the two runs were alive."""

    polls: int = 0
    max_claimed: int = 0
    polls_with_claim: int = 0
    polls_with_waiter: int = 0
    limits: set[int | None] = field(default_factory=set)
    skipped_busy: int = 0  # SQLite busy for the poller: its own problem, not the runs'
    stuck: str | None = None  # why the runs were stopped before they finished


def child_env(data: Path, home: Path) -> dict[str, str]:
    # The developer's own QE_*/OPENAI_*/DAGSTER_* settings would change the queue, the LLM mode,
    # the fine-tune backend or the instance; the test pins the defaults (file inbox, naive
    # completions, no fine-tune backend) and its own DAGSTER_HOME.
    inherited = {
        k: v for k, v in os.environ.items() if not k.startswith(("QE_", "OPENAI_", "DAGSTER_"))
    }
    return {**inherited, "QE_DATA_DIR": str(data), "DAGSTER_HOME": str(home), **BATCH_ENV}


def launch_run(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "qe_assets.cli", "run", "--cut-version"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def observe_pool(
    instance: dg.DagsterInstance, procs: list[subprocess.Popen[str]]
) -> PoolObservations:
    """Samples the writer pool until every process has exited, or stops early (`stuck`)."""
    seen = PoolObservations()
    deadline = time.monotonic() + RUN_TIMEOUT
    stalled_since: float | None = None
    while any(proc.poll() is None for proc in procs):
        if time.monotonic() > deadline:
            seen.stuck = f"the runs did not finish within {RUN_TIMEOUT:.0f}s"
            return seen
        time.sleep(POLL_SECONDS)
        try:
            info = instance.event_log_storage.get_concurrency_info(WRITER_POOL)
        except OperationalError as exc:
            if "locked" not in str(exc).lower():
                raise
            seen.skipped_busy += 1
            continue
        seen.polls += 1
        claimed = len(info.claimed_slots)
        seen.max_claimed = max(seen.max_claimed, claimed)
        seen.polls_with_claim += claimed > 0
        waiting = [s for s in info.pending_steps if s.assigned_timestamp is None]
        # A pending step without an assigned slot is one waiting for the other run's writer.
        seen.polls_with_waiter += bool(waiting)
        seen.limits.add(info.limit)
        # Only freeing a slot assigns a waiting step, so a free slot next to a waiting step
        # (for longer than a free-then-assign takes) is a lost wake-up: nothing will ever run it.
        if waiting and claimed == 0 and len(waiting) == len(info.pending_steps):
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > STALL_SECONDS:
                seen.stuck = (
                    f"the writer slot is free, yet {[(s.run_id, s.step_key) for s in waiting]} "
                    f"has waited for it, unassigned, for {STALL_SECONDS:.0f}s: {info}"
                )
                return seen
        else:
            stalled_since = None
    return seen


def run_together(
    env: dict[str, str], instance: dg.DagsterInstance, count: int = 2
) -> tuple[list[tuple[int, str, str]], PoolObservations]:
    """`count` `qe run`s launched at once: (exit code, stdout, stderr) of each, and what the
    poller saw meanwhile."""
    procs = [launch_run(env) for _ in range(count)]
    try:
        seen = observe_pool(instance, procs)
    finally:
        for proc in procs:  # never leave a run behind, whatever stopped the poller
            if proc.poll() is None:
                proc.kill()
    outputs = [proc.communicate(timeout=30) for proc in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs, strict=True)], seen


def pooled_step_keys() -> set[str]:
    keys = {a.op.name for a in ASSETS if a.op.pool == WRITER_POOL}
    keys |= {c.op.name for c in ASSET_CHECKS if c.op.pool == WRITER_POOL}
    return keys


@dataclass
class StepSpan:
    run_id: str
    step_key: str
    start: float
    end: float


def step_spans(
    instance: dg.DagsterInstance, run_id: str, steps: set[str]
) -> tuple[list[StepSpan], int]:
    """Start..end of each of `steps` in a run, and how many pool-blocked events the run logged."""
    starts: dict[str, float] = {}
    spans: list[StepSpan] = []
    blocked = 0
    for record in instance.get_records_for_run(run_id, limit=100_000).records:
        entry = record.event_log_entry
        event = entry.dagster_event
        if event is None:
            continue
        if event.event_type == dg.DagsterEventType.ENGINE_EVENT and (
            (event.message or "").startswith(BLOCKED_MESSAGE)
        ):
            blocked += 1
        if event.step_key not in steps:
            continue
        if event.is_step_start:
            starts[event.step_key] = entry.timestamp
        elif event.is_step_success or event.is_step_failure:
            spans.append(
                StepSpan(run_id, event.step_key, starts.pop(event.step_key), entry.timestamp)
            )
    assert not starts, f"steps of run {run_id} started and never ended: {starts}"
    return spans, blocked


@dataclass
class Expected:
    """What the enqueued lines imply (demo re-sends are exact: duplicates, not rejections)."""

    ids: dict[str, str] = field(default_factory=dict)  # request_id -> first valid line
    rejected: Counter[str] = field(default_factory=Counter)

    @classmethod
    def of(cls, lines: list[str]) -> Expected:
        expected = cls()
        for text in lines:
            try:
                rid = validate_event(text).request_id
            except ValidationError:
                expected.rejected[text] += 1
                continue
            if expected.ids.setdefault(rid, text) != text:
                expected.rejected[text] += 1
        return expected


def column(conn: Any, query: str) -> list[Any]:
    return [row[0] for row in conn.execute(query).fetchall()]


def check_data(data: Path, expected: Expected) -> None:
    with connect(data / "qe.duckdb", read_only=True) as conn:
        raw = column(conn, "SELECT request_id FROM raw_events")
        assert len(raw) == len(set(raw)), "raw_events holds a request_id twice"
        assert set(raw) == set(expected.ids), (
            f"lost: {sorted(set(expected.ids) - set(raw))[:5]}, "
            f"unexpected: {sorted(set(raw) - set(expected.ids))[:5]}"
        )
        rejected = Counter(column(conn, "SELECT payload FROM rejected_events"))
        assert rejected == expected.rejected, (
            f"missing: {sum((expected.rejected - rejected).values())}, "
            f"extra: {sum((rejected - expected.rejected).values())}"
        )
        annotated = column(conn, "SELECT request_id FROM annotated_samples")
        assert sorted(annotated) == sorted(raw), "not exactly one annotated sample per raw event"
        ((completions, distinct_completions),) = conn.execute(
            "SELECT count(*), count(DISTINCT sample_id) FROM completions"
        ).fetchall()
        assert completions == distinct_completions > 0

        twice = column(conn, "SELECT sample_id FROM dataset_samples GROUP BY 1 HAVING count(*) > 1")
        assert twice == [], f"samples in two dataset versions: {twice[:5]}"
        # Every completion was committed before the first cut (each run's cut follows its own
        # completions step, which follows the step that annotated everything), so the first cut
        # took every ready sample and the second, serialised behind it, found nothing.
        versions = column(conn, "SELECT version FROM dataset_versions ORDER BY number")
        assert versions == ["v001"], versions
        ready = set(
            column(
                conn,
                """
                SELECT c.sample_id FROM completions c JOIN annotated_samples s USING (sample_id)
                WHERE c.status = 'ok' AND c.completion IS NOT NULL AND s.duplicate_of IS NULL
                  AND NOT EXISTS (SELECT 1 FROM review_queue r
                                  WHERE r.sample_id = c.sample_id AND r.status = 'pending')
                """,
            )
        )
        assert set(column(conn, "SELECT sample_id FROM dataset_samples")) == ready


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def instance(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dg.DagsterInstance]:
    """The instance both runs record into, configured before they start, as after `make ui`:
    otherwise the two `qe run`s would race to write its dagster.yaml."""
    home = tmp_path / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    assert prepare_dagster_home(Settings(data_dir=str(data))) == home.resolve()
    assert (home / "dagster.yaml").read_text() == DAGSTER_YAML
    with dg.DagsterInstance.from_config(str(home)) as opened:
        yield opened


def test_two_runs_launched_together_queue_for_the_writer_slot(
    data: Path, instance: dg.DagsterInstance
) -> None:
    lines = generate_events(EVENTS, seed=31, bad_share=0.02)
    expected = Expected.of(lines)
    # The input holds malformed lines and exact re-sends, so both tables' counts mean something.
    assert expected.rejected and len(expected.ids) < len(lines) - expected.rejected.total()
    FileInbox(data / "inbox").put(lines)
    pooled = pooled_step_keys()
    assert pooled >= WRITING_STEPS, f"writing steps outside {WRITER_POOL}: {WRITING_STEPS - pooled}"

    started = time.monotonic()
    results, seen = run_together(child_env(data, Path(instance.root_directory)), instance)
    elapsed = time.monotonic() - started
    assert seen.stuck is None, seen.stuck + "".join(
        f"\n--- run {n} (exit {code}) stderr tail:\n{stderr[-3000:]}"
        for n, (code, _, stderr) in enumerate(results)
    )

    runs = instance.get_runs()
    spans: list[StepSpan] = []
    blocked = 0
    for run in runs:
        run_spans, run_blocked = step_spans(instance, run.run_id, pooled)
        spans += run_spans
        blocked += run_blocked
    # Checked before the exit codes: two writers at once is the cause, a failed step the symptom.
    spans.sort(key=lambda s: s.start)
    for before, after in itertools.pairwise(spans):
        assert after.start >= before.end, (
            f"{after.step_key} of run {after.run_id} started while {before.step_key} of run "
            f"{before.run_id} held the one writer slot (exit codes {[r[0] for r in results]})"
        )

    for code, stdout, stderr in results:
        assert code == 0, f"qe run failed ({code}):\n{stdout}\n{stderr}"
        for text in (stdout, stderr):
            lock_failure = LOCK_FAILURE.search(text)
            assert lock_failure is None, f"{lock_failure}:\n{text}"
            assert "Traceback" not in text, text

    assert Counter(run.job_name for run in runs)["qe_pipeline"] == 2
    assert "qe_release" in {run.job_name for run in runs}
    assert {run.status for run in runs} == {dg.DagsterRunStatus.SUCCESS}, [
        (run.job_name, run.status) for run in runs
    ]
    pipeline_runs = {run.run_id for run in runs if run.job_name == "qe_pipeline"}
    assert {s.run_id for s in spans} >= pipeline_runs

    assert seen.limits == {1}, f"the writer pool's limit is {seen.limits}, not 1"
    assert seen.polls_with_claim > 0, "the poller never saw the writer slot claimed"
    # Weaker than the spans above: a slot row claimed twice still reads as one claimed slot.
    assert seen.max_claimed <= 1, f"{seen.max_claimed} writer slots claimed at once"
    # Both start with raw_events within a fraction of a second; the first holds it for seconds.
    assert blocked > 0, "no step ever waited for the writer slot: the runs did not contend"

    check_data(data, expected)
    inbox = FileInbox(data / "inbox")
    assert inbox.pending_files() == [], "the inbox was not drained"

    print(
        f"\ntwo runs in {elapsed:.1f}s: {len(runs)} Dagster runs, {len(spans)} pooled steps, "
        f"none overlapping; {blocked} pool-blocked events; poller: {seen.polls} polls, "
        f"max claimed {seen.max_claimed}, a step waiting in {seen.polls_with_waiter}, "
        f"{seen.skipped_busy} skipped (SQLite busy)"
    )
