"""The producer call: threshold, enqueue, spool when Redis is down, never raise."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from qe_assets.ingest.queues import FileInbox, RedisQueue
from qe_assets.service.capture import CaptureStatus, QualityCapture
from qe_assets.settings import Settings
from qe_assets_tests.conftest import RedisServer, free_port
from qe_assets_tests.factories import make_event


def test_score_at_or_above_threshold_is_a_no_op(settings: Settings) -> None:
    capture = QualityCapture(settings)
    result = capture.capture_event(make_event(evaluation={"score": 0.7}))
    assert result.status is CaptureStatus.SKIPPED
    assert not settings.inbox_dir.exists()


def test_threshold_is_configurable(settings: Settings) -> None:
    capture = QualityCapture(settings.model_copy(update={"capture_threshold": 0.9}))
    assert capture.capture_event(make_event(evaluation={"score": 0.8})).captured


def test_low_score_goes_to_the_inbox_with_a_capture_timestamp(settings: Settings) -> None:
    capture = QualityCapture(settings)
    event = make_event()
    del event["timestamp"]
    result = capture(**event, tenant="acme")
    assert result.status is CaptureStatus.ENQUEUED
    (batch,) = FileInbox(settings.inbox_dir).batches(10)
    stored = json.loads(batch.records[0])
    assert stored["tenant"] == "acme"
    assert stored["timestamp"].endswith("Z")


def test_low_score_goes_to_redis(
    settings: Settings, redis_url: str, redis_server: RedisServer
) -> None:
    capture = QualityCapture(settings.model_copy(update={"queue_url": redis_url}))
    assert capture.capture_event(make_event()).status is CaptureStatus.ENQUEUED
    assert redis_server.client().llen("quality_events") == 1
    assert RedisQueue(redis_url).depth() == 1


def test_invalid_event_is_reported_not_raised(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    capture = QualityCapture(settings)
    with caplog.at_level(logging.WARNING, "qe_assets.service.capture"):
        result = capture.capture_event(make_event(docs="oops"))
    assert result.status is CaptureStatus.INVALID
    assert result.reason and result.reason.startswith("docs:")
    assert "not captured" in caplog.text


def test_redis_down_spools_to_inbox_and_the_request_is_not_broken(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    down = settings.model_copy(update={"queue_url": f"redis://127.0.0.1:{free_port()}/0"})
    capture = QualityCapture(down)
    with caplog.at_level(logging.WARNING, "qe_assets.service.capture"):
        result = capture.capture_event(make_event("spooled-1"))
    assert result.status is CaptureStatus.SPOOLED and result.captured
    assert "spooled" in caplog.text
    (batch,) = FileInbox(settings.inbox_dir).batches(10)
    assert json.loads(batch.records[0])["request_id"] == "spooled-1"


def test_queue_and_spool_both_failing_returns_failed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the data dir should be")
    settings = Settings(data_dir=str(blocker), queue_url=f"redis://127.0.0.1:{free_port()}/0")
    with caplog.at_level(logging.ERROR, "qe_assets.service.capture"):
        result = QualityCapture(settings).capture_event(make_event())
    assert result.status is CaptureStatus.FAILED
    assert "lost" in caplog.text


def test_inbox_only_failure_returns_failed(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    result = QualityCapture(Settings(data_dir=str(blocker))).capture_event(make_event())
    assert result.status is CaptureStatus.FAILED


FORK_WHILE_FLUSHING = """
import os, sys, threading, time
from qe_assets.service.answer_counts import AnswerCounter

parent = os.getpid()
sent = threading.Event()
delivered = []

def sink(record):
    if os.getpid() == parent:  # the parent's delivery hangs: the flush lock stays taken
        sent.set()
        time.sleep(30)
    delivered.append(record)

counter = AnswerCounter(sink, threshold=0.5, interval_seconds=3600)
counter.add("prod", 0.1)
threading.Thread(target=counter.flush, daemon=True).start()
assert sent.wait(10)
pid = os.fork()
if pid == 0:
    counter.add("prod", 0.9)
    ok = counter.flush() and len(delivered) == 1 and counter.pending() == {}
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
os._exit(0)
"""


def test_a_child_forked_during_a_flush_counts_and_flushes() -> None:
    """The parent's flush thread holds the flush lock (its delivery hangs) when the process
    forks: the child gets locks of its own, so its count and flush return at once."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", FORK_WHILE_FLUSHING], capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 0 and done.stdout.strip() == "0", done.stderr
