"""`qe import langfuse` against recorded Langfuse API responses served over real HTTP
(`langfuse_server.py`: v3 scores with cursor pagination, v2 observations, basic auth)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from qe_assets.imports.state import state_path
from qe_assets.lib.resources import PipelineSettings
from qe_assets.ops.sensors import build_import_sensor
from qe_assets.settings import Settings
from qe_assets_tests.conftest import free_port
from qe_assets_tests.langfuse_server import (
    PUBLIC,
    SECRET,
    Recorded,
    observation,
    score,
    serving,
    trace_record,
)
from qe_assets_tests.test_cli import qe
from qe_assets_tests.test_raw_events import materialize, rows


def stamp(minutes_ago: float) -> str:
    when = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def add_trace(recorded: Recorded, n: int, *, docs: Any = None, root_io: bool = True) -> None:
    t, start = f"t-{n}", stamp(90)
    # Trace 3's request id is on the trace only (as SDKs set it), not on its root observation.
    recorded.traces[t] = trace_record(
        t, start, metadata={"app": {"request_id": f"lf-{n}"}} if n == 3 else {"env": "prod"}
    )
    recorded.observations += [
        observation(
            f"o-{n}-root",
            t,
            "SPAN",
            start,
            name="rag",
            input=f"年假可以结转吗?({n})" if root_io else None,
            output=f"不可以。({n})" if root_io else None,
            metadata={"app": {"request_id": f"lf-{n}"}} if n != 3 else {},
        ),
        observation(
            f"o-{n}-ret",
            t,
            "RETRIEVER",
            start,
            parent=f"o-{n}-root",
            input=f"年假可以结转吗?({n})",
            output=docs
            if docs is not None
            else [
                {"id": f"kb-{n}-a", "content": "年假最多结转五天。", "score": 0.82},
                {"id": f"kb-{n}-b", "content": "病假另计。", "score": 0.4},
            ],
        ),
        observation(
            f"o-{n}-gen",
            t,
            "GENERATION",
            start,
            parent=f"o-{n}-root",
            model="qwen-rag-7b",
            input=[
                {"role": "system", "content": "Answer from the docs."},
                {"role": "user", "content": f"年假可以结转吗?({n})"},
            ],
            output={"role": "assistant", "content": f"不可以。({n})"},
        ),
    ]


@pytest.fixture
def recorded() -> Recorded:
    data = Recorded()
    for n in range(4):
        add_trace(
            data,
            n,
            root_io=n != 3,
            docs=[{"id": "kb-2-a", "content": "正文"}, {"id": "kb-2-b"}] if n == 2 else None,
        )
    data.scores += [
        score("s-0a", "t-0", "correctness", 0.1, stamp(80), comment="答非所问"),
        score("s-0b", "t-0", "hallucination", "hallucinated", stamp(79), data_type="CATEGORICAL"),
        score("s-1a", "t-1", "correctness", 0.9, stamp(78)),
        score("s-2a", "t-2", "correctness", 0.2, stamp(77)),
        score("s-3a", "t-3", "correctness", 0.3, stamp(76), observation="o-3-gen"),
        score("s-3b", "t-3", "note", "looks off", stamp(75), data_type="TEXT"),
    ]
    return data


@pytest.fixture
def langfuse(recorded: Recorded) -> Iterator[str]:
    with serving(recorded) as url:
        yield url


def environment(url: str, data: Path, **more: str) -> dict[str, str]:
    return {
        "QE_DATA_DIR": str(data),
        "QE_LANGFUSE_URL": url,
        "QE_LANGFUSE_PUBLIC_KEY": PUBLIC,
        "QE_LANGFUSE_SECRET_KEY": SECRET,
        "QE_IMPORT_SETTLE": "0s",
        "QE_IMPORT_EVALUATORS": json.dumps({"correctness": "higher", "hallucination": "lower"}),
        "QE_IMPORT_REQUEST_ID_KEY": "app.request_id",
        "QE_IMPORT_PAGE_SIZE": "2",
        **more,
    }


def no_keys_under(data: Path, *texts: str) -> None:
    for text in texts:
        assert SECRET not in text and PUBLIC not in text
    for path in data.rglob("*"):
        if path.is_file():
            body = path.read_bytes()
            assert SECRET.encode() not in body and PUBLIC.encode() not in body, path


def test_import_then_qe_run_late_and_changed_judgements(
    recorded: Recorded, langfuse: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    env = environment(langfuse, data)
    first = qe("import", "langfuse", env=env)
    assert "4 traces read, 3 events enqueued, 1 judged at or above the threshold" in first.stdout
    assert "retrieval.documents.1 has no content" in first.stderr
    assert any("limit=2" in r and "cursor=" in r for r in recorded.requests)  # paged
    assert any("fields=subject%2Cdetails" in r for r in recorded.requests)
    run = qe("run", "--quiet", env=env)

    settings = Settings.from_env(env)
    got = {
        r[0]: r[1:]
        for r in rows(
            settings,
            "SELECT request_id, question, answer, score, labels, model, extra, checks, "
            "to_json(docs) FROM raw_events",
        )
    }
    assert set(got) == {"lf-0", "lf-3"}
    question, answer, value, labels, model, extra, checks, docs = got["lf-0"]
    assert (question, answer, value, labels) == (
        "年假可以结转吗?(0)",
        "不可以。(0)",
        0.1,
        ["factuality_error"],
    )
    assert model == "qwen-rag-7b"
    assert json.loads(extra)["origin"] == {
        "system": "langfuse",
        "project": "cm-project-7",
        "trace_id": "t-0",
        "span_id": "o-0-root",
    }
    assert json.loads(checks)["correctness"]["explanation"] == "答非所问"
    assert [d["content"] for d in json.loads(docs)] == ["年假最多结转五天。", "病假另计。"]
    assert got["lf-3"][:3] == ("年假可以结转吗?(3)", "不可以。(3)", 0.3)  # from the generation
    (reason,) = [r[0] for r in rows(settings, "SELECT reason FROM rejected_events")]
    assert "docs.1.content" in reason

    assert "0 traces read" in qe("import", "langfuse", env=env).stdout
    # A late judgement of t-1, and t-0 judged again after its event was ingested.
    recorded.scores += [
        score("s-1b", "t-1", "correctness", 0.2, stamp(0)),
        score("s-0c", "t-0", "correctness", 0.05, stamp(0)),
    ]
    late = qe("import", "langfuse", env=env)
    assert "2 traces read, 2 events enqueued" in late.stdout
    meta = materialize(settings)
    assert meta["new_rows"] == 1
    assert rows(settings, "SELECT score FROM raw_events WHERE request_id = 'lf-1'") == [(0.2,)]
    assert rows(settings, "SELECT score FROM raw_events WHERE request_id = 'lf-0'") == [(0.1,)]
    reasons = [r[0] for r in rows(settings, "SELECT reason FROM rejected_events")]
    assert any("conflicting duplicate" in r for r in reasons)
    no_keys_under(data, first.stdout, first.stderr, late.stdout, run.stdout, run.stderr)


CRASH = """
import os
from qe_assets.imports.langfuse import import_langfuse
from qe_assets.settings import Settings
import_langfuse(Settings.from_env(), after_write=lambda: os._exit(9))
"""


def test_a_crash_between_file_and_cursor_replays_identically(langfuse: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = environment(langfuse, data, QE_IMPORT_PAGE_SIZE="50")
    settings = Settings.from_env(env)
    crashed = subprocess.run(
        [sys.executable, "-c", CRASH], env={**os.environ, **env}, capture_output=True, timeout=120
    )
    assert crashed.returncode == 9, crashed.stderr
    assert not state_path(settings, "langfuse", langfuse).exists()
    (written,) = sorted((data / "inbox").glob("*.jsonl"))
    first_bytes = written.read_bytes()
    assert materialize(settings)["new_rows"] == 2

    qe("import", "langfuse", env=env)
    (replayed,) = sorted((data / "inbox").glob("*.jsonl"))
    assert replayed.read_bytes() == first_bytes
    meta = materialize(settings)
    assert (meta["new_rows"], meta["total_rows"]) == (0, 2)
    assert "watermark" in json.loads(state_path(settings, "langfuse", langfuse).read_text())


def test_errors_name_the_setting_never_a_key(
    recorded: Recorded, langfuse: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    env = environment(langfuse, data)
    refused = qe(
        "import", "langfuse", env={**env, "QE_LANGFUSE_SECRET_KEY": "sk-wrong-1"}, check=False
    )
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "HTTP 401" in refused.stderr and "QE_LANGFUSE_SECRET_KEY" in refused.stderr
    assert "sk-wrong-1" not in refused.stderr

    unset = qe("import", "langfuse", env={**env, "QE_LANGFUSE_URL": ""}, check=False)
    assert unset.returncode == 2 and "QE_LANGFUSE_URL is not set" in unset.stderr
    down = qe(
        "import",
        "langfuse",
        env={**env, "QE_LANGFUSE_URL": f"http://127.0.0.1:{free_port()}"},
        check=False,
    )
    assert "cannot reach" in down.stderr and "QE_LANGFUSE_URL" in down.stderr
    recorded.v3 = False
    old = qe("import", "langfuse", env=env, check=False)
    assert "HTTP 404" in old.stderr and "QE_LANGFUSE_URL" in old.stderr
    assert "Traceback" not in refused.stderr + unset.stderr + down.stderr + old.stderr
    assert not (data / "imports").exists() and not (data / "inbox").exists()
    no_keys_under(data, refused.stderr, unset.stderr, down.stderr, old.stderr)


def test_the_import_sensor_ticks_and_is_off_by_default(
    langfuse: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = environment(langfuse, tmp_path / "data")
    # The keys come from the daemon's environment, as they would in production.
    monkeypatch.setenv("QE_LANGFUSE_PUBLIC_KEY", PUBLIC)
    monkeypatch.setenv("QE_LANGFUSE_SECRET_KEY", SECRET)
    sensor = build_import_sensor("langfuse", running_by_default=False, interval_seconds=120)
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED
    context = dg.build_sensor_context(
        instance=dg.DagsterInstance.ephemeral(),
        resources={"settings": PipelineSettings(**Settings.from_env(env).model_dump())},
    )
    result = sensor(context)
    assert isinstance(result, dg.SkipReason)
    assert "3 events enqueued" in (result.skip_message or "")
