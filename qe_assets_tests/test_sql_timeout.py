"""A long `qe sql` never fails a concurrent `qe run` (issue 26, item 7).

A read-only DuckDB connection keeps every writer out of the file. `qe sql` stops its query after
`--timeout` (default 60 s, at most store.READ_SECONDS_MAX) and writers wait longer than that for
readers (store.WRITER_WAIT_SECONDS). Before, `SELECT count(*) FROM range(20000000000)` and a
`qe run` 3 s later made the run fail after 69.8 s with "Could not set lock … Conflicting lock".

Real parts: `qe sql` and `qe run` as subprocesses, as a user at two terminals would run them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qe_assets.ops.adhoc import INTERRUPT_GRACE_SECONDS
from qe_assets.ops.demo import generate_events, write_jsonl
from qe_assets.store import READ_SECONDS_MAX, WRITER_WAIT_SECONDS, connect, ensure_schema

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Hours of work for DuckDB on two cores (the issue's range(20000000000) takes some 40 s here):
# only the timeout ends it.
LONG_QUERY = "SELECT count(*) FROM range(1000000000000)"
N_EVENTS = 40


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QE_", "DAGSTER_HOME"))}
    env["QE_DATA_DIR"] = str(data_dir)
    return env


def _store_with_inbox(data_dir: Path) -> None:
    with connect(data_dir / "qe.duckdb") as conn:
        ensure_schema(conn)
    write_jsonl(data_dir / "inbox" / "events.jsonl", generate_events(N_EVENTS, seed=26))


def _qe(*args: str) -> list[str]:
    return [sys.executable, "-m", "qe_assets.cli", *args]


def _long_query_then_run(
    data_dir: Path, *sql_args: str
) -> tuple[subprocess.CompletedProcess[str], float, int, str, float]:
    """`qe sql LONG_QUERY`, then `qe run` 3 s later (the issue's steps); the run, its seconds, and
    the query's exit code, stderr and seconds."""
    env = _env(data_dir)
    began = time.monotonic()
    reader = subprocess.Popen(
        _qe("sql", LONG_QUERY, "--format", "csv", *sql_args),
        cwd=PROJECT_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ended: list[tuple[str, float]] = []
    # The query's end, timed as it happens (the run goes on for a while after).
    watcher = threading.Thread(
        target=lambda: ended.append((reader.communicate()[1], time.monotonic() - began)),
        daemon=True,
    )
    watcher.start()
    try:
        time.sleep(3)
        assert reader.poll() is None, "qe sql ended before the run started"
        started = time.monotonic()
        run = subprocess.run(
            _qe("run", "-q"),
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=WRITER_WAIT_SECONDS + 120,
        )
        run_seconds = time.monotonic() - started
        watcher.join(timeout=30)
        ((reader_err, reader_seconds),) = ended
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait(timeout=10)
    return run, run_seconds, reader.returncode, reader_err, reader_seconds


def _stored_events(data_dir: Path) -> int:
    with connect(data_dir / "qe.duckdb", read_only=True) as conn:
        return int(conn.execute("SELECT count(*) FROM raw_events").fetchall()[0][0])


def test_a_long_sql_query_is_stopped_and_the_run_waits_for_it(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    _store_with_inbox(data_dir)
    run, run_seconds, code, err, reader_seconds = _long_query_then_run(data_dir, "--timeout", "8")
    print(f"\nqe sql stopped after {reader_seconds:.1f}s; qe run took {run_seconds:.1f}s")
    assert run.returncode == 0, run.stderr
    assert code == 1 and err.strip() == (
        "qe: query stopped after --timeout 8s, so that it does not hold up the runs that write "
        "(raise --timeout, or narrow the query)"
    )
    assert reader_seconds < 8 + INTERRUPT_GRACE_SECONDS + 5
    assert _stored_events(data_dir) > 0


def test_sql_timeout_is_bounded_below_the_writers_wait(tmp_path: Path) -> None:
    """The bound the writers count on: a query at the largest --timeout, interrupted late, still
    lets go of the file before a writer gives up; larger timeouts are refused in one line."""
    assert WRITER_WAIT_SECONDS > READ_SECONDS_MAX + INTERRUPT_GRACE_SECONDS
    data_dir = tmp_path / "data"
    _store_with_inbox(data_dir)
    refused = subprocess.run(
        _qe("sql", "SELECT 1", "--timeout", str(READ_SECONDS_MAX + 1)),
        env=_env(data_dir),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert refused.stderr == "qe: --timeout must be above 0 and at most 300 seconds\n"


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("QE_SLOW_TRIALS"), reason="opt-in: about 80 s; set QE_SLOW_TRIALS=1"
)
def test_the_issues_steps_with_the_default_timeout(tmp_path: Path) -> None:
    """The issue's exact steps (no --timeout): the query stops at 60 s, the run waits for it
    and succeeds. Before the fix the run failed at 60 s of waiting. About 80 s."""
    data_dir = tmp_path / "data"
    _store_with_inbox(data_dir)
    run, run_seconds, code, err, reader_seconds = _long_query_then_run(data_dir)
    print(f"\nqe sql stopped after {reader_seconds:.1f}s; qe run took {run_seconds:.1f}s")
    assert run.returncode == 0, run.stderr
    assert code == 1 and "query stopped after --timeout 60s" in err
    assert _stored_events(data_dir) > 0
