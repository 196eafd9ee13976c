"""annotate_pending over many batches: each batch is read ahead and annotated while the one
before commits; the result must not depend on the batch size, and a failure part-way loses and
doubles nothing."""

from __future__ import annotations

import polars as pl
import pytest

from qe_assets.annotate.assets import STAGE, annotate_config, annotate_pending
from qe_assets.ingest.assets import ingest_pending
from qe_assets.ingest.queues import FileInbox
from qe_assets.settings import Settings
from qe_assets.store import connect, select_frame, watermark
from qe_assets_tests.factories import line, make_event
from qe_assets_tests.runs import failing_on_open

EVENTS = 40
# Every fifth event repeats an earlier one's content under a new request_id, often from an
# earlier batch: duplicates must be found across batch boundaries as well as within one.
_COLUMNS = "sample_id, label, route, prompt, question_key, dedup_key, duplicate_of"


def events() -> list[str]:
    lines = []
    for i in range(EVENTS):
        source = i - 9 if i % 5 == 4 and i >= 9 else i
        lines.append(
            line(
                make_event(
                    f"r{i:03d}",
                    question=f"Question {source}?",
                    answer=f"Answer {source}.",
                    evaluation={"score": 0.2 + 0.6 * (i % 2), "labels": ["事实性错误"]},
                )
            ).decode()
        )
    return lines


def ingested(settings: Settings) -> Settings:
    FileInbox(settings.inbox_dir).put(events())
    ingest_pending(FileInbox(settings.inbox_dir), writer(settings), batch_size=1000)
    return settings


def writer(settings: Settings):
    return lambda: connect(settings.database)


def annotated(settings: Settings) -> pl.DataFrame:
    with connect(settings.database, read_only=True) as conn:
        return select_frame(conn, f"SELECT {_COLUMNS} FROM annotated_samples ORDER BY sample_id")


def review_queue(settings: Settings) -> list[str]:
    with connect(settings.database, read_only=True) as conn:
        return [
            r[0] for r in conn.execute("SELECT sample_id FROM review_queue ORDER BY 1").fetchall()
        ]


@pytest.fixture
def one_batch(tmp_path) -> Settings:
    settings = ingested(Settings(data_dir=str(tmp_path / "one"), spot_check_share=0.3))
    annotate_pending(writer(settings), annotate_config(settings), batch_size=1000, spot_share=0.3)
    return settings


def test_batches_of_seven_give_the_rows_of_one_batch(tmp_path, one_batch: Settings) -> None:
    settings = ingested(Settings(data_dir=str(tmp_path / "many"), spot_check_share=0.3))
    sizes: list[int] = []
    done = annotate_pending(
        writer(settings),
        annotate_config(settings),
        batch_size=7,
        spot_share=0.3,
        on_batch=lambda batch: sizes.append(batch.height),
    )
    assert done == EVENTS and sizes == [7, 7, 7, 7, 7, 5]
    expected = annotated(one_batch)
    assert expected["duplicate_of"].is_not_null().sum() == 7
    assert annotated(settings).equals(expected)
    assert review_queue(settings) == review_queue(one_batch)
    with connect(settings.database, read_only=True) as conn:
        assert watermark(conn, STAGE) == EVENTS


def test_failure_part_way_then_rerun_loses_and_doubles_nothing(
    tmp_path, one_batch: Settings
) -> None:
    settings = ingested(Settings(data_dir=str(tmp_path / "many"), spot_check_share=0.3))
    # Open 1 reads batch 1; open N reads batch N and commits batch N-1.
    committed: list[int] = []
    with pytest.raises(RuntimeError, match="database unavailable"):
        annotate_pending(
            failing_on_open(settings, 4),
            annotate_config(settings),
            batch_size=7,
            spot_share=0.3,
            on_batch=lambda batch: committed.append(batch.height),
        )
    assert committed == [7, 7]
    with connect(settings.database, read_only=True) as conn:
        assert watermark(conn, STAGE) == 14
    assert annotated(settings).height == 14

    rest = annotate_pending(
        writer(settings), annotate_config(settings), batch_size=7, spot_share=0.3
    )
    assert rest == EVENTS - 14
    assert annotated(settings).equals(annotated(one_batch))
    assert review_queue(settings) == review_queue(one_batch)
