"""The data path end to end through dagster.materialize on a temp DuckDB file."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from qe_assets.ingest.queues import FileInbox
from qe_assets.ingest.validation import chat_format_problems
from qe_assets.release.export import VersionWriter, sha256_file
from qe_assets.settings import Settings
from qe_assets_tests.factories import line, make_event
from qe_assets_tests.runs import checks, materialize, metadata, scalar

LABELS = ["factuality_error", "回答不完整", "low_relevance", "过度自信"]


def batch(prefix: str, n: int, *, score: float = 0.5) -> list[str]:
    """n train-worthy events (score 0.5 → confidence 0.75), distinct questions, rotating labels."""
    return [
        line(
            make_event(
                f"{prefix}-{i}",
                question=f"Question {prefix} number {i}?",
                answer=f"Answer {i}.",
                evaluation={"score": score, "labels": [LABELS[i % len(LABELS)]]},
            )
        ).decode()
        for i in range(n)
    ]


def version_files(settings: Settings, version: str) -> list[Path]:
    stem = settings.datasets_dir / f"rag_quality_tuning_{version}"
    return [Path(f"{stem}.jsonl"), Path(f"{stem}.chat.jsonl"), Path(f"{stem}.manifest.json")]


def test_events_to_v001_then_v002_then_nothing(settings: Settings) -> None:
    inbox = FileInbox(settings.inbox_dir)
    inbox.put(
        batch("a", 40)
        + batch("low", 10, score=0.2)  # confidence 0.3 → review
        + ["{not json"]
    )
    # The same content under another request_id: kept once for training.
    inbox.put(
        [
            line(
                make_event(
                    "dup",
                    question="Question a number 0?",
                    answer="Answer 0.",
                    evaluation={"score": 0.5, "labels": ["factuality_error"]},
                )
            ).decode()
        ]
    )
    result = materialize(settings)
    assert result.success
    assert metadata(result, "raw_events")["new_rows"] == 51
    annotated = metadata(result, "annotated_samples")
    assert (annotated["new_samples"], annotated["new_train"], annotated["new_review"]) == (
        51,
        41,
        10,
    )
    assert annotated["new_duplicates"] == 1
    assert metadata(result, "completions")["new_completions"] == 40
    v1 = metadata(result, "tuning_dataset")
    assert (v1["version"], v1["samples"]) == ("v001", 40)
    assert v1["train"] + v1["validation"] == 40
    assert all(c.passed for c in checks(result).values()), checks(result)

    jsonl, chat, manifest_path = version_files(settings, "v001")
    rows = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert len(rows) == 40
    assert set(rows[0]) == {
        "sample_id",
        "prompt",
        "completion",
        "label",
        "confidence",
        "score",
        "weight",
    }
    assert {r["label"] for r in rows} == {
        "factuality_error",
        "incomplete_answer",
        "low_relevance",
        "overconfidence",
    }
    assert all(r["confidence"] == 0.75 for r in rows)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["version"] == "v001"
    assert manifest["counts"]["samples"] == 40
    assert manifest["label_counts"]["factuality_error"] == 10
    assert manifest["files"]["jsonl"]["sha256"] == sha256_file(jsonl)
    assert manifest["files"]["chat"]["sha256"] == sha256_file(chat)
    assert manifest["settings"]["QE_MIN_CONFIDENCE"] == 0.6
    assert scalar(settings, "SELECT sha256 FROM dataset_versions WHERE version = 'v001'") == (
        sha256_file(jsonl)
    )
    assert scalar(settings, "SELECT count(*) FROM dataset_samples WHERE version='v001'") == 40
    assert scalar(settings, "SELECT count(*) FROM rejected_events") == 1

    # New events: v002 holds only them.
    hashes = {p: sha256_file(p) for p in version_files(settings, "v001")}
    inbox.put(batch("b", 15))
    result = materialize(settings)
    v2 = metadata(result, "tuning_dataset")
    assert (v2["version"], v2["samples"]) == ("v002", 15)
    v2_ids = {
        json.loads(x)["sample_id"]
        for x in version_files(settings, "v002")[0].read_text().splitlines()
    }
    assert v2_ids == {
        f"b-{i}#{label}"
        for i, label in enumerate(
            ["factuality_error", "incomplete_answer", "low_relevance", "overconfidence"] * 4
        )
        if i < 15
    }
    assert {p: sha256_file(p) for p in hashes} == hashes  # v001 untouched

    # Nothing new: no version, no changed table, no changed file.
    before = {
        t: scalar(settings, f"SELECT count(*) FROM {t}")
        for t in (
            "raw_events",
            "annotated_samples",
            "completions",
            "dataset_versions",
            "dataset_samples",
        )
    }
    listing = sorted(settings.datasets_dir.iterdir())
    result = materialize(settings)
    assert result.success
    assert metadata(result, "tuning_dataset") == {}
    after = {t: scalar(settings, f"SELECT count(*) FROM {t}") for t in before}
    assert after == before
    assert sorted(settings.datasets_dir.iterdir()) == listing


def test_exported_files_load_with_hugging_face_datasets(settings: Settings, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    FileInbox(settings.inbox_dir).put(batch("hf", 30))
    assert materialize(settings).success
    jsonl, chat, _ = version_files(settings, "v001")
    records = datasets.load_dataset(
        "json", data_files=str(jsonl), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert records.num_rows == 30
    assert {"prompt", "completion", "label", "confidence"} <= set(records.column_names)
    conversations = datasets.load_dataset(
        "json", data_files=str(chat), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert conversations.num_rows == 30
    assert conversations[0]["messages"][-1]["role"] == "assistant"
    assert chat_format_problems(pl.read_ndjson(chat, infer_schema_length=None)) == []


def test_uncommitted_version_files_are_cleaned_and_the_number_reused(settings: Settings) -> None:
    settings.datasets_dir.mkdir(parents=True)
    stale = version_files(settings, "v001")[0]
    stale.write_text('{"half": "written"}\n')  # a crash after rename, before the DB row
    FileInbox(settings.inbox_dir).put(batch("c", 12))
    result = materialize(settings)
    assert metadata(result, "tuning_dataset")["version"] == "v001"
    assert len(stale.read_text().splitlines()) == 12


def test_weights_and_no_system_message_options(settings: Settings) -> None:
    settings = settings.model_copy(
        update={"chat_system_message": False, "chat_weight_threshold": 0.8}
    )
    FileInbox(settings.inbox_dir).put(batch("w", 12))
    assert materialize(settings).success
    first = json.loads(version_files(settings, "v001")[1].read_text().splitlines()[0])
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]
    assert first["messages"][1]["weight"] == 0  # confidence 0.75 < 0.8


def run_checks(settings: Settings) -> dict[str, dg.AssetCheckEvaluation]:
    result = materialize(
        settings, selection=dg.AssetSelection.all_asset_checks(), raise_on_error=False
    )
    return checks(result)


def test_format_check_fails_on_purpose_on_a_broken_file(settings: Settings) -> None:
    FileInbox(settings.inbox_dir).put(batch("f", 12))
    assert materialize(settings).success
    chat = version_files(settings, "v001")[1]
    lines = chat.read_text().splitlines()
    broken = json.loads(lines[0])
    broken["messages"] = broken["messages"][:-1]  # drop the assistant message
    chat.write_text("\n".join([json.dumps(broken), *lines[1:]]) + "\n")
    evaluation = run_checks(settings)["dataset_format_valid"]
    assert not evaluation.passed
    assert evaluation.severity == dg.AssetCheckSeverity.ERROR
    assert "no assistant message on lines 1" in evaluation.description


def test_format_check_fails_on_purpose_with_too_few_examples(settings: Settings) -> None:
    FileInbox(settings.inbox_dir).put(batch("few", 3))
    result = materialize(settings, raise_on_error=False)
    evaluation = checks(result)["dataset_format_valid"]
    assert not evaluation.passed and "fewer than the minimum of 10" in evaluation.description


def test_leakage_check_fails_on_purpose(settings: Settings) -> None:
    FileInbox(settings.inbox_dir).put(batch("l", 12))
    assert materialize(settings).success
    from qe_assets.store import connect

    with connect(settings.database) as conn:
        # Pretend a sample of v001 was also exported in an older version, on the other side.
        conn.execute(
            "INSERT INTO dataset_versions SELECT 'v000', 0, jsonl_path, chat_path, "
            "manifest_path, 1, 1, 0, sha256, chat_sha256, manifest_sha256, label_counts, "
            "settings, 0, created_at FROM dataset_versions WHERE version = 'v001'"
        )
        conn.execute(
            "INSERT INTO dataset_samples SELECT 'v000', sample_id, "
            "CASE split WHEN 'train' THEN 'validation' ELSE 'train' END "
            "FROM dataset_samples WHERE version = 'v001' LIMIT 1"
        )
    evaluation = run_checks(settings)["dataset_no_leakage"]
    assert not evaluation.passed
    assert "1 samples are already in an earlier version" in evaluation.description
    assert "1 questions appear in both train and validation" in evaluation.description


def test_label_checks_warn_on_purpose(settings: Settings) -> None:
    one_label = [
        line(
            make_event(f"s{i}", question=f"q{i}?", evaluation={"score": 0.5, "labels": []})
        ).decode()
        for i in range(12)
    ]
    FileInbox(settings.inbox_dir).put(one_label)
    result = materialize(settings)
    distribution = checks(result)["label_distribution"]
    assert not distribution.passed
    assert distribution.severity == dg.AssetCheckSeverity.WARN
    assert "unspecified is 100.0%" in distribution.description
    # The next version has a completely different label mix: drift.
    FileInbox(settings.inbox_dir).put(batch("d", 12))
    drift = checks(materialize(settings))["label_drift"]
    assert not drift.passed and drift.severity == dg.AssetCheckSeverity.WARN
    assert drift.metadata["total_variation_distance"].value == 1.0


def test_no_seeded_pii_reaches_a_dataset_file(settings: Settings) -> None:
    pii = {
        "email": "li.wei@example.com",
        "phone": "+86 138 0013 8000",
        "card": "4111 1111 1111 1111",
        "ip": "192.168.10.24",
    }
    events = [
        line(
            make_event(
                f"p{i}",
                question=f"My e-mail is {pii['email']}, call {pii['phone']} - question {i}?",
                answer=f"Card {pii['card']} was charged from {pii['ip']}.",
                docs=[{"id": "d", "content": f"Contact {pii['email']} for refunds.", "score": 1}],
                evaluation={"score": 0.5, "labels": ["factuality_error"]},
            )
        ).decode()
        for i in range(12)
    ]
    FileInbox(settings.inbox_dir).put(events)
    result = materialize(settings)
    assert result.success
    text = "".join(p.read_text() for p in settings.datasets_dir.glob("*_v001.*"))
    for value in pii.values():
        assert value not in text
    assert "[EMAIL]" in text and "[CARD]" in text
    meta = metadata(result, "tuning_dataset")
    assert meta["pii_redacted/email"] >= 24 and meta["pii_redacted/card"] == 12
    manifest = json.loads(version_files(settings, "v001")[2].read_text())
    assert manifest["pii_redactions"]["ip"] == 12


def test_export_walks_windows_of_completions_that_hold_no_ready_sample(settings: Settings) -> None:
    """The export reads completions a window (QE_EXPORT_BATCH_SIZE) at a time; windows where
    every sample waits for a reviewer must not end the version early."""
    from qe_assets.review.decisions import accept
    from qe_assets.store import connect

    settings = settings.model_copy(
        update={"export_batch_size": 4, "spot_check_share": 1.0, "min_dataset_examples": 1}
    )
    FileInbox(settings.inbox_dir).put(batch("w", 20))
    upstream = dg.AssetSelection.assets("raw_events", "annotated_samples", "completions")
    materialize(settings, upstream)
    with connect(settings.database) as conn:
        pending = [
            row[0]
            for row in conn.execute(
                "SELECT sample_id FROM review_queue r JOIN completions c USING (sample_id) "
                "ORDER BY c.seq"
            ).fetchall()
        ]
        assert len(pending) == 20
        # Accepting renews the completion's seq: these three are the newest completions, after
        # five windows of pending ones.
        for sample_id in pending[:3]:
            accept(conn, sample_id, reviewer="test")

    result = materialize(settings, dg.AssetSelection.assets("tuning_dataset"))
    assert metadata(result, "tuning_dataset")["samples"] == 3
    records = version_files(settings, "v001")[0].read_text("utf-8").splitlines()
    assert sorted(json.loads(r)["sample_id"] for r in records) == sorted(pending[:3])


def test_version_writer_refuses_null_lines_so_the_two_files_stay_in_step(tmp_path: Path) -> None:
    # Polars' str.join skips nulls: written as they came, the record and chat files would
    # disagree on which line is which sample.
    null_line = pl.Series(["{}", None])
    with (
        VersionWriter(tmp_path, "rag_quality_tuning_v001") as writer,
        pytest.raises(ValueError, match=r"rag_quality_tuning_v001\.chat\.jsonl: 1 lines"),
    ):
        writer.write(pl.DataFrame({"sample_id": ["a", "b"]}), null_line, pl.Series(["train"] * 2))


def test_review_queue_reports_every_sample_it_queued_spot_checks_included(
    settings: Settings,
) -> None:
    # `qe status` counts the whole queue; the run's review_queue line must add up to it too,
    # not count only the low-confidence samples and leave the spot checks out.
    settings = settings.model_copy(update={"spot_check_share": 0.5})
    FileInbox(settings.inbox_dir).put(batch("a", 40) + batch("low", 10, score=0.2))
    result = materialize(settings, selection=["raw_events", "annotated_samples", "review_queue"])
    assert result.success
    queued = metadata(result, "review_queue")
    spot = scalar(settings, "SELECT count(*) FROM review_queue WHERE reason = 'spot_check'")
    assert spot > 0
    assert (queued["new_low_confidence"], queued["new_spot_check"]) == (10, spot)
    assert (
        queued["new_queued"] == 10 + spot == scalar(settings, "SELECT count(*) FROM review_queue")
    )
    # The same batch again queues nothing new: only rows really queued are counted.
    FileInbox(settings.inbox_dir).put(batch("a", 40))
    again = materialize(settings, selection=["raw_events", "annotated_samples", "review_queue"])
    assert metadata(again, "review_queue")["new_queued"] == 0
