"""Kafka topic `quality_events`: producers send one message per event keyed by `request_id`; the
ingester reads every partition from its consumer group's committed offset and commits a batch's
offsets only after the batch is in DuckDB.

A crash before that commit leaves the group's offsets where they were, so the next run reads the
batch again: the claim is the uncommitted offset range, nothing is held on the broker. A run reads
each partition up to the end it had when the run first fetched from it, so a busy topic cannot
keep `raw_events` running for ever; later messages wait for the next run.

`confluent-kafka` is an optional dependency (`pip install 'qe_assets[kafka]'`), imported here only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import confluent_kafka as ck

from qe_assets.ingest.queues.base import Backlog, Batch
from qe_assets.service.kafka_producer import KafkaProducer

_LOG = logging.getLogger("qe_assets.ingest.queues.kafka")
_EOF = ck.KafkaError._PARTITION_EOF


class KafkaQueue(KafkaProducer):
    """The ingester's side of the topic; `put` (what producers do) is `KafkaProducer`'s."""

    # A batch's ack commits only its own offsets, so the next batch may be read before it.
    reads_ahead = True

    def __init__(
        self,
        url: str,
        *,
        consumer: str = "default",
        timeout: float = 10.0,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(url, timeout=timeout, environ=environ)
        self.group = f"qe_assets.{consumer}"
        target, base = self._target, self._base
        self._consumer_config: dict[str, Any] = {
            "group.id": self.group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
            "socket.timeout.ms": int(timeout * 1000),
            **base,
            **target.consumer,
        }

    # --- the ingester ---------------------------------------------------------------------

    def _consumer(self) -> ck.Consumer:
        try:
            return ck.Consumer(self._consumer_config)
        except ck.KafkaException as exc:
            raise self._misconfigured(exc) from exc

    def _start_offsets(self, consumer: ck.Consumer) -> list[ck.TopicPartition]:
        """Every partition of the topic at its committed offset; none when the topic is absent
        (like an empty Redis list: nothing was ever sent)."""
        try:
            topic = consumer.list_topics(self.topic, timeout=self.timeout).topics[self.topic]
            if topic.error is not None:
                if topic.error.code() == ck.KafkaError.UNKNOWN_TOPIC_OR_PART:
                    return []
                raise self._unavailable(topic.error)
            partitions = [ck.TopicPartition(self.topic, p) for p in sorted(topic.partitions)]
            if not partitions:
                return []
            committed = consumer.committed(partitions, timeout=self.timeout)
        except ck.KafkaException as exc:
            raise self._unavailable(exc) from exc
        return [
            ck.TopicPartition(
                self.topic, tp.partition, tp.offset if tp.offset >= 0 else ck.OFFSET_BEGINNING
            )
            for tp in committed
        ]

    def batches(self, max_records: int) -> Iterator[Batch]:
        claim = _Claim(self._consumer(), self)
        consumer = claim.consumer
        try:
            start = self._start_offsets(consumer)
            if not start:
                return
            consumer.assign(start)
            reading = {tp.partition for tp in start}
            # Where this run stops on each partition: its end when the run first fetched from it.
            ends: dict[int, int | None] = {}
            idle_since = time.monotonic()
            records: list[bytes] = []
            sources: list[str] = []
            last: dict[int, int] = {}
            while reading:
                messages = consumer.consume(max_records - len(records), timeout=0.5)
                # Progress is a record or an end of partition; retriable errors repeat while the
                # broker is away and must not keep the run waiting past its timeout.
                if any(m.error() is None or m.error().code() == _EOF for m in messages):
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > self.timeout:
                    raise self._unavailable(f"no reply from the broker in {self.timeout:g} s")
                done: list[int] = []
                for message in messages:
                    partition = message.partition()
                    error = message.error()
                    if error is not None:
                        if error.code() == _EOF:
                            done.append(partition)
                            continue
                        if error.retriable() and not error.fatal():
                            continue
                        raise self._unavailable(error)
                    offset = message.offset()
                    records.append(message.value() or b"")
                    sources.append(f"kafka:{self.topic}:{partition}:{offset}")
                    last[partition] = offset
                    if partition not in ends:
                        tp = ck.TopicPartition(self.topic, partition)
                        high = consumer.get_watermark_offsets(tp, cached=True)[1]
                        ends[partition] = high if high >= 0 else None
                    end = ends[partition]
                    if end is not None and offset + 1 >= end:
                        done.append(partition)
                finished = [p for p in set(done) if p in reading]
                if finished:
                    consumer.pause([ck.TopicPartition(self.topic, p) for p in finished])
                    reading.difference_update(finished)
                if records and (len(records) >= max_records or not reading):
                    yield claim.batch(records, sources, last)
                    records, sources, last = [], [], {}
        finally:
            claim.done_reading()

    def backlog(self) -> Backlog:
        """The consumer lag; how long the oldest message waited is not read (it would mean
        fetching it), so the freshness check says so instead of guessing."""
        return Backlog(self.depth(), "events")

    def depth(self) -> int:
        """Consumer lag: messages after the group's committed offsets, summed over partitions."""
        consumer = self._consumer()
        try:
            lag = 0
            for tp in self._start_offsets(consumer):
                low, high = consumer.get_watermark_offsets(tp, timeout=self.timeout)
                start = low if tp.offset == ck.OFFSET_BEGINNING else max(tp.offset, low)
                lag += max(high - start, 0)
            return lag
        except ck.KafkaException as exc:
            raise self._unavailable(exc) from exc
        finally:
            consumer.close()


class _Claim:
    """The consumer of one `batches()` call. Acks commit through it, and the ingester acks a
    batch after it has read the next one (or the end), so it closes only once reading is over and
    every batch it handed out is acked."""

    def __init__(self, consumer: ck.Consumer, queue: KafkaQueue) -> None:
        self.consumer = consumer
        self.queue = queue
        self.unacked = 0
        self.reading = True
        self.closed = False

    def batch(self, records: list[bytes], sources: list[str], last: dict[int, int]) -> Batch:
        offsets = [ck.TopicPartition(self.queue.topic, p, o + 1) for p, o in last.items()]
        self.unacked += 1
        return Batch(records, sources, lambda: self._ack(offsets))

    def _ack(self, offsets: list[ck.TopicPartition]) -> None:
        # librdkafka's synchronous commit waits without a bound when the broker hangs: wait for it
        # on a daemon thread, up to the queue's timeout. A commit that lands after we gave up is
        # harmless (the batch is in DuckDB); one that never lands replays it as duplicates.
        outcome: list[BaseException | None] = []

        def commit() -> None:
            try:
                self.consumer.commit(offsets=offsets, asynchronous=False)
                outcome.append(None)
            except BaseException as exc:  # handed to the ingester's thread below
                outcome.append(exc)

        worker = threading.Thread(target=commit, name="kafka-offset-commit", daemon=True)
        worker.start()
        worker.join(self.queue.timeout)
        if not outcome:
            self.closed = True  # the commit still holds the consumer: never close it under it
            raise self.queue._unavailable(
                f"the offset commit got no reply in {self.queue.timeout:g} s"
            )
        if isinstance(outcome[0], ck.KafkaException):
            raise self.queue._unavailable(outcome[0]) from outcome[0]
        if outcome[0] is not None:
            raise outcome[0]
        self.unacked -= 1
        self._close_when_idle()

    def done_reading(self) -> None:
        self.reading = False
        self._close_when_idle()

    def _close_when_idle(self) -> None:
        # A batch that is never acked (its commit failed) leaves the consumer to the garbage
        # collector, which closes it; it holds no group membership, as partitions are assigned.
        if not self.reading and self.unacked == 0 and not self.closed:
            self.closed = True
            self.consumer.close()
