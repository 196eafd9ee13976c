"""A run of LLM completions killed with SIGKILL mid-way resumes where it stopped: every sample ends
up with exactly one completion, and nothing already committed is asked for again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from qe_assets.ingest.queues import FileInbox
from qe_assets.settings import Settings
from qe_assets.store import connect
from qe_assets_tests.factories import line, make_event
from qe_assets_tests.openai_server import OpenAIServer, prompt_hash
from qe_assets_tests.runs import materialize, metadata

SAMPLES = 60
ROOT = Path(__file__).resolve().parents[1]
# The same entry point a user's run takes, in a child process we can kill.
CHILD = """
import sys
import dagster as dg
from qe_assets.settings import Settings
from qe_assets_tests.runs import materialize
settings = Settings.model_validate_json(sys.argv[1])
materialize(settings, selection=dg.AssetSelection.assets("completions"))
"""


def committed(settings: Settings) -> dict[str, tuple[str, str]]:
    """sample_id → (status, prompt) of the completions in the database."""
    with connect(settings.database, read_only=True) as conn:
        found = conn.execute(
            "SELECT c.sample_id, c.status, s.prompt FROM completions c "
            "JOIN annotated_samples s USING (sample_id)"
        ).fetchall()
    return {sample_id: (status, prompt) for sample_id, status, prompt in found}


def test_a_killed_run_resumes_with_every_sample_exactly_once(
    settings: Settings, openai_server: OpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-resume")
    settings = settings.model_copy(
        update={
            "llm_model": "test-model",
            "openai_base_url": openai_server.base_url,
            "llm_concurrency": 2,
            "llm_batch_size": 5,
            "llm_timeout_seconds": 5.0,
        }
    )
    FileInbox(settings.inbox_dir).put(
        [
            line(
                make_event(
                    f"r{i}",
                    question=f"Resume question {i}?",
                    evaluation={"score": 0.5, "labels": ["incomplete_answer"]},
                )
            ).decode()
            for i in range(SAMPLES)
        ]
    )
    materialize(settings, selection=dg.AssetSelection.assets("raw_events", "annotated_samples"))
    openai_server.latency = 0.1  # 2 slots → about 20 calls/s: slow enough to stop half-way

    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, settings.model_dump_json()],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Poll the server, not DuckDB: the child holds the database file while it writes.
        deadline = time.monotonic() + 60
        while openai_server.chat_count < 25:
            assert child.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL

    before = committed(settings)
    assert 0 < len(before) < SAMPLES, len(before)
    assert {status for status, _ in before.values()} == {"ok"}
    asked_before = openai_server.prompt_counts()

    result = materialize(settings, selection=dg.AssetSelection.assets("completions"))
    assert metadata(result, "completions")["new_completions"] == SAMPLES - len(before)
    after = committed(settings)
    with connect(settings.database, read_only=True) as conn:
        ((rows, distinct, train),) = conn.execute(
            "SELECT (SELECT count(*) FROM completions), "
            "(SELECT count(DISTINCT sample_id) FROM completions), "
            "(SELECT count(*) FROM annotated_samples WHERE route = 'train')"
        ).fetchall()
    assert rows == distinct == train == SAMPLES
    assert {status for status, _ in after.values()} == {"ok"}

    asked = openai_server.prompt_counts()
    for sample_id, (_, prompt) in after.items():
        key = prompt_hash(prompt)
        asked_again = asked[key] - asked_before[key]
        if sample_id in before:
            assert asked[key] == 1 and asked_again == 0, sample_id  # never paid twice
        else:
            assert asked_again == 1, sample_id
