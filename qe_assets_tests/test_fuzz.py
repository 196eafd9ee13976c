"""Fuzzing the ingester with malformed and adversarial events (hypothesis, real DuckDB files).

Every generated record carries what must happen to it, and the property checks exactly that:

* **valid but adversarial** events (NUL bytes, huge strings, emoji and CJK, escaped or raw UTF-8,
  valid surrogate pairs, duplicate JSON keys whose last value is valid, integer document ids,
  10k-label lists, scores -0.0 / 0 / 1 / 5e-324, floats like 1e308 and 70-bit integers in extra
  fields, nesting up to 150 levels, timestamps with any offset in years 2-9998, padded request
  ids): ingested, and every field read back from raw_events equals the input (the last value of a
  repeated key, request_id trimmed, the timestamp in UTC);
* the same event again, byte for byte or re-serialised with other key order, escaping or
  whitespace: a duplicate; the same request_id with other content: rejected as a conflict;
* **one contract violation** (wrong types, missing fields, blank ids, scores as strings / true /
  null / NaN / ±Infinity / 1e308 / 10^30 / out of range, non-string labels, bad timestamps):
  rejected with exactly that field named first in `field` and in `reason`;
* **broken payloads** (non-UTF-8 bytes, truncated JSON, trailing garbage, a BOM, raw control
  characters, lone surrogate escapes, nesting deeper than the parser's 200 levels, top-level
  arrays/strings/numbers, empty and whitespace-only lines, random bytes): rejected as `payload`.

Each batch mixes all of these, so the property also proves that one bad record never stops the
others, and that new + duplicates + rejected == read. Giant lines (8 MB) and one adversarial file
through the real inbox and `dagster.materialize` are tested separately.

Three inputs once crashed the ingester instead of being rejected, and stay as regression tests
(`test_poison_record_is_rejected_and_does_not_block_the_queue`): nesting deeper than Python's
recursion limit, a timestamp that leaves the calendar when converted to UTC, and a rejected record
whose request_id holds a lone surrogate. The property's valid events stay inside years 2-9998
(a timestamp at the calendar's edge is rightly rejected, so it cannot be generated as valid).

Count records (`{"qe_record":"answer_counts",…}`) share the queue: a second property draws them
with counts around BIGINT's limit, windows at the calendar's edges with offsets, odd thresholds
and texts, and checks that each is stored intact or rejected naming a field, beside an event
that is stored. A record the validator lets through but the store refuses is found by splitting
its batch and rejected alone (`test_a_value_the_store_refuses_is_found_and_rejected_alone`, and on
the real inbox, Redis and Kafka queues `test_unstorable_records_block_no_queue`).

Budget: 60 hypothesis examples by default (mixed batches of up to 14 records, ~400 records,
~10 s), QE_FUZZ_EXAMPLES=N for a longer hunt; the number of records fuzzed is printed at the end
of the module (`pytest -s`).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from qe_assets.ingest.assets import commit_batch, ingest_pending
from qe_assets.ingest.events import EVENT_FIELDS, QualityEvent
from qe_assets.ingest.queues import FileInbox, RedisQueue
from qe_assets.ingest.queues.kafka_queue import KafkaQueue
from qe_assets.settings import Settings
from qe_assets.store import connect, ensure_schema
from qe_assets_tests.factories import make_event
from qe_assets_tests.runs import materialize, metadata

RECEIVED_AT = datetime(2026, 11, 2, 12, 0, 0)
FIELDS = {"request_id", "question", "docs", "answer", "evaluation", "timestamp"}
_ids = itertools.count()
FUZZED = {"records": 0, "batches": 0}
# Each example is one commit_batch (~0.1 s with data generation); raise for a longer hunt.
EXAMPLES = int(os.environ.get("QE_FUZZ_EXAMPLES") or 60)


# --- strategies -------------------------------------------------------------------------------

# No lone surrogates in valid text: they cannot be encoded as UTF-8 (they are tested as escapes).
chars = st.characters(exclude_categories=("Cs",))
text = st.text(chars, max_size=20)
special = st.sampled_from(
    [
        "",
        "\x00",
        "a\x00b",
        "\u2028\u2029",
        "😀👍🏽",
        "年假可以结转吗？",
        "\u202eevil",
        "\ufeffbom",
        '\\"quoted"\\',
        "</script><script>",
        "\r\n\t",
        "\x7f\x1b[31m",
    ]
)
huge = st.builds(
    lambda piece, n: piece * n, st.text(chars, min_size=1, max_size=4), st.integers(2_000, 30_000)
)
string = st.one_of(text, text, special, huge)

json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    text,
)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=6,
)


def nested(depth: int, leaf: Any = "deep") -> Any:
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"n": value}
    return value


extra_value = st.one_of(json_value, st.integers(1, 150).map(nested))
score = st.one_of(
    st.floats(0.0, 1.0), st.sampled_from([0, 1, -0.0, 0.0, 1.0, 5e-324, 0.9999999999999999])
)
offsets = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
# Years 2-9998: at the calendar's edge a time may leave it in UTC, which is a rejection.
moments = st.datetimes(datetime(2, 1, 1), datetime(9998, 12, 31), timezones=st.none() | offsets)


def iso(moment: datetime, zulu: bool, pad: bool) -> str:
    value = moment.isoformat()
    if zulu and moment.utcoffset() == timedelta(0):
        value = value.replace("+00:00", "Z")
    return f" {value} " if pad else value


timestamps = st.builds(iso, moments, st.booleans(), st.booleans())
whitespace = st.sampled_from(["", " ", "\t", "\n ", "\u3000", "\x1c"])


@st.composite
def docs(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": draw(st.one_of(text, st.integers(-(10**30), 10**30))),
        "content": draw(string),
    }
    if draw(st.booleans()):
        doc["score"] = draw(
            st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-5, 5))
        )
    meta = draw(
        st.dictionaries(
            text.filter(lambda k: k not in doc and k not in ("id", "content", "score")),
            json_value,
            max_size=2,
        )
    )
    return {**doc, **meta}


@st.composite
def valid_events(draw: st.DrawFn) -> dict[str, Any]:
    # Fixed width: the id comes from outside the strategy, so its length must not vary, or the
    # lengths drawn from below (a truncation point, say) differ when hypothesis replays a case.
    rid = f"{draw(whitespace)}fz{next(_ids):09d}-{draw(text)}{draw(whitespace)}"
    evaluation: dict[str, Any] = {"score": draw(score)}
    if draw(st.booleans()):
        evaluation["labels"] = draw(
            st.one_of(
                st.none(),
                st.lists(text, max_size=5),
                st.just(["事实性错误", " Factuality_Error "] * 5_000),  # 10k labels
            )
        )
    if draw(st.booleans()):
        evaluation["checks"] = draw(st.none() | st.dictionaries(text, json_value, max_size=3))
    evaluation.update(
        draw(
            st.dictionaries(
                text.filter(lambda k: k not in ("score", "labels", "checks")),
                json_value,
                max_size=2,
            )
        )
    )
    event: dict[str, Any] = {
        "request_id": rid,
        "question": draw(string),
        "docs": draw(st.lists(docs(), max_size=3)),
        "answer": draw(string),
        "evaluation": evaluation,
    }
    if draw(st.booleans()):
        event["timestamp"] = draw(st.none() | timestamps)
    event.update(
        draw(st.dictionaries(text.filter(lambda k: k not in FIELDS), extra_value, max_size=3))
    )
    return event


# A decoy is a wrong value sent first under the same key: JSON's last value wins.
decoys = st.sampled_from([None, 5, "0.4", [], {}, True])


@st.composite
def encode(draw: st.DrawFn, event: dict[str, Any], *, ascii_only: bool | None = None) -> bytes:
    """JSON text with random key order, escaping, spacing and duplicate keys (decoys first)."""
    ascii_only = draw(st.booleans()) if ascii_only is None else ascii_only
    item_sep, key_sep = draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", " : ")]))

    def dump(value: Any) -> str:
        return json.dumps(value, ensure_ascii=ascii_only, separators=(item_sep, key_sep))

    def obj(mapping: dict[str, Any], encoded: dict[str, str]) -> str:
        keys = draw(st.permutations(list(mapping)))
        pairs = []
        for key in keys:
            if draw(st.integers(0, 5)) == 0:
                pairs.append(f"{dump(key)}{key_sep}{dump(draw(decoys))}")
            pairs.append(f"{dump(key)}{key_sep}{encoded.get(key) or dump(mapping[key])}")
        return "{" + item_sep.join(pairs) + "}"

    evaluation = event.get("evaluation")
    encoded = {}
    if isinstance(evaluation, dict):
        encoded["evaluation"] = obj(evaluation, {})
    text_ = obj(event, encoded)
    return text_.encode("utf-8")


@dataclass(frozen=True)
class Case:
    """One record and its fate: accept (with the event), duplicate, conflict or reject(field)."""

    record: bytes
    fate: str
    event: dict[str, Any] | None = None
    field: str | None = None


def _without(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda target: target.pop(key, None)


def _setter(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda target: target.__setitem__(key, value)


@st.composite
def contract_violations(draw: st.DrawFn) -> Case:
    event = draw(valid_events())
    wrong = st.sampled_from([None, 5, 1.5, True, [], {}, ["x"]])
    choice = draw(
        st.sampled_from(
            [
                "request_id",
                "blank_id",
                "question",
                "answer",
                "docs",
                "doc",
                "doc_content",
                "doc_id",
                "doc_score",
                "evaluation",
                "score",
                "labels",
                "label",
                "checks",
                "timestamp",
            ]
        )
    )
    if choice in ("doc", "doc_content", "doc_id", "doc_score") and not event["docs"]:
        event["docs"] = [{"id": "d", "content": "c"}]
    i = draw(st.integers(0, len(event["docs"]) - 1)) if event["docs"] else 0
    evaluation = event["evaluation"]
    missing = draw(st.booleans())
    field = {
        "blank_id": "request_id",
        "doc": f"docs.{i}",
        "doc_content": f"docs.{i}.content",
        "doc_id": f"docs.{i}.id",
        "doc_score": f"docs.{i}.score",
        "score": "evaluation.score",
        "labels": "evaluation.labels",
        "checks": "evaluation.checks",
    }.get(choice, choice)
    if choice in ("request_id", "question", "answer", "docs", "evaluation"):
        if missing:
            del event[choice]
        else:
            values = wrong.filter(lambda v: not (choice == "docs" and isinstance(v, list)))
            if choice == "evaluation":
                values = values.filter(lambda v: not isinstance(v, dict))
            event[choice] = draw(values)
    elif choice == "blank_id":
        event["request_id"] = draw(st.sampled_from(["", " ", "\t\n", "\u3000"]))
    elif choice == "doc":
        event["docs"][i] = draw(st.sampled_from([None, "x", 5, [], True]))
    elif choice == "doc_content":
        (_without("content") if missing else _setter("content", draw(wrong)))(event["docs"][i])
    elif choice == "doc_id":
        event["docs"][i]["id"] = draw(st.sampled_from([None, 1.5, True, [], {}]))
    elif choice == "doc_score":
        event["docs"][i]["score"] = draw(
            st.sampled_from(["0.4", True, math.nan, math.inf, -math.inf, [], {}])
        )
    elif choice == "score":
        bad = st.sampled_from(
            [
                "0.4",
                True,
                False,
                None,
                math.nan,
                math.inf,
                -math.inf,
                1e308,
                -1e-9,
                1.0000001,
                10**30,
                [0.4],
                {"v": 0.4},
            ]
        )
        (_without("score") if missing else _setter("score", draw(bad)))(evaluation)
    elif choice == "labels":
        evaluation["labels"] = draw(st.sampled_from(["factuality_error", {}, 5, True]))
    elif choice == "label":
        labels = [*(evaluation.get("labels") or [])][:3] or ["a"]
        k = draw(st.integers(0, len(labels)))
        labels.insert(k, draw(st.sampled_from([5, None, [], {}, True, 1.5])))
        evaluation["labels"] = labels
        field = f"evaluation.labels.{k}"
    elif choice == "checks":
        evaluation["checks"] = draw(st.sampled_from([[], "x", 5, True]))
    elif choice == "timestamp":
        event["timestamp"] = draw(
            st.sampled_from(
                [5, [], True, "", "yesterday", "2026-13-01T00:00:00Z", "2026-11-01T25:00"]
            )
        )
    return Case(draw(encode(event)), "reject", field=field)


@st.composite
def broken_payloads(draw: st.DrawFn) -> Case:
    event = draw(valid_events())
    good = draw(encode(event, ascii_only=True))
    kind = draw(
        st.sampled_from(
            [
                "non_utf8",
                "truncated",
                "trailing",
                "bom",
                "control",
                "surrogate",
                "not_object",
                "blank",
                "random",
            ]
        )
    )
    if kind == "non_utf8":
        at = draw(st.integers(0, len(good)))
        junk = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80abc", b"\xf8\x88"]))
        record = good[:at] + junk + good[at:]
    elif kind == "truncated":
        record = good[: draw(st.integers(0, len(good) - 1))]
    elif kind == "trailing":
        record = good + draw(st.sampled_from([b" x", b"}", b"\x00", b"{}", b",", b" // c"]))
    elif kind == "bom":
        record = b"\xef\xbb\xbf" + good
    elif kind == "control":
        event["question"] = "line\nbreak"
        record = draw(encode(event, ascii_only=True)).replace(b"line\\nbreak", b"line\nbreak")
    elif kind == "surrogate":
        target = draw(st.sampled_from(["question", "answer", "label", "extra_key", "doc"]))
        lone = draw(st.sampled_from(["\ud800", "\udfff", "x\udbff", "\udc00y"]))
        if target in ("question", "answer"):
            event[target] = lone
        elif target == "label":
            event["evaluation"]["labels"] = ["ok", lone]
        elif target == "extra_key":
            event[lone] = 1
        else:
            event["docs"] = [{"id": "d", "content": lone}]
        record = draw(encode(event, ascii_only=True))
    elif kind == "too_deep":
        # Past the model's 200 levels; deeper than Python's limit is the poison test's.
        event["deep"] = nested(draw(st.integers(250, 600)))
        record = draw(encode(event))
    elif kind == "not_object":
        record = draw(st.sampled_from([b"[]", b"[{}]", b"1", b'"event"', b"null", b"true", b"-0"]))
    elif kind == "blank":
        record = draw(st.sampled_from([b"", b" ", b"\t", b"\r", b"  \t "]))
    else:
        record = draw(st.binary(max_size=300).filter(lambda b: not b.lstrip().startswith(b"{")))
    return Case(record, "reject", field="payload")


@st.composite
def batches(draw: st.DrawFn) -> list[Case]:
    cases: list[Case] = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["valid", "valid", "violation", "broken"]))
        if kind == "valid":
            event = draw(valid_events())
            cases.append(Case(draw(encode(event)), "accept", event=event))
        elif kind == "violation":
            cases.append(draw(contract_violations()))
        else:
            cases.append(draw(broken_payloads()))
    cases = draw(st.permutations(cases)) if len(cases) > 1 else cases
    # Re-sends come after their original: the first arrival of a request_id wins.
    accepted = [c for c in cases if c.fate == "accept"]
    for original in draw(st.lists(st.sampled_from(accepted), max_size=2)) if accepted else []:
        assert original.event is not None
        if draw(st.booleans()):  # the same event again: byte for byte, or re-serialised
            again = original.record if draw(st.booleans()) else draw(encode(original.event))
            cases.append(Case(again, "duplicate", event=original.event))
        else:  # the same request_id with other content
            changed = {**original.event, "answer": f"{original.event['answer']} (changed)"}
            cases.append(Case(draw(encode(changed)), "reject", field="request_id"))
    return cases


# --- what a stored row must equal -------------------------------------------------------------


def utc(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed


def expected_row(event: dict[str, Any]) -> dict[str, Any]:
    evaluation = event["evaluation"]
    extra = {k: v for k, v in event.items() if k not in FIELDS}
    stamp = event.get("timestamp")
    return {
        "request_id": event["request_id"].strip(),
        "question": event["question"],
        "answer": event["answer"],
        "docs": [
            {
                "id": str(doc["id"]),
                "content": doc["content"],
                "score": None if doc.get("score") is None else float(doc["score"]),
                "meta": {k: v for k, v in doc.items() if k not in ("id", "content", "score")}
                or None,
            }
            for doc in event["docs"]
        ],
        "score": float(evaluation["score"]),
        "labels": evaluation.get("labels") or [],
        "checks": evaluation.get("checks") or {},
        "evaluation": evaluation,  # as sent (the last value of a repeated key)
        "timestamp": utc(stamp) if stamp else RECEIVED_AT,
        "extra": extra or None,
    }


def stored_row(conn: duckdb.DuckDBPyConnection, rid: str) -> dict[str, Any] | None:
    rows = conn.execute(
        "SELECT request_id, question, answer, docs, score, labels, checks, evaluation, "
        "timestamp, extra FROM raw_events WHERE request_id = ?",
        [rid],
    ).fetchall()
    if not rows:
        return None
    rid_, question, answer, docs_, score_, labels, checks, evaluation, stamp, extra = rows[0]
    return {
        "request_id": rid_,
        "question": question,
        "answer": answer,
        "docs": [{**d, "meta": json.loads(d["meta"]) if d["meta"] else None} for d in docs_],
        "score": score_,
        "labels": labels,
        "checks": json.loads(checks),
        "evaluation": json.loads(evaluation),
        "timestamp": stamp,
        "extra": json.loads(extra) if extra else None,
    }


# --- the properties ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[duckdb.DuckDBPyConnection]:
    conn = duckdb.connect(str(tmp_path_factory.mktemp("fuzz") / "qe.duckdb"))
    ensure_schema(conn)
    yield conn
    conn.close()
    print(f"\nfuzzed {FUZZED['records']} records in {FUZZED['batches']} batches")


def fast_and_model_agree(record: bytes) -> None:
    """EVENT_FIELDS (plain dicts, the ingester's fast judge) accepts exactly what QualityEvent
    accepts, with the same values."""
    try:
        model: dict[str, Any] | None = QualityEvent.model_validate_json(record).model_dump(
            exclude_unset=True
        )
    except ValidationError:
        model = None
    try:
        fast: dict[str, Any] | None = EVENT_FIELDS.validate_json(record)
    except ValidationError:
        fast = None
    assert fast == model, record[:200]


def check_batch(conn: duckdb.DuckDBPyConnection, cases: list[Case]) -> None:
    for case in cases:
        fast_and_model_agree(case.record)
    tag = next(_ids)
    sources = [f"fuzz:{tag}:{i}" for i in range(len(cases))]
    report = commit_batch(conn, [c.record for c in cases], sources, received_at=RECEIVED_AT)
    FUZZED["records"] += len(cases)
    FUZZED["batches"] += 1

    fates = [c.fate for c in cases]
    assert report.read == len(cases) == report.new + report.duplicates + report.rejected
    assert (report.new, report.duplicates, report.rejected) == (
        fates.count("accept"),
        fates.count("duplicate"),
        fates.count("reject"),
    )
    rejected = {
        source: (field, reason, payload)
        for source, field, reason, payload in conn.execute(
            "SELECT source, field, reason, payload FROM rejected_events WHERE source LIKE ? || '%'",
            [f"fuzz:{tag}:"],
        ).fetchall()
    }
    for case, source in zip(cases, sources, strict=True):
        if case.fate == "reject":
            assert source in rejected, case.record[:200]
            field, reason, payload = rejected[source]
            assert field == case.field, (reason, case.record[:200])
            assert reason.startswith(f"{field}: "), reason
            assert payload == case.record.decode("utf-8", errors="backslashreplace")
        else:
            assert source not in rejected, rejected.get(source)
            assert case.event is not None
            expected = expected_row(case.event)
            assert stored_row(conn, expected["request_id"]) == expected


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
@given(cases=batches())
def test_every_record_is_ingested_intact_or_rejected_naming_a_field(
    fuzz_db: duckdb.DuckDBPyConnection, cases: list[Case]
) -> None:
    check_batch(fuzz_db, cases)


def test_giant_lines(fuzz_db: duckdb.DuckDBPyConnection) -> None:
    event = make_event(f"giant-{next(_ids)}", question="长" * 4_000_000, answer="x" * 2_000_000)
    record = json.dumps(event, ensure_ascii=False).encode()
    assert len(record) > 8_000_000
    check_batch(
        fuzz_db,
        [
            Case(record, "accept", event=event),
            Case(record[:-1], "reject", field="payload"),
            Case(b"x" * 8_000_000, "reject", field="payload"),
        ],
    )


# --- the real inbox and Dagster ---------------------------------------------------------------


def adversarial_lines() -> tuple[list[bytes], int, int]:
    """A file's worth of nasty lines: (lines, how many must be ingested, how many rejected)."""
    good = [
        make_event("adv-nul", question="a\x00b", answer="\x00"),
        make_event("adv-emoji", question="😀" * 10_000, docs=[{"id": 7, "content": "年假"}]),
        make_event("adv-labels", evaluation={"score": -0.0, "labels": ["过度自信"] * 10_000}),
        make_event("adv-deep", deep=nested(150), big=2**70, tiny=5e-324, huge=1e308),
        make_event("  adv-padded  ", timestamp="0002-01-01T00:00:00+14:00"),
    ]
    lines = [json.dumps(e, ensure_ascii=i % 2 == 0).encode() for i, e in enumerate(good)]
    lines.append(b'{"request_id": 5, ' + json.dumps(make_event("adv-dupkey"))[1:].encode())
    bad = [
        json.dumps(make_event("adv-nan")).replace('"score": 0.35', '"score": NaN').encode(),
        json.dumps(make_event("adv-inf")).replace('"score": 0.35', '"score": -Infinity').encode(),
        json.dumps(make_event("adv-str", evaluation={"score": "0.4"})).encode(),
        json.dumps(make_event("adv-big", evaluation={"score": 1e308})).encode(),
        json.dumps(make_event("adv-sur", question="\ud800")).encode(),
        json.dumps(make_event("adv-toodeep", deep=nested(500))).encode(),
        b"\xff\xfe not utf-8",
        b"\xef\xbb\xbf" + json.dumps(make_event("adv-bom")).encode(),
        b'{"request_id": "adv-trunc", "question": "',
        b"\x00\x00\x00",
        b"[1, 2, 3]",
        json.dumps(make_event("adv-nul")).encode(),  # same id, other content: a conflict
    ]
    # Blank and whitespace-only lines are skipped by the inbox, not records.
    return [*lines, b"", b"   ", *bad, b"\t"], len(lines), len(bad)


def test_adversarial_file_through_the_inbox_and_dagster(settings: Settings) -> None:
    lines, good, bad = adversarial_lines()
    settings.inbox_dir.mkdir(parents=True)
    (settings.inbox_dir / "adversarial.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    FUZZED["records"] += len(lines)
    result = materialize(settings, selection=dg.AssetSelection.assets("raw_events"))
    assert result.success
    meta = metadata(result, "raw_events")
    assert (meta["new_rows"], meta["duplicates"], meta["rejected"]) == (good, 0, bad)
    assert meta["records_read"] == good + bad and meta["queue_depth_left"] == 0
    with connect(settings.database, read_only=True) as conn:
        ids = {r[0] for r in conn.execute("SELECT request_id FROM raw_events").fetchall()}
        fields = [r[0] for r in conn.execute("SELECT field FROM rejected_events").fetchall()]
    assert "adv-padded" in ids and "adv-dupkey" in ids and len(ids) == good
    assert sorted(fields) == sorted(["evaluation.score"] * 4 + ["payload"] * 7 + ["request_id"])
    assert not list(settings.inbox_dir.glob("*.jsonl"))


# --- poison records and re-sends (regressions) ------------------------------------------
#
# The crash inputs pad their request_id with a space (documented as harmless: it is trimmed).


def deep_record(request_id: str, depth: int) -> bytes:
    # Written by hand: json.dumps itself cannot encode 2,000 levels.
    head = json.dumps(make_event(request_id))[:-1]
    return f'{head}, "deep": {"[" * depth}{"]" * depth}}}'.encode()


def event_record(request_id: str, **fields: Any) -> bytes:
    return json.dumps(make_event(request_id, **fields)).encode()


POISON = {
    "nesting_2000_levels": deep_record(" poison-deep", 2000),
    "timestamp_past_year_9999_in_utc": event_record(
        " poison-ts", timestamp="9999-12-31T23:59:59-14:00"
    ),
    "timestamp_before_year_1_in_utc": event_record(
        " poison-ts0", timestamp="0001-01-01T00:00:00+01:00"
    ),
    "lone_surrogate_request_id_in_rejected_record": event_record("\udc00poison", question="\ud800"),
}


@pytest.mark.parametrize("name", list(POISON))
def test_poison_record_is_rejected_and_does_not_block_the_queue(
    settings: Settings, name: str
) -> None:
    # Through the real inbox: a crash leaves the file in .processing/, replayed first by every
    # later run, so one bad record would stop all ingestion until someone removes it by hand.
    inbox = FileInbox(settings.inbox_dir)
    ok = [json.dumps(make_event(f"{name}-ok-{i}")) for i in range(2)]
    inbox.put([ok[0], POISON[name].decode(), ok[1]])
    report = ingest_pending(inbox, lambda: connect(settings.database), batch_size=10)
    assert (report.new, report.rejected) == (2, 1)
    assert inbox.depth() == 0


def test_resend_with_other_key_order_inside_nested_json_is_a_duplicate(
    fuzz_db: duckdb.DuckDBPyConnection,
) -> None:
    # Nested JSON (checks, extra, document keys) is fingerprinted with sorted keys; an explicit
    # "checks": null is the same content as no checks at all.
    first = [
        event_record("keys", evaluation={"score": 0.4, "checks": {"a": 1, "b": 2}}),
        event_record("null-checks", evaluation={"score": 0.4}),
    ]
    again = [
        event_record("keys", evaluation={"score": 0.4, "checks": {"b": 2, "a": 1}}),
        event_record("null-checks", evaluation={"score": 0.4, "checks": None}),
    ]
    assert commit_batch(fuzz_db, first, ["f:1", "f:2"]).new == 2
    report = commit_batch(fuzz_db, again, ["g:1", "g:2"])
    assert (report.duplicates, report.rejected) == (2, 0)


# --- count records and values no column can hold (issue #26, item 2) ----------------------------


def count_line(flush_id: str, counts: dict[str, Any], **fields: Any) -> bytes:
    """A count record as the flusher writes it (its key order is how the ingester tells it from an
    event), with `fields` replacing the defaults; values are written as given, big ints too."""
    record = {
        "qe_record": "answer_counts",
        "flush_id": flush_id,
        "producer": "host:1",
        "threshold": 0.5,
        "window_start": "2026-11-02T11:59:00Z",
        "window_end": "2026-11-02T12:00:00Z",
        "counts": counts,
        **fields,
    }
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()


def test_a_count_record_too_big_for_its_column_does_not_block_the_inbox(
    settings: Settings,
) -> None:
    # The record: replayed first by every run, it failed each one (0 of 101 stored).
    inbox = FileInbox(settings.inbox_dir)
    poison = count_line("f-big", {"m": {"answers": 10**20, "low": 1}})
    events = [json.dumps(make_event(f"after-big-{i}")) for i in range(100)]
    inbox.put([poison.decode(), *events])
    report = ingest_pending(inbox, lambda: connect(settings.database), batch_size=500)
    assert (report.read, report.new, report.rejected, report.new_count_rows) == (101, 100, 1, 0)
    assert inbox.depth() == 0
    with connect(settings.database, read_only=True) as conn:
        ((field, reason),) = conn.execute("SELECT field, reason FROM rejected_events").fetchall()
    assert field == "counts.m.answers"
    assert reason.startswith("counts.m.answers: ") and "(count record)" in reason


# Values around every limit a count record's columns have: BIGINT counts, TIMESTAMP windows
# (naive UTC, so an offset can push a moment out of years 1-9999), DOUBLE thresholds, text.
BIG_INTS = [0, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**20, 10**400, -1]
count_ints = st.one_of(st.sampled_from(BIG_INTS), st.integers(min_value=-(2**70), max_value=2**70))
window_stamps = st.one_of(
    st.sampled_from(
        [
            "0001-01-01T00:00:00+01:00",
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59-14:00",
            "9999-12-31T23:59:59Z",
            "2026-11-02T12:00:00+14:00",
            "2026-11-02",
            "not a time",
        ]
    ),
    st.builds(
        iso,
        st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)),
        st.booleans(),
        st.booleans(),
    ),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
)
count_text = st.one_of(text, special)


@st.composite
def count_records(draw: st.DrawFn) -> tuple[bytes, str, dict[str, Any]]:
    """(line, flush_id, counts): one count record with values drawn around its columns' limits."""
    flush_id = f"fuzz-{next(_ids)}"
    models = draw(st.lists(count_text, max_size=3, unique=True))
    counts = {m: {"answers": draw(count_ints), "low": draw(count_ints)} for m in models}
    fields: dict[str, Any] = {}
    if draw(st.booleans()):
        fields["window_start"] = draw(window_stamps)
    if draw(st.booleans()):
        fields["window_end"] = draw(window_stamps)
    if draw(st.booleans()):
        fields["threshold"] = draw(st.one_of(st.floats(), count_ints))
    if draw(st.booleans()):
        fields["producer"] = draw(count_text)
    return count_line(flush_id, counts, **fields), flush_id, counts


RECORD_FIELDS = ("qe_record", "flush_id", "producer", "threshold", "window", "counts", "payload")


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=st.lists(count_records(), min_size=1, max_size=6))
def test_every_count_record_is_stored_or_rejected_naming_its_field(
    fuzz_db: duckdb.DuckDBPyConnection, drawn: list[tuple[bytes, str, dict[str, Any]]]
) -> None:
    # Mixed with an event in the same batch: a count record never takes the event down with it.
    event = make_event(f"beside-counts-{next(_ids)}")
    lines = [line for line, _, _ in drawn] + [json.dumps(event).encode()]
    tag = next(_ids)
    sources = [f"counts:{tag}:{i}" for i in range(len(lines))]
    report = commit_batch(fuzz_db, lines, sources, received_at=RECEIVED_AT)
    FUZZED["records"] += len(lines)
    assert report.new == 1
    for (line, flush_id, counts), source in zip(drawn, sources, strict=False):
        stored = dict(
            (model, (answers, low))
            for model, answers, low in fuzz_db.execute(
                "SELECT model, answers, low FROM answer_counts WHERE flush_id = ?", [flush_id]
            ).fetchall()
        )
        rejected = fuzz_db.execute(
            "SELECT field, reason FROM rejected_events WHERE source = ?", [source]
        ).fetchall()
        too_big = [
            f"counts.{m}.{k}" for m, c in counts.items() for k, v in c.items() if v > 2**63 - 1
        ]
        if stored or (counts == {} and not rejected):
            assert not rejected and not too_big, line[:300]
            assert stored == {m: (c["answers"], c["low"]) for m, c in counts.items()}
            continue
        assert len(rejected) == 1, line[:300]
        ((field, reason),) = rejected
        assert reason.startswith(f"{field}: ") and field.startswith(RECORD_FIELDS), reason


# answer_counts with INTEGER counts, as an operator's copy of the table might have them.
INTEGER_COUNTS = (
    "CREATE TABLE answer_counts (flush_id VARCHAR NOT NULL, model VARCHAR NOT NULL, "
    "answers INTEGER NOT NULL, low INTEGER NOT NULL, threshold DOUBLE NOT NULL, "
    "producer VARCHAR NOT NULL, window_start TIMESTAMP NOT NULL, "
    "window_end TIMESTAMP NOT NULL, source VARCHAR NOT NULL, "
    "ingested_at TIMESTAMP NOT NULL, PRIMARY KEY (flush_id, model))"
)


def test_a_value_the_store_refuses_is_found_and_rejected_alone(tmp_path: Path) -> None:
    # The last line of defence, against a real store: answer_counts made with INTEGER counts (as
    # an operator's copy of the table might be) refuses a count that BIGINT would hold. The
    # validator cannot know; the batch is split until the record is alone, and only it is
    # rejected, with the store's error, while the rest of the batch is committed once.
    database = tmp_path / "qe.duckdb"
    with connect(database) as conn:
        conn.execute(INTEGER_COUNTS)
    inbox = FileInbox(tmp_path / "inbox")
    lines = [json.dumps(make_event(f"around-{i}")) for i in range(7)]
    lines.insert(3, count_line("f-int", {"m": {"answers": 2**40, "low": 0}}).decode())
    lines.insert(5, count_line("f-ok", {"m": {"answers": 5, "low": 1}}).decode())
    inbox.put(lines)
    report = ingest_pending(inbox, lambda: connect(database), batch_size=100)
    assert (report.read, report.new, report.rejected, report.new_count_rows) == (9, 7, 1, 1)
    assert inbox.depth() == 0
    with connect(database, read_only=True) as conn:
        ((field, reason, payload),) = conn.execute(
            "SELECT field, reason, payload FROM rejected_events"
        ).fetchall()
        order = conn.execute("SELECT request_id FROM raw_events ORDER BY seq").fetchall()
    assert field == "payload" and reason.startswith("payload: could not be stored (")
    assert json.loads(payload)["flush_id"] == "f-int"
    assert [r[0] for r in order] == [
        f"around-{i}" for i in range(7)
    ]  # arrival order kept through the split


@pytest.mark.parametrize("kind", ["inbox", "redis", "kafka"])
def test_unstorable_records_block_no_queue(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    # Both kinds of poison on each real queue (Kafka reads ahead: a batch is committed while the
    # next is read, so a split happens beside a batch in flight): a count the validator refuses
    # (10^20) and one only the store refuses (2^40 into an INTEGER column).
    database = tmp_path / "qe.duckdb"
    with connect(database) as conn:
        conn.execute(INTEGER_COUNTS)
    queue: Any
    if kind == "inbox":
        queue = FileInbox(tmp_path / "inbox")
    elif kind == "redis":
        queue = RedisQueue(request.getfixturevalue("redis_url"), key=f"fuzz-{next(_ids)}")
    else:
        broker = request.getfixturevalue("kafka_broker")
        queue = KafkaQueue(broker.url(broker.new_topic(partitions=1)))
    lines = [json.dumps(make_event(f"{kind}-{i}")) for i in range(12)]
    lines.insert(2, count_line("f-big", {"m": {"answers": 10**20, "low": 1}}).decode())
    lines.insert(6, count_line("f-int", {"m": {"answers": 2**40, "low": 0}}).decode())
    lines.insert(9, count_line("f-ok", {"m": {"answers": 5, "low": 1}}).decode())
    queue.put(lines)
    report = ingest_pending(queue, lambda: connect(database), batch_size=4)
    assert (report.read, report.new, report.rejected, report.new_count_rows) == (15, 12, 2, 1)
    assert queue.depth() == 0
    with connect(database, read_only=True) as conn:
        fields = sorted(r[0] for r in conn.execute("SELECT field FROM rejected_events").fetchall())
    assert fields == ["counts.m.answers", "payload"]


def test_a_model_name_with_a_colon_is_named_whole_in_the_field(
    fuzz_db: duckdb.DuckDBPyConnection,
) -> None:
    # Found by the count property: the field was cut at the model name's own `:`.
    line = count_line(f"colon-{next(_ids)}", {"a:b": {"answers": 0, "low": 1}})
    source = f"colon:{next(_ids)}"
    assert commit_batch(fuzz_db, [line], [source]).rejected == 1
    ((field,),) = fuzz_db.execute(
        "SELECT field FROM rejected_events WHERE source = ?", [source]
    ).fetchall()
    assert field == "counts.a:b.low"
