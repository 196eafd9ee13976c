"""Golden tests of the annotate transform on hand-written events."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from qe_assets.annotate.assets import (
    annotate_config,
    annotated_batch,
    commit_samples,
    read_new_events,
)
from qe_assets.annotate.labels import (
    REVIEW,
    TRAIN,
    AnnotateConfig,
    annotate_events,
    sample_id,
    sample_id_parts,
    select_context,
)
from qe_assets.ingest.events import parse_records
from qe_assets.ingest.queues import FileInbox
from qe_assets.lib.templates import load_templates
from qe_assets.settings import Settings
from qe_assets.store import connect, ensure_schema
from qe_assets_tests.factories import line, make_event
from qe_assets_tests.runs import materialize, metadata


def annotate(*events: dict, config: AnnotateConfig | None = None) -> pl.DataFrame:
    parsed = parse_records([line(e) for e in events], [f"t:{i}" for i in range(len(events))])
    raw = parsed.events.with_row_index("seq", offset=1).with_columns(pl.col("seq").cast(pl.Int64))
    return annotate_events(raw, config or AnnotateConfig(), load_templates())


ZH_EVENT = make_event(
    "zh-1",
    question="年假可以结转到明年吗?",
    docs=[
        {"id": "a", "content": "年假最多结转五天。", "score": 0.31},
        {"id": "b", "content": "病假需要医院证明。"},  # no score: ranks as 0
        {"id": "c", "content": "结转的年假须在三月底前用完。", "score": 0.92},
        {"id": "d", "content": "加班可以调休。", "score": 0.31},
    ],
    answer="不可以结转。",
    evaluation={"score": 0.3, "labels": ["相关性低", "事实性错误"]},
)


def test_chinese_event_golden() -> None:
    row = annotate(ZH_EVENT).row(0, named=True)
    assert row["sample_id"] == "zh-1#factuality_error"
    assert row["label"] == "factuality_error"
    assert row["labels"] == ["low_relevance", "factuality_error"]
    assert row["language"] == "zh"
    # Top 3 by score; the tie at 0.31 keeps retrieval order (a before d).
    assert [d["id"] for d in row["context_docs"]] == ["c", "a", "d"]
    assert row["confidence"] == pytest.approx(0.45)
    assert row["route"] == REVIEW
    assert row["route_reason"] == "confidence 0.45 below gate 0.6"
    instruction = load_templates().instructions["zh"]["factuality_error"]
    assert row["instruction"] == instruction
    assert row["prompt"] == (
        "[资料1] <<<结转的年假须在三月底前用完。>>>\n"
        "[资料2] <<<年假最多结转五天。>>>\n"
        "[资料3] <<<加班可以调休。>>>\n\n"
        f"{instruction}\n\n"
        "# 问题\n年假可以结转到明年吗?"
    )


def test_english_event_golden_with_truncation_and_train_route() -> None:
    event = make_event(
        "en-1",
        docs=[{"id": "long", "content": "x" * 800, "score": 0.5}],
        evaluation={"score": 0.5, "labels": [" Overconfidence "]},
    )
    row = annotate(event).row(0, named=True)
    assert (row["label"], row["language"], row["route"]) == ("overconfidence", "en", TRAIN)
    assert row["confidence"] == pytest.approx(0.75)
    assert row["route_reason"] is None
    assert len(row["context_docs"][0]["content"]) == 500
    instruction = load_templates().instructions["en"]["overconfidence"]
    assert row["prompt"] == (
        f"[Document 1] <<<{'x' * 500}>>>\n\n{instruction}\n\n"
        "# Question\nHow many days do I have to request a refund?"
    )


def test_confidence_is_capped_and_gate_is_inclusive() -> None:
    high = annotate(make_event("h", evaluation={"score": 0.9})).row(0, named=True)
    assert high["confidence"] == 1.0
    gate = annotate(make_event("g", evaluation={"score": 0.4})).row(0, named=True)
    assert gate["confidence"] == pytest.approx(0.6) and gate["route"] == TRAIN


def test_unknown_and_missing_labels_and_no_docs() -> None:
    frame = annotate(
        make_event("u", evaluation={"score": 0.5, "labels": ["Format_Error", "style"]}),
        make_event("n", docs=[], evaluation={"score": 0.5}),
    )
    unknown, none = frame.rows(named=True)
    assert unknown["label"] == "format_error"
    assert unknown["instruction"] == load_templates().instructions["en"]["default"]
    assert none["label"] == "unspecified" and none["sample_id"] == "n#unspecified"
    assert none["prompt"].startswith(load_templates().instructions["en"]["default"])


def test_settings_change_k_truncation_factor_gate_and_language() -> None:
    config = AnnotateConfig(
        top_k=1, max_chars=4, confidence_factor=2.0, min_confidence=0.5, language="en"
    )
    row = annotate(ZH_EVENT, config=config).row(0, named=True)
    assert [d["content"] for d in row["context_docs"]] == ["结转的年"]
    assert row["confidence"] == pytest.approx(0.6) and row["route"] == TRAIN
    assert row["language"] == "en" and row["prompt"].startswith("[Document 1] <<<结转的年>>>")


def test_select_context_handles_empty_and_null_scores() -> None:
    frame = pl.DataFrame(
        {"docs": [[], [{"id": "a", "content": "A", "score": None}]]},
        schema={
            "docs": pl.List(pl.Struct({"id": pl.String, "content": pl.String, "score": pl.Float64}))
        },
    )
    out = frame.select(select_context(pl.col("docs"), 3, 10)).to_series().to_list()
    assert out[0] == [] and out[1][0]["id"] == "a"


def test_duplicates_within_batch_and_against_history(tmp_path: Path) -> None:
    """The store keys each sample and points a duplicate at the kept one: the batch's first of a
    dedup_key, or one kept by an earlier batch."""
    same = {"question": "How many days?", "answer": "Two."}
    first = annotate(make_event("a1", **same), make_event("a2", **same), make_event("b"))
    later = annotate(make_event("a3", **same), make_event("c", question="Other?"))
    with connect(tmp_path / "qe.duckdb") as conn:
        ensure_schema(conn)
        written = commit_samples(conn, first, 3, 0.0)
        assert written.height == 3 and written["duplicate_of"].null_count() == 2
        assert commit_samples(conn, later, 5, 0.0).height == 2
        rows = conn.execute(
            "SELECT request_id, duplicate_of, dedup_key = md5(?) FROM annotated_samples "
            "ORDER BY seq",
            [first["dedup_text"][0]],
        ).fetchall()
    kept = first["sample_id"][0]
    assert rows == [
        ("a1", None, True),
        ("a2", kept, True),
        ("b", None, False),
        ("a3", kept, True),
        ("c", None, False),
    ]


def test_dedup_text_ignores_case_and_whitespace_but_not_content() -> None:
    a = make_event("a", question="How  many days?", answer="Two.")
    b = make_event("b", question="how many DAYS? ", answer="two.")
    c = make_event("c", question="How many days?", answer="Three.")
    frame = annotate(a, b, c)
    texts = frame["dedup_text"].to_list()
    assert texts[0] == texts[1] != texts[2]


# --- sample ids: request_id '#' label, injective --------------------------------------------------

# The pair: unescaped, both were `a#b#c` and the second event got no sample.
HASH_PAIR = [
    make_event("a#b", evaluation={"score": 0.5, "labels": ["c"]}),
    make_event("a", evaluation={"score": 0.5, "labels": ["b#c"]}),
]


def test_ids_with_separators_in_either_part_stay_distinct() -> None:
    frame = annotate(*HASH_PAIR, make_event("50%", evaluation={"score": 0.5, "labels": ["x%23"]}))
    assert frame["sample_id"].to_list() == ["a%23b#c", "a#b%23c", "50%25#x%2523"]
    request, label = sample_id_parts(pl.col("sample_id"))
    parts = frame.select(request.alias("request_id"), label.alias("label"))
    assert parts.rows() == [("a#b", "c"), ("a", "b#c"), ("50%", "x%23")]
    assert annotate(ZH_EVENT)["sample_id"].item() == "zh-1#factuality_error"  # ordinary: as was


id_text = st.text(st.sampled_from("#%23ab5x") | st.characters(exclude_categories=("Cs",)))


@hypothesis_settings(max_examples=300, deadline=None)
@given(pairs=st.lists(st.tuples(id_text, id_text), min_size=1, max_size=30, unique=True))
def test_sample_id_encoding_is_injective_and_decodes(pairs: list[tuple[str, str]]) -> None:
    frame = pl.DataFrame(pairs, schema=["request_id", "label"], orient="row")
    ids = frame.select(sample_id(pl.col("request_id"), pl.col("label"))).to_series()
    assert ids.n_unique() == len(pairs)
    request, label = sample_id_parts(pl.col("s"))
    assert ids.to_frame("s").select(request, label.alias("label")).rows() == pairs
    for (rid, lab), encoded in zip(pairs, ids, strict=True):
        if not any(c in rid + lab for c in "#%"):
            assert encoded == f"{rid}#{lab}"


def test_colliding_ids_give_two_samples_and_honest_counts(tmp_path: Path) -> None:
    settings = Settings(data_dir=str(tmp_path / "data"), spot_check_share=0.0)
    FileInbox(settings.inbox_dir).put([line(e).decode() for e in HASH_PAIR])
    result = materialize(
        settings, selection=dg.AssetSelection.assets("raw_events", "annotated_samples")
    )
    with connect(settings.database, read_only=True) as conn:
        ids = sorted(
            r[0] for r in conn.execute("SELECT sample_id FROM annotated_samples").fetchall()
        )
    assert ids == ["a#b%23c", "a%23b#c"]
    meta = metadata(result, "annotated_samples")
    assert meta["new_samples"] == meta["total_samples"] == 2
    assert meta["new_label_counts"] == {"b#c": 1, "c": 1}


def test_a_key_already_stored_is_neither_written_nor_counted_again(tmp_path: Path) -> None:
    settings = Settings(data_dir=str(tmp_path / "data"), spot_check_share=0.0)
    FileInbox(settings.inbox_dir).put([line(e).decode() for e in HASH_PAIR])
    materialize(settings, selection=dg.AssetSelection.assets("raw_events"))
    with connect(settings.database) as conn:
        raw = read_new_events(conn, 0, 10)
        batch = annotated_batch(raw, annotate_config(settings))
        assert commit_samples(conn, batch, 2, 0.0).height == 2
        # The same rows again (a replay): nothing new is written, so nothing is reported.
        assert commit_samples(conn, batch, 2, 0.0).height == 0
        assert conn.execute("SELECT count(*) FROM annotated_samples").fetchall() == [(2,)]
