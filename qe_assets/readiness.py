"""Which samples the next dataset version would take: shared by the export, the fine-tune sensor,
`qe run` and `qe status`, and free of Dagster so the CLI stays quick to start."""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

# Ready = a completion that is ok, written after the last version's watermark, for a sample that
# is not a duplicate, not waiting for a reviewer and not in any version yet.
READY = """
    FROM completions c JOIN annotated_samples s USING (sample_id)
    WHERE c.seq > $low AND c.seq <= $high AND c.status = 'ok' AND c.completion IS NOT NULL
      AND s.duplicate_of IS NULL
      AND NOT EXISTS (
          SELECT 1 FROM review_queue r WHERE r.sample_id = c.sample_id AND r.status = 'pending'
      )
      AND NOT EXISTS (SELECT 1 FROM dataset_samples d WHERE d.sample_id = c.sample_id)
"""


@dataclass(frozen=True)
class VersionState:
    committed: list[str]
    next_number: int
    low: int  # completions.seq already covered by committed versions
    high: int  # newest completions.seq now


def version_state(conn: duckdb.DuckDBPyConnection) -> VersionState:
    committed = [r[0] for r in conn.execute("SELECT version FROM dataset_versions").fetchall()]
    ((number, low),) = conn.execute(
        "SELECT coalesce(max(number), 0), coalesce(max(max_completion_seq), 0) "
        "FROM dataset_versions"
    ).fetchall()
    ((high,),) = conn.execute("SELECT coalesce(max(seq), 0) FROM completions").fetchall()
    return VersionState(committed, int(number) + 1, int(low), int(high))


def ready_sample_count(conn: duckdb.DuckDBPyConnection, state: VersionState | None = None) -> int:
    """Samples the next version would take: what the fine-tune sensor compares to its threshold."""
    state = state or version_state(conn)
    ((count,),) = conn.execute(
        f"SELECT count(*) {READY}", {"low": state.low, "high": state.high}
    ).fetchall()
    return int(count)
