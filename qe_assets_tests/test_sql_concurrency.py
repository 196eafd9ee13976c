"""`qe sql` while `raw_events` ingests 50,000 events in another process (issue 6, "Must show").

One scenario, run once per module: a real Dagster materialization of `raw_events` drains a 50k
line inbox file in batches of 2,000 (QE_INGEST_BATCH_SIZE) in a subprocess, while this process
runs `qe sql "SELECT count(*) FROM raw_events" --format csv` 50 times, each as its own process,
as a user at a terminal would. Two tests read the record:

* every query answers (exit 0, a number), counts never go down, the final count is exact;
* queries answer *between* the writer's batches, not only after it is done: the ingest validates
  each batch before it takes the write lock, and readers poll at most every 50 ms.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qe_assets.ops.demo import generate_events, write_jsonl
from qe_assets.settings import Settings
from qe_assets.store import connect, ensure_schema

PROJECT_ROOT = Path(__file__).resolve().parents[1]
N_EVENTS = 50_000
N_QUERIES = 50
BATCH_SIZE = 2_000
QUERY = "SELECT count(*) FROM raw_events"
WAIT_NOTICE = "database busy with a writer, waiting"
# Lighter docs than the demo default (~0.8 KB instead of ~5.6 KB per event) keep the ingest near
# 15 s on two cores: well inside qe sql's default 60 s wait, which a query may need in full today.
DOCS_PER_EVENT, DOC_CHARS = (1, 2), (60, 200)
WRITER = (
    "from qe_assets.settings import Settings\n"
    "from qe_assets_tests.runs import materialize, metadata\n"
    "result = materialize(Settings.from_env(), 'raw_events')\n"
    "print('raw_events:', metadata(result, 'raw_events'))\n"
)


@dataclass(frozen=True)
class Query:
    started: float  # seconds since the ingest began
    seconds: float
    returncode: int
    stdout: str
    stderr: str
    during_write: bool  # the writer was still running when the query started

    @property
    def count(self) -> int | None:
        lines = self.stdout.split()
        try:
            return int(lines[-1]) if len(lines) == 2 else None  # csv: header, value
        except ValueError:
            return None

    @property
    def waited(self) -> bool:
        return WAIT_NOTICE in self.stderr


@dataclass(frozen=True)
class Scenario:
    queries: list[Query]
    expected: int
    final_count: int
    writer_returncode: int
    writer_seconds: float
    writer_log: str

    def percentile(self, share: float) -> float:
        latencies = sorted(q.seconds for q in self.queries)
        return latencies[min(len(latencies) - 1, round(share * (len(latencies) - 1)))]

    @property
    def intermediate_counts(self) -> set[int]:
        """Counts strictly between empty and done: answers given while the writer wrote."""
        return {c for q in self.queries if (c := q.count) is not None and 0 < c < self.expected}


def _clean_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QE_", "DAGSTER_HOME"))}
    env.update(QE_DATA_DIR=str(data_dir), QE_INGEST_BATCH_SIZE=str(BATCH_SIZE))
    return env


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    root = tmp_path_factory.mktemp("sql_concurrency")
    data_dir = root / "data"
    lines = generate_events(N_EVENTS, seed=606, docs_per_event=DOCS_PER_EVENT, doc_chars=DOC_CHARS)
    # bad_share=0: every line is valid; the generator's exact re-sends are the only duplicates.
    expected = len({json.loads(line)["request_id"] for line in lines})
    assert expected < N_EVENTS
    inbox_file = data_dir / "inbox" / "bulk.jsonl"
    write_jsonl(inbox_file, lines)
    del lines
    # A deployment that has run before: the database and its tables exist.
    with connect(Settings(data_dir=str(data_dir)).database) as conn:
        ensure_schema(conn)
    env = _clean_env(data_dir)

    log_path = root / "writer.log"
    with open(log_path, "wb") as log:
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER],
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        # The ingest has begun once the inbox claims the file (renames it into .processing/).
        deadline = time.monotonic() + 60
        while inbox_file.exists():
            if writer.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the writer never claimed the inbox file:\n{log_path.read_text()}")
            time.sleep(0.02)
        began = time.monotonic()
        finished: list[float] = []
        watcher = threading.Thread(
            target=lambda: (writer.wait(), finished.append(time.monotonic())), daemon=True
        )
        watcher.start()

        queries: list[Query] = []
        for _ in range(N_QUERIES):
            start = time.monotonic()
            during_write = writer.poll() is None
            done = subprocess.run(
                [sys.executable, "-m", "qe_assets.cli", "sql", QUERY, "--format", "csv"],
                cwd=PROJECT_ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            queries.append(
                Query(
                    started=start - began,
                    seconds=time.monotonic() - start,
                    returncode=done.returncode,
                    stdout=done.stdout,
                    stderr=done.stderr,
                    during_write=during_write,
                )
            )
        writer_returncode = writer.wait(timeout=240)
        watcher.join(timeout=10)
        writer_seconds = finished[0] - began
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(timeout=30)

    with connect(Settings(data_dir=str(data_dir)).database, read_only=True) as conn:
        final_count = int(conn.execute(QUERY).fetchall()[0][0])
    result = Scenario(
        queries=queries,
        expected=expected,
        final_count=final_count,
        writer_returncode=writer_returncode,
        writer_seconds=writer_seconds,
        writer_log=log_path.read_text(errors="replace"),
    )
    during = [q for q in queries if q.during_write]
    print(
        f"\nqe sql x{len(queries)} while raw_events ingested {N_EVENTS:,} events "
        f"(batches of {BATCH_SIZE:,}; writer done {writer_seconds:.1f}s after the ingest began):"
        f"\n  latency p50 {result.percentile(0.5):.2f}s, p99 {result.percentile(0.99):.2f}s, "
        f"max {max(q.seconds for q in queries):.2f}s"
        f"\n  waited for the writer: {sum(q.waited for q in queries)} queries; started during "
        f"the write: {len(during)}; distinct counts seen mid-ingest: "
        f"{sorted(result.intermediate_counts)}"
        f"\n  during the write: "
        + ", ".join(f"{q.started:.1f}s+{q.seconds:.1f}s->{q.count}" for q in during)
    )
    yield result


def test_sql_always_answers_while_raw_events_ingests(scenario: Scenario) -> None:
    assert scenario.writer_returncode == 0, scenario.writer_log[-3000:]
    for n, query in enumerate(scenario.queries, start=1):
        assert query.returncode == 0, f"query {n}: exit {query.returncode}: {query.stderr}"
        assert query.count is not None, f"query {n}: not a count: {query.stdout!r}"
    counts = [q.count for q in scenario.queries if q.count is not None]
    assert counts == sorted(counts), f"a count went down: {counts}"
    assert all(c <= scenario.expected for c in counts)
    # The loop really overlapped the run: it started while the writer was ingesting.
    assert scenario.queries[0].during_write
    assert scenario.final_count == scenario.expected
    assert counts[-1] == scenario.expected or scenario.queries[-1].during_write


def test_sql_answers_between_write_batches(scenario: Scenario) -> None:
    """Answering "while a run writes" means between its batches: every query that began and
    ended while the writer ran saw a count (the last ones may see every row: the run still
    reports after its last commit), they saw it grow through partial counts, and no query was
    stuck behind the writer for more than a few batches. How many queries fit in the write
    depends on how fast the ingest is (each `qe sql` is a new process of about 0.5 s), so the
    test asks for growth, not for a number of them."""
    inside = [
        q
        for q in scenario.queries
        if q.during_write and q.started + q.seconds < scenario.writer_seconds
    ]
    seen = [q.count for q in inside]
    longest = max(q.seconds for q in scenario.queries)
    assert len(inside) >= 2, f"only {len(inside)} queries ran inside the write"
    assert all(c is not None and 0 < c <= scenario.expected for c in seen), seen
    partial = {c for c in seen if c is not None and c < scenario.expected}
    assert len(partial) >= 2 and longest <= 5.0, (
        f"partial counts {seen}, longest query {longest:.1f}s"
    )
