"""Queue backends behind one interface: the embedded file inbox, a Redis list, a Kafka topic.

The broker clients (redis, confluent_kafka) are imported only when that queue is opened (or
`RedisQueue` is named), so a producer on the file inbox loads neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qe_assets.ingest.queues.base import Backlog, Batch, EventQueue, QueueUnavailable
from qe_assets.ingest.queues.inbox import FileInbox, write_atomically
from qe_assets.settings import Settings

if TYPE_CHECKING:
    from qe_assets.ingest.queues.redis_queue import RedisQueue

__all__ = [
    "Backlog",
    "Batch",
    "EventQueue",
    "FileInbox",
    "QueueUnavailable",
    "RedisQueue",
    "durability_warning",
    "open_queue",
    "write_atomically",
]


def __getattr__(name: str) -> Any:
    if name == "RedisQueue":
        from qe_assets.ingest.queues.redis_queue import RedisQueue

        return RedisQueue
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def durability_warning(queue: EventQueue) -> str | None:
    """Why `queue` may lose events it accepted, or None. Only a Redis server can be configured
    to (no append-only file); the inbox fsyncs, and Kafka's producer waits for acks=all."""
    if queue.name != "redis":  # only a RedisQueue is named so; no redis import for the others
        return None
    from qe_assets.ingest.queues.redis_queue import RedisQueue

    return queue.durability_warning() if isinstance(queue, RedisQueue) else None


def open_queue(settings: Settings, *, timeout: float | None = None) -> EventQueue:
    """The configured queue: Redis or Kafka as QE_QUEUE_URL says, else the file inbox.

    `timeout` bounds each call to the broker (producers on a request path want it short).
    """
    url = settings.queue_url
    if not url:
        return FileInbox(settings.inbox_dir)
    if url.startswith("kafka://"):
        # confluent-kafka is optional: imported only when the queue is Kafka.
        from qe_assets.ingest.queues.kafka_queue import KafkaQueue

        return KafkaQueue(url, consumer=settings.queue_consumer, timeout=timeout or 10.0)
    from qe_assets.ingest.queues.redis_queue import RedisQueue

    return RedisQueue(url, consumer=settings.queue_consumer, socket_timeout=timeout or 5.0)
