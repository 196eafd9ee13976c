"""`qe-capture`, the service side as its own distribution: installed the documented way
(`pip install './qe_assets/service[redis]'`) into a clean venv, it brings none of the pipeline's
heavy packages and sends events and answer counts through the inbox and a real redis-server,
where the ingester's queues read them back.

Slow (a fresh venv resolves pydantic and redis from the package index): `slow` marker."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qe_assets.ingest.events import validate_event
from qe_assets.ingest.queues import FileInbox, RedisQueue
from qe_assets.service.answer_counts import is_count_record, parse_count_record
from qe_assets_tests.conftest import RedisServer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("dagster", "duckdb", "polars", "pyarrow", "openai")

SERVICE_CODE = """
    import importlib.metadata, importlib.util, json, logging, sys
    logging.basicConfig(level=logging.WARNING)
    from qe_assets.service import capture, choose_model

    present = [m for m in sys.argv[1].split(",") if importlib.util.find_spec(m) is not None]
    dists = sorted(d.metadata["Name"].lower() for d in importlib.metadata.distributions())
    statuses = []
    for i in range(3):
        model = choose_model(f"r{i}")
        statuses.append(capture(request_id=f"r{i}", question="q", docs=[{"id": 1, "content": "d"}],
                                answer="a", evaluation={"score": 0.2}, model=model).status.value)
    skipped = capture(request_id="hi", question="q", docs=[], answer="a",
                      evaluation={"score": 0.9}, model=model).status.value
    import qe_assets.service
    print(json.dumps({"present": present, "dists": dists, "statuses": statuses,
                      "skipped": skipped, "model": model,
                      "loaded": sorted(m for m in sys.modules if m.startswith("qe_assets")),
                      "where": qe_assets.service.__file__}))
"""


@pytest.fixture(scope="module")
def service_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean venv with `qe-capture[redis]` installed from a copy of the source folder (pip
    builds in the folder it is given; the copy keeps the repository clean)."""
    root = tmp_path_factory.mktemp("qe-capture")
    source = root / "service"
    shutil.copytree(
        REPO / "qe_assets" / "service",
        source,
        ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"),
    )
    venv = root / "venv"
    # No pip of its own: the project's pip installs into it (`--python`), as fast and the same.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", f"{source}[redis]"],
        check=True,
        env=env,
        cwd=root,
        timeout=900,
    )
    return python


def run_in_venv(python: Path, data_dir: Path, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("QE_")}
    done = subprocess.run(
        [python, "-c", textwrap.dedent(SERVICE_CODE), ",".join(HEAVY)],
        capture_output=True,
        text=True,
        # An unrelated bad setting too: the service does not read it.
        env={**clean, "QE_DATA_DIR": str(data_dir), "QE_FINETUNE_THRESHOLD": "abc", **env},
        cwd=data_dir.parent,  # not the repository: only the venv's site-packages
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return json.loads(done.stdout)


def check_records(records: list[bytes]) -> None:
    """Three valid events and one count record of 4 answers, 3 of them low-score."""
    events = [r for r in records if not is_count_record(r)]
    assert sorted(validate_event(r.decode()).request_id for r in events) == ["r0", "r1", "r2"]
    counts = [row for r in records if is_count_record(r) for row in parse_count_record(r)]
    assert [(c["model"], c["answers"], c["low"]) for c in counts] == [("base-model", 4, 3)]


def test_the_service_installs_alone_and_sends_through_the_inbox(
    service_venv: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    out = run_in_venv(service_venv, data, QE_FINETUNE_BASE_MODEL="base-model")
    assert out["present"] == []
    assert not set(out["dists"]) & {"dagster", "duckdb", "polars", "pyarrow", "qe-assets"}
    assert "qe-capture" in out["dists"] and "pydantic" in out["dists"]
    assert out["where"].startswith(str(service_venv.parents[1]))
    assert all(m == "qe_assets" or m.startswith("qe_assets.service") for m in out["loaded"])
    assert out["statuses"] == ["enqueued"] * 3 and out["skipped"] == "skipped"
    # The ingester's side of the inbox reads what the installed package wrote.
    records = [r for batch in FileInbox(data / "inbox").batches(100) for r in batch.records]
    check_records(records)


def test_the_service_installs_alone_and_sends_through_redis(
    service_venv: Path, tmp_path: Path, redis_url: str, redis_server: RedisServer
) -> None:
    out = run_in_venv(
        service_venv, tmp_path / "data", QE_QUEUE_URL=redis_url, QE_FINETUNE_BASE_MODEL="base-model"
    )
    assert out["present"] == [] and "redis" in out["dists"]
    assert out["statuses"] == ["enqueued"] * 3
    assert not (tmp_path / "data" / "inbox").exists()  # nothing spooled: Redis took it all
    queue = RedisQueue(redis_url, consumer="service-package")
    records = []
    for batch in queue.batches(100):
        records += batch.records
        batch.ack()
    check_records(records)
