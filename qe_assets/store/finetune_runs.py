"""`fine_tune_runs`: one row per attempt, linking a model to the dataset version it came from.

Rows are written in short transactions as the run progresses, the provider's job id first, so a
restarted run finds the job it was following.
"""

from __future__ import annotations

import json
from typing import Any

import duckdb

from qe_assets.store import select_frame

# A version with a row in one of these states is done for that backend: trained, recorded with
# no backend, or refused by a blocking asset check. `failed`/`cancelled` ones are retried.
FINISHED = ("succeeded", "skipped", "rejected")
_JSON_FIELDS = ("recipe", "metrics")


def latest_run(
    conn: duckdb.DuckDBPyConnection, version: str, backend: str
) -> dict[str, Any] | None:
    rows = select_frame(
        conn,
        "SELECT * FROM fine_tune_runs WHERE dataset_version = ? AND backend = ? "
        "ORDER BY created_at DESC, run_id DESC LIMIT 1",
        [version, backend],
    ).rows(named=True)
    return rows[0] if rows else None


def attempts(conn: duckdb.DuckDBPyConnection, version: str, backend: str) -> int:
    ((count,),) = conn.execute(
        "SELECT count(*) FROM fine_tune_runs WHERE dataset_version = ? AND backend = ?",
        [version, backend],
    ).fetchall()
    return int(count)


def pending_version(conn: duckdb.DuckDBPyConnection, backend: str) -> str | None:
    """The OLDEST dataset version with no finished run for this backend: what the release
    publishes, checks and fine-tunes next. Oldest first, so a version committed by a run that
    died before its fine-tune is never skipped for a newer one (each round continues from the
    previous round's model)."""
    rows = conn.execute(
        """
        SELECT v.version FROM dataset_versions v
        WHERE NOT EXISTS (
            SELECT 1 FROM fine_tune_runs r
            WHERE r.dataset_version = v.version AND r.backend = ? AND r.status IN ?
        )
          -- superseded by `qe forget`: its replacement is released instead
          AND v.version NOT IN (SELECT version FROM version_supersessions)
        ORDER BY v.number LIMIT 1
        """,
        [backend, list(FINISHED)],
    ).fetchall()
    return rows[0][0] if rows else None


def handed_over(conn: duckdb.DuckDBPyConnection, version: str, backend: str) -> bool:
    """Whether the version's release reached an end with this backend: False when no run was
    ever recorded, or the last one is still `running` (its process died: it must be resumed)."""
    last = latest_run(conn, version, backend)
    return last is not None and last["status"] != "running"


def reject_version(
    conn: duckdb.DuckDBPyConnection, version: str, backend: str, reason: str
) -> None:
    """Record that a blocking check refused the version, so later releases move on to newer
    versions instead of publishing this one again for ever. A no-op once it is finished."""
    if _finished(conn, version, backend):
        return
    run_id = f"{version}-{backend}-{attempts(conn, version, backend) + 1}"
    save_run(
        conn, run_id, dataset_version=version, backend=backend, status="rejected", message=reason
    )


def _finished(conn: duckdb.DuckDBPyConnection, version: str, backend: str) -> bool:
    rows = conn.execute(
        "SELECT 1 FROM fine_tune_runs WHERE dataset_version = ? AND backend = ? AND status IN ?",
        [version, backend, list(FINISHED)],
    ).fetchall()
    return bool(rows)


def previous_model(conn: duckdb.DuckDBPyConnection, backend: str, version: str) -> str | None:
    """The newest model this backend made from an earlier version: the next round starts there."""
    rows = conn.execute(
        """
        SELECT r.model_id FROM fine_tune_runs r JOIN dataset_versions v
          ON v.version = r.dataset_version
        WHERE r.backend = ? AND r.status = 'succeeded' AND r.model_id IS NOT NULL
          AND v.number < (SELECT number FROM dataset_versions WHERE version = ?)
        ORDER BY v.number DESC LIMIT 1
        """,
        [backend, version],
    ).fetchall()
    return rows[0][0] if rows else None


def save_run(conn: duckdb.DuckDBPyConnection, run_id: str, **fields: Any) -> None:
    """Insert or update the row of `run_id` with the given columns."""
    values = {
        key: json.dumps(value, ensure_ascii=False) if key in _JSON_FIELDS else value
        for key, value in fields.items()
    }
    exists = conn.execute("SELECT 1 FROM fine_tune_runs WHERE run_id = ?", [run_id]).fetchall()
    if exists:
        if values:
            assignments = ", ".join(f"{key} = ?" for key in values)
            conn.execute(
                f"UPDATE fine_tune_runs SET {assignments}, updated_at = now()::TIMESTAMP "
                "WHERE run_id = ?",
                [*values.values(), run_id],
            )
        return
    columns = ", ".join(["run_id", *values])
    marks = ", ".join(["?"] * (len(values) + 1))
    conn.execute(
        f"INSERT INTO fine_tune_runs ({columns}, created_at, updated_at) "
        f"VALUES ({marks}, now()::TIMESTAMP, now()::TIMESTAMP)",
        [run_id, *values.values()],
    )
