"""The event model: validation rules, kept extras, label normalisation."""

from __future__ import annotations

import json

import polars as pl
import pytest
from pydantic import TypeAdapter

from qe_assets.ingest import events as events_module
from qe_assets.ingest.events import (
    Doc,
    Evaluation,
    QualityEvent,
    normalised_labels,
    parse_records,
    primary_label,
)
from qe_assets_tests.factories import line, make_event


def parse_one(raw: bytes | str):
    return parse_records([raw], ["test:1"])


def test_valid_event_becomes_one_row_with_defaults_and_extras() -> None:
    event = make_event(tenant="acme", evaluation={"score": 0.5})
    del event["timestamp"]
    parsed = parse_one(line(event))
    assert parsed.rejected.is_empty()
    row = parsed.events.row(0, named=True)
    assert row["request_id"] == "req-1"
    assert row["labels"] == []
    assert json.loads(row["evaluation"]) == {"score": 0.5}  # as the evaluator sent it
    assert row["checks"] == "{}"
    assert json.loads(row["extra"]) == {"tenant": "acme"}
    assert row["timestamp"] is not None  # ingest time when missing
    assert [d["id"] for d in row["docs"]] == ["kb-1", "kb-2"]


def test_request_id_is_trimmed_and_integer_doc_ids_are_text() -> None:
    event = make_event(request_id="  r-7 ", docs=[{"id": 12, "content": "x", "title": "T"}])
    row = parse_one(line(event)).events.row(0, named=True)
    assert row["request_id"] == "r-7"
    assert row["docs"][0]["id"] == "12"
    assert json.loads(row["docs"][0]["meta"]) == {"title": "T"}


def test_fingerprint_ignores_key_order_and_whitespace() -> None:
    event = make_event()
    reordered = dict(reversed(list(event.items())))
    a = parse_one(json.dumps(event)).events["fingerprint"][0]
    b = parse_one(json.dumps(reordered, indent=None, separators=(" , ", " : "))).events[
        "fingerprint"
    ][0]
    assert a == b
    assert parse_one(line(make_event(answer="other"))).events["fingerprint"][0] != a


def _without(key: str) -> dict:
    event = make_event()
    del event[key]
    return event


BAD_INPUTS = [
    ("bad JSON", b'{"request_id": "x", ', "payload", "Invalid JSON"),
    ("bad UTF-8", b'{"request_id": "\xff\xfe"}', "payload", "not valid UTF-8"),
    ("not an object", b"[1, 2]", "payload", "expected a JSON object"),
    ("missing request_id", line(_without("request_id")), "request_id", "Field required"),
    ("empty request_id", line(make_event(request_id="   ")), "request_id", "must not be empty"),
    ("numeric request_id", line(make_event(request_id=5)), "request_id", "valid string"),
    ("missing question", line(_without("question")), "question", "Field required"),
    ("missing answer", line(_without("answer")), "answer", "Field required"),
    ("missing score", line(make_event(evaluation={"labels": []})), "evaluation.score", "required"),
    ("score > 1", line(make_event(evaluation={"score": 1.5})), "evaluation.score", "less than"),
    ("score < 0", line(make_event(evaluation={"score": -0.1})), "evaluation.score", "greater"),
    ("score string", line(make_event(evaluation={"score": "0.4"})), "evaluation.score", "number"),
    (
        "score NaN",
        b'{"request_id":"n","question":"q","docs":[],"answer":"a","evaluation":{"score":NaN}}',
        "evaluation.score",
        "finite",
    ),
    ("score bool", line(make_event(evaluation={"score": True})), "evaluation.score", "number"),
    (
        "labels not list",
        line(make_event(evaluation={"score": 0.1, "labels": "x"})),
        "evaluation.labels",
        "valid array",
    ),
    ("docs not a list", line(make_event(docs={"id": "a"})), "docs", "valid array"),
    ("doc without content", line(make_event(docs=[{"id": "a"}])), "docs.0.content", "required"),
    ("missing docs", line(_without("docs")), "docs", "Field required"),
    ("bad timestamp", line(make_event(timestamp="yesterday")), "timestamp", "ISO-8601"),
    ("numeric timestamp", line(make_event(timestamp=1700000000)), "timestamp", "string"),
    ("missing evaluation", line(_without("evaluation")), "evaluation", "Field required"),
]


@pytest.mark.parametrize(
    ("case", "raw", "field", "words"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS]
)
def test_each_rule_rejects_with_a_reason_naming_the_field(
    case: str, raw: bytes, field: str, words: str
) -> None:
    parsed = parse_one(raw)
    assert parsed.events.is_empty(), case
    assert parsed.rejected.height == 1
    rejected = parsed.rejected.row(0, named=True)
    assert rejected["field"] == field
    assert rejected["reason"].startswith(f"{field}: ")
    assert words.lower() in rejected["reason"].lower()
    assert rejected["source"] == "test:1"
    assert rejected["payload"]  # raw text kept for the user


def test_rejected_records_keep_a_request_id_hint_when_there_is_one() -> None:
    parsed = parse_one(line(make_event(request_id="r-9", evaluation={"score": 3})))
    assert parsed.rejected["request_id"][0] == "r-9"


def test_mixed_batch_keeps_order_and_loses_nothing() -> None:
    records = [line(make_event(f"r{i}")) if i % 3 else b"nope" for i in range(30)]
    parsed = parse_records(records, [f"s:{i}" for i in range(30)])
    assert parsed.events.height + parsed.rejected.height == 30
    assert parsed.events["source"].to_list() == [f"s:{i}" for i in range(30) if i % 3]


def test_large_and_non_bmp_content_survive() -> None:
    big = "检索" * 500_000 + "🦆𝔘"
    parsed = parse_one(line(make_event(docs=[{"id": "big", "content": big}], question="𠀀 what?")))
    row = parsed.events.row(0, named=True)
    assert row["docs"][0]["content"] == big
    assert row["question"] == "𠀀 what?"


@pytest.mark.parametrize(
    ("labels", "normalised", "primary"),
    [
        ([], [], "unspecified"),
        (["overconfidence", "low_relevance"], ["overconfidence", "low_relevance"], "low_relevance"),
        (["相关性低", "事实性错误"], ["low_relevance", "factuality_error"], "factuality_error"),
        ([" Incomplete_Answer "], ["incomplete_answer"], "incomplete_answer"),
        (["可能过度自信"], ["overconfidence"], "overconfidence"),
        (["过度自信"], ["overconfidence"], "overconfidence"),
        (["Format_Error", "格式错误"], ["format_error", "格式错误"], "format_error"),
        (["  ", "回答不完整"], ["incomplete_answer"], "incomplete_answer"),
        (["  "], [], "unspecified"),
    ],
)
def test_label_normalisation_and_priority(
    labels: list[str], normalised: list[str], primary: str
) -> None:
    frame = pl.DataFrame({"labels": [labels]}, schema={"labels": pl.List(pl.String)})
    out = frame.select(normalised_labels(pl.col("labels")).alias("n")).with_columns(
        primary_label(pl.col("n")).alias("p")
    )
    assert out["n"][0].to_list() == normalised
    assert out["p"][0] == primary


@pytest.mark.parametrize(
    ("model", "fields"),
    [
        (QualityEvent, events_module._EventFields),
        (Doc, events_module._DocFields),
        (Evaluation, events_module._EvaluationFields),
    ],
)
def test_fast_validator_declares_the_models_fields(model: type, fields: type) -> None:
    """EVENT_FIELDS (the ingester's TypedDicts) and the models must not drift apart: the same
    fields, the same required ones."""
    schema = TypeAdapter(fields).core_schema
    while schema["type"] != "typed-dict":  # under a definitions wrapper
        schema = schema["schema"]
    required = {name: field.get("required", True) for name, field in schema["fields"].items()}
    assert required == {name: info.is_required() for name, info in model.model_fields.items()}
