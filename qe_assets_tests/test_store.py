"""`WriterSession`: per-batch write connections closed (checkpointed) on a helper thread, and the
writer settings every write connection gets."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl
import pytest

from qe_assets.store import (
    WRITER_CONFIG,
    WriterSession,
    connect,
    owned_copy,
    select_frame,
    sql_over_frames,
    transaction,
)


def _count(database: Path) -> int:
    with connect(database, read_only=True, wait_seconds=5) as conn:
        return int(conn.execute("SELECT count(*) FROM raw_events").fetchall()[0][0])


def _insert_rows(conn, first: int, count: int) -> None:
    conn.execute(
        """
        INSERT INTO raw_events (request_id, question, docs, answer, evaluation, score, labels,
                                timestamp, fingerprint, source, ingested_at)
        SELECT 'r' || i, 'q', [], 'a', '{}', 0.1, [], now()::TIMESTAMP, 'f', 's',
               now()::TIMESTAMP
        FROM range(?, ?) t(i)
        """,
        [first, first + count],
    )


def test_batches_committed_through_a_session_are_all_stored(tmp_path: Path) -> None:
    database = tmp_path / "qe.duckdb"
    with WriterSession(database, config={"memory_limit": "256MB"}) as session:
        for batch in range(5):
            # Each connection opens only after the previous one finished closing.
            with session.connection() as conn:
                assert conn.execute("SELECT current_setting('max_vacuum_tasks')").fetchall() == [
                    (WRITER_CONFIG["max_vacuum_tasks"],)
                ]
                with transaction(conn):
                    _insert_rows(conn, batch * 1_000, 1_000)
    # Leaving the session waited for the last close: another reader gets in straight away.
    assert _count(database) == 5_000


def test_a_failing_batch_is_rolled_back_and_closed_at_once(tmp_path: Path) -> None:
    database = tmp_path / "qe.duckdb"
    with WriterSession(database) as session:
        with session.connection() as conn, transaction(conn):
            _insert_rows(conn, 0, 10)
        with (
            pytest.raises(RuntimeError, match="boom"),
            session.connection() as conn,
            transaction(conn),
        ):
            _insert_rows(conn, 10, 10)
            raise RuntimeError("boom")
        # Closed synchronously on the failure: a read-only connection opens without waiting.
        assert _count(database) == 10
        with session.connection() as conn, transaction(conn):
            _insert_rows(conn, 20, 10)
    assert _count(database) == 20


def test_an_error_in_the_session_body_is_not_masked(tmp_path: Path) -> None:
    database = tmp_path / "qe.duckdb"
    with pytest.raises(ValueError, match="stage failed"), WriterSession(database) as session:
        with session.connection() as conn, transaction(conn):
            _insert_rows(conn, 0, 3)
        raise ValueError("stage failed")
    assert _count(database) == 3


def test_sql_over_frames_runs_without_a_store() -> None:
    result = sql_over_frames(
        "SELECT a.k, a.v + b.v AS total FROM a JOIN b USING (k) ORDER BY k",
        a=pl.DataFrame({"k": [1, 2], "v": [10, 20]}),
        b=pl.DataFrame({"k": [2, 1], "v": [1, 2]}),
    )
    assert result.to_dicts() == [{"k": 1, "total": 12}, {"k": 2, "total": 21}]


def _rss_mb() -> float:
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024


def test_sql_over_frames_from_many_threads_sees_only_its_own_frames() -> None:
    """sql_over_frames shares one private database per process: concurrent calls registering the
    same name must each see their own frame, and leave nothing registered behind."""

    def total(n: int) -> int:
        frame = pl.DataFrame({"x": list(range(n))})
        return int(sql_over_frames("SELECT sum(x) AS s FROM batch", batch=frame)["s"][0])

    sizes = [1_000 + i for i in range(64)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(total, sizes)) == [n * (n - 1) // 2 for n in sizes]
    views = sql_over_frames("SELECT count(*) AS n FROM duckdb_views() WHERE NOT internal")
    assert views["n"][0] == 0


def test_owned_copy_does_not_keep_the_rest_of_the_query_result_alive(tmp_path: Path) -> None:
    # The export keeps each batch's sample ids until the version commits; kept as plain column
    # selects they held every prompt of every batch (1M-event export: 0.4 -> 2.0 GB).
    query = (
        "SELECT 'demo-7-' || lpad(i::VARCHAR, 9, '0') || '#low_relevance' AS sample_id, "
        "repeat('x', 4000) || i AS prompt FROM range(?, ?) t(i)"
    )
    growth: dict[str, float] = {}
    with connect(tmp_path / "qe.duckdb") as conn:
        for name, keep in (
            # A first round keeps nothing: the allocators reach their steady state.
            ("warm-up", lambda frame: frame.head(0)),
            ("owned", lambda frame: frame.select(owned_copy("sample_id"))),
            ("plain", lambda frame: frame.select("sample_id")),
        ):
            kept = []
            before = _rss_mb()
            for batch in range(10):
                frame = select_frame(conn, query, [batch * 5_000, (batch + 1) * 5_000])
                kept.append(keep(frame))
                del frame
            growth[name] = _rss_mb() - before
            if name != "warm-up":
                assert pl.concat(kept)["sample_id"].to_list() == [
                    f"demo-7-{i:09d}#low_relevance" for i in range(50_000)
                ]
            del kept
    # 10 batches of 5,000 prompts are ~200 MB: "plain" keeps them, "owned" only the ids.
    assert growth["plain"] > 120, growth
    assert growth["owned"] < 40, growth


UTC_EVERYWHERE = """
import sys
from datetime import UTC, datetime

import duckdb

from qe_assets.ops.adhoc import SANDBOX
from qe_assets.store import WriterSession, connect, writer_connection

database = sys.argv[1]
NOW = "SELECT now()::TIMESTAMP"

def offset(conn):
    return abs((conn.execute(NOW).fetchall()[0][0] - datetime.now(UTC).replace(tzinfo=None))
               .total_seconds())

raw = duckdb.connect()
print("raw", offset(raw))  # DuckDB's own session zone: New York's here
raw.close()
with writer_connection(database) as conn:
    print("writer_connection", offset(conn))
with WriterSession(database) as session, session.connection() as conn:
    print("WriterSession", offset(conn))
with connect(database) as conn:
    print("connect", offset(conn))
with connect(database, read_only=True) as conn:
    print("read_only", offset(conn))
with connect(database, read_only=True, config=SANDBOX) as conn:  # qe sql's locked sandbox
    print("sandbox", offset(conn))
"""


def test_every_store_connection_casts_now_in_utc(tmp_path: Path) -> None:
    """`now()::TIMESTAMP` follows DuckDB's session time zone, the machine's by default, while
    the stages write Python UTC: every connection of ours sets UTC, whatever TZ says."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TZ": "America/New_York"}
    done = subprocess.run(
        [sys.executable, "-c", UTC_EVERYWHERE, str(tmp_path / "tz.duckdb")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    offsets = {
        name: float(value) for name, value in (x.split() for x in done.stdout.split("\n") if x)
    }
    assert offsets.pop("raw") > 3 * 3600  # the zone took effect: the test means something
    assert offsets.keys() == {
        "writer_connection",
        "WriterSession",
        "connect",
        "read_only",
        "sandbox",
    }
    assert all(seconds < 60 for seconds in offsets.values()), offsets
