"""`qe` as users run it: a subprocess with environment variables."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from qe_assets.store import connect
from qe_assets_tests.factories import line, make_event
from qe_assets_tests.test_pipeline import batch


def qe(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "qe_assets.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"qe {args} failed ({result.returncode}): {result.stderr}")
    return result


def test_enqueue_run_status_sql_round_trip(tmp_path: Path) -> None:
    env = {"QE_DATA_DIR": str(tmp_path / "data")}
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(line(make_event(f"r{i}")) for i in range(12)) + b"\n{broken\n")

    bad = qe("enqueue", str(events), env=env, check=False)
    assert bad.returncode == 1
    assert f"{events}:13: payload: Invalid JSON" in bad.stderr
    assert "enqueued 12 records on the inbox queue; 1 invalid" in bad.stdout

    run = qe("run", env=env)
    assert "raw_events: new_rows=12" in run.stdout
    status = qe("status", env=env)
    assert "raw_events" in status.stdout and "12" in status.stdout
    assert "queue (inbox): 0 pending" in status.stdout

    table = qe("sql", "SELECT count(*) AS n FROM raw_events", env=env)
    assert "12" in table.stdout
    as_json = qe(
        "sql", "SELECT request_id FROM raw_events ORDER BY 1 LIMIT 2", "--format", "json", env=env
    )
    assert [json.loads(r)["request_id"] for r in as_json.stdout.splitlines()] == ["r0", "r1"]
    out = tmp_path / "ids.parquet"
    qe("sql", "SELECT request_id FROM raw_events", "--format", "parquet", "-o", str(out), env=env)
    assert out.stat().st_size > 0
    # The Dagster run is recorded in the persistent instance the UI uses.
    assert (tmp_path / "data" / "dagster_home" / "dagster.yaml").exists()


def test_keep_invalid_forwards_bad_records_to_rejected_events(tmp_path: Path) -> None:
    env = {"QE_DATA_DIR": str(tmp_path / "data")}
    events = tmp_path / "events.jsonl"
    events.write_bytes(line(make_event("a")) + b"\n" + b"[1]\n")
    assert qe("enqueue", "--keep-invalid", str(events), env=env).returncode == 0
    qe("run", env=env)
    out = qe("sql", "SELECT field, reason FROM rejected_events", "--format", "csv", env=env)
    assert "expected a JSON object" in out.stdout


def test_user_errors_have_exit_codes_and_no_traceback(tmp_path: Path) -> None:
    env = {"QE_DATA_DIR": str(tmp_path / "data")}
    missing_db = qe("sql", "SELECT 1", env=env, check=False)
    assert missing_db.returncode == 2 and "qe run" in missing_db.stderr

    qe("run", env=env)
    bad_sql = qe("sql", "SELEC nonsense", env=env, check=False)
    assert bad_sql.returncode == 1
    assert "Traceback" not in bad_sql.stderr and "syntax error" in bad_sql.stderr

    write = qe("sql", "DELETE FROM raw_events", env=env, check=False)
    assert write.returncode == 1 and "read-only" in write.stderr.lower()

    bad_config = qe("status", env={**env, "QE_CAPTURE_THRESHOLD": "high"}, check=False)
    assert bad_config.returncode == 2
    assert "QE_CAPTURE_THRESHOLD must be a number" in bad_config.stderr

    no_file = qe("enqueue", str(tmp_path / "nope.jsonl"), env=env, check=False)
    assert no_file.returncode == 2 and "no such file" in no_file.stderr


def test_help_lists_every_command() -> None:
    out = qe("--help", env={})
    for command in ("enqueue", "run", "sql", "status", "ui"):
        assert command in out.stdout


def test_run_shows_progress_on_stderr_and_quiet_only_the_summary(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(batch("p", 30)) + "\n")
    batches = {"QE_INGEST_BATCH_SIZE": "10", "QE_EXPORT_BATCH_SIZE": "10"}
    loud_env = {
        "QE_DATA_DIR": str(tmp_path / "loud"),
        "QE_SPOT_CHECK_SHARE": "0",
        "QE_EVAL_SHARE": "0",  # every sample in the files: the batches below are exact
        **batches,
    }
    qe("enqueue", str(events), env=loud_env)
    loud = qe("run", "--cut-version", env=loud_env)
    # Every stage reports its batches while it works, the export included.
    assert "annotated 10 events (30 so far)" in loud.stderr
    assert "v001: 10 samples written" in loud.stderr
    assert "v001: 30 samples written" in loud.stderr
    assert "tuning_dataset: " in loud.stdout and "version=v001" in loud.stdout

    quiet_env = {"QE_DATA_DIR": str(tmp_path / "quiet")}
    qe("enqueue", str(events), env=quiet_env)
    quiet = qe("run", "--cut-version", "--quiet", env=quiet_env)
    assert "samples written" not in quiet.stderr and "annotated" not in quiet.stderr
    assert "version=v001" in quiet.stdout


def assert_refused(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    """Refused as a query error: exit 1, one `qe:` line naming why, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("qe: ") and fragment in lines[0], lines
    assert "Traceback" not in result.stdout


def test_sql_reads_our_tables_and_nothing_else(tmp_path: Path) -> None:
    env = {"QE_DATA_DIR": str(tmp_path / "data")}
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(line(make_event(f"r{i}")) for i in range(3)) + b"\n")
    qe("enqueue", str(events), env=env)
    qe("run", env=env)
    victim = tmp_path / "victim.jsonl"
    victim.write_text("a dataset line\n")
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t")
    other = tmp_path / "other.duckdb"
    with connect(other) as conn:
        conn.execute("CREATE TABLE precious AS SELECT 42 AS answer")

    copy = qe("sql", f"COPY raw_events TO '{victim}'", env=env, check=False)
    assert_refused(copy, "not COPY; COPY … TO / EXPORT DATABASE need --allow-files")
    export = qe("sql", f"EXPORT DATABASE '{tmp_path / 'export'}'", env=env, check=False)
    assert_refused(export, "not EXPORT")
    attach = qe("sql", f"ATTACH '{other}' AS o (READ_WRITE)", env=env, check=False)
    assert_refused(attach, "read-only: one SELECT (or EXPLAIN), not ATTACH")
    several = f"ATTACH '{other}' AS o (READ_WRITE); DELETE FROM o.precious; SELECT 1"
    assert_refused(qe("sql", several, env=env, check=False), "exactly one statement, not 3")
    assert_refused(qe("sql", "SELECT 1; SELECT 2", env=env, check=False), "not 2")
    unlock = qe("sql", "SET enable_external_access = true", env=env, check=False)
    assert_refused(unlock, "not SET")
    # A plain SELECT may name files too (table functions, 'file' as a table): DuckDB refuses.
    for query in (
        f"SELECT * FROM read_text('{secret}')",
        f"SELECT * FROM '{other}'",
        "SELECT * FROM read_text('/etc/shadow')",
    ):
        refused = qe("sql", query, env=env, check=False)
        assert_refused(refused, "file system operations are disabled")
        assert "s3cr3t" not in refused.stdout + refused.stderr
    assert victim.read_text() == "a dataset line\n"
    assert not (tmp_path / "export").exists()
    with connect(other, read_only=True) as conn:
        assert conn.execute("SELECT answer FROM precious").fetchall() == [(42,)]

    # The explicit way out, for people who want files.
    target = tmp_path / "ids.csv"
    allowed = qe(
        "sql",
        f"COPY (SELECT request_id FROM raw_events ORDER BY 1) TO '{target}'",
        "--allow-files",
        env=env,
    )
    assert "COPY done" in allowed.stdout
    assert target.read_text().split() == ["request_id", "r0", "r1", "r2"]
    assert (
        "s3cr3t"
        in qe(
            "sql",
            f"SELECT * FROM read_text('{secret}')",
            "--allow-files",
            "--format",
            "json",
            env=env,
        ).stdout
    )
    still = qe("sql", f"ATTACH '{other}' AS o (READ_WRITE)", "--allow-files", env=env, check=False)
    assert_refused(still, "not ATTACH")


def test_sql_writes_nested_columns_as_json_in_csv_and_tables(tmp_path: Path) -> None:
    env = {"QE_DATA_DIR": str(tmp_path / "data")}
    events = tmp_path / "events.jsonl"
    events.write_bytes(line(make_event("r0", question='Comma, "quote"?')) + b"\n")
    qe("enqueue", str(events), env=env)
    qe("run", env=env)
    query = "SELECT request_id, docs, labels, interval 1 day AS waited FROM raw_events"
    docs = [
        {"id": d["id"], "content": d["content"], "score": d["score"], "meta": None}
        for d in make_event()["docs"]
    ]

    as_csv = qe("sql", query, "--format", "csv", env=env)
    (row,) = csv.DictReader(io.StringIO(as_csv.stdout))
    assert json.loads(row["docs"]) == docs and json.loads(row["labels"]) == ["factuality_error"]
    assert row["waited"] == "1 day"
    (record,) = map(json.loads, qe("sql", query, "--format", "json", env=env).stdout.splitlines())
    assert record["docs"] == docs and record["labels"] == ["factuality_error"]
    table = qe("sql", query, env=env).stdout
    assert '"content":"Refunds are accepted within 30 days."' in table
    assert_refused(qe("sql", "SELECT 1 AS x, 2 AS x", env=env, check=False), "'x' appears twice")
