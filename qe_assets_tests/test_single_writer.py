"""Two runs launched together take turns on DuckDB instead of failing on its lock.

Requirement: a sensor run and a UI run started at the same moment must not fail on the DuckDB file
lock. Every writing stage (raw_events, annotated_samples, completions, tuning_dataset) holds the
database's writer lock (`qe_assets.store.writer_lock`, a kernel flock next to the database file)
for the whole stage, so stages of different runs take turns; the kernel drops the lock of a
killed holder. (Dagster's concurrency pools were tried first and dropped: on Dagster 1.13 two
processes claiming the one slot at the same instant could both get it, and a step queued while
the slot was being freed could wait for ever.)

The test launches two real `qe run --cut-version` processes at the same instant against one data
directory and one DAGSTER_HOME, over a file inbox of demo events ingested in small batches, so
each run holds many short write transactions for seconds. It proves:

* both processes exit 0, no output mentions a DuckDB lock error, every Dagster run succeeded;
* no two holds of the writer lock overlapped in time, across both runs (the took/released lines
  of each stage in the instance's event log are disjoint), and the runs really contended (a
  stage logged that it waited for the lock);
* nothing was lost or doubled: every distinct valid request_id once in raw_events, every
  malformed line once in rejected_events, one annotated sample per event, the queue drained,
  and exactly one dataset version holding every ready sample (the second cut found nothing).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import pytest
from pydantic import ValidationError

from qe_assets.ingest.events import validate_event
from qe_assets.ingest.queues import FileInbox
from qe_assets.lib.resources import RELEASED_LOCK, TOOK_LOCK, WAITING_FOR_LOCK
from qe_assets.ops.demo import generate_events
from qe_assets.ops.runner import DAGSTER_YAML, prepare_dagster_home
from qe_assets.settings import Settings
from qe_assets.store import (
    DatabaseBusy,
    connect,
    holds_writer_lock,
    writer_connection,
    writer_lock,
)
from qe_assets_tests.runs import column, exportable_sample_ids, stored_once

ROOT = Path(__file__).resolve().parents[1]
EVENTS = 1_000
# Small batches: a run holds many short write transactions, as under production traffic.
BATCH_ENV = {"QE_INGEST_BATCH_SIZE": "100", "QE_EXPORT_BATCH_SIZE": "200"}
RUN_TIMEOUT = 150.0
PIPELINE_WRITERS = {"raw_events", "annotated_samples", "completions"}
# What DuckDB, our store helpers and Dagster print when the file lock is not obtained.
LOCK_FAILURE = re.compile(
    r"could not set lock|conflicting lock|ioexception|io error|stayed locked|databasebusy",
    re.IGNORECASE,
)


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


def run_together(env: dict[str, str], count: int = 2) -> list[tuple[int, str, str]]:
    """`count` `qe run`s launched at once: (exit code, stdout, stderr) of each."""
    procs = [launch_run(env) for _ in range(count)]
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        outputs = [
            proc.communicate(timeout=max(1.0, deadline - time.monotonic())) for proc in procs
        ]
    finally:
        for proc in procs:  # never leave a run behind, whatever happened
            if proc.poll() is None:
                proc.kill()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs, strict=True)]


@dataclass
class StepSpan:
    run_id: str
    step_key: str
    start: float
    end: float


def lock_spans(instance: dg.DagsterInstance, run_id: str) -> tuple[list[StepSpan], int]:
    """When each stage of a run held the writer lock, and how many times a stage waited for it."""
    taken: dict[str, float] = {}
    spans: list[StepSpan] = []
    waits = 0
    for record in instance.get_records_for_run(run_id, limit=100_000).records:
        entry = record.event_log_entry
        if entry.dagster_event is not None or not entry.step_key:
            continue
        message = entry.user_message
        if message.startswith(WAITING_FOR_LOCK):
            waits += 1
        elif message == TOOK_LOCK:
            taken[entry.step_key] = entry.timestamp
        elif message == RELEASED_LOCK:
            spans.append(
                StepSpan(run_id, entry.step_key, taken.pop(entry.step_key), entry.timestamp)
            )
    assert not taken, f"stages of run {run_id} took the lock and never released it: {taken}"
    return spans, waits


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


def check_data(data: Path, expected: Expected) -> None:
    with connect(data / "qe.duckdb", read_only=True) as conn:
        raw = stored_once(conn, expected.ids)
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
        ready = exportable_sample_ids(conn)
        released = column(
            conn,
            "SELECT sample_id FROM dataset_samples UNION ALL SELECT sample_id FROM evaluation_set",
        )  # the frozen evaluation set holds its share out of every version
        assert sorted(released) == sorted(ready)


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


def test_two_runs_launched_together_take_turns_on_the_writer_lock(
    data: Path, instance: dg.DagsterInstance
) -> None:
    lines = generate_events(EVENTS, seed=31, bad_share=0.02)
    expected = Expected.of(lines)
    # The input holds malformed lines and exact re-sends, so both tables' counts mean something.
    assert expected.rejected and len(expected.ids) < len(lines) - expected.rejected.total()
    FileInbox(data / "inbox").put(lines)

    started = time.monotonic()
    results = run_together(child_env(data, Path(instance.root_directory)))
    elapsed = time.monotonic() - started

    runs = instance.get_runs()
    spans: list[StepSpan] = []
    waits = 0
    for run in runs:
        run_spans, run_waits = lock_spans(instance, run.run_id)
        spans += run_spans
        waits += run_waits
    # Checked before the exit codes: two writers at once is the cause, a failed step the symptom.
    spans.sort(key=lambda s: s.start)
    for before, after in itertools.pairwise(spans):
        assert after.start >= before.end, (
            f"{after.step_key} of run {after.run_id} took the writer lock while "
            f"{before.step_key} of run {before.run_id} held it "
            f"(exit codes {[r[0] for r in results]})"
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
    # Every writing stage of both pipeline runs held the lock.
    for run in runs:
        if run.job_name == "qe_pipeline":
            held = {s.step_key for s in spans if s.run_id == run.run_id}
            assert held == PIPELINE_WRITERS, held
    # Both start with raw_events within a fraction of a second; the first holds it for seconds.
    assert waits > 0, "no stage ever waited for the writer lock: the runs did not contend"

    check_data(data, expected)
    inbox = FileInbox(data / "inbox")
    assert inbox.pending_files() == [], "the inbox was not drained"

    print(
        f"\ntwo runs in {elapsed:.1f}s: {len(runs)} Dagster runs, {len(spans)} lock holds, "
        f"none overlapping; {waits} waits for the lock"
    )


HOLD = """
import sys, time
from qe_assets.store import writer_lock
with writer_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_writer_lock_is_exclusive_across_processes_and_dropped_when_its_holder_dies(
    tmp_path: Path,
) -> None:
    database = tmp_path / "qe.duckdb"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(database)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        waits: list[str] = []
        taken = threading.Event()

        def take() -> None:
            with writer_lock(database, on_wait=waits.append, report_seconds=0.2):
                taken.set()

        waiter = threading.Thread(target=take, daemon=True)
        waiter.start()
        time.sleep(0.8)
        assert not taken.is_set(), "the lock was taken while another process held it"
        # The waiter says who holds it, and keeps saying so while it waits.
        assert len(waits) >= 2 and waits[0] == f"pid {holder.pid} on {socket.gethostname()}"
        holder.kill()  # no release code runs: the kernel drops the lock
        holder.wait(timeout=10)
        assert taken.wait(timeout=5), "the lock of a killed holder was never released"
        waiter.join(timeout=5)
    finally:
        if holder.poll() is None:
            holder.kill()


# Reviewers against a run (issue #15, item 7): a run of RUN_EVENTS demo events, once alone and once
# while REVIEWERS `qe review accept` loops decide the pending samples over and over.
RUN_EVENTS = 4_000
REVIEWERS = 3
PENDING = 30
QE = (sys.executable, "-m", "qe_assets.cli")
REVIEW_WAIT = 90  # each reviewer command's --wait: a bound, not what a decision should take


@dataclass(frozen=True)
class Decision:
    returncode: int
    seconds: float
    stderr: str


def review_loop(env: dict[str, str], ids: list[str], run: subprocess.Popen[str]) -> list[Decision]:
    """`qe review accept ID` for each id, over and over until the run ends (one pass at least).
    The run has no version to cut, so accepting again is allowed and changes nothing."""
    decisions: list[Decision] = []
    while not decisions or run.poll() is None:
        for sample_id in ids:
            started = time.monotonic()
            done = subprocess.run(
                [*QE, "review", "--wait", str(REVIEW_WAIT), "accept", sample_id],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=REVIEW_WAIT + 60,
            )
            decisions.append(Decision(done.returncode, time.monotonic() - started, done.stderr))
    return decisions


def timed_run(env: dict[str, str], ids: list[str], reviewers: int) -> tuple[float, list[Decision]]:
    """`qe run` over the inbox, with `reviewers` review loops on `ids` alongside; its seconds."""
    started = time.monotonic()
    run = subprocess.Popen(
        [sys.executable, "-m", "qe_assets.cli", "run"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    decisions: list[list[Decision]] = [[] for _ in range(reviewers)]
    loops = [
        threading.Thread(
            target=lambda n=n: decisions[n].extend(review_loop(env, ids[n::reviewers], run))
        )
        for n in range(reviewers)
    ]
    try:
        for loop in loops:
            loop.start()
        stdout, stderr = run.communicate(timeout=RUN_TIMEOUT * 2)
        elapsed = time.monotonic() - started
        for loop in loops:
            loop.join(timeout=REVIEW_WAIT + 60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, f"qe run failed ({run.returncode}):\n{stdout}\n{stderr}"
    for text in (stdout, stderr):
        assert LOCK_FAILURE.search(text) is None and "Traceback" not in text, text
    return elapsed, [d for loop in decisions for d in loop]


def test_reviewers_deciding_while_a_run_writes_never_fail_it(tmp_path: Path) -> None:
    """Reviewers take the writer lock for one short transaction; every connection of the run
    waits on that lock too, so neither side fails on DuckDB's file lock, and reviewers wait at
    most for one stage."""
    from qe_assets_tests.runs import materialize
    from qe_assets_tests.test_pipeline import batch

    prepared = tmp_path / "prepared"
    FileInbox(prepared / "inbox").put(batch("low", PENDING, score=0.2))
    materialize(Settings(data_dir=str(prepared)))
    with connect(prepared / "qe.duckdb", read_only=True) as conn:
        ids = column(conn, "SELECT sample_id FROM review_queue WHERE status = 'pending'")
    assert len(ids) == PENDING
    times: dict[str, float] = {}
    decisions: list[Decision] = []
    for name, reviewers in (("alone", 0), ("reviewed", REVIEWERS)):
        data = tmp_path / name
        shutil.copytree(prepared, data)
        FileInbox(data / "inbox").put(generate_events(RUN_EVENTS, seed=17, doc_chars=(60, 200)))
        # No version is cut (the threshold is out of reach), so deciding again stays allowed.
        env = {**child_env(data, tmp_path / f"home-{name}"), "QE_FINETUNE_THRESHOLD": "1000000"}
        times[name], decided = timed_run(env, ids, reviewers)
        decisions += decided

    assert len(decisions) >= PENDING
    failed = [d for d in decisions if d.returncode != 0]
    assert not failed, f"{len(failed)} review commands failed, first: {failed[0]}"
    slowest = max(d.seconds for d in decisions)
    median = sorted(d.seconds for d in decisions)[len(decisions) // 2]
    assert slowest < REVIEW_WAIT / 2, f"a review command took {slowest:.1f}s"
    with connect(tmp_path / "reviewed" / "qe.duckdb", read_only=True) as conn:
        statuses = dict(conn.execute("SELECT sample_id, status FROM review_queue").fetchall())
        ((raw,),) = conn.execute("SELECT count(*) FROM raw_events").fetchall()
    assert {statuses[i] for i in ids} == {"accepted"}
    assert raw > PENDING + RUN_EVENTS * 0.9
    print(
        f"\nqe run over {RUN_EVENTS:,} events: {times['alone']:.1f}s alone, "
        f"{times['reviewed']:.1f}s with {REVIEWERS} reviewers ({len(decisions)} decisions, "
        f"slowest {slowest:.1f}s, median {median:.1f}s)"
    )


def test_writer_connection_queues_on_the_writer_lock(tmp_path: Path) -> None:
    """Every short write outside a stage takes the stage's lock: bounded, naming the holder, and
    without waiting for itself when its own process holds the lock (a stage's queries, on the
    stage's thread or a worker thread)."""
    database = tmp_path / "qe.duckdb"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(database)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with (
            pytest.raises(DatabaseBusy, match=f"pid {holder.pid} on"),
            writer_connection(database, wait_seconds=0.5),
        ):
            pass
        assert 0.5 <= time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait(timeout=10)

    def query() -> list[tuple[int]]:
        with writer_connection(database, wait_seconds=0.5) as conn:
            return conn.execute("SELECT 42").fetchall()

    with writer_lock(database):
        assert holds_writer_lock(database)
        assert query() == [(42,)]
        with ThreadPoolExecutor(max_workers=1) as pool:
            assert pool.submit(query).result(timeout=30) == [(42,)]
    assert not holds_writer_lock(database)
