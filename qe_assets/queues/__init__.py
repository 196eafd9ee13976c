"""Queue backends behind one interface: the embedded file inbox and a Redis list."""

from __future__ import annotations

from qe_assets.queues.base import Batch, EventQueue, QueueUnavailable
from qe_assets.queues.inbox import FileInbox, write_atomically
from qe_assets.queues.redis_queue import RedisQueue
from qe_assets.settings import Settings

__all__ = [
    "Batch",
    "EventQueue",
    "FileInbox",
    "QueueUnavailable",
    "RedisQueue",
    "open_queue",
    "write_atomically",
]


def open_queue(settings: Settings) -> EventQueue:
    """The configured queue: Redis when QE_QUEUE_URL is set, else the file inbox."""
    if settings.queue_url:
        return RedisQueue(settings.queue_url, consumer=settings.queue_consumer)
    return FileInbox(settings.inbox_dir)
