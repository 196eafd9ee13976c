"""`qe purge --older-than AGE`: the stored text of exported samples, their events and completions
is redacted in place, under the writer lock; keys and samples never exported are kept."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

from qe_assets.ingest.queues import FileInbox
from qe_assets.release.purge import _redact_lists
from qe_assets.settings import Settings
from qe_assets.store import connect, writer_lock
from qe_assets_tests.factories import line, make_event
from qe_assets_tests.runs import materialize
from qe_assets_tests.test_cli import qe
from qe_assets_tests.test_pii import LEAKS, OUTSIDE, _pii_events

# Every stored text column a purge must clean, as one string per row.
_TEXTS = {
    "annotated_samples": "SELECT sample_id, concat_ws('|', label, labels::VARCHAR, question, "
    "original_answer, context_docs::VARCHAR, prompt) FROM annotated_samples",
    "raw_events": "SELECT request_id || '#', concat_ws('|', question, answer, docs::VARCHAR, "
    "labels::VARCHAR, evaluation::VARCHAR, checks::VARCHAR, extra::VARCHAR) FROM raw_events",
    "completions": "SELECT sample_id, concat_ws('|', completion, judge_verdict) FROM completions",
}
# Under review (confidence 0.15 < 0.6): never exported, so never purged.
UNDER_REVIEW = make_event(
    "held", question="Mail me at dora@example.com", evaluation={"score": 0.1, "labels": []}
)


def _leaks(settings: Settings) -> dict[str, list[str]]:
    """Per table, the keys of rows whose text still holds a raw PII value."""
    found: dict[str, list[str]] = {}
    with connect(settings.database, read_only=True) as conn:
        for table, query in _TEXTS.items():
            rows = conn.execute(query).fetchall()
            found[table] = sorted(k for k, text in rows if any(v in text for v in LEAKS))
    return found


def test_purge_redacts_exported_text_under_the_writer_lock(tmp_path: Path) -> None:
    settings = Settings(data_dir=str(tmp_path / "data"), spot_check_share=0.0)
    events = [*_pii_events(), UNDER_REVIEW]
    FileInbox(settings.inbox_dir).put([line(e).decode() for e in events])
    assert materialize(settings).success
    with connect(settings.database) as conn:
        # Cache entries (regenerated answers and a verdict judging one), old and new.
        conn.execute(
            "INSERT INTO llm_cache VALUES "
            "('old-pii', 'regenerate', NULL, 'm', 'Reach me at eve@example.com', 'stop', 1, 1,"
            " now()::TIMESTAMP - INTERVAL 40 DAY),"
            "('old-verdict', 'judge', 'old-pii', 'm', '{\"winner\": \"1\"}', 'stop', 1, 1,"
            " now()::TIMESTAMP - INTERVAL 40 DAY),"
            "('old-clean', 'regenerate', NULL, 'm', 'No details here.', 'stop', 1, 1,"
            " now()::TIMESTAMP - INTERVAL 40 DAY),"
            "('new-pii', 'regenerate', NULL, 'm', 'eve@example.com', 'stop', 1, 1,"
            " now()::TIMESTAMP)"
        )
    before = _leaks(settings)
    assert len(before["annotated_samples"]) == 12 and len(before["raw_events"]) == 12
    env = {"QE_DATA_DIR": settings.data_dir}

    # Younger than the cut-off: nothing changes but the old cache entry holding PII (and the
    # verdict that judged it).
    assert qe("purge", "--older-than", "30d", env=env).stdout.strip() == (
        "redacted 0 raw events, 0 samples and 0 completions already in a dataset version and "
        "older than 30d; deleted 1 LLM cache entries holding PII"
    )
    assert _leaks(settings) == before
    with connect(settings.database, read_only=True) as conn:
        cached = conn.execute("SELECT cache_key FROM llm_cache ORDER BY 1").fetchall()
    assert cached == [("new-pii",), ("old-clean",)]

    # A purge waits for the stage holding the writer lock, then runs.
    with writer_lock(settings.database):
        purge = subprocess.Popen(
            [sys.executable, "-m", "qe_assets.cli", "purge", "--older-than", "0d"],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2.0)
        assert purge.poll() is None, purge.communicate()
    out, err = purge.communicate(timeout=120)
    assert purge.returncode == 0, err
    assert "redacted 12 raw events, 12 samples and" in out

    assert _leaks(settings) == {"annotated_samples": [], "raw_events": [], "completions": []}
    with connect(settings.database, read_only=True) as conn:
        held = conn.execute("SELECT question FROM raw_events WHERE request_id = 'held'").fetchall()
        ids = {r[0] for r in conn.execute("SELECT request_id FROM annotated_samples").fetchall()}
        labels = {r[0] for r in conn.execute("SELECT label FROM annotated_samples").fetchall()}
    assert held == [("Mail me at dora@example.com",)]  # not in a version: kept as received
    assert set(OUTSIDE["request_id"]) <= ids  # keys are kept
    assert "complaint from [EMAIL] [PHONE]" in labels

    # Idempotent: a second purge finds nothing left to change.
    again = qe("purge", "--older-than", "0d", env=env).stdout
    assert again.startswith("redacted 0 raw events, 0 samples and 0 completions")


def test_purge_age_is_checked(tmp_path: Path) -> None:
    result = qe("purge", "--older-than", "a month", env={"QE_DATA_DIR": str(tmp_path)}, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "qe: --older-than 'a month': give a number of days, hours or minutes: 30d"
    ]
    missing = qe("purge", "--older-than", "30d", env={"QE_DATA_DIR": str(tmp_path)}, check=False)
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        f"qe: no database at {tmp_path}/qe.duckdb yet (QE_DATA_DIR={tmp_path}): nothing to "
        "purge, or set QE_DATA_DIR to the directory that holds qe.duckdb"
    )


def test_lists_keep_their_shape_and_documents_lose_their_meta() -> None:
    docs = pl.Struct(
        {"id": pl.String, "content": pl.String, "score": pl.Float64, "meta": pl.String}
    )
    frame = pl.DataFrame(
        {
            "labels": [[], ["from a@b.com", "x"]],
            "docs": [[], [{"id": "1", "content": "mail a@b.com", "score": None, "meta": "{}"}]],
        },
        schema={"labels": pl.List(pl.String), "docs": pl.List(docs)},
    )
    out = _redact_lists(_redact_lists(frame, "labels", None), "docs", "content")
    assert out.schema == frame.schema
    assert out.to_dicts() == [
        {"labels": [], "docs": []},
        {
            "labels": ["from [EMAIL]", "x"],
            "docs": [{"id": "1", "content": "mail [EMAIL]", "score": None, "meta": None}],
        },
    ]
