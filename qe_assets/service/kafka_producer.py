"""Producers send one Kafka message per event, keyed by `request_id`, and wait for the broker's
acks; `qe_assets.ingest.queues.kafka_queue` adds the ingester's consumer on top. Imported only when
QE_QUEUE_URL is a `kafka://` URL; `confluent-kafka` is an optional dependency
(`pip install 'qe-capture[kafka]'` or `'qe_assets[kafka]'`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import confluent_kafka as ck

from qe_assets.service.config import SettingsError, kafka_environment, parse_kafka_url
from qe_assets.service.producers import QueueUnavailable

_LOG = logging.getLogger("qe_assets.ingest.queues.kafka")


def _request_key(payload: str) -> bytes | None:
    # Re-sends of a request must land in one partition, so "first one wins" sees them in order.
    try:
        request_id = json.loads(payload).get("request_id")
    except (ValueError, AttributeError):
        return None
    return request_id.encode() if isinstance(request_id, str) else None


def _serve_while_idle(queue_ref: weakref.ref[KafkaProducer]) -> None:
    """Serve an idle producer's statistics and log lines, which otherwise pile up in memory
    until the next put (a RAG service may go hours between low-score answers). Never during a
    put, so its flush alone serves its delivery reports; ends with the queue object."""
    while (queue := queue_ref()) is not None:
        with queue._serving:
            if queue._producer is not None:
                queue._producer.poll(0)
        del queue
        time.sleep(1.0)


class KafkaProducer:
    name = "kafka"

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        target = parse_kafka_url(url)
        self._target = target
        self.topic = target.topic
        self.timeout = timeout
        secrets = kafka_environment(environ)
        base: dict[str, Any] = {
            "bootstrap.servers": target.bootstrap_servers,
            # librdkafka's own log (reconnects, broker errors) into Python logging, hence into
            # the Dagster run log, instead of bare lines on stderr.
            "logger": _LOG,
            **target.common,
            **secrets,
        }
        self._producer_config: dict[str, Any] = {
            # Retries after a lost ack must not write a message twice, nor reorder a partition.
            "enable.idempotence": True,
            "acks": "all",
            # A put waits `timeout` for its deliveries; the messages themselves live longer. A
            # message timing out on an idempotent producer stalls the ones after it (epoch bump),
            # and one delivered after its put gave up is a duplicate, which ingest absorbs.
            "message.timeout.ms": 60_000,
            # Only for warm_up: the statistics say when the producer id is assigned.
            "statistics.interval.ms": 1_000,
            "stats_cb": self._producer_stats,
            **base,
            **target.producer,
        }
        self._producer_state: str | None = None
        self._base = base
        self._producer: ck.Producer | None = None
        # Held while something serves the producer's callbacks (see _serve_while_idle).
        self._serving = threading.Lock()

    @staticmethod
    def _misconfigured(exc: ck.KafkaException) -> SettingsError:
        # Building a client never touches the network: what fails there is its configuration.
        return SettingsError(
            f"the Kafka client refused its configuration (QE_QUEUE_URL's query parameters and "
            f"QE_KAFKA_* variables): {exc.args[0].str()}"
        )

    def _unavailable(self, exc: BaseException | str) -> QueueUnavailable:
        return QueueUnavailable(f"kafka topic {self.topic!r} unavailable: {exc}")

    def _producer_client(self) -> ck.Producer:
        if self._producer is None:
            try:
                self._producer = ck.Producer(self._producer_config)
            except ck.KafkaException as exc:
                raise self._misconfigured(exc) from exc
            threading.Thread(
                target=_serve_while_idle, args=(weakref.ref(self),), daemon=True
            ).start()
        return self._producer

    def _producer_stats(self, stats: str) -> None:
        self._producer_state = json.loads(stats).get("eos", {}).get("idemp_state")

    def warm_up(self, budget: float = 3.0) -> None:
        """Wait (at most `budget` seconds) until the producer holds its idempotent producer id.

        librdkafka asks for the id once it knows the broker behind the bootstrap address, about
        half a second after start; a put before that waits for it, which a request path's short
        timeout cannot afford.
        """
        # A configuration the client refuses raises here (SettingsError), at start-up.
        with contextlib.suppress(QueueUnavailable, ck.KafkaException):
            producer = self._producer_client()
            if str(self._producer_config["enable.idempotence"]).lower() not in ("true", "1"):
                producer.list_topics(self.topic, timeout=budget)  # just connect
                return
            deadline = time.monotonic() + budget
            while self._producer_state != "Assigned" and time.monotonic() < deadline:
                with self._serving:
                    producer.poll(0.05)

    def put(self, payloads: Sequence[str]) -> int:
        """Send the payloads and wait until the broker has them all.

        Not atomic as a group: when this raises, part of the group may have been delivered; the
        caller's retry (or its inbox spool) then re-sends those, and the ingester takes them as
        duplicates of the same request_id.
        """
        if not payloads:
            return 0
        producer = self._producer_client()
        failures: list[str] = []

        def delivered(error: ck.KafkaError | None, _message: ck.Message) -> None:
            if error is not None:
                failures.append(str(error))

        deadline = time.monotonic() + self.timeout
        with self._serving:  # this put's flush alone serves its delivery reports
            try:
                for payload in payloads:
                    while True:
                        try:
                            key = _request_key(payload)
                            producer.produce(
                                self.topic, payload.encode(), key, on_delivery=delivered
                            )
                            break
                        except BufferError:  # the local queue is full: let deliveries drain it
                            if time.monotonic() > deadline:
                                raise
                            producer.poll(0.1)
                undelivered = producer.flush(max(deadline - time.monotonic(), 0.0))
            except (ck.KafkaException, BufferError) as exc:
                raise self._unavailable(exc) from exc
        if undelivered or failures:
            problem = failures[0] if failures else f"{undelivered} not delivered in time"
            raise self._unavailable(f"{len(failures) or undelivered} of {len(payloads)}: {problem}")
        return len(payloads)
