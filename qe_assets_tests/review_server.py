"""The review page tests' store; the `qe serve` process and HTTP helpers live in
`qe_assets.testing.review_server` (the benchmark uses them too) and are re-exported here."""

from __future__ import annotations

from qe_assets.ingest.queues import FileInbox
from qe_assets.settings import Settings
from qe_assets.testing.review_server import Client, ReviewServer, hidden, in_thread, serving
from qe_assets_tests.runs import materialize, metadata
from qe_assets_tests.test_pipeline import batch


def review_store(
    settings: Settings, low: int, train: int = 4, extra: list[str] | None = None
) -> Settings:
    """`low` samples waiting for review (confidence 0.3), `train` ones not, and `extra` event
    lines; no version cut."""
    settings = settings.model_copy(update={"spot_check_share": 0.0})
    events = batch("t", train) + batch("low", low, score=0.2) + (extra or [])
    FileInbox(settings.inbox_dir).put(events)
    result = materialize(settings, ["raw_events", "annotated_samples", "completions"])
    assert metadata(result, "annotated_samples")["review_queue_size"] >= low
    return settings


__all__ = ["Client", "ReviewServer", "hidden", "in_thread", "review_store", "serving"]
