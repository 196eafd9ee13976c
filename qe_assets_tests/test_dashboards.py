"""The dashboards the README promises (section *Dashboards*), read from real materializations.

Dagster's *Plots* tab charts numeric metadata over time, and the asset page renders markdown
metadata. So each promise is checked twice: the entry exists with the right kind of value (an int
or float, or markdown), and its number equals what the DuckDB tables and the dataset files say.
The chart is decoded like a browser would: a real PNG with one bar per label, bar lengths in
proportion to the counts.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from PIL import Image

from qe_assets.ingest.queues import FileInbox
from qe_assets.review import decisions as review
from qe_assets.settings import Settings
from qe_assets.store import connect
from qe_assets_tests.factories import line, make_event
from qe_assets_tests.runs import materialize, metadata
from qe_assets_tests.test_pipeline import batch

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BAR_COLOUR = (0x4F, 0x6B, 0xED)  # charts.py draws the bars in #4f6bed
LABELS = ("factuality_error", "incomplete_answer", "low_relevance", "overconfidence")
NUMERIC = (dg.IntMetadataValue, dg.FloatMetadataValue)


@dataclass(frozen=True)
class Run:
    settings: Settings
    result: dg.ExecuteInProcessResult


def raw_metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, dg.MetadataValue]:
    """The typed metadata values (what decides whether the UI plots or renders an entry)."""
    (event,) = [
        e.materialization
        for e in result.get_asset_materialization_events()
        if e.materialization.asset_key == dg.AssetKey(asset)
    ]
    return dict(event.metadata)


def rows(settings: Settings, query: str) -> list[tuple[Any, ...]]:
    with connect(settings.database, read_only=True) as conn:
        return conn.execute(query).fetchall()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """One full materialization shared by the read-only tests below (it is the slow part).

    Inbox content, chosen so every raw_events counter is non-zero and label counts are uneven:
    * 42 train events (score 0.5), labels rotating over four (English and Chinese spellings):
      11, 11, 10, 10;
    * 6 low-score events (score 0.2 → confidence 0.3 → review): 2, 2, 1, 1;
    * 2 malformed lines, and in a second file 5 re-sends (duplicates) plus one request_id
      re-sent with other content (a conflicting duplicate → rejected).
    """
    settings = Settings(
        data_dir=str(tmp_path_factory.mktemp("dashboards") / "data"),
        spot_check_share=0.0,
        eval_share=0.0,  # every sample in the version: the label counts below are exact
    )
    inbox = FileInbox(settings.inbox_dir)
    train = batch("a", 42)
    inbox.put(
        train
        + batch("low", 6, score=0.2)
        + ["{not json", line(make_event("bad-score", evaluation={"score": 2})).decode()]
    )
    inbox.put([*train[:5], line(make_event("a-0", answer="A different answer.")).decode()])
    result = materialize(settings)
    assert result.success
    yield Run(settings, result)


def test_raw_events_counts_new_rows_duplicates_rejected_and_queue_depth(run: Run) -> None:
    meta = raw_metadata(run.result, "raw_events")
    for key in ("new_rows", "duplicates", "rejected", "queue_depth_left", "total_rows"):
        assert isinstance(meta[key], dg.IntMetadataValue), key
    values = metadata(run.result, "raw_events")
    assert (values["new_rows"], values["duplicates"], values["rejected"]) == (48, 5, 3)
    assert values["records_read"] == 48 + 2 + 5 + 1
    # The queue was drained: nothing left in the inbox, and the tables hold what was counted.
    assert values["queue_depth_left"] == 0 == FileInbox(run.settings.inbox_dir).depth()
    ((raw, rejected),) = rows(
        run.settings,
        "SELECT (SELECT count(*) FROM raw_events), (SELECT count(*) FROM rejected_events)",
    )
    rejected_meta = metadata(run.result, "rejected_events")
    assert (values["total_rows"], rejected_meta["rejected_total"]) == (raw, rejected) == (48, 3)
    assert rejected_meta["dagster/row_count"] == rejected
    by_field = dict(rows(run.settings, "SELECT field, count(*) FROM rejected_events GROUP BY 1"))
    assert rejected_meta["rejected_by_field"] == by_field
    assert by_field == {"payload": 1, "evaluation.score": 1, "request_id": 1}


def test_annotated_samples_counts_labels_rate_and_review_queue(run: Run) -> None:
    meta = raw_metadata(run.result, "annotated_samples")
    values = metadata(run.result, "annotated_samples")
    # One numeric entry per label, so each label is its own line on the Plots tab.
    per_label = {k.split("/", 1)[1]: v for k, v in values.items() if k.startswith("new_label/")}
    assert all(isinstance(meta[f"new_label/{label}"], dg.IntMetadataValue) for label in per_label)
    expected = dict(rows(run.settings, "SELECT label, count(*) FROM annotated_samples GROUP BY 1"))
    assert per_label == expected == dict(zip(LABELS, (13, 13, 11, 11), strict=True))
    assert values["new_label_counts"] == expected
    assert (values["new_samples"], values["new_train"], values["new_review"]) == (48, 42, 6)

    # The production rate: all 42 train samples were annotated just now.
    assert isinstance(meta["train_samples_last_hour"], dg.IntMetadataValue)
    assert isinstance(meta["train_samples_per_hour_24h"], dg.FloatMetadataValue)
    assert values["train_samples_last_hour"] == 42
    assert values["train_samples_per_hour_24h"] == round(42 / 24, 2)

    # The review queue: the 6 low-confidence samples, pending.
    assert isinstance(meta["review_queue_size"], dg.IntMetadataValue)
    pending = rows(run.settings, "SELECT count(*) FROM review_queue WHERE status = 'pending'")
    assert values["review_queue_size"] == pending[0][0] == 6
    assert not any(k.startswith("review_kept_share/") for k in values)  # nothing reviewed yet


def test_completions_counts_new_and_totals_per_mode_and_status(run: Run) -> None:
    meta = raw_metadata(run.result, "completions")
    values = metadata(run.result, "completions")
    assert values["mode"] == "naive" and values["new_completions"] == 42
    assert isinstance(meta["total/naive/ok"], dg.IntMetadataValue)
    totals = rows(run.settings, "SELECT mode, status, count(*) FROM completions GROUP BY ALL")
    assert {f"total/{m}/{s}": n for m, s, n in totals} == {
        k: v for k, v in values.items() if k.startswith("total/")
    }


def test_tuning_dataset_label_share_numbers_table_and_chart(run: Run) -> None:
    meta = raw_metadata(run.result, "tuning_dataset")
    values = metadata(run.result, "tuning_dataset")
    version = values["version"]
    counts = dict(
        rows(
            run.settings,
            "SELECT s.label, count(*) FROM dataset_samples d JOIN annotated_samples s "
            f"USING (sample_id) WHERE d.version = '{version}' GROUP BY 1",
        )
    )
    total = sum(counts.values())
    assert counts == dict(zip(LABELS, (11, 11, 10, 10), strict=True)) and values["samples"] == total

    # label_share/<label>: numbers (plotted), one per label, each the label's share, summing to 1.
    shares = {k.split("/", 1)[1]: v for k, v in values.items() if k.startswith("label_share/")}
    assert set(shares) == set(counts)
    for label, share in shares.items():
        assert isinstance(meta[f"label_share/{label}"], dg.FloatMetadataValue)
        assert share == pytest.approx(counts[label] / total, abs=5e-5)  # rounded to 4 places
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
    assert values["label_counts"] == counts

    # The markdown table: a header and one row per label with its count and percentage.
    assert isinstance(meta["label_share"], dg.MarkdownMetadataValue)
    table = values["label_share"].splitlines()
    assert table[0] == "| label | samples | share |"
    table_rows = {}
    for row in table[2:]:
        label, count, share = (cell.strip() for cell in row.strip("|").split("|"))
        table_rows[label] = (int(count), share)
    assert table_rows == {
        label: (count, f"{100 * count / total:.1f}%") for label, count in counts.items()
    }

    # The chart: markdown with an inline PNG that decodes to one bar per label.
    assert isinstance(meta["label_share_chart"], dg.MarkdownMetadataValue)
    match = re.fullmatch(
        r"!\[label share\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", values["label_share_chart"]
    )
    assert match, values["label_share_chart"][:80]
    png = base64.b64decode(match[1], validate=True)
    assert png.startswith(PNG_SIGNATURE) and len(png) > 5_000
    assert_bars_match(png, counts)


def assert_bars_match(png: bytes, counts: dict[str, int]) -> None:
    """Find the bars by their colour: as many as labels, lengths in proportion to the counts."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    width, height = image.size
    assert (width, height) == (600, round(100 * (0.45 * len(counts) + 1.0)))  # charts.py sizes
    pixels = image.load()
    bar_rows = [sum(pixels[x, y] == BAR_COLOUR for x in range(width)) for y in range(height)]
    # Runs of consecutive pixel rows that contain bar colour are the bars (horizontal bars).
    bars: list[int] = []
    inside = False
    for length in bar_rows:
        if length and not inside:
            bars.append(0)
        if length:
            bars[-1] = max(bars[-1], length)
        inside = bool(length)
    assert len(bars) == len(counts), bars
    # The largest label is listed first (at the top), so top to bottom the bars get shorter;
    # lengths scale with the counts (within a pixel or two of anti-aliasing).
    expected = sorted(counts.values(), reverse=True)
    assert bars == sorted(bars, reverse=True)
    for bar, count in zip(bars, expected, strict=True):
        assert bar == pytest.approx(bars[0] * count / expected[0], abs=2)


def test_review_outcomes_become_kept_share_per_label_and_shrink_the_queue(
    settings: Settings,
) -> None:
    # Four low-confidence events, one per label: all wait for a human.
    FileInbox(settings.inbox_dir).put(batch("r", 4, score=0.2))
    up_to_annotate = dg.AssetSelection.assets("raw_events", "annotated_samples")
    first = metadata(materialize(settings, selection=up_to_annotate), "annotated_samples")
    assert first["review_queue_size"] == 4
    # A reviewer acts on three of them through the same functions `qe review` calls.
    with connect(settings.database) as conn:
        ids = dict(conn.execute("SELECT label, sample_id FROM annotated_samples").fetchall())
        review.accept(conn, ids["factuality_error"], "ann")
        review.reject(conn, ids["incomplete_answer"], "ann")
        review.edit(conn, ids["low_relevance"], "A better answer.", "ann")
    result = materialize(settings, selection=dg.AssetSelection.assets("annotated_samples"))
    assert raw_metadata(result, "annotated_samples")["review_queue_size"].value == 1
    # Selected alone, annotated_samples reports nothing for review_queue (the subset).
    assert not [
        e
        for e in result.get_asset_materialization_events()
        if e.materialization.asset_key == dg.AssetKey("review_queue")
    ]
    result = materialize(settings, selection=dg.AssetSelection.assets("review_queue"))
    after = raw_metadata(result, "review_queue")
    assert after["pending"].value == 1
    kept = {k.split("/", 1)[1]: v for k, v in after.items() if k.startswith("review_kept_share/")}
    assert all(isinstance(v, dg.FloatMetadataValue) for v in kept.values())
    assert {label: v.value for label, v in kept.items()} == {
        "factuality_error": 1.0,  # accepted
        "incomplete_answer": 0.0,  # rejected
        "low_relevance": 1.0,  # edited: kept, as a human completion
    }
    assert after["review_outcomes"].value["incomplete_answer"] == {
        "reviewed": 1,
        "kept_share": 0.0,
    }


def test_empty_run_reports_zero_counters_and_cuts_no_version(tmp_path: Path) -> None:
    # An empty run still reports the capture counters (zeros plot as zeros, not as gaps) and
    # tuning_dataset materializes nothing rather than a version without samples.
    settings = Settings(data_dir=str(tmp_path / "data"), spot_check_share=0.0)
    result = materialize(settings)
    values = metadata(result, "raw_events")
    assert (values["new_rows"], values["duplicates"], values["rejected"]) == (0, 0, 0)
    assert values["queue_depth_left"] == 0
    assert metadata(result, "tuning_dataset") == {}
