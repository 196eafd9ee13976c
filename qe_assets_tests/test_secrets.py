"""The API key never leaves the environment: the whole graph, as users run it, then a grep.

`qe run --cut-version` runs in a subprocess with a recognisable fake key and every stage that uses
it switched on: LLM regeneration, the judge and the `openai` fine-tune backend, all against the
local OpenAI-compatible server. Afterwards the key is searched for in stdout and stderr, in the
Dagster instance (run storage, event log with all metadata, compute logs: everything under
DAGSTER_HOME), in the DuckDB file and in every other file under the data directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from qe_assets.ingest.queues import FileInbox
from qe_assets.ops.demo import generate_events
from qe_assets.store import connect
from qe_assets_tests.openai_server import ChatRequest, OpenAIServer, Reply

KEY = "sk-qe-LEAKCHECK-0123456789abcdef"
JUDGE_MARKER = "<<<BEGIN ANSWER B>>>"


def judge_prefers_the_rewrite(request: ChatRequest) -> Reply | None:
    if JUDGE_MARKER in request.prompt:
        return Reply.ok(json.dumps({"score_a": 3, "score_b": 8, "reason": "grounded"}))
    return None  # the server's default regenerated answer


def test_the_key_appears_nowhere_after_a_whole_run(
    tmp_path: Path, openai_server: OpenAIServer
) -> None:
    data = tmp_path / "data"
    FileInbox(data / "inbox").put(generate_events(60, seed=11, bad_share=0.05))
    openai_server.responder = judge_prefers_the_rewrite
    env = {
        **os.environ,
        "QE_DATA_DIR": str(data),
        "DAGSTER_HOME": str(data / "dagster_home"),
        "OPENAI_API_KEY": KEY,
        "OPENAI_BASE_URL": openai_server.base_url,
        "QE_LLM_MODEL": "test-model",
        "QE_LLM_JUDGE": "true",
        "QE_LLM_MAX_RETRIES": "1",
        "QE_FINETUNE_BACKEND": "openai",
        "QE_FINETUNE_POLL_SECONDS": "0.01",
        "QE_FINETUNE_DEADLINE_SECONDS": "20",
    }
    run = subprocess.run(
        [sys.executable, "-m", "qe_assets.cli", "run", "--cut-version"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    # With no held-out set the gate has too few pairs to decide: a warning, the run succeeds.
    assert run.returncode == 0, run.stderr[-3000:]

    # Every stage that holds the key really ran and really sent it.
    assert openai_server.requests, "the LLM server saw no request"
    assert all(r.headers.get("authorization") == f"Bearer {KEY}" for r in openai_server.requests)
    paths = {r.path for r in openai_server.requests}
    assert any(p.endswith("/chat/completions") for p in paths)
    assert any(p.endswith("/files") for p in paths) and any("fine_tuning/jobs" in p for p in paths)
    with connect(data / "qe.duckdb", read_only=True) as conn:
        modes = dict(conn.execute("SELECT mode, count(*) FROM completions GROUP BY 1").fetchall())
        judged = conn.execute(
            "SELECT count(*) FROM completions WHERE judge_verdict IS NOT NULL"
        ).fetchone()
        (status,) = conn.execute("SELECT status FROM fine_tune_runs").fetchone()  # type: ignore[misc]
    assert modes.get("llm", 0) > 0 and judged and judged[0] > 0
    assert status == "succeeded"

    needle = KEY.encode()
    # The secret part alone too, in case something masks the prefix.
    fragment = KEY.removeprefix("sk-qe-").encode()
    assert needle not in run.stdout.encode() and needle not in run.stderr.encode()
    assert fragment not in run.stdout.encode() and fragment not in run.stderr.encode()
    files = [p for p in data.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    # Real content was searched: the database, the instance's storage and the dataset files.
    assert "qe.duckdb" in names and any(n.endswith(".chat.jsonl") for n in names)
    assert any(p.suffix == ".db" for p in (data / "dagster_home").rglob("*"))
    leaks = [str(p) for p in files if needle in p.read_bytes() or fragment in p.read_bytes()]
    assert leaks == []
