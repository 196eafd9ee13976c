"""Kafka topic as the queue, against a real Kafka-protocol broker process (see `KafkaBroker`):
claim, crash before commit, crash after commit before ack, read-ahead, bounded runs, outages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from qe_assets.ingest.assets import commit_batch, ingest_pending
from qe_assets.ingest.queues import QueueUnavailable, open_queue
from qe_assets.ingest.queues.kafka_queue import KafkaQueue
from qe_assets.service.capture import CaptureStatus, QualityCapture
from qe_assets.settings import Settings, SettingsError, kafka_environment, parse_kafka_url
from qe_assets.store import connect, ensure_schema
from qe_assets_tests.conftest import KafkaBroker, free_port
from qe_assets_tests.factories import line, make_event
from qe_assets_tests.runs import failing_on_open, materialize, metadata, stored_once
from qe_assets_tests.test_cli_operations import assert_one_line_error, qe
from qe_assets_tests.test_queues import payloads, stored_ids, writer

# Each message its own batch, so the broker's ListOffsets (and so depth()) is exact; see
# KafkaBroker.
EXACT_DEPTH = {"producer.batch.num.messages": "1"}


def committed(broker: KafkaBroker, topic: str, group: str = "qe_assets.default") -> int:
    """Messages the group has committed, summed over the topic's partitions."""
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        offsets = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        return sum(max(tp.offset, 0) for tp in offsets)
    finally:
        consumer.close()


def test_url_parsing_and_clear_errors() -> None:
    target = parse_kafka_url(
        "kafka://a:9092,b:9093/events.v1?client.id=qe&producer.linger.ms=5&consumer.fetch.wait.max.ms=50"
    )
    assert (target.bootstrap_servers, target.topic) == ("a:9092,b:9093", "events.v1")
    assert target.common == {"client.id": "qe"}
    assert target.producer == {"linger.ms": "5"}
    assert target.consumer == {"fetch.wait.max.ms": "50"}
    assert parse_kafka_url("kafka://[::1]:9092").topic == "quality_events"
    for bad, words in (
        ("kafka:///topic", "at least one HOST:PORT"),
        ("kafka://host/topic", "'host' is not HOST:PORT"),
        ("kafka://h:1/bad topic!", "topic 'bad topic!'"),
        ("kafka://h:1/t?sasl.password=hunter2", "QE_KAFKA_SASL_PASSWORD"),
    ):
        with pytest.raises(SettingsError, match="QE_QUEUE_URL") as err:
            Settings.from_env({"QE_QUEUE_URL": bad})
        assert words in str(err.value)
        assert "hunter2" in bad or "hunter2" not in str(err.value)
    # Secrets come from the environment when the client is built, never from settings.
    assert kafka_environment({"QE_KAFKA_SASL_PASSWORD": "s", "QE_QUEUE_URL": "x"}) == {
        "sasl.password": "s"
    }
    assert Settings.from_env({"QE_QUEUE_URL": "kafka://h:1/t"}).queue_url == "kafka://h:1/t"


def test_client_properties_from_the_url_and_the_environment_reach_librdkafka(
    kafka_broker: KafkaBroker,
) -> None:
    topic = kafka_broker.new_topic(partitions=1)
    queue = KafkaQueue(kafka_broker.url(topic, **{"client.id": "qe-test"}))
    assert queue.put(payloads(1)) == 1
    for url, environ, named in (
        (kafka_broker.url(topic, **{"no.such.property": "1"}), {}, "no.such.property"),
        (kafka_broker.url(topic), {"QE_KAFKA_ACKS": "sometimes"}, "acks"),
    ):
        wrong = KafkaQueue(url, environ=environ)
        with pytest.raises(SettingsError, match="refused its configuration") as err:
            wrong.put(payloads(1))
        assert named in str(err.value)
        with pytest.raises(SettingsError, match=named.replace(".", r"\.")):
            wrong.depth()
    # A producer in the RAG service learns it when it starts, not on a request.
    with pytest.raises(SettingsError, match=r"no\.such\.property"):
        QualityCapture(Settings(queue_url=kafka_broker.url(topic, **{"no.such.property": "1"})))


def test_put_then_ingest_in_bounded_batches_and_commit_offsets(
    settings: Settings, kafka_broker: KafkaBroker
) -> None:
    topic = kafka_broker.new_topic(partitions=3)
    queue = KafkaQueue(kafka_broker.url(topic, **EXACT_DEPTH))
    assert queue.depth() == 0
    assert queue.put(payloads(20)) == 20
    assert queue.depth() == 20
    reports = []
    report = ingest_pending(queue, writer(settings), batch_size=7, on_batch=reports.append)
    assert report.new == 20 and all(r.read <= 7 for r in reports)
    assert sorted(stored_ids(settings)) == sorted(f"r{i}" for i in range(20))
    assert queue.depth() == 0 and committed(kafka_broker, topic) == 20
    with connect(settings.database, read_only=True) as conn:
        sources = [r[0] for r in conn.execute("SELECT source FROM raw_events").fetchall()]
    assert len(set(sources)) == 20
    assert all(s.startswith(f"kafka:{topic}:") and len(s.split(":")) == 4 for s in sources)
    # A second run finds nothing new and reads nothing again.
    assert ingest_pending(queue, writer(settings), batch_size=7).read == 0


def test_messages_from_other_producers_and_bad_records_are_rejected_once(
    settings: Settings, kafka_broker: KafkaBroker
) -> None:
    topic = kafka_broker.new_topic(partitions=1)
    producer = Producer({"bootstrap.servers": kafka_broker.bootstrap})
    for value in (line(make_event("ok")), b"not json", None):
        producer.produce(topic, value=value)
    assert producer.flush(10) == 0
    report = ingest_pending(KafkaQueue(kafka_broker.url(topic)), writer(settings), batch_size=10)
    assert (report.new, report.rejected) == (1, 2)
    with connect(settings.database, read_only=True) as conn:
        rows = conn.execute("SELECT source, field FROM rejected_events ORDER BY source").fetchall()
    assert rows == [(f"kafka:{topic}:0:1", "payload"), (f"kafka:{topic}:0:2", "payload")]


CRASH_AFTER_CLAIM = """
import os, sys
from qe_assets.ingest.queues.kafka_queue import KafkaQueue
for batch in KafkaQueue(sys.argv[1]).batches(int(sys.argv[2])):
    os._exit(9)  # died holding the batch: read from the broker, nothing committed
"""


def test_crash_after_read_before_commit_then_restart_is_exactly_once(
    settings: Settings, kafka_broker: KafkaBroker
) -> None:
    topic = kafka_broker.new_topic()
    url = kafka_broker.url(topic, **EXACT_DEPTH)
    KafkaQueue(url).put(payloads(10))
    crashed = subprocess.run([sys.executable, "-c", CRASH_AFTER_CLAIM, url, "4"], check=False)
    assert crashed.returncode == 9
    assert committed(kafka_broker, topic) == 0 and KafkaQueue(url).depth() == 10
    report = ingest_pending(KafkaQueue(url), writer(settings), batch_size=4)
    assert (report.new, report.duplicates) == (10, 0)
    with connect(settings.database, read_only=True) as conn:
        stored_once(conn, [f"r{i}" for i in range(10)])
    assert KafkaQueue(url).depth() == 0


def test_crash_after_commit_before_ack_doubles_nothing(
    settings: Settings, kafka_broker: KafkaBroker
) -> None:
    topic = kafka_broker.new_topic(partitions=2)
    url = kafka_broker.url(topic)
    queue = KafkaQueue(url)
    queue.put([*payloads(5), "not json"])
    batches = queue.batches(100)
    batch = next(batches)
    with connect(settings.database) as conn:
        ensure_schema(conn)
        commit_batch(conn, batch.records, batch.sources)
    batches.close()  # no ack: the offsets stay uncommitted
    report = ingest_pending(KafkaQueue(url), writer(settings), batch_size=100)
    assert (report.new, report.duplicates) == (0, 5)
    with connect(settings.database, read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM raw_events").fetchall()[0][0] == 5
        assert conn.execute("SELECT count(*) FROM rejected_events").fetchall()[0][0] == 1
    assert committed(kafka_broker, topic) == 6


def test_commit_failing_while_the_next_batch_is_read_ahead_loses_and_doubles_nothing(
    settings: Settings, kafka_broker: KafkaBroker
) -> None:
    """Kafka reads ahead like the inbox: batch N+1 is read while N commits. A commit that fails
    stops the ingest with every batch before it acked; the next run replays from there."""
    topic = kafka_broker.new_topic(partitions=1)
    url = kafka_broker.url(topic)
    KafkaQueue(url).put(payloads(30))
    reports = []
    with pytest.raises(RuntimeError, match="database unavailable"):
        ingest_pending(
            KafkaQueue(url),
            failing_on_open(settings, 5),
            batch_size=5,
            on_batch=reports.append,
        )
    assert [r.new for r in reports] == [5, 5, 5]
    assert committed(kafka_broker, topic) == 15
    report = ingest_pending(KafkaQueue(url), writer(settings), batch_size=5)
    assert (report.new, report.duplicates) == (15, 0)
    with connect(settings.database, read_only=True) as conn:
        stored_once(conn, [f"r{i}" for i in range(30)])
    assert committed(kafka_broker, topic) == 30


def test_resends_share_a_partition_so_the_first_one_wins(
    settings: Settings, kafka_broker: KafkaBroker
) -> None:
    topic = kafka_broker.new_topic(partitions=4)
    queue = KafkaQueue(kafka_broker.url(topic))
    first = [line(make_event(f"q{i}", answer="first")).decode() for i in range(12)]
    second = [line(make_event(f"q{i}", answer="second")).decode() for i in range(12)]
    queue.put(first)
    queue.put(second)
    report = ingest_pending(queue, writer(settings), batch_size=5)
    assert (report.new, report.rejected) == (12, 12)
    with connect(settings.database, read_only=True) as conn:
        answers = {r[0] for r in conn.execute("SELECT answer FROM raw_events").fetchall()}
        reasons = conn.execute("SELECT DISTINCT field FROM rejected_events").fetchall()
    assert answers == {"first"} and reasons == [("request_id",)]


def test_a_run_stops_at_the_end_it_found_while_producers_keep_sending(
    settings: Settings, kafka_broker: KafkaBroker
) -> None:
    topic = kafka_broker.new_topic(partitions=2)
    url = kafka_broker.url(topic)
    KafkaQueue(url).put(payloads(50, prefix="early"))
    stop = threading.Event()
    sent = 0

    def keep_sending() -> None:
        nonlocal sent
        producer = KafkaQueue(url)
        while not stop.is_set():
            producer.put(payloads(10, prefix=f"late{sent}-"))
            sent += 10
            time.sleep(0.01)

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        started = time.monotonic()
        first = ingest_pending(KafkaQueue(url), writer(settings), batch_size=10)
        took = time.monotonic() - started
    finally:
        stop.set()
        sender.join()
    assert first.new >= 50 and took < 30
    # The next run takes the rest: every message once.
    second = ingest_pending(KafkaQueue(url), writer(settings), batch_size=500)
    assert first.new + second.new == 50 + sent
    assert committed(kafka_broker, topic) == 50 + sent


def test_broker_down_raises_queue_unavailable_and_capture_spools(settings: Settings) -> None:
    url = f"kafka://127.0.0.1:{free_port()}/quality_events"
    queue = KafkaQueue(url, timeout=1.0)
    for call in (lambda: queue.put(["{}"]), lambda: list(queue.batches(10)), queue.depth):
        started = time.monotonic()
        with pytest.raises(QueueUnavailable, match="kafka topic 'quality_events' unavailable"):
            call()
        assert time.monotonic() - started < 15
    capture = QualityCapture(settings.model_copy(update={"queue_url": url}), queue_timeout=1.0)
    result = capture.capture_event(make_event("while-down"))
    assert result.status == CaptureStatus.SPOOLED
    assert json.loads(next(settings.inbox_dir.glob("*.jsonl")).read_bytes())["request_id"] == (
        "while-down"
    )


def test_capture_and_the_pipeline_run_on_kafka(
    settings: Settings, kafka_broker: KafkaBroker
) -> None:
    topic = kafka_broker.new_topic()
    configured = settings.model_copy(update={"queue_url": kafka_broker.url(topic, **EXACT_DEPTH)})
    assert isinstance(open_queue(configured), KafkaQueue)
    capture = QualityCapture(configured)
    statuses = {capture.capture_event(make_event(f"c{i}")).status for i in range(6)}
    assert statuses == {CaptureStatus.ENQUEUED}
    result = materialize(configured, "raw_events")
    meta = metadata(result, "raw_events")
    assert (meta["new_rows"], meta["queue_depth_left"]) == (6, 0)
    assert sorted(stored_ids(configured)) == [f"c{i}" for i in range(6)]


def test_qe_enqueue_status_and_run_on_kafka(tmp_path: Path, kafka_broker: KafkaBroker) -> None:
    topic = kafka_broker.new_topic()
    env = {
        "QE_DATA_DIR": str(tmp_path / "data"),
        "QE_QUEUE_URL": kafka_broker.url(topic, **EXACT_DEPTH),
    }
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join([*(line(make_event(f"k{i}")) for i in range(4)), b"{broken"]))
    enqueued = qe("enqueue", str(events), env=env, code=1)
    assert "enqueued 4 records on the kafka queue; 1 invalid" in enqueued.stdout
    assert "queue (kafka): 4 pending" in qe("status", env=env).stdout
    run = qe("run", env=env)
    assert "raw_events: new_rows=4, duplicates=0, rejected=0, queue_depth_left=0" in run.stdout
    assert "queue (kafka): 0 pending" in qe("status", env=env).stdout

    bad = qe("status", env={**env, "QE_QUEUE_URL": "kafka://broker/topic"}, code=2)
    assert_one_line_error(bad, "QE_QUEUE_URL", "'broker' is not HOST:PORT")


@pytest.mark.parametrize("fault", ["hang", "kill"])
def test_broker_fault_mid_ingest_fails_within_the_timeout_and_doubles_nothing(
    settings: Settings, tmp_path: Path, fault: str
) -> None:
    """SIGSTOP or SIGKILL the broker after a few batches: the ingest must not hang (it raises
    QueueUnavailable within its timeout) and what it committed is stored once. A hung broker
    that comes back is drained by the next run, every event once; a killed one is gone with its
    in-memory topic here (a durable broker would replay past the committed offsets)."""
    broker = KafkaBroker(tmp_path)
    broker.start()
    try:
        topic = broker.new_topic(partitions=2)
        url = broker.url(topic, **EXACT_DEPTH)
        KafkaQueue(url).put(payloads(200))
        assert broker.process is not None
        pid = broker.process.pid
        signal_ = signal.SIGSTOP if fault == "hang" else signal.SIGKILL
        committed_batches = 0

        def fault_after_third(_report: object) -> None:
            nonlocal committed_batches
            committed_batches += 1
            if committed_batches == 3:
                os.kill(pid, signal_)

        started = time.monotonic()
        try:
            with pytest.raises(QueueUnavailable, match="unavailable"):
                ingest_pending(
                    KafkaQueue(url, timeout=2.0),
                    writer(settings),
                    batch_size=20,
                    on_batch=fault_after_third,
                )
            took = time.monotonic() - started
        finally:
            if fault == "hang":
                os.kill(pid, signal.SIGCONT)
        assert took < 20
        stored = stored_ids(settings)
        assert len(stored) == len(set(stored)) and 60 <= len(stored) < 200
        if fault == "kill":
            return
        report = ingest_pending(KafkaQueue(url), writer(settings), batch_size=50)
        with connect(settings.database, read_only=True) as conn:
            stored_once(conn, [f"r{i}" for i in range(200)])
        assert report.new == 200 - len(stored)
        # Right after SIGCONT the broker may not take the last batch's offset commit within the
        # queue's timeout (the ack gives up, bounded): those records are then read once more and
        # recognised as stored. Nothing new, nothing doubled, and then the lag is 0.
        again = ingest_pending(KafkaQueue(url), writer(settings), batch_size=50)
        assert again.new == 0 and again.rejected == 0
        assert KafkaQueue(url).depth() == 0
    finally:
        broker.stop()


def test_an_idle_producer_does_not_pile_up_callbacks(kafka_broker: KafkaBroker) -> None:
    """Statistics (for warm_up) and librdkafka's log lines queue up until someone polls; a RAG
    service may go hours without a put, so the queue serves them while idle."""
    topic = kafka_broker.new_topic(partitions=1)
    queue = KafkaQueue(kafka_broker.url(topic), timeout=0.5)
    queue.warm_up()
    assert queue.put(payloads(1)) == 1
    time.sleep(4.5)  # four statistics intervals
    assert queue._producer is not None and len(queue._producer) <= 1  # messages + unserved ops
    assert queue.put(payloads(1, prefix="later")) == 1
