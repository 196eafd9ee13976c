"""The importers' mapping core (`qe_assets.imports.mapping`): pure, so checked directly."""

from __future__ import annotations

import pytest

from qe_assets.imports.mapping import Judgement, Rules, Span, Trace, decide, event_line
from qe_assets.settings import Settings, SettingsError


def rules(**over: object) -> Rules:
    base = Rules.from_settings(
        Settings(import_evaluators={"relevance": "higher", "hallucination": "lower"}), "phoenix"
    )
    return Rules(**{**base.__dict__, **over})  # type: ignore[arg-type]


def trace(judgements: list[Judgement], **root_attributes: object) -> Trace:
    root = Span(
        "r1",
        "CHAIN",
        "2026-12-01T08:00:00+00:00",
        {"input.value": "问?", "output.value": "答。", **root_attributes},
    )
    retriever = Span(
        "s2",
        "RETRIEVER",
        "2026-12-01T08:00:01+00:00",
        {
            "retrieval.documents.1.document.id": "b",
            "retrieval.documents.1.document.content": "B",
            "retrieval.documents.0.document.id": "a",
            "retrieval.documents.0.document.content": "A",
            "retrieval.documents.0.document.score": 0.5,
        },
    )
    return Trace("phoenix", "p", "t1", root, [root, retriever], judgements)


def test_the_worst_judgement_counts_with_its_direction_and_labels_map() -> None:
    decision = decide(
        trace(
            [
                Judgement("relevance", 0.8, "relevant"),
                Judgement(
                    "hallucination", 0.9, "hallucinated", span_id="s3"
                ),  # 1 = bad: counts 0.1
                Judgement("tone", 0.0, "rude"),  # not configured: ignored
            ]
        ),
        rules(),
    )
    assert decision.outcome == "emit" and decision.event is not None
    evaluation = decision.event["evaluation"]
    assert evaluation["score"] == pytest.approx(0.1)
    assert evaluation["labels"] == ["factuality_error"]
    assert set(evaluation["checks"]) == {"relevance", "hallucination"}
    assert decision.event["docs"] == [
        {"id": "a", "content": "A", "score": 0.5},
        {"id": "b", "content": "B"},
    ]
    assert decision.event["request_id"] == "phoenix:t1"


def test_skip_unjudged_and_a_judge_on_several_spans() -> None:
    assert decide(trace([Judgement("relevance", 0.9)]), rules()).outcome == "skip"
    assert decide(trace([Judgement("relevance", None, "meh")]), rules()).outcome == "unjudged"
    assert decide(trace([]), rules()).outcome == "unjudged"
    both = decide(
        trace([Judgement("relevance", 0.3, span_id="a"), Judgement("relevance", 0.2, span_id="b")]),
        rules(),
    )
    assert both.event is not None
    assert set(both.event["evaluation"]["checks"]) == {"relevance", "relevance#2"}


def test_a_missing_request_id_key_is_left_for_the_ingester_to_reject() -> None:
    keyed = rules(request_id_key="app.request_id")
    found = decide(trace([Judgement("relevance", 0.1)], **{"metadata.app.request_id": 7}), keyed)
    assert found.event is not None and found.event["request_id"] == "7"
    missing = decide(trace([Judgement("relevance", 0.1)]), keyed)
    assert missing.event is not None and "request_id" not in missing.event
    assert "QE_IMPORT_REQUEST_ID_KEY" in missing.problems[0]


def test_the_event_text_is_the_same_whatever_the_order_judgements_arrive_in() -> None:
    a, b = Judgement("relevance", 0.3, span_id="x", key="1"), Judgement("relevance", 0.2, key="2")
    first, second = decide(trace([a, b]), rules()), decide(trace([b, a]), rules())
    assert first.event is not None and second.event is not None
    assert event_line(first.event) == event_line(second.event)


def test_bad_import_settings_fail_at_load_naming_the_variable() -> None:
    with pytest.raises(SettingsError, match="QE_IMPORT_EVALUATORS"):
        Settings.from_env({"QE_IMPORT_EVALUATORS": '{"relevance": "up"}'})
    with pytest.raises(SettingsError, match="QE_PHOENIX_URL must not hold credentials"):
        Settings.from_env({"QE_PHOENIX_URL": "http://user:pw@127.0.0.1:6006"})
    with pytest.raises(SettingsError, match="QE_IMPORT_LABEL_MAP"):
        Settings.from_env({"QE_IMPORT_LABEL_MAP": '{"bad": ""}'})
    assert Settings.from_env({"QE_IMPORT_SETTLE": "2m"}).import_settle_seconds == 120


def test_each_source_may_map_its_own_judges_labels_and_request_id_else_the_shared_one() -> None:
    settings = Settings.from_env(
        {
            "QE_IMPORT_EVALUATORS": '{"relevance": "higher"}',
            "QE_IMPORT_LABEL_MAP": '{"irrelevant": "low_relevance"}',
            "QE_IMPORT_REQUEST_ID_KEY": "app.request_id",
            # Langfuse's judge scores 1 = hallucinated, and its labels differ.
            "QE_LANGFUSE_EVALUATORS": '{"hallucination": "lower"}',
            "QE_LANGFUSE_LABEL_MAP": '{"Hallucinated": "factuality_error"}',
        }
    )
    phoenix, langfuse = (Rules.from_settings(settings, s) for s in ("phoenix", "langfuse"))
    assert phoenix.evaluators == {"relevance": "higher"}
    assert phoenix.label_map == {"irrelevant": "low_relevance"}
    assert langfuse.evaluators == {"hallucination": "lower"}
    assert langfuse.label_map == {"hallucinated": "factuality_error"}
    assert phoenix.request_id_key == langfuse.request_id_key == "app.request_id"
    # The same judged trace, read under each source's rules.
    judged = trace([Judgement("hallucination", 0.9, "hallucinated", "made up", "r1")])
    assert decide(judged, phoenix).outcome == "unjudged"  # not a judge Phoenix counts
    emitted = decide(judged, langfuse)
    assert emitted.outcome == "emit" and emitted.event is not None
    assert emitted.event["evaluation"]["labels"] == ["factuality_error"]
    with pytest.raises(SettingsError, match="QE_PHOENIX_EVALUATORS"):
        Settings.from_env({"QE_PHOENIX_EVALUATORS": '{"relevance": "up"}'})
    with pytest.raises(SettingsError, match="QE_LANGFUSE_LABEL_MAP"):
        Settings.from_env({"QE_LANGFUSE_LABEL_MAP": '{"bad": ""}'})
