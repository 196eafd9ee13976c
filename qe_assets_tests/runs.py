"""Run the real Definitions in process against a test's settings."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import dagster as dg

from qe_assets.settings import Settings
from qe_assets.store import connect
from qe_assets.testing.runs import materialize, metadata

__all__ = ["materialize", "metadata"]  # shared with the benchmarks; the rest is test-only


def checks(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def scalar(settings: Settings, query: str, params: list | None = None) -> Any:
    with connect(settings.database, read_only=True) as conn:
        return conn.execute(query, params or []).fetchall()[0][0]


def column(conn: Any, query: str) -> list[Any]:
    return [row[0] for row in conn.execute(query).fetchall()]


def exportable_sample_ids(conn: Any) -> set[str]:
    """Every sample a version (or the evaluation set) must hold once nothing is pending: ok, not a
    duplicate, not waiting for a reviewer. Written independently of the export's own query."""
    return set(
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


def failing_on_open(settings: Settings, failing: int) -> Callable[[], Any]:
    """A connection factory whose open number `failing` raises, as a database going away part
    way through a stage would; every other open connects to the test's database."""
    opened = 0

    def connection() -> Any:
        nonlocal opened
        opened += 1
        if opened == failing:
            raise RuntimeError("database unavailable")
        return connect(settings.database)

    return connection


def stored_once(conn: Any, expected_ids: Iterable[str]) -> list[str]:
    """raw_events' request ids, after asserting each expected id is there exactly once and no
    other: nothing lost, nothing doubled."""
    raw = column(conn, "SELECT request_id FROM raw_events")
    expected = set(expected_ids)
    assert len(raw) == len(set(raw)), "raw_events holds a request_id twice"
    assert set(raw) == expected, (
        f"lost: {sorted(expected - set(raw))[:5]}, unexpected: {sorted(set(raw) - expected)[:5]}"
    )
    return raw
