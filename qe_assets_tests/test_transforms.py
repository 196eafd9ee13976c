"""Completions, split, record and chat formats, and the dataset rules: pure transforms."""

from __future__ import annotations

import io
import json

import polars as pl
import pytest

from qe_assets.annotate.assets import redacted_outcomes
from qe_assets.ingest.validation import (
    LabelBounds,
    chat_format_problems,
    label_share_problems,
    record_problems,
    total_variation,
)
from qe_assets.lib.completions import naive_completions
from qe_assets.lib.pii import redacted_label_counts
from qe_assets.lib.templates import load_templates
from qe_assets.release.dataset import (
    assign_split,
    chat_lines,
    exported_sample_ids,
    label_counts,
    records,
    redact_identifiers,
)

T = load_templates()


def test_naive_completion_prefix_per_label_and_language() -> None:
    samples = pl.DataFrame(
        {
            "sample_id": ["a", "b", "c"],
            "language": ["zh", "en", "en"],
            "label": ["factuality_error", "incomplete_answer", "made_up"],
            "original_answer": ["十四天。", "14 days.", "x"],
        }
    )
    out = naive_completions(samples, T).rows(named=True)
    assert out[0]["completion"] == T.naive_prefixes["zh"]["factuality_error"] + "十四天。"
    assert out[1]["completion"] == T.naive_prefixes["en"]["incomplete_answer"] + "14 days."
    assert out[2]["completion"] == T.naive_prefixes["en"]["default"] + "x"
    assert {(r["mode"], r["status"]) for r in out} == {("naive", "ok")}


def test_split_is_deterministic_by_question_and_near_the_share() -> None:
    import hashlib

    keys = [hashlib.md5(f"question {i}".encode()).hexdigest() for i in range(5000)]
    frame = pl.DataFrame({"question_key": keys + keys[:100]})
    split = assign_split(frame, 0.1)["split"].to_list()
    share = split[:5000].count("validation") / 5000
    assert 0.08 < share < 0.12
    assert split[5000:] == split[:100]  # same question, same side
    assert set(assign_split(frame, 0.0)["split"]) == {"train"}


def _export_frame() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "sample_id": ["a", "b"],
            "prompt": ['Doc "1"\nQ?', "问题?"],
            "completion": ["Answer.", "回答。"],
            "label": ["low_relevance", "factuality_error"],
            "confidence": [0.9, 0.45],
            "score": [0.6, 0.3],
            "language": ["en", "zh"],
        }
    )


def test_records_keep_the_seed_fields_in_order() -> None:
    assert records(_export_frame()).columns == [
        "sample_id",
        "prompt",
        "completion",
        "label",
        "confidence",
        "score",
        "weight",
    ]


def test_chat_lines_with_system_and_weights() -> None:
    lines = chat_lines(_export_frame(), T, weight_threshold=0.6).to_list()
    first, second = (json.loads(x) for x in lines)
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant"]
    assert first["messages"][0]["content"] == T.system["en"]
    assert second["messages"][0]["content"] == T.system["zh"]
    assert first["messages"][1] == {"role": "user", "content": 'Doc "1"\nQ?'}
    assert first["messages"][2] == {"role": "assistant", "content": "Answer.", "weight": 1}
    assert second["messages"][2]["weight"] == 0
    plain = json.loads(chat_lines(_export_frame(), T, system_message=False)[0])
    assert [m["role"] for m in plain["messages"]] == ["user", "assistant"]
    assert "weight" not in plain["messages"][1]


def test_label_counts_sorted_by_count() -> None:
    frame = pl.DataFrame({"label": ["b", "a", "b", "c", "a", "b"]})
    assert list(label_counts(frame).items()) == [("b", 3), ("a", 2), ("c", 1)]


def chat_frame(*lines: dict) -> pl.DataFrame:
    """Read as the asset check reads a chat file."""
    body = "\n".join(json.dumps(x) for x in lines).encode()
    return pl.read_ndjson(io.BytesIO(body), infer_schema_length=None)


GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def test_good_chat_lines_pass() -> None:
    assert chat_format_problems(chat_frame(GOOD, GOOD)) == []


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ({"messages": [{"role": "user", "content": "q"}]}, "no assistant message on lines 2"),
        (
            {
                "messages": [
                    {"role": "robot", "content": "q"},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "a role other than",
        ),
        (
            {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}]},
            "empty or missing content",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q", "weight": 1},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "weight on a non-assistant",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a", "weight": 0.5},
                ]
            },
            "weight other than",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q", "mood": "x"},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "keys not allowed",
        ),
        ({"messages": [], "x": 1}, "top-level keys other than messages"),
        ({"messages": []}, "lines without messages: 2"),
    ],
)
def test_each_chat_rule_fails_on_purpose(bad: dict, words: str) -> None:
    problems = chat_format_problems(chat_frame(GOOD, bad))
    assert any(words in p for p in problems), problems


def test_record_rules_fail_on_purpose() -> None:
    good = pl.DataFrame({"prompt": ["p"] * 10, "completion": ["c"] * 10, "confidence": [0.5] * 10})
    assert record_problems(good, 10) == []
    assert "fewer than the minimum" in record_problems(good.head(3), 10)[0]
    bad = good.with_columns(
        pl.when(pl.int_range(10) == 2).then(pl.lit("")).otherwise("completion").alias("completion"),
        pl.when(pl.int_range(10) == 4).then(1.5).otherwise("confidence").alias("confidence"),
    )
    problems = record_problems(bad, 10)
    assert "empty completion on lines 3" in problems
    assert "confidence outside [0, 1] on lines 5" in problems


def test_label_bounds_and_drift() -> None:
    bounds = LabelBounds()
    assert label_share_problems({"factuality_error": 5, "low_relevance": 5}, bounds) == []
    assert (
        "factuality_error is 90.0%"
        in label_share_problems({"factuality_error": 9, "low_relevance": 1}, bounds)[0]
    )
    assert "unspecified is 30.0%" in " ".join(
        label_share_problems({"unspecified": 3, "low_relevance": 4, "overconfidence": 3}, bounds)
    )
    assert "outside the known four" in " ".join(
        label_share_problems({"format_error": 2, "low_relevance": 4, "overconfidence": 4}, bounds)
    )
    assert total_variation({"a": 1}, {"a": 5}) == 0
    assert total_variation({"a": 1}, {"b": 1}) == 1
    assert total_variation({"a": 1, "b": 1}, {"a": 3, "b": 1}) == pytest.approx(0.25)


# --- PII in ids and labels (issue #15) -----------------------------------------------------------

PII_LABEL = "complaint from carol@example.com +86 137 0000 1111"


def test_ids_holding_pii_become_stable_distinct_pseudonyms() -> None:
    ids = pl.Series(
        "sample_id",
        [
            "bob@example.com#factuality_error",
            "bob@example.com#low_relevance",
            f"r-1#{PII_LABEL}",
            "%2513812345678#unspecified",  # the raw request id `%13812345678` holds a phone
            "r-2#factuality_error",
            "a%23b#c",
        ],
    )
    out = exported_sample_ids(ids).to_list()
    assert out[4:] == ["r-2#factuality_error", "a%23b#c"]  # no PII: as stored
    assert all(x.startswith("pii-") and "#" not in x and len(x) == 68 for x in out[:4])
    assert len(set(out)) == len(out)
    assert exported_sample_ids(ids).to_list() == out  # stable
    assert exported_sample_ids(pl.Series("sample_id", [], dtype=pl.String)).len() == 0


def test_labels_holding_pii_are_redacted_and_their_counts_merged() -> None:
    frame = pl.DataFrame({"sample_id": ["a#x", f"b#{PII_LABEL}"], "label": ["x", PII_LABEL]})
    out, found = redact_identifiers(frame)
    assert out["label"].to_list() == ["x", "complaint from [EMAIL] [PHONE]"]
    assert out["sample_id"][0] == "a#x" and out["sample_id"][1].startswith("pii-")
    assert (found["email"], found["phone"]) == (1, 1)
    counts = {"x": 2, "from a@b.com": 3, "from c@d.com": 1}
    assert redacted_label_counts(counts) == {"x": 2, "from [EMAIL]": 4}
    outcomes = {
        "from a@b.com": {"reviewed": 3, "kept_share": 1.0},
        "from c@d.com": {"reviewed": 1, "kept_share": 0.0},
        "x": {"reviewed": 2, "kept_share": 0.5},
    }
    assert redacted_outcomes(outcomes) == {
        "from [EMAIL]": {"reviewed": 4, "kept_share": 0.75},
        "x": {"reviewed": 2, "kept_share": 0.5},
    }


def test_normalised_text_matches_collapsing_every_whitespace_run() -> None:
    # normalise_text skips lone plain spaces for speed; its output must be exactly that of the
    # plain rule (lower-case, every Unicode whitespace run -> one space, stripped) that dedup
    # and split keys of existing stores were computed with.
    import random

    from qe_assets.annotate.labels import normalise_text

    rng = random.Random(5)
    alphabet = ["a", "B", "Σ", "中", "文", " ", "  ", "\t", "\n", "\r\n", "\u3000", "\u00a0"]
    alphabet += ["\u2028", "\u0085", "\u200a", "\u202f", "\x0b", "İ", "ß", "Ⅻ"]
    texts = ["", " ", "a", " a ", *("".join(rng.choices(alphabet, k=12)) for _ in range(3000))]
    frame = pl.DataFrame({"t": texts})
    reference = frame.select(
        pl.col("t").str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars()
    )["t"]
    assert frame.select(normalise_text(pl.col("t")))["t"].to_list() == reference.to_list()
