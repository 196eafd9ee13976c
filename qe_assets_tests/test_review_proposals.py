"""LLM-proposed completions for review samples: real Dagster runs, a real DuckDB file, the real
openai client against the local OpenAI-compatible server, and the real export path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import polars as pl
import pytest

from qe_assets.ingest.queues import FileInbox
from qe_assets.lib.completions import mark_proposed
from qe_assets.review import decisions as review
from qe_assets.settings import Settings
from qe_assets.store import connect
from qe_assets_tests.openai_server import ChatRequest, OpenAIServer, Reply
from qe_assets_tests.runs import materialize, metadata
from qe_assets_tests.test_llm import JUDGE_MARKER, KEY, llm
from qe_assets_tests.test_pipeline import batch

LOW = ["low-0#factuality_error", "low-1#incomplete_answer", "low-2#low_relevance"]
TRAIN = ["t-0#factuality_error", "t-1#incomplete_answer"]


def judge(garbage_for: str | None) -> object:
    def respond(request: ChatRequest) -> Reply | None:
        if JUDGE_MARKER not in request.prompt:
            return None
        if garbage_for is not None and garbage_for in request.prompt:
            return Reply.ok("B is better.")
        return Reply.ok('{"score_a": 4, "score_b": 6, "reason": "closer to the documents"}')

    return respond


def completions(settings: Settings) -> dict[str, dict]:
    with connect(settings.database, read_only=True) as conn:
        cursor = conn.execute("SELECT * FROM completions")
        names = [d[0] for d in cursor.description]
        return {r[0]: dict(zip(names, r, strict=True)) for r in cursor.fetchall()}


def exported(settings: Settings) -> dict[str, dict]:
    """Every sample in every version's JSONL file, as the export wrote it."""
    found = {}
    for path in sorted(settings.datasets_dir.glob("rag_quality_tuning_v*[0-9].jsonl")):
        for row in map(json.loads, path.read_text().splitlines()):
            found[row["sample_id"]] = row
    return found


def test_review_samples_get_a_proposal_exported_only_once_accepted(
    settings: Settings, openai_server: OpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    settings = llm(
        settings, openai_server, llm_judge=True, min_dataset_examples=1, spot_check_share=0.0
    )
    FileInbox(settings.inbox_dir).put(batch("t", 2) + batch("low", 3, score=0.2))
    openai_server.responder = judge(garbage_for="Question low number 2?")
    result = materialize(settings)  # the whole graph, a version cut
    meta = metadata(result, "completions")
    assert meta["proposed_for_review"] == 2 and meta["llm/failed"] == 1
    stored = completions(settings)
    for sample_id in LOW[:2]:
        row = stored[sample_id]
        assert (row["mode"], row["status"]) == ("llm", "proposed"), row
        assert row["completion"] and row["judge_completion_score"] == 6.0
    # The judge's reply was unreadable: failed, to be retried (and proposed again) next run.
    assert (stored[LOW[2]]["status"], stored[LOW[2]]["error"]) == (
        "failed",
        "judge:MalformedVerdict",
    )
    assert set(exported(settings)) == set(TRAIN)  # no proposal in v001

    env = {**os.environ, "QE_DATA_DIR": settings.data_dir}
    shown = subprocess.run(
        [sys.executable, "-m", "qe_assets.cli", "review", "show", LOW[0]],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "--- proposed completion (llm, proposed) ---" in shown.stdout
    assert stored[LOW[0]]["completion"] in shown.stdout
    assert "judge test-model: original 4, completion 6" in shown.stdout

    with connect(settings.database) as conn:
        review.accept(conn, LOW[0], "ann", note="the proposal is right")
    openai_server.responder = judge(garbage_for=None)
    result = materialize(settings)
    assert metadata(result, "tuning_dataset")["version"] == "v002"
    stored = completions(settings)
    assert stored[LOW[2]]["status"] == "proposed"  # the retry proposes, never makes it ok
    assert stored[LOW[0]]["status"] == "ok" and stored[LOW[0]]["mode"] == "llm"
    rows = exported(settings)
    assert set(rows) == {*TRAIN, LOW[0]}
    assert rows[LOW[0]]["completion"] == stored[LOW[0]]["completion"]
    # Still pending proposals stay out of every version, whatever runs come.
    materialize(settings)
    assert not {LOW[1], LOW[2]} & set(exported(settings))


def test_proposals_can_be_switched_off(
    settings: Settings, openai_server: OpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    settings = llm(settings, openai_server, llm_propose_review=False)
    FileInbox(settings.inbox_dir).put(batch("t", 2) + batch("low", 2, score=0.2))
    materialize(settings, ["raw_events", "annotated_samples", "completions"])
    assert set(completions(settings)) == set(TRAIN)


def test_mark_proposed_keeps_failures_and_other_samples() -> None:
    rows = pl.DataFrame(
        {
            "sample_id": ["r1", "r2", "r3", "t1"],
            "status": ["ok", "rejected_by_judge", "failed", "ok"],
        }
    )
    marked = mark_proposed(rows, pl.Series(["r1", "r2", "r3"]))
    assert marked["status"].to_list() == ["proposed", "proposed", "failed", "ok"]
