"""The producer call for the RAG service: one `capture(...)` after each answer.

Policy, in the order it is applied:

1. `score >= threshold` (default 0.7, `QE_CAPTURE_THRESHOLD`): nothing to do → `skipped`.
2. The event breaks CONTRACT §1 → `invalid`, with the field-naming reason; logged as a warning.
3. The configured queue accepts it → `enqueued`.
4. The queue is down (Redis unreachable, timeout) → the event is written to the local file inbox
   (the spool, which the ingester always drains too) → `spooled`; logged as a warning.
5. Even the spool fails (disk full, read-only) → `failed`; logged as an error.

`capture` never raises into the request path: the RAG answer is already on its way to the user,
and a lost quality signal must be visible in logs and in the returned status, not as a 500.

With `model="…"` (which model answered; see `qe_assets.service.rollout`), the call is also
counted per model before the threshold is applied, so skipped answers count too: the A/B test's
denominator. Counts are flushed in the background (`answer_counts`), never one write per answer.

Part of the light service package: standard library and pydantic (and the broker client of the
configured queue), settings from `config.ServiceSettings` only; a test installs it alone.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from qe_assets.service.answer_counts import AnswerCounter
from qe_assets.service.config import ServiceSettings, warn_once
from qe_assets.service.event_model import describe_errors, validate_event
from qe_assets.service.producers import InboxWriter, Producer, QueueUnavailable

log = logging.getLogger("qe_assets.service.capture")


def open_producer(settings: ServiceSettings, *, timeout: float) -> Producer:
    """The producer for QE_QUEUE_URL: Redis or Kafka, else the file inbox; `timeout` bounds each
    call to the broker (a request path wants it short)."""
    url = settings.queue_url
    if not url:
        return InboxWriter(settings.inbox_dir)
    if url.startswith("kafka://"):
        from qe_assets.service.kafka_producer import KafkaProducer

        return KafkaProducer(url, timeout=timeout)
    from qe_assets.service.redis_producer import RedisProducer

    return RedisProducer(url, socket_timeout=timeout)


class CaptureStatus(StrEnum):
    SKIPPED = "skipped"
    ENQUEUED = "enqueued"
    SPOOLED = "spooled"
    INVALID = "invalid"
    FAILED = "failed"


@dataclass(frozen=True)
class CaptureResult:
    status: CaptureStatus
    reason: str | None = None

    @property
    def captured(self) -> bool:
        """True when the event is safely on its way to raw_events."""
        return self.status in (CaptureStatus.ENQUEUED, CaptureStatus.SPOOLED)


class QualityCapture:
    """Holds the queue connection; create one per process and call it after every answer."""

    def __init__(
        self,
        settings: Any = None,
        *,
        queue: Producer | None = None,
        spool: InboxWriter | None = None,
        queue_timeout: float = 0.5,
    ) -> None:
        """`settings`: a `ServiceSettings`, the pipeline's `Settings` (its service fields are
        used), or None to read the service's variables from the environment."""
        self.settings = (
            ServiceSettings.from_env() if settings is None else ServiceSettings.of(settings)
        )
        self.threshold = self.settings.capture_threshold
        if queue is None and self.settings.queue_url:
            # A short timeout: a stalled broker must not stall the user's request.
            queue = open_producer(self.settings, timeout=queue_timeout)
            queue.warm_up()
        self.spool = spool or InboxWriter(self.settings.inbox_dir)
        self.queue: Producer = queue or self.spool
        self.counter = AnswerCounter(
            self._deliver_counts,
            threshold=self.threshold,
            interval_seconds=self.settings.count_flush_seconds,
        )

    def _deliver_counts(self, payload: str) -> None:
        """A count record takes the events' way: the queue, else the spool; raises when both
        fail (the counter keeps the record and tries again)."""
        try:
            self.queue.put([payload])
            return
        except (QueueUnavailable, OSError):
            if self.queue is self.spool:
                raise
        self.spool.put([payload])

    def __call__(
        self,
        *,
        request_id: str,
        question: str,
        docs: list[Mapping[str, Any]],
        answer: str,
        evaluation: Mapping[str, Any],
        timestamp: datetime | str | None = None,
        model: str | None = None,
        **extra: Any,
    ) -> CaptureResult:
        if model is not None:
            extra["model"] = model
        event: dict[str, Any] = {
            "request_id": request_id,
            "question": question,
            "docs": docs,
            "answer": answer,
            "evaluation": evaluation,
            **extra,
        }
        if timestamp is not None:
            event["timestamp"] = timestamp
        return self.capture_event(event)

    def capture_event(self, event: Mapping[str, Any]) -> CaptureResult:
        try:
            return self._capture(dict(event))
        except Exception as exc:  # never into the request path, whatever went wrong
            log.error("quality event not captured: %s: %s", type(exc).__name__, exc)
            return CaptureResult(CaptureStatus.FAILED, f"{type(exc).__name__}: {exc}")

    def _capture(self, event: dict[str, Any]) -> CaptureResult:
        evaluation = event.get("evaluation")
        score = evaluation.get("score") if isinstance(evaluation, Mapping) else None
        numeric = isinstance(score, int | float) and not isinstance(score, bool)
        model = event.get("model")
        if numeric and 0.0 <= score <= 1.0 and isinstance(model, str) and model.strip():
            self.counter.add(model, score)
        if numeric and score >= self.threshold:
            return CaptureResult(CaptureStatus.SKIPPED)
        stamp = event.get("timestamp")
        if stamp is None:
            event["timestamp"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        elif isinstance(stamp, datetime):
            event["timestamp"] = stamp.isoformat()
        try:
            validate_event(event)
            payload = json.dumps(event, ensure_ascii=False)
        except ValidationError as exc:
            reason = describe_errors(exc)[1]
            log.warning("quality event %r not captured: %s", event.get("request_id"), reason)
            return CaptureResult(CaptureStatus.INVALID, reason)
        except (TypeError, ValueError) as exc:  # not JSON-serialisable extras
            log.warning("quality event %r not captured: %s", event.get("request_id"), exc)
            return CaptureResult(CaptureStatus.INVALID, f"payload: {exc}")
        try:
            self.queue.put([payload])
            return CaptureResult(CaptureStatus.ENQUEUED)
        except (QueueUnavailable, OSError) as exc:
            queue_error = str(exc)
        if self.queue is self.spool:
            log.error("quality event %r lost: %s", event["request_id"], queue_error)
            return CaptureResult(CaptureStatus.FAILED, queue_error)
        try:
            self.spool.put([payload])
        except OSError as exc:
            log.error(
                "quality event %r lost: queue down (%s) and spool failed (%s)",
                event["request_id"],
                queue_error,
                exc,
            )
            return CaptureResult(CaptureStatus.FAILED, f"{queue_error}; spool: {exc}")
        log.warning(
            "queue down, quality event %r spooled to %s: %s",
            event["request_id"],
            self.spool.root,
            queue_error,
        )
        return CaptureResult(CaptureStatus.SPOOLED, queue_error)


_default: QualityCapture | None = None
_default_lock = threading.Lock()


def default_capture() -> QualityCapture:
    """The process-wide `QualityCapture`, configured from the environment at first use. When the
    configured queue cannot even be set up (a Kafka configuration its client refuses), events go
    to the file inbox, with one warning."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                try:
                    _default = QualityCapture()
                except Exception as exc:
                    settings = ServiceSettings.from_env()
                    warn_once(
                        ("queue", str(exc)),
                        "the queue could not be set up (%s); quality events go to the file "
                        "inbox %s",
                        exc,
                        settings.inbox_dir,
                    )
                    spool = InboxWriter(settings.inbox_dir)
                    _default = QualityCapture(settings, queue=spool, spool=spool)
    return _default


def capture(**kwargs: Any) -> CaptureResult:
    """Module-level convenience: `default_capture()(**kwargs)`; never raises."""
    try:
        return default_capture()(**kwargs)
    except Exception as exc:  # a wrong argument too: the RAG request must not fail on it
        log.error("quality event not captured: %s: %s", type(exc).__name__, exc)
        return CaptureResult(CaptureStatus.FAILED, f"{type(exc).__name__}: {exc}")
