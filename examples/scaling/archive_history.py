"""Copy the append-only history out of DuckDB into Parquet files, locally or on object storage.

    python examples/scaling/archive_history.py TARGET [--chunk-rows 200000]

TARGET is a directory or an object-storage prefix such as s3://my-qe-bucket/history. Each run
appends what is new since the previous one: for `raw_events` and `annotated_samples` (append-only,
ordered by `seq`), the rows whose `seq` is above the highest `seq` already under
TARGET/<table>/, in chunks of --chunk-rows rows, one Parquet file per chunk named by its seq
range (`seq_000000000001-000000200000.parquet`). A chunk is the unit of retry: a local file is
written under a temporary name and renamed, an object is only visible once fully uploaded, and
the next run starts after the highest seq it finds, so a crash costs at most one chunk's work.

Every chunk opens DuckDB read-only for that chunk only, with the same bounded wait as `qe sql`
(qe_assets.store.connect), so a running ingest gets the file between chunks.

It copies and never deletes: the pipeline still needs every request_id, dedup_key and
dataset_samples row in DuckDB (idempotent ingest, duplicate detection, leakage check).

Object storage goes through DuckDB's httpfs extension (`s3://`, also `gs://` and `r2://`) and the
aws extension's credential chain (AWS_* variables, ~/.aws, an instance or pod role). Both are
downloaded once from DuckDB's extension repository, which needs network access; for an
S3-compatible store set AWS_ENDPOINT_URL or use your own CREATE SECRET via --secret-sql.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import duckdb

from qe_assets.settings import Settings
from qe_assets.store import connect

TABLES = ("raw_events", "annotated_samples")
REMOTE_PREFIXES = ("s3://", "s3a://", "gs://", "gcs://", "r2://")
DEFAULT_SECRET = (
    "CREATE OR REPLACE TEMPORARY SECRET qe_archive (TYPE s3, PROVIDER credential_chain)"
)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _prepare(conn: duckdb.DuckDBPyConnection, remote: bool, secret_sql: str) -> None:
    if remote:
        for extension in ("httpfs", "aws"):
            conn.install_extension(extension)
            conn.load_extension(extension)
        conn.execute(secret_sql)


def archived_up_to(conn: duckdb.DuckDBPyConnection, target: str, table: str) -> int:
    """The highest seq already in TARGET/<table>/ (0 when nothing is there yet)."""
    pattern = _quote(f"{target}/{table}/seq_*.parquet")
    try:
        (high,) = conn.execute(f"SELECT max(seq) FROM read_parquet({pattern})").fetchone() or (0,)
    except duckdb.IOException as exc:
        if "No files found" in str(exc):
            return 0
        raise
    return int(high or 0)


def archive_table(
    database: Path, target: str, table: str, chunk_rows: int, secret_sql: str, wait: float
) -> int:
    remote = target.startswith(REMOTE_PREFIXES)
    if not remote:
        Path(target, table).mkdir(parents=True, exist_ok=True)
    written = 0
    done = None
    while True:
        with connect(database, read_only=True, wait_seconds=wait) as conn:
            _prepare(conn, remote, secret_sql)
            low = archived_up_to(conn, target, table) if done is None else done
            chunk = f"SELECT seq FROM {table} WHERE seq > ? ORDER BY seq LIMIT ?"
            (high,) = conn.execute(
                f"SELECT max(seq) FROM ({chunk})", [low, chunk_rows]
            ).fetchone() or (None,)
            if high is None:
                return written
            final = f"{target}/{table}/seq_{low + 1:012d}-{high:012d}.parquet"
            path = final if remote else f"{target}/{table}/.seq_{low + 1:012d}.parquet.part"
            query = f"SELECT * FROM {table} WHERE seq > {low} AND seq <= {high} ORDER BY seq"
            conn.execute(f"COPY ({query}) TO {_quote(path)} (FORMAT parquet, COMPRESSION zstd)")
            (rows,) = conn.execute(
                f"SELECT count(*) FROM {table} WHERE seq > {low} AND seq <= {high}"
            ).fetchone() or (0,)
        if not remote:
            os.replace(path, final)
        written += int(rows)
        done = high
        print(f"{table}: seq {low + 1}..{high} ({rows} rows) → {final}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="a directory or s3://bucket/prefix")
    parser.add_argument(
        "--database", help="the DuckDB file (default: QE_DUCKDB_PATH / QE_DATA_DIR)"
    )
    parser.add_argument("--chunk-rows", type=int, default=200_000)
    parser.add_argument("--wait", type=float, default=60.0, help="max seconds to wait for a writer")
    parser.add_argument(
        "--secret-sql", default=DEFAULT_SECRET, help="CREATE SECRET for remote targets"
    )
    args = parser.parse_args(argv)
    database = Path(args.database) if args.database else Settings.from_env().database
    if not database.exists():
        print(f"no database at {database}", file=sys.stderr)
        return 2
    target = args.target.rstrip("/")
    for table in TABLES:
        count = archive_table(database, target, table, args.chunk_rows, args.secret_sql, args.wait)
        print(f"{table}: {count} new rows archived")
    return 0


if __name__ == "__main__":
    sys.exit(main())
