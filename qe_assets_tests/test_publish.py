"""Publishing versions where trainers read: a real S3-compatible server (moto in server mode) on
loopback through boto3, a directory, and the Hugging Face dataset-repo layout."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import pytest

from qe_assets.ingest.queues import FileInbox
from qe_assets.release.export import VersionFiles
from qe_assets.release.publish import (
    PublishError,
    manifest_name,
    open_store,
    remote_state,
    version_entries,
)
from qe_assets.release.published import publish_versions
from qe_assets.settings import Settings, SettingsError
from qe_assets.store import connect
from qe_assets_tests.runs import materialize, metadata
from qe_assets_tests.s3_server import SECRET_KEY, S3Server
from qe_assets_tests.test_cli_operations import assert_one_line_error, qe
from qe_assets_tests.test_pipeline import batch


def released(settings: Settings, *prefixes: str) -> None:
    """One release per prefix: 12 events, a run that cuts, checks, publishes and fine-tunes."""
    for prefix in prefixes:
        FileInbox(settings.inbox_dir).put(batch(prefix, 12))
        result = materialize(settings, raise_on_error=False)
        assert result.success, [e.message for e in result.all_events if e.is_failure]


def publications(settings: Settings) -> list[tuple]:
    with connect(settings.database, read_only=True) as conn:
        return conn.execute(
            "SELECT version, destination, location, status, files FROM version_publications "
            "ORDER BY version"
        ).fetchall()


def local_manifest(settings: Settings, version: str) -> dict:
    return json.loads(VersionFiles.at(settings.datasets_dir, version).manifest.read_text("utf-8"))


def test_release_publishes_to_s3_verified_manifest_last_and_idempotent(
    settings: Settings, s3_env: S3Server
) -> None:
    bucket = s3_env.bucket("qe-release")
    settings = settings.model_copy(update={"publish_url": f"s3://{bucket}/datasets/rag"})
    released(settings, "a")
    objects = s3_env.objects(bucket)
    manifest = local_manifest(settings, "v001")
    entries = version_entries(manifest)
    # Every file and the manifest, byte for byte what the manifest's sha256 says.
    assert set(objects) == {f"datasets/rag/{e.name}" for e in entries} | {
        f"datasets/rag/{manifest_name('v001')}"
    }
    for entry in entries:
        assert hashlib.sha256(objects[f"datasets/rag/{entry.name}"]).hexdigest() == entry.sha256
    local = VersionFiles.at(settings.datasets_dir, "v001").manifest.read_bytes()
    assert objects[f"datasets/rag/{manifest_name('v001')}"] == local
    # The row says where it went; the remote copy matches, deep (every byte read) too.
    location = f"s3://{bucket}/datasets/rag/{manifest_name('v001')}"
    assert publications(settings) == [
        ("v001", settings.publish_url, location, "published", len(entries) + 1)
    ]
    store = open_store(settings.publish_url)
    sha = hashlib.sha256(local).hexdigest()
    assert remote_state(store, "v001", sha, deep=True).state == "matches"
    # The secret is in no object's metadata.
    client = s3_env.client()
    for key in objects:
        head = client.head_object(Bucket=bucket, Key=key)
        assert SECRET_KEY not in json.dumps(head["Metadata"])
    # A second release publishes v002 and uploads nothing of v001 again.
    released(settings, "b")
    assert [row[0] for row in publications(settings)] == ["v001", "v002"]
    # Asked again, v001 is verified file by file and nothing is uploaded.
    (again,) = publish_versions(settings.database, settings, None, versions=["v001"])
    assert (again.uploaded_files, again.uploaded_bytes) == (0, 0)


def test_versions_cli_shows_where_each_version_lives_and_repairs_a_remote_copy(
    tmp_path: Path, s3_env: S3Server
) -> None:
    bucket = s3_env.bucket("qe-cli")
    env = {"QE_DATA_DIR": str(tmp_path / "data"), "QE_PUBLISH_URL": f"s3://{bucket}/ds"}
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(batch("c", 12)) + "\n")
    qe("enqueue", str(events), env=env)
    qe("run", "--cut-version", "--quiet", env=env)
    listed = qe("versions", "list", env=env).stdout
    assert f"s3://{bucket}/ds/{manifest_name('v001')}" in listed and "matches" in listed
    shown = qe("versions", "show", "v001", "--deep", env=env).stdout
    assert "remote copy matches" in shown
    # Someone deletes a published file: show says so and fails; publish repairs it.
    s3_env.client().delete_object(Bucket=bucket, Key="ds/rag_quality_tuning_v001.chat.jsonl")
    broken = qe("versions", "show", "v001", env=env, code=1).stdout
    assert (
        "remote copy differs" in broken
        and "rag_quality_tuning_v001.chat.jsonl is missing" in broken
    )
    repaired = qe("versions", "publish", "v001", "-q", env=env).stdout
    assert "v001: s3://" in repaired and "(1 files" in repaired
    assert "remote copy matches" in qe("versions", "show", "v001", "--deep", env=env).stdout
    unknown = qe("versions", "publish", "v009", env=env, code=1)
    assert_one_line_error(unknown, "v009: not publishable")
    assert SECRET_KEY not in listed + shown + broken + repaired + unknown.stderr


def test_publish_resumes_after_an_interrupted_upload_and_never_shows_half_a_version(
    settings: Settings, tmp_path: Path
) -> None:
    """The state a kill mid-upload leaves (some files, a temp file, no manifest): readers see no
    version; the next pass uploads only what is missing and writes the manifest last."""
    remote = tmp_path / "published"
    settings = settings.model_copy(update={"publish_url": f"file://{remote}"})
    released(settings, "a")
    store = open_store(settings.publish_url)
    sha = hashlib.sha256(
        VersionFiles.at(settings.datasets_dir, "v001").manifest.read_bytes()
    ).hexdigest()
    assert remote_state(store, "v001", sha).state == "matches"
    entries = version_entries(local_manifest(settings, "v001"))
    # Back to "killed mid-upload": no manifest, two files gone, one half-written temp file.
    (remote / manifest_name("v001")).unlink()
    (remote / entries[0].name).unlink()
    (remote / entries[-1].name).unlink()
    half = remote / entries[0].name
    half.with_name(f".{half.name}.dead.tmp").write_bytes(b"half")
    assert remote_state(store, "v001", sha).state == "missing"
    with connect(settings.database) as conn:
        conn.execute("DELETE FROM version_publications")
    uploaded: list[str] = []
    done = publish_versions(settings.database, settings, None, log=uploaded.append)
    assert [p.version for p in done] == ["v001"]
    assert done[0].uploaded_files == 3  # the two files and the manifest
    assert remote_state(store, "v001", sha, deep=True).state == "matches"
    assert not list(remote.rglob(".*.tmp"))


def test_hf_layout_loads_with_datasets(settings: Settings, tmp_path: Path) -> None:
    remote = tmp_path / "hub"
    settings = settings.model_copy(update={"publish_url": f"hf://{remote}"})
    released(settings, "a")
    folder = remote / "v001"
    assert (folder / "README.md").is_file() and (folder / manifest_name("v001")).is_file()
    loaded = datasets.load_dataset(str(folder))
    manifest = local_manifest(settings, "v001")
    assert loaded["train"].num_rows == manifest["counts"]["train"]
    chat = datasets.load_dataset(str(folder), "chat")
    assert "messages" in chat["train"].column_names


def test_unreachable_store_keeps_the_version_and_the_next_run_publishes(
    settings: Settings, s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3_env.bucket("qe-later")
    settings = settings.model_copy(update={"publish_url": f"s3://{bucket}"})
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens
    FileInbox(settings.inbox_dir).put(batch("a", 12))
    result = materialize(settings, raise_on_error=False)
    failures = [e for e in result.all_events if e.is_step_failure]
    assert [e.step_key for e in failures] == ["published_dataset"]
    message = failures[0].step_failure_data.error.message
    assert "QE_PUBLISH_URL" in message and "unreachable" in message
    assert SECRET_KEY not in message
    assert metadata(result, "tuning_dataset")["version"] == "v001"  # kept locally
    assert publications(settings) == []
    # The store is back: publishing picks the checked version up.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_env.endpoint)
    done = publish_versions(settings.database, settings, None)
    assert [p.version for p in done] == ["v001"]
    assert manifest_name("v001") in s3_env.objects(bucket)


def test_missing_bucket_is_one_line_naming_the_setting(
    settings: Settings, s3_env: S3Server
) -> None:
    settings = settings.model_copy(update={"publish_url": "s3://no-such-bucket-here/x"})
    released_settings = settings.model_copy(update={"publish_url": None})
    released(released_settings, "a")
    with pytest.raises(PublishError) as raised:
        publish_versions(settings.database, settings, None)
    text = str(raised.value)
    assert "\n" not in text and text.startswith("QE_PUBLISH_URL=s3://no-such-bucket-here/x")
    assert "does not exist" in text and SECRET_KEY not in text


def test_wrong_credentials_are_one_line_without_the_secret(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    released(settings, "a")
    strict = S3Server(tmp_path, check_credentials=True)
    strict.start()
    try:
        for name, value in strict.environment().items():
            monkeypatch.setenv(name, value)
        settings = settings.model_copy(update={"publish_url": "s3://any-bucket/x"})
        with pytest.raises(PublishError) as raised:
            publish_versions(settings.database, settings, None)
    finally:
        strict.stop()
    text = str(raised.value)
    assert text.startswith("QE_PUBLISH_URL=s3://any-bucket/x") and "\n" not in text
    assert "refused the credentials" in text and SECRET_KEY not in text


def test_a_remote_manifest_of_another_dataset_is_never_overwritten(
    settings: Settings, tmp_path: Path
) -> None:
    remote = tmp_path / "shared"
    remote.mkdir()
    (remote / manifest_name("v001")).write_text('{"another": "dataset"}')
    settings = settings.model_copy(update={"publish_url": f"file://{remote}"})
    released(settings.model_copy(update={"publish_url": None}), "a")
    with pytest.raises(PublishError, match="refusing to overwrite an immutable version"):
        publish_versions(settings.database, settings, None)
    assert (remote / manifest_name("v001")).read_text() == '{"another": "dataset"}'


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("s3://bucket/prefix/", "s3://bucket/prefix"),
        ("file:///srv/datasets", "file:///srv/datasets"),
        ("hf:///srv/hub", "hf:///srv/hub"),
    ],
)
def test_publish_url_accepted(raw: str, expected: str) -> None:
    assert Settings.from_env({"QE_PUBLISH_URL": raw}).publish_url == expected


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ("s3://AKIAX:topsecret@bucket/p", "must not carry credentials"),
        ("gs://bucket", "must look like"),
        ("file://relative/path", "absolute path"),
        ("s3:///nobucket", "needs a bucket"),
    ],
)
def test_bad_publish_url_fails_at_load_naming_the_variable(raw: str, words: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"QE_PUBLISH_URL": raw})
    assert "QE_PUBLISH_URL" in str(raised.value) and words in str(raised.value)
    assert "topsecret" not in str(raised.value)
