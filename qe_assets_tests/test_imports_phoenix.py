"""`qe import phoenix` against a real Phoenix server (issue #31).

Phoenix runs from `.venv-phoenix` (`make phoenix`; `make test` sets QE_TEST_PHOENIX to its
`phoenix`), once per session, on 127.0.0.1. Traces go in through the OpenTelemetry SDK of that
venv (a CHAIN root, a RETRIEVER span with documents, an LLM span, Chinese text), judgements
through `POST /v1/span_annotations`; then the importer, then `qe run` or the real `raw_events`
materialization, and assertions on `raw_events` and `rejected_events`. Each test has its own
Phoenix project and data directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from qe_assets.imports.phoenix import import_phoenix
from qe_assets.imports.state import state_path
from qe_assets.lib.resources import PipelineSettings
from qe_assets.ops.sensors import build_import_sensor
from qe_assets.settings import Settings
from qe_assets.testing.phoenix_server import PHOENIX_VARIABLE, PhoenixServer, phoenix_executable
from qe_assets_tests.conftest import free_port
from qe_assets_tests.test_cli import qe
from qe_assets_tests.test_raw_events import materialize, rows

# Phoenix runs with authentication: this is its admin secret, the bearer token every request
# needs (32+ characters with a digit), and what QE_PHOENIX_API_KEY carries.
SECRET = "phx-key-5d1c9a7e-never-shown-0123456789abcdef"
EVALUATORS = json.dumps({"correctness": "higher", "hallucination": "lower"})


@pytest.fixture(scope="session")
def phoenix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PhoenixServer]:
    executable = phoenix_executable()
    if executable is None:
        pytest.skip(
            f"{PHOENIX_VARIABLE} is unset: `make phoenix` builds .venv-phoenix and "
            "`make test` points it at .venv-phoenix/bin/phoenix"
        )
    server = PhoenixServer(executable, tmp_path_factory.mktemp("phoenix"), api_key=SECRET)
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def phoenix_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key in this process's environment too: in-process imports and the sensor read it
    there, as they would in the daemon."""
    monkeypatch.setenv("QE_PHOENIX_API_KEY", SECRET)


def project() -> str:
    return f"p-{uuid.uuid4().hex[:10]}"


def trace(n: int, **extra: Any) -> dict[str, Any]:
    """One RAG trace: Chinese question and answer, three documents, a request id in metadata."""
    return {
        "question": f"年假可以结转吗?({n})",
        "answer": f"不可以。({n})",
        "docs": [
            {"id": f"kb-{n}-a", "content": "年假最多结转五天。", "score": 0.82},
            {"id": f"kb-{n}-b", "content": "病假另计。", "score": 0.4},
        ],
        "model": "qwen-rag-7b",
        "metadata": {"app": {"request_id": f"req-{n}"}, "channel": "web"},
        **extra,
    }


def low(n: int, score: float = 0.2) -> list[dict[str, Any]]:
    """A correctness judgement on the root and a hallucination judgement (1 = bad) on the LLM."""
    return [
        {
            "trace": n,
            "name": "correctness",
            "score": score,
            "label": "incorrect",
            "explanation": "答非所问",
            "identifier": "judge-v1",
        },
        {
            "trace": n,
            "name": "hallucination",
            "score": 1,
            "label": "hallucinated",
            "on": "llm",
            "identifier": "judge-v1",
        },
    ]


def environment(phoenix: PhoenixServer, name: str, data: Path, **more: str) -> dict[str, str]:
    return {
        "QE_DATA_DIR": str(data),
        "QE_PHOENIX_URL": phoenix.url,
        "QE_PHOENIX_PROJECT": name,
        "QE_PHOENIX_API_KEY": SECRET,
        "QE_IMPORT_SETTLE": "0s",
        "QE_IMPORT_EVALUATORS": EVALUATORS,
        "QE_IMPORT_REQUEST_ID_KEY": "app.request_id",
        "QE_IMPORT_TENANT": "acme",
        "QE_IMPORT_PAGE_SIZE": "2",
        **more,
    }


def settings_of(env: dict[str, str]) -> Settings:
    return Settings.from_env(env)


def wait_for_roots(phoenix: PhoenixServer, name: str, count: int) -> None:
    import time

    deadline = time.monotonic() + 60
    while phoenix.root_count(name) < count:
        assert time.monotonic() < deadline, f"phoenix stored fewer than {count} roots"
        time.sleep(0.1)


def inbox_lines(data: Path) -> list[str]:
    found = sorted((data / "inbox").glob("*.jsonl"))
    return [line for path in found for line in path.read_text(encoding="utf-8").splitlines()]


def no_secret_under(data: Path, *texts: str) -> None:
    for text in texts:
        assert SECRET not in text
    for path in data.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_import_then_qe_run_maps_skips_keeps_pending_and_rejects_a_doc_without_content(
    phoenix: PhoenixServer, tmp_path: Path
) -> None:
    name, data = project(), tmp_path / "data"
    env = environment(phoenix, name, data)
    traces = [
        trace(0),  # judged low: emitted
        trace(1),  # judged 0.95 and not hallucinated: skipped
        trace(2),  # not judged yet: pending
        trace(3, docs=[{"id": "kb-3-a", "content": "正文", "score": 0.9}, {"id": "kb-3-b"}]),
        trace(4, root_io=False),  # question and answer from the LLM span's messages
    ]
    notes = [
        *low(0),
        {"trace": 1, "name": "correctness", "score": 0.95, "label": "correct"},
        {"trace": 1, "name": "hallucination", "score": 0, "label": "factual", "on": "llm"},
        *low(3),
        *low(4, 0.3),
    ]
    ids = phoenix.send(name, traces, notes)
    wait_for_roots(phoenix, name, 5)

    first = qe("import", "phoenix", env=env)
    assert "5 traces read, 3 events enqueued, 1 judged at or above the threshold, 1 pending" in (
        first.stdout
    )
    assert "retrieval.documents.1 has no content" in first.stderr
    run = qe("run", "--quiet", env=env)
    assert run.returncode == 0

    settings = settings_of(env)
    got = {
        r[0]: r[1:]
        for r in rows(
            settings,
            "SELECT request_id, question, answer, score, labels, model, extra, "
            "to_json(docs) FROM raw_events",
        )
    }
    assert set(got) == {"req-0", "req-4"}
    question, answer, score, labels, model, extra, docs = got["req-0"]
    assert (question, answer, score) == ("年假可以结转吗?(0)", "不可以。(0)", 0.0)
    assert labels == ["factuality_error"]
    assert model == "qwen-rag-7b"
    extra = json.loads(extra)
    assert extra["tenant"] == "acme"
    assert extra["origin"] == {
        "system": "phoenix",
        "project": name,
        "trace_id": ids[0]["trace_id"],
        "span_id": ids[0]["root"],
    }
    assert [d["id"] for d in json.loads(docs)] == ["kb-0-a", "kb-0-b"]
    assert got["req-4"][:3] == ("年假可以结转吗?(4)", "不可以。(4)", 0.0)
    (reason,) = [r[0] for r in rows(settings, "SELECT reason FROM rejected_events")]
    assert "docs.1.content" in reason
    checks = json.loads(
        rows(settings, "SELECT checks FROM raw_events WHERE request_id='req-0'")[0][0]
    )
    assert checks["correctness"] == {"label": "incorrect", "score": 0.2, "explanation": "答非所问"}

    again = qe("import", "phoenix", env=env)
    assert "1 traces read, 0 events enqueued" in again.stdout  # only the pending one
    phoenix.annotate(name, ids, low(2, 0.1))  # the late judgement
    late = qe("import", "phoenix", env=env)
    assert "1 traces read, 1 events enqueued" in late.stdout and "0 pending" in late.stdout
    materialize(settings)
    assert {r[0] for r in rows(settings, "SELECT request_id FROM raw_events")} == {
        "req-0",
        "req-2",
        "req-4",
    }
    no_secret_under(data, first.stdout, first.stderr, again.stdout, late.stdout, run.stdout)


def test_pages_resume_from_the_cursor_and_roots_wait_to_settle(
    phoenix: PhoenixServer, tmp_path: Path
) -> None:
    name, data = project(), tmp_path / "data"
    env = environment(phoenix, name, data)
    phoenix.send(name, [trace(n) for n in range(5)], [n for i in range(5) for n in low(i)])
    wait_for_roots(phoenix, name, 5)
    settings = settings_of(env)

    unsettled = import_phoenix(settings_of({**env, "QE_IMPORT_SETTLE": "1h"}))
    assert (unsettled.read, unsettled.emitted) == (0, 0)
    assert not state_path(settings, "phoenix", name).exists()

    one = import_phoenix(settings, max_pages=1)
    assert (one.pages, one.emitted) == (1, 2)
    cursor = json.loads(state_path(settings, "phoenix", name).read_text())["cursor"]
    # The largest page Phoenix serves (1,000), even with the cursor's own row fetched again.
    rest = import_phoenix(settings_of({**env, "QE_IMPORT_PAGE_SIZE": "1000"}))
    assert (rest.pages, rest.emitted) == (1, 3)  # the cursor's root not read twice
    assert json.loads(state_path(settings, "phoenix", name).read_text())["cursor"] != cursor
    assert import_phoenix(settings).read == 0
    ids = [json.loads(line)["request_id"] for line in inbox_lines(data)]
    assert sorted(ids) == [f"req-{n}" for n in range(5)]


CRASH = """
import os
from qe_assets.imports.phoenix import import_phoenix
from qe_assets.settings import Settings
import_phoenix(Settings.from_env(), after_write=lambda: os._exit(9))
"""


def test_a_crash_between_file_and_cursor_replays_identically_and_a_changed_judgement_conflicts(
    phoenix: PhoenixServer, tmp_path: Path
) -> None:
    name, data = project(), tmp_path / "data"
    env = environment(phoenix, name, data, QE_IMPORT_PAGE_SIZE="10")
    ids = phoenix.send(name, [trace(n) for n in range(3)], [n for i in range(3) for n in low(i)])
    wait_for_roots(phoenix, name, 3)
    settings = settings_of(env)

    crashed = subprocess.run(
        [sys.executable, "-c", CRASH], env={**os.environ, **env}, capture_output=True, timeout=120
    )
    assert crashed.returncode == 9, crashed.stderr
    assert not state_path(settings, "phoenix", name).exists()  # the cursor never moved
    (written,) = sorted((data / "inbox").glob("*.jsonl"))
    first_bytes = written.read_bytes()
    assert materialize(settings)["new_rows"] == 3

    replay = qe("import", "phoenix", env=env)
    assert "3 events enqueued" in replay.stdout
    (replayed,) = sorted((data / "inbox").glob("*.jsonl"))
    assert replayed.read_bytes() == first_bytes
    meta = materialize(settings)
    assert (meta["new_rows"], meta["total_rows"]) == (0, 3)
    assert rows(settings, "SELECT count(*) FROM rejected_events")[0][0] == 0

    # The judge changes its mind after the event was ingested: the first judgement is kept.
    phoenix.annotate(name, ids, low(1, 0.45))
    qe("import", "phoenix", "--from-start", env=env)
    meta = materialize(settings)
    assert meta["new_rows"] == 0
    (reason,) = [r[0] for r in rows(settings, "SELECT reason FROM rejected_events")]
    assert "conflicting duplicate" in reason
    kept = rows(settings, "SELECT checks FROM raw_events WHERE request_id = 'req-1'")[0][0]
    assert json.loads(kept)["correctness"]["score"] == 0.2


def test_errors_are_one_line_naming_the_setting_and_leave_the_cursor(
    phoenix: PhoenixServer, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    env = environment(phoenix, "no-such-project", data)
    missing = qe("import", "phoenix", env=env, check=False)
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
    assert "QE_PHOENIX_PROJECT" in missing.stderr and "cursor is unchanged" in missing.stderr

    down = qe(
        "import",
        "phoenix",
        env={**env, "QE_PHOENIX_URL": f"http://127.0.0.1:{free_port()}"},
        check=False,
    )
    assert down.returncode == 1 and down.stderr.count("\n") == 1
    assert "cannot reach" in down.stderr and "QE_PHOENIX_URL" in down.stderr

    refused = qe(
        "import", "phoenix", env={**env, "QE_PHOENIX_API_KEY": "wrong-key-77"}, check=False
    )
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "refused the credentials (HTTP 401)" in refused.stderr
    assert "QE_PHOENIX_API_KEY" in refused.stderr and "wrong-key-77" not in refused.stderr

    bad = qe("import", "phoenix", env={**env, "QE_PHOENIX_URL": "ftp://x"}, check=False)
    assert bad.returncode == 2 and "QE_PHOENIX_URL" in bad.stderr
    assert not (data / "imports").exists()
    no_secret_under(data, missing.stderr, down.stderr, refused.stderr, bad.stderr)


def test_the_import_sensor_imports_on_a_tick_and_is_off_by_default(
    phoenix: PhoenixServer, tmp_path: Path
) -> None:
    name, data = project(), tmp_path / "data"
    env = environment(phoenix, name, data)
    phoenix.send(name, [trace(0)], low(0))
    wait_for_roots(phoenix, name, 1)
    sensor = build_import_sensor("phoenix", running_by_default=False, interval_seconds=60)
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED
    assert sensor.minimum_interval_seconds == 60

    def tick(settings: Settings) -> str:
        context = dg.build_sensor_context(
            instance=dg.DagsterInstance.ephemeral(),
            resources={"settings": PipelineSettings(**settings.model_dump())},
        )
        result = sensor(context)
        assert isinstance(result, dg.SkipReason)
        return result.skip_message or ""

    assert "1 events enqueued" in tick(settings_of(env))
    assert [json.loads(line)["request_id"] for line in inbox_lines(data)] == ["req-0"]
    assert "0 events enqueued" in tick(settings_of(env))
    cursor = state_path(settings_of(env), "phoenix", name).read_bytes()
    down = tick(settings_of({**env, "QE_PHOENIX_URL": f"http://127.0.0.1:{free_port()}"}))
    assert "QE_PHOENIX_URL" in down and "cursor is unchanged" in down
    assert state_path(settings_of(env), "phoenix", name).read_bytes() == cursor
