"""The producer half of the queues: put events on the file inbox, a Redis list or a Kafka topic.

The ingester's queues (`qe_assets.ingest.queues`) extend these classes with claiming and acking; a
RAG
service needs only `put`. The Redis and Kafka clients are imported only when that queue is
opened, so a service on the file inbox installs and loads neither.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

# The inbox's file names: producers' stamps, and the ingester's claim stamps.
STAMP_FORMAT = "%Y%m%dT%H%M%S%f"


class QueueUnavailable(RuntimeError):
    """The queue backend cannot be reached; producers decide what to do about it."""


class Producer(Protocol):
    name: str

    def put(self, payloads: Sequence[str]) -> int:
        """Enqueue JSON payloads (one event each) as a group; returns the count."""
        ...

    def warm_up(self) -> None:
        """Connect ahead of the first `put`, so that a request path's first event does not pay
        for it; best effort, a failure shows on `put`."""
        ...


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable: the files' own fsync does not cover it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, rename: readers see all of the file or none of it."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class InboxWriter:
    """Puts events into the file inbox: one new `*.jsonl` file per put, written atomically."""

    name = "inbox"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def warm_up(self) -> None:
        pass  # nothing to connect ahead: a folder

    def _ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, payloads: Sequence[str]) -> int:
        if not payloads:
            return 0
        self._ensure()
        stamp = datetime.now(UTC).strftime(STAMP_FORMAT)
        target = self.root / f"{stamp}-{uuid.uuid4().hex[:12]}.jsonl"
        body = "".join(p if p.endswith("\n") else p + "\n" for p in payloads)
        write_atomically(target, body.encode("utf-8"))
        return len(payloads)
