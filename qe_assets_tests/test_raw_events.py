"""raw_events through real Dagster materializations against a temp DuckDB file."""

from __future__ import annotations

import json

import dagster as dg

from qe_assets.ingest.assets import raw_events
from qe_assets.ingest.queues import FileInbox, RedisQueue
from qe_assets.ops.definitions import build_resources
from qe_assets.settings import Settings
from qe_assets.store import connect
from qe_assets_tests.factories import line, make_event
from qe_assets_tests.test_events import BAD_INPUTS


def materialize(settings: Settings) -> dict:
    """The metadata of raw_events and rejected_events (one step writes both), merged."""
    result = dg.materialize([raw_events], resources=build_resources(settings))
    assert result.success
    events = result.get_asset_materialization_events()
    assert {e.materialization.asset_key.to_user_string() for e in events} == {
        "raw_events",
        "rejected_events",
    }
    return {k: v.value for e in events for k, v in e.materialization.metadata.items()}


def rows(settings: Settings, query: str) -> list[tuple]:
    with connect(settings.database, read_only=True) as conn:
        return conn.execute(query).fetchall()


def test_materialize_ingests_inbox_with_metadata_and_is_idempotent(settings: Settings) -> None:
    inbox = FileInbox(settings.inbox_dir)
    inbox.put([line(make_event(f"r{i}")).decode() for i in range(20)])
    meta = materialize(settings)
    assert meta["new_rows"] == 20
    assert meta["total_rows"] == 20
    assert meta["rejected"] == 0
    assert meta["queue_depth_left"] == 0
    # Nothing new: a re-run changes nothing.
    meta = materialize(settings)
    assert (meta["new_rows"], meta["total_rows"], meta["records_read"]) == (0, 20, 0)


def test_resend_is_a_duplicate_and_conflict_is_rejected(settings: Settings) -> None:
    inbox = FileInbox(settings.inbox_dir)
    original = make_event("r1")
    inbox.put([line(original).decode()])
    materialize(settings)
    inbox.put(
        [
            json.dumps(dict(reversed(list(original.items())))),  # same content, other key order
            line(make_event("r1", answer="a different answer")).decode(),
        ]
    )
    meta = materialize(settings)
    assert (meta["new_rows"], meta["duplicates"], meta["rejected"]) == (0, 1, 1)
    assert rows(settings, "SELECT answer FROM raw_events") == [("You have 14 days.",)]
    (reason,) = rows(settings, "SELECT reason FROM rejected_events")[0]
    assert "conflicting duplicate" in reason


def test_bad_input_suite_lands_in_rejected_events_and_nothing_valid_is_lost(
    settings: Settings,
) -> None:
    valid = [line(make_event(f"ok{i}")) for i in range(5)]
    bad = [raw for _, raw, _, _ in BAD_INPUTS]
    settings.inbox_dir.mkdir(parents=True)
    (settings.inbox_dir / "mixed.jsonl").write_bytes(
        b"\n".join(valid[:2] + bad + valid[2:]) + b"\n"
    )
    meta = materialize(settings)
    assert meta["new_rows"] == 5
    assert meta["rejected"] == len(BAD_INPUTS)
    got = rows(settings, "SELECT source, field, reason FROM rejected_events ORDER BY source")
    fields = {source: field for source, field, _ in got}
    for offset, (case, _, field, _) in enumerate(BAD_INPUTS):
        assert fields[f"inbox:mixed.jsonl:{offset + 3}"] == field, case
    # Replaying the same file (an operator copies it back in) adds nothing anywhere.
    (archived,) = (settings.inbox_dir / "archive").rglob("mixed.jsonl")
    archived.rename(settings.inbox_dir / "mixed.jsonl")
    meta = materialize(settings)
    assert (meta["new_rows"], meta["duplicates"]) == (0, 5)
    assert rows(settings, "SELECT count(*) FROM raw_events") == [(5,)]
    assert rows(settings, "SELECT count(*) FROM rejected_events") == [(len(BAD_INPUTS),)]


def test_big_document_extras_and_non_bmp_text_round_trip_through_duckdb(
    settings: Settings,
) -> None:
    big = "数据" * 300_000 + "🦆"  # > 1 MB of UTF-8
    event = make_event(
        "big",
        question="𠀀𝔘 ok?",
        docs=[{"id": "d", "content": big, "url": "https://kb/1"}],
        tenant={"name": "acme", "tier": [1, 2]},
    )
    FileInbox(settings.inbox_dir).put([line(event).decode()])
    materialize(settings)
    ((question, content, meta, extra),) = rows(
        settings, "SELECT question, docs[1].content, docs[1].meta, extra FROM raw_events"
    )
    assert question == "𠀀𝔘 ok?"
    assert content == big
    assert json.loads(meta) == {"url": "https://kb/1"}
    assert json.loads(extra) == {"tenant": {"name": "acme", "tier": [1, 2]}}


def test_redis_queue_and_spooled_inbox_are_both_drained(settings: Settings, redis_url: str) -> None:
    settings = settings.model_copy(update={"queue_url": redis_url})
    RedisQueue(redis_url).put([line(make_event(f"q{i}")).decode() for i in range(4)])
    FileInbox(settings.inbox_dir).put([line(make_event("spooled")).decode()])
    meta = materialize(settings)
    assert meta["new_rows"] == 5
    assert meta["queue_depth_left"] == 0
    assert rows(settings, "SELECT count(*) FROM raw_events WHERE source LIKE 'redis:%'") == [(4,)]


def test_columns_users_query_are_present(settings: Settings) -> None:
    FileInbox(settings.inbox_dir).put([line(make_event("r1")).decode()])
    materialize(settings)
    with connect(settings.database, read_only=True) as conn:
        columns = {r[0] for r in conn.execute("DESCRIBE raw_events").fetchall()}
        rejected_columns = {r[0] for r in conn.execute("DESCRIBE rejected_events").fetchall()}
    assert {
        "request_id",
        "question",
        "docs",
        "answer",
        "evaluation",
        "score",
        "labels",
        "timestamp",
        "ingested_at",
    } <= columns
    assert {"source", "payload", "reason", "rejected_at"} <= rejected_columns
