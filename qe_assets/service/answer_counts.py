"""Answers per model, counted where the RAG service runs and sent through the event queue.

The A/B test needs a low-score *rate*, so every `capture(..., model=…)` call counts, the ones
skipped for a high score included. Counting happens in process (a dict under a lock, no I/O on
the request path); a daemon thread flushes the counts every `QE_COUNT_FLUSH_SECONDS` and once
more at exit, as one *count record* on the same queue the events take (the inbox, Redis or
Kafka), so it works wherever the service runs. Each record has a unique `flush_id`; the ingester
stores it in `answer_counts` keyed by (flush_id, model) with ON CONFLICT DO NOTHING, so a replay
after a crash, a re-send after a lost ack, or two processes flushing at once never count twice.
A process killed before a flush loses that interval's counts (answers and low-score counts
together, so the rate stays unbiased); the events themselves go through `capture` as before.

Part of the light service package: standard library and pydantic only.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import uuid
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

log = logging.getLogger("qe_assets.service.answer_counts")

RECORD_KIND = "answer_counts"
# Count records start with exactly these bytes (the flusher writes them so); anything else on the
# queue is a quality event. A hand-written record in another key order is judged as an event.
RECORD_PREFIX = b'{"qe_record":"' + RECORD_KIND.encode() + b'"'

# The answer_counts columns are BIGINT: a larger count could not be stored, so it is rejected here,
# naming its field, instead of failing the batch it came in (and every replay of it).
BIGINT_MAX = 2**63 - 1
NonNegative = Annotated[StrictInt, Field(ge=0, le=BIGINT_MAX)]


class ModelCount(BaseModel):
    model_config = ConfigDict(extra="forbid")

    answers: NonNegative
    low: NonNegative


class CountRecord(BaseModel):
    """One flush of one process: what `parse_count_record` accepts."""

    model_config = ConfigDict(extra="allow")

    qe_record: StrictStr
    flush_id: Annotated[StrictStr, Field(min_length=1, max_length=200)]
    producer: StrictStr
    threshold: Annotated[float, Field(ge=0.0, le=1.0, strict=True)]
    window_start: datetime
    window_end: datetime
    counts: dict[Annotated[StrictStr, Field(min_length=1)], ModelCount]


class CountRecordError(ValueError):
    """A count record refused: `field` names it apart from the message, since a model name (part
    of a field's path) may itself hold `:` or `.`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _stamp(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


def count_record(
    flush_id: str,
    producer: str,
    threshold: float,
    window_start: datetime,
    window_end: datetime,
    counts: dict[str, list[int]],
) -> str:
    """The JSON line of one flush; `counts` maps model → [answers, low-score answers]."""
    record = {
        "qe_record": RECORD_KIND,
        "flush_id": flush_id,
        "producer": producer,
        "threshold": threshold,
        "window_start": _stamp(window_start),
        "window_end": _stamp(window_end),
        # The queues' freshness look reads `timestamp` off the oldest record.
        "timestamp": _stamp(window_end),
        "counts": {m: {"answers": c[0], "low": c[1]} for m, c in sorted(counts.items())},
    }
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def is_count_record(raw: bytes | str) -> bool:
    head = raw[: len(RECORD_PREFIX)]
    return (head if isinstance(head, bytes) else head.encode()) == RECORD_PREFIX


def _naive_utc(when: datetime, field: str) -> datetime:
    """Naive UTC, as the TIMESTAMP columns hold it; a moment that leaves years 1-9999 when moved
    to UTC is the record's fault, said as a field error (OverflowError would stop the batch)."""
    if when.tzinfo is None:
        return when
    try:
        return when.astimezone(UTC).replace(tzinfo=None)
    except OverflowError:
        raise CountRecordError(field, "outside years 1-9999 in UTC (count record)") from None


def parse_count_record(raw: bytes | str) -> list[dict[str, Any]]:
    """The `answer_counts` rows of one count record (one per model); raises CountRecordError (a
    ValueError) naming the failing field, as rejected_events wants it."""
    try:
        record = CountRecord.model_validate_json(raw)
    except ValidationError as exc:
        item = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in item["loc"]) or "payload"
        raise CountRecordError(loc, f"{item['msg']} (count record)") from None
    if record.qe_record != RECORD_KIND:
        raise CountRecordError("qe_record", f"expected {RECORD_KIND!r} (count record)")
    bad = [m for m, c in record.counts.items() if c.low > c.answers]
    if bad:
        raise CountRecordError(f"counts.{bad[0]}.low", "more low-score answers than answers")

    window_start = _naive_utc(record.window_start, "window_start")
    window_end = _naive_utc(record.window_end, "window_end")
    return [
        {
            "flush_id": record.flush_id,
            "model": model,
            "answers": count.answers,
            "low": count.low,
            "threshold": record.threshold,
            "producer": record.producer,
            "window_start": window_start,
            "window_end": window_end,
        }
        for model, count in record.counts.items()
    ]


class AnswerCounter:
    """Per-model counts of one process, flushed by a daemon thread through `sink`.

    `sink(payload)` delivers one count record or raises; a record that could not be delivered
    is kept (with its flush id) and tried again first at the next flush, so a re-send after a
    delivery that did land is absorbed by the ingester. Safe across `fork`: a child starts with
    empty counts (the parent's are the parent's to send).
    """

    def __init__(
        self,
        sink: Callable[[str], None],
        *,
        threshold: float,
        interval_seconds: float = 5.0,
        producer: str | None = None,
    ) -> None:
        self._sink = sink
        self.threshold = threshold
        self.interval = interval_seconds
        self._producer = producer
        self._reset()
        _COUNTERS.add(self)

    def _reset(self) -> None:
        """A fresh start: at creation and in a forked child. The locks are new too: the parent's
        flush thread may have held one at the fork, and no thread of the child would release
        it."""
        self._lock = threading.Lock()  # guards the counts: held for microseconds
        self._flushing = threading.Lock()  # one flush at a time (the thread, atexit, a caller)
        self._pid = os.getpid()
        self._counts: dict[str, list[int]] = {}
        self._pending: list[str] = []
        self._window_start = datetime.now(UTC)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    @property
    def producer(self) -> str:
        return self._producer or f"{socket.gethostname()}:{os.getpid()}"

    def add(self, model: str, score: float) -> None:
        """Count one answer of `model`; low-score when `score` < the capture threshold."""
        if self._pid != os.getpid():
            self._reset()
        low = 1 if score < self.threshold else 0
        with self._lock:
            count = self._counts.get(model)
            if count is None:
                self._counts[model] = [1, low]
            else:
                count[0] += 1
                count[1] += low
        if self._thread is None:
            self._start()

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=_flush_loop,
                args=(weakref.ref(self), self._stop, self.interval),
                name="qe-answer-counts",
                daemon=True,
            )
            self._thread.start()
        atexit.register(_flush_at_exit, weakref.ref(self))

    def pending(self) -> dict[str, list[int]]:
        """Counts not flushed yet (a copy)."""
        with self._lock:
            return {model: list(count) for model, count in self._counts.items()}

    def flush(self) -> bool:
        """Send what was counted since the last flush; False when delivery failed (kept)."""
        if self._pid != os.getpid():
            self._reset()
        with self._flushing:
            now = datetime.now(UTC)
            with self._lock:
                counts, self._counts = self._counts, {}
                started, self._window_start = self._window_start, now
            if counts:
                flush_id = uuid.uuid4().hex
                self._pending.append(
                    count_record(flush_id, self.producer, self.threshold, started, now, counts)
                )
            while self._pending:
                try:
                    self._sink(self._pending[0])
                except Exception as exc:  # never into the request path nor the thread's death
                    if not self._failing:
                        log.error("answer counts not delivered (kept, retried): %s", exc)
                    self._failing = True
                    return False
                self._pending.pop(0)
            if self._failing:
                log.warning("answer counts delivered again")
                self._failing = False
            return True

    def close(self) -> None:
        """Stop the thread and flush what is left (also run at interpreter exit)."""
        self._stop.set()
        self.flush()


# Every counter of this process, reset in a forked child before any of its threads can run
# (the pid checks in `add` and `flush` remain for a counter used across a fork without them).
_COUNTERS: weakref.WeakSet[AnswerCounter] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for counter in list(_COUNTERS):
        counter._reset()


os.register_at_fork(after_in_child=_reset_after_fork)


def _flush_loop(ref: weakref.ref[AnswerCounter], stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        counter = ref()
        if counter is None:
            return
        counter.flush()
        del counter


def _flush_at_exit(ref: weakref.ref[AnswerCounter]) -> None:
    counter = ref()
    if counter is not None and counter._pid == os.getpid():
        counter.close()
