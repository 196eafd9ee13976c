"""The event queue as a Dagster resource: where raw_events drains from."""

from __future__ import annotations

import dagster as dg

from qe_assets.ingest.queues import EventQueue, FileInbox, open_queue
from qe_assets.settings import Settings


def drained_queues(settings: Settings) -> list[EventQueue]:
    """Where raw_events drains from: the configured queue, plus the inbox that producers spool
    to when Redis or Kafka is down. Opens nothing until a queue is used."""
    configured = open_queue(settings)
    if isinstance(configured, FileInbox):
        return [configured]
    return [configured, FileInbox(settings.inbox_dir)]


class QueueResource(dg.ConfigurableResource):
    """The event queue, one concern: where events wait (QE_QUEUE_URL, else the file inbox) and
    this ingester's name on it. The settings stay typed and validated in `Settings`; this
    resource carries only the fields the queue needs."""

    queue_url: str | None = None
    queue_consumer: str = "default"
    data_dir: str = "data"

    @classmethod
    def from_settings(cls, settings: Settings) -> QueueResource:
        return cls(
            queue_url=settings.queue_url,
            queue_consumer=settings.queue_consumer,
            data_dir=settings.data_dir,
        )

    def queues(self) -> list[EventQueue]:
        settings = Settings(
            queue_url=self.queue_url, queue_consumer=self.queue_consumer, data_dir=self.data_dir
        )
        return drained_queues(settings)
