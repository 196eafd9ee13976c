"""File inbox and Redis queue: atomic hand-over, claim, replay after crashes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qe_assets.ingest import commit_batch, ingest_pending
from qe_assets.queues import FileInbox, QueueUnavailable, RedisQueue
from qe_assets.settings import Settings
from qe_assets.store import connect
from qe_assets_tests.conftest import RedisServer, free_port
from qe_assets_tests.factories import line, make_event
from qe_assets_tests.runs import failing_on_open, stored_once


def payloads(n: int, prefix: str = "r") -> list[str]:
    return [line(make_event(f"{prefix}{i}")).decode() for i in range(n)]


def stored_ids(settings: Settings) -> list[str]:
    with connect(settings.database, read_only=True) as conn:
        return [r[0] for r in conn.execute("SELECT request_id FROM raw_events").fetchall()]


def writer(settings: Settings):
    return lambda: connect(settings.database)


# --- file inbox -------------------------------------------------------------------------------


def test_inbox_put_is_atomic_and_leaves_no_temp_files(settings: Settings) -> None:
    inbox = FileInbox(settings.inbox_dir)
    assert inbox.put(payloads(3)) == 3
    files = [p.name for p in settings.inbox_dir.iterdir() if p.is_file()]
    assert len(files) == 1 and files[0].endswith(".jsonl")
    assert inbox.depth() == 3


def test_half_written_file_is_not_read(settings: Settings) -> None:
    settings.inbox_dir.mkdir(parents=True)
    (settings.inbox_dir / "events.jsonl.part").write_bytes(line(make_event("half"))[:20])
    (settings.inbox_dir / ".tmp-events.jsonl").write_bytes(line(make_event("hidden")))
    inbox = FileInbox(settings.inbox_dir)
    report = ingest_pending(inbox, writer(settings), batch_size=100)
    assert report.read == 0
    assert (settings.inbox_dir / "events.jsonl.part").exists()
    # The producer finishes and renames: now it is ingested.
    os.replace(settings.inbox_dir / "events.jsonl.part", settings.inbox_dir / "events.jsonl")
    (settings.inbox_dir / "events.jsonl").write_bytes(line(make_event("half")))
    assert ingest_pending(inbox, writer(settings), batch_size=100).new == 1


def test_file_is_archived_only_after_commit_and_crash_before_archive_doubles_nothing(
    settings: Settings,
) -> None:
    inbox = FileInbox(settings.inbox_dir)
    inbox.put(payloads(5))
    # Claim and commit, then "crash" before the ack that archives the file.
    batch = next(inbox.batches(100))
    with connect(settings.database) as conn:
        from qe_assets.store import ensure_schema

        ensure_schema(conn)
        commit_batch(conn, batch.records, batch.sources)
    claimed = list((settings.inbox_dir / ".processing").glob("*.jsonl"))
    assert len(claimed) == 1 and not list((settings.inbox_dir / "archive").rglob("*.jsonl"))
    # Restart: the claimed file is replayed, its events are duplicates now, then archived.
    report = ingest_pending(FileInbox(settings.inbox_dir), writer(settings), batch_size=100)
    assert (report.new, report.duplicates) == (0, 5)
    assert sorted(stored_ids(settings)) == sorted(f"r{i}" for i in range(5))
    assert not list((settings.inbox_dir / ".processing").glob("*.jsonl"))
    assert len(list((settings.inbox_dir / "archive").rglob("*.jsonl"))) == 1


def test_large_file_is_read_in_bounded_batches_and_archived_once(settings: Settings) -> None:
    inbox = FileInbox(settings.inbox_dir)
    inbox.put(payloads(25))
    batches = []
    report = ingest_pending(inbox, writer(settings), batch_size=10, on_batch=batches.append)
    assert [b.read for b in batches] == [10, 10, 5]
    assert report.new == 25
    assert len(list((settings.inbox_dir / "archive").rglob("*.jsonl"))) == 1


def test_blank_lines_are_skipped_and_sources_name_file_and_line(settings: Settings) -> None:
    settings.inbox_dir.mkdir(parents=True)
    body = b"\n" + line(make_event("a")) + b"\n\n" + b"garbage\n"
    (settings.inbox_dir / "x.jsonl").write_bytes(body)
    batch = next(FileInbox(settings.inbox_dir).batches(100))
    assert batch.sources == ["inbox:x.jsonl:2", "inbox:x.jsonl:4"]


def test_empty_file_is_archived(settings: Settings) -> None:
    settings.inbox_dir.mkdir(parents=True)
    (settings.inbox_dir / "empty.jsonl").write_bytes(b"")
    assert list(FileInbox(settings.inbox_dir).batches(10)) == []
    assert len(list((settings.inbox_dir / "archive").rglob("*.jsonl"))) == 1


def test_commit_failing_while_the_next_batch_is_read_ahead_loses_and_doubles_nothing(
    settings: Settings,
) -> None:
    """The inbox reads ahead: batch N+1 is claimed and validated while N commits. A commit that
    fails there stops the ingest with every batch before it committed and acked, and the rest
    (the failed batch and the one read ahead) still claimed; the next ingest finishes the job."""
    inbox = FileInbox(settings.inbox_dir)
    for name in "abc":
        inbox.put(payloads(10, prefix=name))  # three files of 10 → six batches of 5
    reports = []
    with pytest.raises(RuntimeError, match="database unavailable"):
        ingest_pending(inbox, failing_on_open(settings, 5), batch_size=5, on_batch=reports.append)
    assert [r.new for r in reports] == [5, 5, 5]
    assert len(stored_ids(settings)) == 15
    # File a is done and archived; b (half committed, half failed) and c (read ahead) are claimed.
    assert len(list((settings.inbox_dir / "archive").rglob("*.jsonl"))) == 1
    assert len(list((settings.inbox_dir / ".processing").glob("*.jsonl"))) == 2

    report = ingest_pending(FileInbox(settings.inbox_dir), writer(settings), batch_size=5)
    assert (report.new, report.duplicates) == (15, 5)  # b's first half is replayed as duplicates
    with connect(settings.database, read_only=True) as conn:
        stored_once(conn, [f"{name}{i}" for name in "abc" for i in range(10)])
    assert not list((settings.inbox_dir / ".processing").glob("*.jsonl"))
    assert len(list((settings.inbox_dir / "archive").rglob("*.jsonl"))) == 3


def test_reading_failing_while_a_batch_commits_still_acks_that_batch(settings: Settings) -> None:
    """Batch N commits on the helper thread while N+1 is read; when that read fails, N's commit
    is waited for, acked and counted before the error surfaces (else N comes back as duplicates
    and the run's figures leave it out)."""
    inbox = FileInbox(settings.inbox_dir)
    inbox.put(payloads(5, prefix="a"))
    # Both left claimed by a crashed run, read in name order; the second is a real read fault,
    # a directory where a claimed file should be.
    processing = settings.inbox_dir / ".processing"
    processing.mkdir(exist_ok=True)
    (sent,) = settings.inbox_dir.glob("*.jsonl")
    sent.rename(processing / f"a-{sent.name}")
    (processing / "zz.jsonl").mkdir()
    reports = []
    with pytest.raises(IsADirectoryError):
        ingest_pending(inbox, writer(settings), batch_size=5, on_batch=reports.append)
    assert [r.new for r in reports] == [5]
    assert sorted(stored_ids(settings)) == [f"a{i}" for i in range(5)]
    assert len(list((settings.inbox_dir / "archive").rglob("*.jsonl"))) == 1


def test_which_queues_read_ahead() -> None:
    # Redis acks by deleting the consumer's whole processing list: claiming the next batch into
    # it before the ack would delete that batch too. Inbox and Kafka acks touch only their batch.
    from qe_assets.queues.kafka_queue import KafkaQueue

    assert FileInbox.reads_ahead is True
    assert KafkaQueue.reads_ahead is True
    assert RedisQueue.reads_ahead is False


# --- redis ------------------------------------------------------------------------------------


def test_redis_rpush_by_producer_is_ingested(
    settings: Settings, redis_server: RedisServer, redis_url: str
) -> None:
    # Producers RPUSH JSON strings, as the RAG service does without our library.
    client = redis_server.client()
    client.rpush("quality_events", *payloads(7))
    queue = RedisQueue(redis_url)
    assert queue.depth() == 7
    report = ingest_pending(queue, writer(settings), batch_size=3)
    assert (report.new, report.batches) == (7, 3)
    assert queue.depth() == 0
    assert client.llen("quality_events:processing:default") == 0


CRASH_AFTER_CLAIM = """
import os, sys
from qe_assets.queues import RedisQueue
queue = RedisQueue(sys.argv[1])
for batch in queue.batches(int(sys.argv[2])):
    os._exit(9)  # died holding the batch: read from Redis, nothing committed
"""


def test_redis_crash_after_read_before_commit_then_restart_is_exactly_once(
    settings: Settings, redis_server: RedisServer, redis_url: str
) -> None:
    client = redis_server.client()
    client.rpush("quality_events", *payloads(10))
    crashed = subprocess.run([sys.executable, "-c", CRASH_AFTER_CLAIM, redis_url, "4"], check=False)
    assert crashed.returncode == 9
    assert client.llen("quality_events") == 6
    assert client.llen("quality_events:processing:default") == 4
    report = ingest_pending(RedisQueue(redis_url), writer(settings), batch_size=4)
    assert report.new == 10
    assert sorted(stored_ids(settings)) == sorted(f"r{i}" for i in range(10))
    assert client.llen("quality_events") == 0
    assert client.llen("quality_events:processing:default") == 0


def test_redis_crash_after_commit_before_ack_doubles_nothing(
    settings: Settings, redis_server: RedisServer, redis_url: str
) -> None:
    client = redis_server.client()
    client.rpush("quality_events", *payloads(5), "not json")
    queue = RedisQueue(redis_url)
    batch = next(queue.batches(100))
    with connect(settings.database) as conn:
        from qe_assets.store import ensure_schema

        ensure_schema(conn)
        commit_batch(conn, batch.records, batch.sources)
    # No ack: restart replays the processing list.
    report = ingest_pending(RedisQueue(redis_url), writer(settings), batch_size=100)
    assert (report.new, report.duplicates) == (0, 5)
    with connect(settings.database, read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM raw_events").fetchall()[0][0] == 5
        assert conn.execute("SELECT count(*) FROM rejected_events").fetchall()[0][0] == 1
    assert queue.depth() == 0


def test_redis_down_raises_queue_unavailable() -> None:
    queue = RedisQueue(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.2)
    with pytest.raises(QueueUnavailable, match="unavailable"):
        queue.put(["{}"])
    with pytest.raises(QueueUnavailable):
        list(queue.batches(10))
    with pytest.raises(QueueUnavailable):
        queue.depth()


def test_redis_keeps_order_and_consumers_are_separate(
    redis_url: str, redis_server: RedisServer
) -> None:
    queue = RedisQueue(redis_url, consumer="a")
    queue.put(payloads(3))
    batch = next(queue.batches(2))
    assert [json.loads(r)["request_id"] for r in batch.records] == ["r0", "r1"]
    assert redis_server.client().llen("quality_events:processing:a") == 2
    assert RedisQueue(redis_url, consumer="b").depth() == 1  # b sees only the unclaimed one
