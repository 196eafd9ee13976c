"""`qe` from any directory: messages name the absolute database path and QE_DATA_DIR, and a
command that only reads (or decides on existing data) never creates a store where there is none.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qe_assets.testing.factories import line, make_event

READ_COMMANDS = [
    ["sql", "SELECT 1"],
    ["review", "list"],
    ["review", "accept", "r-1#factuality_error"],
    ["models", "list"],
    ["purge", "--older-than", "30d"],
]


def qe(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("QE_")}
    return subprocess.run(
        [sys.executable, "-m", "qe_assets.cli", *args],
        cwd=cwd,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.parametrize("command", READ_COMMANDS, ids=" ".join)
def test_a_read_command_in_a_directory_without_a_store_says_where_and_creates_nothing(
    command: list[str], tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = qe(*command, cwd=elsewhere, env={})
    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stderr.strip()
    assert message.count("\n") == 0, message  # one line, no traceback
    assert f"no database at {elsewhere}/data/qe.duckdb yet" in message
    assert "QE_DATA_DIR is not set" in message and "set QE_DATA_DIR" in message
    assert list(elsewhere.iterdir()) == []


def test_status_without_a_store_reports_it_and_the_queue_and_creates_nothing(
    tmp_path: Path,
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = qe("status", cwd=elsewhere, env={})
    assert result.returncode == 0, result.stderr
    assert f"database: none yet at {elsewhere}/data/qe.duckdb" in result.stdout
    assert "QE_DATA_DIR is not set" in result.stdout and "set QE_DATA_DIR" in result.stdout
    assert "queue (inbox): 0 pending" in result.stdout
    assert list(elsewhere.iterdir()) == []


def test_the_same_store_serves_commands_from_any_directory(tmp_path: Path) -> None:
    data = tmp_path / "store"
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(line(make_event(f"r{i}")) for i in range(3)) + b"\n")
    env = {"QE_DATA_DIR": str(data)}
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    enqueued = qe("enqueue", str(events), cwd=first, env=env)
    assert enqueued.returncode == 0, enqueued.stderr
    assert f"({data}/inbox)" in enqueued.stdout
    assert qe("run", "--quiet", cwd=first, env=env).returncode == 0
    status = qe("status", cwd=second, env=env)
    assert status.returncode == 0, status.stderr
    assert f"database: {data}/qe.duckdb (QE_DATA_DIR={data})" in status.stdout
    assert "raw_events" in status.stdout
    assert list(first.iterdir()) == [] and list(second.iterdir()) == []
