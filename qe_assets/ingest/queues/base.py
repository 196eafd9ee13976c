"""What every queue backend offers the ingester and the producers."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from qe_assets.service.producers import QueueUnavailable  # noqa: F401 (its home is the service)


@dataclass
class Batch:
    """Records claimed from a queue; `ack` releases them and must run only after they are committed.

    A crash before `ack` leaves the records claimed, and the next `batches()` hands them out again;
    the ingester's idempotency on `request_id` turns that replay into duplicates, not new rows.
    """

    records: list[bytes]
    sources: list[str]
    _ack: Callable[[], None] = field(default=lambda: None, repr=False)
    # Inputs refused unread, as (source, reason): each becomes one rejected_events row with no
    # payload (the file inbox refuses symlinks and other non-regular files this way).
    refused: list[tuple[str, str]] = field(default_factory=list)

    def ack(self) -> None:
        self._ack()

    def __len__(self) -> int:
        return len(self.records)


@dataclass(frozen=True)
class Backlog:
    """What waits in a queue, from one short read: enough for a sensor to decide whether to start
    an ingest run, and for the freshness check to say how long the oldest event has waited."""

    waiting: int  # items waiting, claimed ones included (0 = nothing to do)
    unit: str  # what `waiting` counts: "events", or "files" for the inbox (lines are not read)
    oldest_at: datetime | None = None  # when the oldest waiting item arrived, where it is known


def event_time(payload: bytes | str | None) -> datetime | None:
    """The `timestamp` a producer put on a queued event (UTC), or None when it has none or the
    payload does not parse: only the freshness check uses it, never the ingest."""
    if payload is None:
        return None
    try:
        stamp = json.loads(payload).get("timestamp")
        when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except (ValueError, AttributeError, TypeError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


class EventQueue(Protocol):
    name: str
    # Whether the next batch may be claimed before the previous one is acked; the ingester then
    # commits a batch while it validates the next.
    reads_ahead: bool

    def put(self, payloads: Sequence[str]) -> int:
        """Enqueue JSON payloads (one event each) atomically as a group; returns the count."""
        ...

    def warm_up(self) -> None:
        """Connect ahead of the first `put`, so that a request path's first event does not pay
        for it; best effort, a failure shows on `put`."""
        ...

    def batches(self, max_records: int) -> Iterator[Batch]:
        """Claim pending records, interrupted claims first, in batches of at most `max_records`."""
        ...

    def depth(self) -> int:
        """Records waiting (claimed ones included)."""
        ...

    def backlog(self) -> Backlog:
        """A cheap look at what waits (no record is read in full); raises QueueUnavailable."""
        ...
