"""File inbox and Redis queue: atomic hand-over, claim, replay after crashes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from qe_assets.ingest.assets import commit_batch, ingest_pending
from qe_assets.ingest.queues import FileInbox, QueueUnavailable, RedisQueue
from qe_assets.settings import Settings
from qe_assets.store import connect, ensure_schema, table_counts
from qe_assets_tests.conftest import RedisServer, free_port
from qe_assets_tests.factories import line, make_event
from qe_assets_tests.runs import failing_on_open, stored_once
from qe_assets_tests.test_cli import qe


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


def drop(settings: Settings, name: str, lines: list[str]) -> None:
    """A producer that re-uses its file name: write aside, rename into place."""
    settings.inbox_dir.mkdir(parents=True, exist_ok=True)
    tmp = settings.inbox_dir / f".{name}.part"
    tmp.write_text("".join(f"{text}\n" for text in lines))
    os.replace(tmp, settings.inbox_dir / name)


def test_same_name_dropped_while_the_first_is_claimed_is_ingested_once(
    settings: Settings,
) -> None:
    """Issue #15: a crash leaves events.jsonl claimed; the producer drops a new events.jsonl.
    Claiming the new one once replaced the old claimed file, and the old file's ack then
    archived the new one before its batches were committed."""
    inbox = FileInbox(settings.inbox_dir)
    drop(settings, "events.jsonl", [*payloads(10, prefix="a"), "not json a"])
    claiming = inbox.batches(5)
    next(claiming)  # claimed, then the run dies: no commit, no ack
    claiming.close()
    drop(settings, "events.jsonl", [*payloads(20, prefix="b"), "not json b"])
    assert inbox.depth() == 32

    report = ingest_pending(FileInbox(settings.inbox_dir), writer(settings), batch_size=5)
    assert (report.new, report.rejected) == (30, 2)
    with connect(settings.database, read_only=True) as conn:
        stored_once(conn, [f"{p}{i}" for p, n in (("a", 10), ("b", 20)) for i in range(n)])
        sources = dict(conn.execute("SELECT payload, source FROM rejected_events").fetchall())
    # The producer's name is kept in the sources: the first file is replayed first.
    assert sources == {"not json a": "inbox:events.jsonl:11", "not json b": "inbox:events.jsonl:21"}
    assert not list((settings.inbox_dir / ".processing").iterdir())
    archived = sorted(p.name for p in (settings.inbox_dir / "archive").rglob("*.jsonl"))
    assert len(archived) == 2 and "events.jsonl" in archived
    assert inbox.depth() == 0


def start_qe_run(env: dict[str, str], *, log: bool) -> subprocess.Popen[str]:
    """`qe run` in the background; with `log`, its log (stderr) is read by the caller."""
    return subprocess.Popen(
        [sys.executable, "-m", "qe_assets.cli", "run"],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE if log else subprocess.DEVNULL,
        text=True,
    )


def kill_when(run: subprocess.Popen[str], reached: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 120
    while not reached():
        assert run.poll() is None, "the run ended before its kill point"
        assert time.monotonic() < deadline, "the kill point never came"
        time.sleep(0.005)
    run.kill()
    run.wait(timeout=30)


def test_qe_run_killed_twice_around_a_same_named_drop_loses_nothing(tmp_path: Path) -> None:
    """Issue #15 end to end, with real `qe run` processes (counts scaled down 10x): 5,000 of
    12,000 events were stored, and the last run reported new_rows=0."""
    settings = Settings(data_dir=str(tmp_path / "data"))
    env = {"QE_DATA_DIR": settings.data_dir, "QE_INGEST_BATCH_SIZE": "500"}
    processing = settings.inbox_dir / ".processing"
    drop(settings, "events.jsonl", payloads(600, prefix="a"))
    first = start_qe_run(env, log=False)
    kill_when(first, lambda: any(processing.glob("*events.jsonl")))

    drop(settings, "events.jsonl", payloads(1200, prefix="b"))
    second = start_qe_run(env, log=True)
    assert second.stderr is not None
    batch_lines = 0

    def third_batch_logged() -> bool:
        nonlocal batch_lines
        batch_lines += "raw_events - batch of" in second.stderr.readline()
        return batch_lines == 3

    kill_when(second, third_batch_logged)
    last = qe("run", env=env)
    assert "queue_depth_left=0" in last.stdout
    with connect(settings.database, read_only=True) as conn:
        stored_once(conn, [f"{p}{i}" for p, n in (("a", 600), ("b", 1200)) for i in range(n)])
    assert not list(processing.iterdir()) and not list(settings.inbox_dir.glob("*.jsonl"))
    assert len(list((settings.inbox_dir / "archive").rglob("*.jsonl"))) == 2


def test_files_claimed_by_the_previous_layout_are_replayed_first(settings: Settings) -> None:
    # The code before claim stamps kept the producer's name in .processing/.
    processing = settings.inbox_dir / ".processing"
    processing.mkdir(parents=True)
    (processing / "events.jsonl").write_text(payloads(3, prefix="old")[0] + "\n")
    drop(settings, "events.jsonl", payloads(2, prefix="new"))
    batches = list(FileInbox(settings.inbox_dir).batches(10))
    assert [b.sources for b in batches] == [
        ["inbox:events.jsonl:1"],
        ["inbox:events.jsonl:1", "inbox:events.jsonl:2"],
    ]
    assert [json.loads(b.records[0])["request_id"] for b in batches] == ["old0", "new0"]


def test_symlinks_and_other_non_regular_files_are_refused_unread(settings: Settings) -> None:
    """A symlink in the inbox once had its target read: /etc/passwd ended up in
    rejected_events. Now nothing but a regular file is opened; each refused entry is one
    rejected_events row naming it, without content, and moves to archive/refused/."""
    secret = settings.inbox_dir.parent / "secret.txt"
    settings.inbox_dir.mkdir(parents=True)
    secret.write_text("root:SECRET-CONTENT-4711:0:0\n")
    (settings.inbox_dir / "link.jsonl").symlink_to(secret)
    (settings.inbox_dir / "folder.jsonl").mkdir()
    os.mkfifo(settings.inbox_dir / "pipe.jsonl")
    drop(settings, "ok.jsonl", payloads(2))
    inbox = FileInbox(settings.inbox_dir)
    assert inbox.depth() == 5  # one row for each refused entry, and two events

    # The first refusal is committed but the run dies before its ack (the move): refused again,
    # and the row's content key makes that a no-op.
    refusal = next(inbox.batches(10))
    assert (refusal.records, [s for s, _ in refusal.refused]) == ([], ["inbox:folder.jsonl"])
    with connect(settings.database) as conn:
        ensure_schema(conn)
        commit_batch(conn, [], [], refused=refusal.refused)
    for _ in range(2):
        ingest_pending(FileInbox(settings.inbox_dir), writer(settings), batch_size=10)

    with connect(settings.database, read_only=True) as conn:
        rows = conn.execute(
            "SELECT source, payload, field, reason FROM rejected_events ORDER BY source"
        ).fetchall()
        dump = repr([conn.execute(f"SELECT * FROM {t}").fetchall() for t in table_counts(conn)])
    assert [r[:3] for r in rows] == [
        ("inbox:folder.jsonl", "", "file"),
        ("inbox:link.jsonl", "", "file"),
        ("inbox:pipe.jsonl", "", "file"),
    ]
    assert "symbolic link" in rows[1][3] and "not a regular file" in rows[2][3]
    assert "SECRET-CONTENT" not in dump
    assert sorted(stored_ids(settings)) == ["r0", "r1"]
    refused = settings.inbox_dir / "archive" / "refused"
    assert (refused / "link.jsonl").is_symlink() and (refused / "folder.jsonl").is_dir()
    assert secret.read_text() == "root:SECRET-CONTENT-4711:0:0\n"  # untouched
    assert inbox.pending_files() == [] and inbox.depth() == 0


def test_which_queues_read_ahead() -> None:
    # Redis acks by deleting the consumer's whole processing list: claiming the next batch into
    # it before the ack would delete that batch too. Inbox and Kafka acks touch only their batch.
    from qe_assets.ingest.queues.kafka_queue import KafkaQueue

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
from qe_assets.ingest.queues import RedisQueue
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
