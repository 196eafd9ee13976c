"""The service side (`qe_assets.service`): it stands alone, reads only its own settings, and
neither `capture` nor `choose_model` ever raises or blocks, whatever the environment or
`rollout.json` holds. Settings are real variables in a real subprocess; rollout files are real
FIFOs, symlinks and deeply nested files."""

from __future__ import annotations

import ast
import json
import logging
import os
import resource
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from qe_assets.service.rollout import RolloutState, Router, write_state

REPO = Path(__file__).resolve().parents[1]
SERVICE = REPO / "qe_assets" / "service"


def run_service(code: str, env: dict[str, str], **kwargs: object) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter with exactly the QE_ variables in `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QE_")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**clean, **env},
        cwd=REPO,
        timeout=60,
        **kwargs,  # type: ignore[arg-type]
    )


# A service's request path through the old import paths (what services use today), three
# requests, each routed and then captured with a low score.
REQUESTS = """
    import json, logging
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from qe_assets.service.capture import capture
    from qe_assets.service.rollout import choose_model

    out = []
    for i in range(3):
        model = choose_model(f"r{i}")
        result = capture(request_id=f"r{i}", question="q", docs=[], answer="a",
                         evaluation={"score": 0.5}, model=model)
        out.append([model, result.status.value])
    print(json.dumps(out))
"""


# --- issue #26 item 5: settings -------------------------------------------------------------


@pytest.mark.parametrize(
    "variable, value",
    [
        ("QE_FINETUNE_THRESHOLD", "abc"),
        ("QE_LLM_CONCURRENCY", "0"),
        ("QE_EVAL_MODEL_MAP", "{bad"),
        ("QE_AB_ALPHA", "7"),
    ],
)
def test_a_bad_unrelated_setting_does_not_touch_the_request_path(
    tmp_path: Path, variable: str, value: str
) -> None:
    done = run_service(REQUESTS, {"QE_DATA_DIR": str(tmp_path), variable: value})
    assert done.returncode == 0, done.stderr
    # Production for every request, every event in the inbox, and not a word about a variable
    # the service does not read.
    base = "gpt-4o-mini-2024-07-18"
    assert json.loads(done.stdout) == [[base, "enqueued"]] * 3
    assert "Traceback" not in done.stderr and variable not in done.stderr
    assert len(list((tmp_path / "inbox").glob("*.jsonl"))) >= 3


def test_a_bad_service_setting_warns_once_and_falls_back(tmp_path: Path) -> None:
    env = {
        "QE_DATA_DIR": str(tmp_path),
        "QE_CAPTURE_THRESHOLD": "abc",  # → 0.7, so a score of 0.5 is sent
        "QE_QUEUE_URL": "bogus://somewhere",  # → the file inbox
        "QE_COUNT_FLUSH_SECONDS": "0",  # → 5 s
    }
    done = run_service(REQUESTS, env)
    assert done.returncode == 0, done.stderr
    assert [status for _, status in json.loads(done.stdout)] == ["enqueued"] * 3
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    # One line per bad value, however many requests and however many objects read the settings.
    assert len(warnings) == 3, done.stderr
    for variable in ("QE_CAPTURE_THRESHOLD", "QE_QUEUE_URL", "QE_COUNT_FLUSH_SECONDS"):
        assert sum(variable in line for line in warnings) == 1, done.stderr
    assert "file inbox" in done.stderr and "Traceback" not in done.stderr
    events = [
        json.loads(line)
        for path in (tmp_path / "inbox").glob("*.jsonl")
        for line in path.read_text().splitlines()
    ]
    assert sorted(e["request_id"] for e in events if "request_id" in e) == ["r0", "r1", "r2"]


def test_a_wrong_call_or_a_refused_kafka_configuration_never_raises(tmp_path: Path) -> None:
    pytest.importorskip("confluent_kafka")
    code = """
        import json
        from qe_assets.service.capture import capture
        missing = capture(request_id="r1")  # a programming error of the service: no raise
        odd = capture(request_id="r2", question="q", docs=[], answer="a",
                      evaluation={"score": 0.1}, extra=object())
        print(json.dumps([missing.status.value, odd.status.value]))
    """
    # A Kafka URL whose client refuses its properties: events go to the inbox instead.
    env = {
        "QE_DATA_DIR": str(tmp_path),
        "QE_QUEUE_URL": "kafka://127.0.0.1:1/t?no.such.property=1",
    }
    done = run_service(code, env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["failed", "invalid"]
    assert "Traceback" not in done.stderr and "file inbox" in done.stderr


# --- issue #26 item 6: rollout.json ----------------------------------------------------------


def replace(path: Path, body: bytes) -> None:
    """Put `body` at `path` as the graph does: a new file renamed into place."""
    tmp = path.with_name(".next")
    tmp.write_bytes(body)
    os.replace(tmp, path)


def started_router(path: Path) -> Router:
    """A router that has seen a good state: production `prod`, `cand` at 50 %."""
    write_state(path, RolloutState("prod", "cand", 0.5))
    router = Router(path, default="base", check_seconds=0)
    assert {router.choose_model(f"r{i}") for i in range(100)} == {"prod", "cand"}
    return router


def test_a_deeply_nested_file_falls_back_to_production_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "rollout.json"
    router = started_router(path)
    depth = 30_000  # within the size bound, far beyond Python's recursion limit
    replace(path, b'{"production": "prod", "x": ' + b"[" * depth + b"]" * depth + b"}")
    with caplog.at_level(logging.INFO, "qe_assets.service.rollout"):
        picks = [router.choose_model(f"r{i}") for i in range(1000)]
    assert set(picks) == {"prod"}
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "nested 30001 levels deep" in caplog.text
    write_state(path, RolloutState("prod", "cand", 0.5))
    assert "cand" in {router.choose_model(f"r{i}") for i in range(100)}


def test_a_fifo_is_refused_without_blocking(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "rollout.json"
    router = started_router(path)
    path.unlink()
    os.mkfifo(path)
    picks: list[str] = []
    worker = threading.Thread(
        target=lambda: picks.extend(router.choose_model(f"r{i}") for i in range(100)),
        daemon=True,
    )
    started = time.monotonic()
    try:
        with caplog.at_level(logging.INFO, "qe_assets.service.rollout"):
            worker.start()
            worker.join(timeout=5)
            assert not worker.is_alive(), "choose_model blocked on a FIFO"
    finally:
        if worker.is_alive():  # release the old code's blocked open
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    assert time.monotonic() - started < 2
    assert set(picks) == {"prod"}
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "not a regular file" in caplog.text


def test_a_symlink_to_dev_zero_is_refused_without_reading(tmp_path: Path) -> None:
    path = tmp_path / "rollout.json"
    write_state(path, RolloutState("prod", "cand", 0.5))
    code = f"""
        import json, logging, os, time
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        from qe_assets.service.rollout import Router
        path = {str(path)!r}
        router = Router(path, default="base", check_seconds=0)
        first = sorted({{router.choose_model(f"r{{i}}") for i in range(100)}})
        os.replace(path, path + ".old")
        os.symlink("/dev/zero", path)
        start = time.monotonic()
        picks = sorted({{router.choose_model(f"r{{i}}") for i in range(1000)}})
        print(json.dumps([first, picks, time.monotonic() - start]))
    """

    def bounded_memory() -> None:
        # The old code reads /dev/zero until memory runs out: keep that to 1.5 GB here.
        limit = 1536 * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    done = run_service(code, {}, preexec_fn=bounded_memory)
    assert done.returncode == 0, done.stderr[-2000:]
    first, picks, seconds = json.loads(done.stdout)
    assert first == ["cand", "prod"] and picks == ["prod"] and seconds < 2
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "not a regular file" in warnings[0]


def test_a_file_over_the_size_bound_or_not_utf8_falls_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from qe_assets.service.rollout import MAX_STATE_BYTES

    path = tmp_path / "rollout.json"
    router = started_router(path)
    padding = " " * MAX_STATE_BYTES
    with caplog.at_level(logging.INFO, "qe_assets.service.rollout"):
        replace(
            path,
            json.dumps({"production": "prod", "candidate": "cand", "share": 0.5}).encode()[:-1]
            + padding.encode()
            + b"}",
        )
        assert {router.choose_model(f"r{i}") for i in range(200)} == {"prod"}
        replace(path, b'{"production": "\xff"}')
        assert {router.choose_model(f"r{i}") for i in range(200)} == {"prod"}
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]
    assert "larger than 65536 bytes" in caplog.text and "not UTF-8" in caplog.text


def test_a_symlink_to_a_regular_file_is_followed(tmp_path: Path) -> None:
    # Configuration mounts (a Kubernetes ConfigMap) are symlinks to regular files.
    real = tmp_path / "..data" / "rollout.json"
    real.parent.mkdir()
    write_state(real, RolloutState("prod", None, 0.0))
    (tmp_path / "rollout.json").symlink_to(real)
    assert Router(tmp_path / "rollout.json", default="base").choose_model("r") == "prod"


# --- issue #27: a package of its own -----------------------------------------------------------


def test_the_service_package_imports_nothing_else_of_qe_assets() -> None:
    """Statically (lazy imports inside functions included): every `qe_assets` import of the
    package is of `qe_assets.service`."""
    outside: list[str] = []
    for source in SERVICE.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            outside += [
                f"{source.name}: {name}"
                for name in names
                if name.split(".")[0] == "qe_assets" and not name.startswith("qe_assets.service")
            ]
    assert outside == []


def test_importing_the_service_loads_no_pipeline_module() -> None:
    code = """
        import sys
        import qe_assets.service, qe_assets.service.capture
        import qe_assets.service.rollout, qe_assets.service.answer_counts
        heavy = ("duckdb", "polars", "dagster", "pyarrow", "redis", "confluent_kafka", "openai")
        print(",".join(sorted(
            m for m in sys.modules
            if m.split(".")[0] in heavy
            or (m.startswith("qe_assets.") and not m.startswith("qe_assets.service"))
        )))
    """
    done = run_service(code, {"QE_FINETUNE_THRESHOLD": "abc"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
