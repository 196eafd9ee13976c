"""The human review loop and its effect on the next dataset version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qe_assets.ingest.queues import FileInbox
from qe_assets.review import decisions as review
from qe_assets.settings import Settings
from qe_assets.store import connect
from qe_assets_tests.runs import materialize, metadata, scalar
from qe_assets_tests.test_cli_operations import qe as run_qe
from qe_assets_tests.test_pipeline import batch


@pytest.fixture
def reviewed_store(settings: Settings) -> Settings:
    """12 train samples and 4 low-confidence ones, spot check off, v001 cut."""
    settings = settings.model_copy(update={"spot_check_share": 0.0})
    FileInbox(settings.inbox_dir).put(batch("t", 12) + batch("low", 4, score=0.2))
    result = materialize(settings)
    assert metadata(result, "tuning_dataset")["samples"] == 12
    assert metadata(result, "annotated_samples")["review_queue_size"] == 4
    return settings


def version_rows(settings: Settings, version: str) -> dict[str, dict]:
    path = settings.datasets_dir / f"rag_quality_tuning_{version}.jsonl"
    return {r["sample_id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_accept_edit_reject_shape_the_next_version(reviewed_store: Settings) -> None:
    settings = reviewed_store
    ids = [
        f"low-{i}#{label}"
        for i, label in enumerate(
            ["factuality_error", "incomplete_answer", "low_relevance", "overconfidence"]
        )
    ]
    with connect(settings.database) as conn:
        pending = review.list_queue(conn)["sample_id"].to_list()
        assert sorted(pending) == sorted(ids)
        review.accept(conn, ids[0], "ann", note="fine as is")
        review.edit(conn, ids[1], "A careful answer written by a person.", "bo")
        review.reject(conn, ids[2], "ann", note="off topic")
        with pytest.raises(review.ReviewError, match="no sample"):
            review.accept(conn, "missing#x", "ann")
        with pytest.raises(review.ReviewError, match="empty"):
            review.edit(conn, ids[3], "   ", "bo")
    # Review samples are held back until a human acts; the version takes exactly those kept.
    settings = settings.model_copy(update={"min_dataset_examples": 1})
    result = materialize(settings)
    assert metadata(result, "tuning_dataset")["version"] == "v002"
    rows = version_rows(settings, "v002")
    assert set(rows) == {ids[0], ids[1]}
    assert rows[ids[1]]["completion"] == "A careful answer written by a person."
    assert rows[ids[0]]["completion"].endswith("Answer 0.")  # the naive completion
    annotated = metadata(result, "annotated_samples")
    assert annotated["review_queue_size"] == 1
    with connect(settings.database, read_only=True) as conn:
        modes = dict(
            conn.execute(
                "SELECT sample_id, mode FROM completions WHERE sample_id IN (?, ?, ?)", ids[:3]
            ).fetchall()
        )
        statuses = dict(conn.execute("SELECT sample_id, status FROM review_queue").fetchall())
        reviewers = dict(
            conn.execute(
                "SELECT sample_id, reviewer FROM review_queue WHERE reviewed_at IS NOT NULL"
            ).fetchall()
        )
        kept = review.acceptance_by_label(conn)
    assert modes[ids[1]] == "human"
    assert scalar(settings, "SELECT status FROM completions WHERE sample_id = ?", [ids[2]]) == (
        "rejected"
    )
    assert statuses == {ids[0]: "accepted", ids[1]: "edited", ids[2]: "rejected", ids[3]: "pending"}
    assert reviewers == {ids[0]: "ann", ids[1]: "bo", ids[2]: "ann"}
    assert kept["low_relevance"] == {"reviewed": 1, "kept_share": 0.0}
    assert kept["factuality_error"]["kept_share"] == 1.0
    # Rejected never reaches any version, even after more runs.
    materialize(settings)
    assert (
        scalar(settings, "SELECT count(*) FROM dataset_samples WHERE sample_id = ?", [ids[2]]) == 0
    )


def test_spot_checked_train_samples_wait_for_review(settings: Settings) -> None:
    settings = settings.model_copy(update={"spot_check_share": 1.0, "min_dataset_examples": 1})
    FileInbox(settings.inbox_dir).put(batch("s", 6))
    result = materialize(settings)
    assert metadata(result, "tuning_dataset") == {}  # everything is waiting for a reviewer
    assert scalar(settings, "SELECT count(*) FROM review_queue WHERE reason = 'spot_check'") == 6
    with connect(settings.database) as conn:
        review.accept(conn, "s-0#factuality_error", "ann")
        review.reject(conn, "s-1#incomplete_answer", "ann")
    result = materialize(settings)
    assert set(version_rows(settings, "v001")) == {"s-0#factuality_error"}


def test_review_cli_round_trip(reviewed_store: Settings, tmp_path: Path) -> None:
    env = {"QE_DATA_DIR": reviewed_store.data_dir, "QE_REVIEWER": "cli-user"}

    def qe(*args: str) -> subprocess.CompletedProcess[str]:
        return run_qe("review", *args, env=env, code=None)

    listed = qe("list", "--limit", "10")
    assert listed.returncode == 0 and "low-0#factuality_error" in listed.stdout
    shown = qe("show", "low-1#incomplete_answer")
    assert "--- prompt ---" in shown.stdout and "--- original answer ---" in shown.stdout
    assert qe("accept", "low-0#factuality_error").returncode == 0
    assert qe("edit", "low-1#incomplete_answer", "--completion", "Better.").returncode == 0
    editor = tmp_path / "editor.sh"
    editor.write_text("#!/bin/sh\nprintf 'Edited in an editor.' > \"$1\"\n")
    editor.chmod(0o755)
    env["EDITOR"] = str(editor)
    assert qe("edit", "low-3#overconfidence").returncode == 0
    rejected = qe("reject", "low-2#low_relevance", "--note", "wrong")
    assert rejected.returncode == 0 and "rejected 1 sample(s) as cli-user" in rejected.stdout
    unknown = qe("accept", "nope")
    assert unknown.returncode == 1 and "no sample 'nope'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    assert (
        scalar(
            reviewed_store,
            "SELECT completion FROM completions WHERE sample_id = 'low-3#overconfidence'",
        )
        == "Edited in an editor."
    )
    assert (
        scalar(reviewed_store, "SELECT count(*) FROM review_queue WHERE reviewer = 'cli-user'") == 4
    )


def qe_cli(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qe_assets.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# Stands for a person: writes a marker when the editor opens, then waits (bounded) until the test
# lets it save.
SLOW_EDITOR = """#!/bin/sh
touch "$QE_TEST_DIR/editor-open"
i=0
while [ ! -e "$QE_TEST_DIR/editor-close" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
printf 'Written while the pipeline kept going.' > "$1"
"""


def test_an_open_editor_holds_no_connection(reviewed_store: Settings, tmp_path: Path) -> None:
    """`qe review edit` reads, closes, and only then opens $EDITOR: readers, a run and other
    reviewers go on meanwhile; the edit is then refused, since the sample changed under it."""
    editor = tmp_path / "editor.sh"
    editor.write_text(SLOW_EDITOR)
    editor.chmod(0o755)
    env = {
        **os.environ,
        "QE_DATA_DIR": reviewed_store.data_dir,
        "QE_REVIEWER": "slow",
        "EDITOR": str(editor),
        "QE_TEST_DIR": str(tmp_path),
    }
    edit = subprocess.Popen(
        [sys.executable, "-m", "qe_assets.cli", "review", "edit", "low-3#overconfidence"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "editor-open").exists():
            assert edit.poll() is None and time.monotonic() < deadline, edit.communicate()
            time.sleep(0.05)
        started = time.monotonic()
        query = qe_cli(env, "sql", "SELECT count(*) FROM review_queue", "--wait", "5")
        assert query.returncode == 0, query.stderr
        result = materialize(reviewed_store)  # a writer: every stage opens write connections
        assert result.success
        other = qe_cli(
            env | {"QE_REVIEWER": "quick"},
            "review",
            "--wait",
            "5",
            "accept",
            "low-3#overconfidence",
        )
        assert other.returncode == 0, other.stderr
        assert time.monotonic() - started < 60
        (tmp_path / "editor-close").touch()
        stdout, stderr = edit.communicate(timeout=60)
    finally:
        if edit.poll() is None:
            edit.kill()
    assert edit.returncode == 1, (stdout, stderr)
    message = one_line(subprocess.CompletedProcess([], 1, stdout, stderr))
    assert "changed while you were editing (now accepted by quick)" in message
    kept = Path(message.rsplit("kept in ", 1)[1])
    assert kept.read_text() == "Written while the pipeline kept going."
    kept.unlink()
    assert (
        scalar(
            reviewed_store,
            "SELECT reviewer FROM review_queue WHERE sample_id = 'low-3#overconfidence'",
        )
        == "quick"
    )


def test_accepting_a_known_and_an_unknown_id_changes_nothing(reviewed_store: Settings) -> None:
    env = {**os.environ, "QE_DATA_DIR": reviewed_store.data_dir}
    result = qe_cli(env, "review", "accept", "low-0#factuality_error", "bogus-id")
    assert result.returncode == 1
    assert one_line(result) == "qe: no sample 'bogus-id'; nothing changed"
    assert (
        scalar(reviewed_store, "SELECT count(*) FROM review_queue WHERE status <> 'pending'") == 0
    )
    both = qe_cli(env, "review", "reject", "low-0#factuality_error", "low-1#incomplete_answer")
    assert both.returncode == 0 and "rejected 2 sample(s)" in both.stdout


def test_a_sample_already_in_a_version_is_refused(reviewed_store: Settings) -> None:
    """A sample goes into one version, and a version is never rewritten: a later decision on it
    could change no dataset, so it is refused instead of recorded and reported as done."""
    settings = reviewed_store.model_copy(update={"min_dataset_examples": 1})
    with connect(settings.database) as conn:
        review.accept(conn, "low-0#factuality_error", "ann")
    assert metadata(materialize(settings), "tuning_dataset")["version"] == "v002"
    env = {**os.environ, "QE_DATA_DIR": settings.data_dir}
    for args in (
        ("edit", "low-0#factuality_error", "--completion", "Too late."),
        ("reject", "low-0#factuality_error"),
        ("accept", "low-0#factuality_error"),
    ):
        result = qe_cli(env, "review", *args)
        assert result.returncode == 1, result
        assert one_line(result) == (
            "qe: sample 'low-0#factuality_error' is already in v002, which is never rewritten "
            "(a sample goes into one version only)"
        )
    assert (
        scalar(
            settings, "SELECT status FROM review_queue WHERE sample_id = 'low-0#factuality_error'"
        )
        == "accepted"
    )
    shown = qe_cli(env, "review", "show", "low-0#factuality_error")
    assert "in v002" in shown.stdout.splitlines()[0]
