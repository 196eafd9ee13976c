"""Capture and ingestion: the queue, the producer's threshold and counts, batches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from qe_assets.settings.parsing import (
    COUNT_FLUSH_BOUNDS,
    DEFAULT_CAPTURE_THRESHOLD,
    DEFAULT_COUNT_FLUSH_SECONDS,
    _duration,
    _float,
    _int,
    _queue_url,
    _text,
)

# field name → (environment variable, parser). Defaults live on the model below.
ENVIRONMENT: dict[str, tuple[str, Callable[[str], Any]]] = {
    "queue_url": ("QE_QUEUE_URL", _queue_url),
    "queue_consumer": ("QE_QUEUE_CONSUMER", _text),
    "capture_threshold": ("QE_CAPTURE_THRESHOLD", _float("QE_CAPTURE_THRESHOLD")),
    "count_flush_seconds": (
        "QE_COUNT_FLUSH_SECONDS",
        _float("QE_COUNT_FLUSH_SECONDS", *COUNT_FLUSH_BOUNDS),
    ),
    "ingest_batch_size": ("QE_INGEST_BATCH_SIZE", _int("QE_INGEST_BATCH_SIZE")),
    "max_queue_age_seconds": ("QE_MAX_QUEUE_AGE", _duration("QE_MAX_QUEUE_AGE")),
    "max_reject_share": ("QE_MAX_REJECT_SHARE", _float("QE_MAX_REJECT_SHARE")),
}


class IngestSettings(BaseModel):
    """Capture and ingestion: the queue, the producer's threshold and counts, batches."""

    model_config = ConfigDict(frozen=True)

    queue_url: str | None = Field(
        None,
        description="The event queue. Unset: the file inbox "
        "`$QE_DATA_DIR/inbox/`. `redis://HOST:PORT/DB`: the list `quality_events`. "
        "`kafka://HOST:PORT[,HOST:PORT…][/TOPIC][?property=value…]`: a Kafka topic "
        "(default `quality_events`), see Queues.",
    )
    queue_consumer: str = Field(
        "default",
        description="Names this ingester's Redis processing "
        "list (`quality_events:processing:<name>`) or Kafka consumer group (`qe_assets.<name>`).",
    )
    capture_threshold: float = Field(
        DEFAULT_CAPTURE_THRESHOLD,
        description="`QualityCapture` sends events whose "
        "`score` is below this; the others are skipped.",
    )
    count_flush_seconds: float = Field(
        DEFAULT_COUNT_FLUSH_SECONDS,
        description="How often a producer process sends its per-model answer counts.",
    )
    ingest_batch_size: int = Field(
        5_000,
        description="Records per ingest / annotate transaction; bounds memory "
        "(naive completions, a short answer each, take ten times as many per transaction).",
    )
    max_queue_age_seconds: float = Field(
        3_600.0,
        description="`queue_freshness` warns when the oldest waiting event is older (default 1h).",
    )
    max_reject_share: float = Field(
        0.2,
        description="`reject_share_by_source` warns when a "
        "queue kind's rejected share over the last day is above this.",
    )
