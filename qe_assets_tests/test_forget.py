"""`qe forget`: a person's data out of the tables, a superseding version without their samples,
the superseded version's published copy taken down (a real S3-compatible server), the models
trained on it flagged and refused by the gate, an audit row without personal text."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from qe_assets.ingest.queues import FileInbox
from qe_assets.release.export import VersionFiles, manifest_temp
from qe_assets.release.forget import FORGOTTEN, ForgetError, cut_superseding, forget
from qe_assets.release.publish import manifest_name
from qe_assets.settings import Settings
from qe_assets.store import connect, select_frame, writer_lock
from qe_assets.store.evaluations import MODELS_QUERY, ModelFlagged, record_promotion
from qe_assets_tests.conftest import free_port
from qe_assets_tests.runs import checks, materialize
from qe_assets_tests.s3_server import SECRET_KEY, S3Server
from qe_assets_tests.test_cli_operations import assert_one_line_error, qe
from qe_assets_tests.test_pipeline import batch

SUBJECT_QUESTION = "Question a number 3?"


def released(settings: Settings) -> None:
    FileInbox(settings.inbox_dir).put(batch("a", 12))
    result = materialize(settings, raise_on_error=False)
    assert result.success
    # A model trained on v001, and one a later round continued from it.
    with connect(settings.database) as conn:
        for run, version, model in (("v001-openai-1", "v001", "ft:model-a"),):
            conn.execute(
                "INSERT INTO fine_tune_runs (run_id, dataset_version, backend, status, model_id, "
                "created_at, updated_at) VALUES (?, ?, 'openai', 'succeeded', ?, now(), now())",
                [run, version, model],
            )


def rows(settings: Settings, query: str, params: list | None = None) -> list[tuple]:
    with connect(settings.database, read_only=True) as conn:
        return conn.execute(query, params).fetchall()


def store_text(settings: Settings) -> str:
    """Every table's rows, as text: what a search for the subject would find."""
    tables = ["raw_events", "annotated_samples", "completions", "llm_cache", "review_queue"]
    return json.dumps(
        {t: [list(map(str, r)) for r in rows(settings, f"SELECT * FROM {t}")] for t in tables}
    )


@pytest.fixture
def published(settings: Settings, s3_env: S3Server) -> tuple[Settings, str]:
    bucket = s3_env.bucket(f"qe-forget-{time.monotonic_ns()}")
    settings = settings.model_copy(update={"publish_url": f"s3://{bucket}/ds"})
    released(settings)
    assert f"ds/{manifest_name('v001')}" in s3_env.objects(bucket)
    return settings, bucket


def test_forget_supersedes_takes_down_flags_and_audits(
    published: tuple[Settings, str], s3_env: S3Server
) -> None:
    settings, bucket = published
    before = store_text(settings)
    # The dry run says what it would touch, and touches nothing.
    dry = forget(
        settings.database, settings.datasets_dir, request_ids=["a-3"], dry_run=True
    ).subject
    assert dry.counts["raw_events"] == 1 and dry.counts["annotated_samples"] == 1
    assert dry.counts["completions"] == 1 and dry.counts["versions"] == 1
    assert dry.counts["published_copies"] == 1 and dry.counts["models"] == 1
    assert store_text(settings) == before
    assert rows(settings, "SELECT count(*) FROM forget_requests") == [(0,)]

    report = forget(
        settings.database, settings.datasets_dir, request_ids=["a-3"], requested_by="dpo"
    )
    assert report.superseding == {"v001": "v002"} and not report.problems
    # Tables: the subject's text is gone, everyone else's is intact.
    assert SUBJECT_QUESTION not in store_text(settings)
    assert "Question a number 4?" in store_text(settings)
    assert rows(settings, "SELECT question FROM raw_events WHERE request_id = 'a-3'") == [
        (FORGOTTEN,)
    ]
    # Files: v001 is immutable and superseded; v002 holds every other sample and nothing of theirs.
    old = VersionFiles.at(settings.datasets_dir, "v001")
    new = VersionFiles.at(settings.datasets_dir, "v002")
    assert SUBJECT_QUESTION in old.jsonl.read_text("utf-8")
    for path in [new.jsonl, new.chat, new.preference, *new.folder.iterdir()]:
        assert SUBJECT_QUESTION not in path.read_text("utf-8"), path
    assert len(new.jsonl.read_text().splitlines()) == len(old.jsonl.read_text().splitlines()) - 1
    manifest = json.loads(new.manifest.read_text("utf-8"))
    assert manifest["supersedes"]["version"] == "v001"
    assert rows(settings, "SELECT version, superseded_by FROM version_supersessions") == [
        ("v001", "v002")
    ]
    # Published copy: v001's commit marker is gone; the row says so.
    assert f"ds/{manifest_name('v001')}" not in s3_env.objects(bucket)
    assert rows(settings, "SELECT version, status FROM version_publications") == [
        ("v001", "unpublished")
    ]
    # Models: flagged, and the gate (and anyone) is refused a promotion.
    assert rows(settings, "SELECT model, dataset_version FROM flagged_models") == [
        ("ft:model-a", "v001")
    ]
    with connect(settings.database) as conn, pytest.raises(ModelFlagged, match="flagged"):
        record_promotion(conn, "ft:model-a", "gate")
    with connect(settings.database, read_only=True) as conn:  # what `qe models` prints
        listed = select_frame(conn, MODELS_QUERY)
    assert listed.filter(pl.col("model") == "ft:model-a")["flagged"].to_list() == [True]
    # The audit row: what, counts, when, by whom; no id or text of the subject.
    ((audit,),) = rows(settings, "SELECT to_json(f) FROM forget_requests f")
    assert '"requested_by":"dpo"' in audit and '"matched_by":"request_id"' in audit
    assert "a-3" not in audit and "number 3" not in audit
    # The next release checks the superseding version (no leakage against v001), and publishes it.
    result = materialize(settings, raise_on_error=False)
    assert all(e.passed for e in checks(result).values() if e.severity.value == "ERROR")
    published_now = s3_env.objects(bucket)
    assert f"ds/{manifest_name('v002')}" in published_now
    assert f"ds/{manifest_name('v001')}" not in published_now  # superseded: never again
    # Forgetting the same person again finds nothing left to change.
    again = forget(settings.database, settings.datasets_dir, request_ids=["a-3"], dry_run=True)
    assert again.subject.counts["versions"] == 0


def test_a_copy_a_down_store_kept_public_is_taken_down_by_the_next_run(
    published: tuple[Settings, str], s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store is unreachable when `qe forget` runs: the forget itself completes (tables,
    files, the superseding version) and says the copy is still up. No one has to remember to
    run it again: published_dataset takes the copy down on its next run, and until then its
    check fails on the asset's page."""
    settings, bucket = published
    marker = f"ds/{manifest_name('v001')}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")  # nobody there
    report = forget(settings.database, settings.datasets_dir, request_ids=["a-3"])
    assert report.superseding == {"v001": "v002"} and not report.remote
    assert len(report.problems) == 1 and "v001" in report.problems[0]
    assert SECRET_KEY not in report.problems[0] and "\n" not in report.problems[0]
    assert rows(settings, "SELECT version, status FROM version_publications") == [
        ("v001", "published")
    ]
    assert marker in s3_env.objects(bucket)
    # The same request again finds no version left to supersede, and tries the copy again.
    again = forget(settings.database, settings.datasets_dir, request_ids=["a-3"])
    assert again.superseding == {} and again.problems and again.problems[0].startswith("v001")

    # Still down, and publishing elsewhere now (QE_PUBLISH_URL unset): the run materializes
    # what is pending and the check fails, naming the version and where it is still readable.
    elsewhere = settings.model_copy(update={"publish_url": None})
    result = materialize(elsewhere, selection=["published_dataset"], raise_on_error=False)
    assert result.success
    event = result.get_asset_materialization_events()[0].materialization
    assert event.metadata["takedowns_pending"].value == 1
    assert "v001" in str(event.metadata["takedown_errors"].value)
    check = checks(result)["superseded_copies_withdrawn"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    assert f"v001 at s3://{bucket}/ds" in (check.description or "")
    assert marker in s3_env.objects(bucket)
    status = qe("status", env={"QE_DATA_DIR": settings.data_dir}).stdout
    assert f"still published: v001 at s3://{bucket}/ds" in status, status

    # The store is back: the next run takes the copy down, records it, and the check passes.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_env.endpoint)
    result = materialize(elsewhere, selection=["published_dataset"])
    event = result.get_asset_materialization_events()[0].materialization
    assert event.metadata["taken_down"].value == [f"v001 at s3://{bucket}/ds: unpublished"]
    assert event.metadata["takedowns_pending"].value == 0
    assert checks(result)["superseded_copies_withdrawn"].passed
    assert marker not in s3_env.objects(bucket)
    assert rows(settings, "SELECT version, status FROM version_publications") == [
        ("v001", "unpublished")
    ]
    assert "still published" not in qe("status", env={"QE_DATA_DIR": settings.data_dir}).stdout
    # Nothing left to do: a further run materializes nothing.
    result = materialize(elsewhere, selection=["published_dataset"])
    assert not result.get_asset_materialization_events()


def test_unknown_request_id_says_so_and_changes_nothing(settings: Settings) -> None:
    released(settings)
    before = store_text(settings)
    with pytest.raises(ForgetError, match="unknown request id: nobody"):
        forget(settings.database, settings.datasets_dir, request_ids=["a-1", "nobody"])
    assert store_text(settings) == before
    assert rows(settings, "SELECT count(*) FROM dataset_versions") == [(1,)]


def test_forget_waits_for_the_writer_lock(settings: Settings) -> None:
    released(settings)
    waited: list[str] = []
    done = threading.Event()

    def run() -> None:
        forget(settings.database, settings.datasets_dir, texts=["number 7?"], on_wait=waited.append)
        done.set()

    with writer_lock(settings.database):
        worker = threading.Thread(target=run)
        worker.start()
        time.sleep(1.0)
        assert waited and not done.is_set()  # a running stage holds it: forget waits
    worker.join(30)
    assert done.is_set()
    assert rows(settings, "SELECT count(*) FROM version_supersessions") == [(1,)]


def test_forget_cli_dry_run_match_and_unknown_id(tmp_path: Path) -> None:
    env = {"QE_DATA_DIR": str(tmp_path / "data")}
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(batch("c", 12)) + "\n")
    qe("enqueue", str(events), env=env)
    qe("run", "--cut-version", "--quiet", env=env)
    dry = qe("forget", "--match", "question C NUMBER 5?", "--dry-run", env=env).stdout
    assert "(dry run)" in dry and "raw_events" in dry and "v001: 1 samples" in dry
    unknown = qe("forget", "--request-id", "nobody", env=env, code=1)
    assert_one_line_error(unknown, "unknown request id: nobody", "nothing was changed")
    ids = tmp_path / "ids.txt"
    ids.write_text("c-5\n")
    done = qe("forget", "--from-file", str(ids), env=env).stdout
    assert "superseded by v002" in done
    listed = qe("versions", "list", "--no-check", env=env).stdout
    assert "superseded by v002" in listed


def test_superseding_cut_streams_in_chunks_to_the_same_files(settings: Settings) -> None:
    """The cut reads each split file in chunks of lines (memory bounded by a chunk, not by the
    version): chunks of 2 lines give byte for byte the files of a single chunk, without the
    removed sample and its preference pair, and the version's files as read via its manifest."""
    released(settings)
    old = VersionFiles.at(settings.datasets_dir, "v001")
    records = [json.loads(line) for line in old.jsonl.read_text("utf-8").splitlines()]
    removed = records[3]["sample_id"]
    cuts = {}
    for version, chunk in (("v090", 2), ("v091", 10**9)):
        manifest, kept = cut_superseding(
            settings.datasets_dir, "v001", version, [removed], {}, "f", chunk_lines=chunk
        )
        assert kept == len(records) - 1 == manifest["counts"]["samples"]
        files = VersionFiles.at(settings.datasets_dir, version)
        cuts[version] = {
            "flat": [p.read_bytes() for p in (files.jsonl, files.chat, files.preference)],
            "split": {
                (split, fmt): entry["sha256"]
                for split, formats in manifest["split_files"].items()
                for fmt, entry in formats.items()
            },
            "fingerprint": manifest["fingerprint"],
        }
    assert cuts["v090"] == cuts["v091"]
    jsonl = cuts["v090"]["flat"][0].decode("utf-8")
    assert removed not in jsonl and records[4]["sample_id"] in jsonl
    assert records[3]["prompt"] not in cuts["v090"]["flat"][2].decode("utf-8")


def test_a_manifest_left_under_its_temp_name_is_settled_not_removed(settings: Settings) -> None:
    """The state a kill between a forget's commit and its manifest's rename leaves: the next
    forget puts the committed version's manifest in place (and supersedes that version in turn)
    instead of removing it as a dead cut's temp file."""
    released(settings)
    assert forget(settings.database, settings.datasets_dir, request_ids=["a-3"]).superseding == {
        "v001": "v002"
    }
    v002 = VersionFiles.at(settings.datasets_dir, "v002")
    body = v002.manifest.read_bytes()
    v002.manifest.rename(manifest_temp(v002))
    report = forget(settings.database, settings.datasets_dir, request_ids=["a-5"])
    assert report.superseding == {"v002": "v003"}
    assert v002.manifest.read_bytes() == body
    assert VersionFiles.at(settings.datasets_dir, "v003").manifest.exists()
