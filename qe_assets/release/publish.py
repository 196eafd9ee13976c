"""Committed versions published where trainers read them: an S3-compatible bucket, a directory,
or a Hugging Face dataset-repo folder (QE_PUBLISH_URL).

A version goes up file by file, each checked against the sha256 its manifest holds; the manifest
goes last, under its final name: it is the commit marker. A reader (and `qe versions`) sees a
version only where its manifest is, so a crash mid-upload leaves objects no reader looks at, and
the next run uploads only what is missing or differs. Publishing the same version twice uploads
nothing; a remote manifest that is not this version's is never overwritten (versions are
immutable: the same name from another store would be another dataset).

S3 goes through boto3: the reference client every S3-compatible store (AWS, MinIO, R2, Ceph)
documents and tests against, with the standard credential and endpoint chain
(AWS_ACCESS_KEY_ID, AWS_PROFILE, AWS_ENDPOINT_URL_S3, ...) so that no secret ever is a setting of
ours, and s3transfer's multipart, threaded, retried uploads.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from qe_assets.ingest.queues.inbox import fsync_dir
from qe_assets.release.export import DATASET_NAME, sha256_file

if TYPE_CHECKING:
    import duckdb

SETTING = "QE_PUBLISH_URL"
# The object metadata key holding a file's sha256: S3 keeps a multipart object's own checksum
# per part only, so the whole file's digest travels with it.
SHA_KEY = "sha256"
MULTIPART_BYTES = 64 << 20


class PublishError(RuntimeError):
    """Publishing failed for a reason a person can fix; one line naming QE_PUBLISH_URL, never a
    secret."""


@dataclass(frozen=True)
class Entry:
    """One file of a version as its manifest describes it (name relative to the datasets
    directory)."""

    name: str
    sha256: str
    size: int


@dataclass(frozen=True)
class RemoteObject:
    size: int
    sha256: str | None  # None: the store keeps no digest (the file is hashed to know)


def manifest_name(version: str) -> str:
    return f"{DATASET_NAME}_{version}.manifest.json"


def version_entries(manifest: dict[str, Any]) -> list[Entry]:
    """Every file of a version but the manifest, from the manifest: the line files, the card and
    each split's files."""
    described = [entry for key, entry in manifest["files"].items() if key != "manifest"]
    described += [e for split in manifest.get("split_files", {}).values() for e in split.values()]
    return [Entry(e["name"], e["sha256"], int(e["bytes"])) for e in described]


class Store(Protocol):
    url: str

    def key(self, name: str) -> str: ...
    def location(self, name: str) -> str: ...
    def stat(self, name: str) -> RemoteObject | None: ...
    def put(self, name: str, path: Path, sha256: str) -> None: ...
    def put_bytes(self, name: str, body: bytes, sha256: str) -> None: ...
    def copy(self, source: str, name: str, sha256: str) -> None: ...
    def read(self, name: str) -> bytes | None: ...
    def digest(self, name: str) -> str | None: ...
    def delete(self, name: str) -> None: ...
    def tidy(self, names: list[str]) -> None: ...


def _copy_hashed(source: Path, target: Path) -> str:
    digest = hashlib.sha256()
    with open(source, "rb") as src, open(target, "wb") as dst:
        while block := src.read(1 << 20):
            digest.update(block)
            dst.write(block)
        dst.flush()
        os.fsync(dst.fileno())
    return digest.hexdigest()


class DirectoryStore:
    """`file:///PATH`: the datasets directory's layout under PATH; `hf:///PATH`: a Hugging Face
    dataset-repo folder per version, `PATH/vNNN/` (README.md with the configs, the split files
    and the manifest), what `huggingface_hub.upload_folder` uploads as is.

    Each file is copied under a temporary name, hashed on the way, fsynced and renamed: a file
    under its final name is always whole."""

    def __init__(self, url: str) -> None:
        self.url = url
        parts = urlsplit(url)
        self.root = Path(parts.path)
        self.hf = parts.scheme == "hf"

    def key(self, name: str) -> str:
        if not self.hf:
            return name
        # rag_quality_tuning_v001/train.jsonl -> v001/train.jsonl; the flat files keep their names
        stem, _, rest = name.partition("/")
        version = stem.removeprefix(f"{DATASET_NAME}_").split(".")[0]
        return f"{version}/{rest}" if rest else f"{version}/{name}"

    def _path(self, name: str) -> Path:
        return self.root / self.key(name)

    def location(self, name: str) -> str:
        return str(self._path(name))

    def _check_root(self) -> None:
        if not self.root.is_dir():
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise PublishError(
                    f"{SETTING}={self.url}: cannot create the directory ({exc.strerror})"
                ) from None

    def stat(self, name: str) -> RemoteObject | None:
        path = self._path(name)
        if not path.is_file():
            return None
        return RemoteObject(path.stat().st_size, None)

    def digest(self, name: str) -> str | None:
        path = self._path(name)
        return sha256_file(path) if path.is_file() else None

    def put(self, name: str, path: Path, sha256: str) -> None:
        self._check_root()
        target = self._path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            copied = _copy_hashed(path, temp)
            if copied != sha256:
                raise PublishError(
                    f"{SETTING}: {name} changed on the local disk (its sha256 differs from the "
                    "manifest's); nothing of it was published"
                )
            os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)
        fsync_dir(target.parent)

    def put_bytes(self, name: str, body: bytes, sha256: str) -> None:
        self._check_root()
        target = self._path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        with open(temp, "wb") as handle:
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
        fsync_dir(target.parent)

    def copy(self, source: str, name: str, sha256: str) -> None:
        """A copy of a stored file under another name, verified like an upload."""
        self.put(name, self._path(source), sha256)

    def read(self, name: str) -> bytes | None:
        path = self._path(name)
        return path.read_bytes() if path.is_file() else None

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def tidy(self, names: list[str]) -> None:
        """Remove the temporary files a killed upload left beside these files."""
        for folder in {self._path(name).parent for name in names}:
            if folder.is_dir():
                for stale in folder.glob(".*.tmp"):
                    stale.unlink(missing_ok=True)


class S3Store:
    """`s3://BUCKET[/PREFIX]`: the datasets directory's layout under PREFIX."""

    def __init__(self, url: str) -> None:
        import boto3
        from botocore.config import Config

        self.url = url
        parts = urlsplit(url)
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        # Bounded: an unreachable store fails the step in seconds, and publishing retries on the
        # next run, instead of hanging a release.
        config = Config(
            connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"}
        )
        self._client = boto3.client("s3", config=config)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def location(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.key(name)}"

    def _call(self, action: str, call: Callable[[], Any], missing_ok: bool = False) -> Any:
        try:
            return call()
        except Exception as exc:
            problem = s3_problem(exc, self.bucket)
            if problem is None:
                if missing_ok:
                    return None
                raise
            raise PublishError(f"{SETTING}={self.url}: {action}: {problem}") from None

    def stat(self, name: str) -> RemoteObject | None:
        head = self._call(
            "head",
            lambda: self._client.head_object(Bucket=self.bucket, Key=self.key(name)),
            missing_ok=True,
        )
        if head is None:
            return None
        return RemoteObject(int(head["ContentLength"]), head.get("Metadata", {}).get(SHA_KEY))

    def digest(self, name: str) -> str | None:
        body = self._call(
            "get",
            lambda: self._client.get_object(Bucket=self.bucket, Key=self.key(name)),
            missing_ok=True,
        )
        if body is None:
            return None
        digest = hashlib.sha256()
        for block in body["Body"].iter_chunks(1 << 20):
            digest.update(block)
        return digest.hexdigest()

    def put(self, name: str, path: Path, sha256: str) -> None:
        from boto3.s3.transfer import TransferConfig

        transfer = TransferConfig(
            multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES
        )
        self._call(
            "upload",
            lambda: self._client.upload_file(
                str(path),
                self.bucket,
                self.key(name),
                ExtraArgs={"Metadata": {SHA_KEY: sha256}},
                Config=transfer,
            ),
        )

    def put_bytes(self, name: str, body: bytes, sha256: str) -> None:
        self._call(
            "upload",
            lambda: self._client.put_object(
                Bucket=self.bucket, Key=self.key(name), Body=body, Metadata={SHA_KEY: sha256}
            ),
        )

    def copy(self, source: str, name: str, sha256: str) -> None:
        """A server-side copy (its metadata, the sha256, comes along): no byte through here."""
        self._call(
            "copy",
            lambda: self._client.copy(
                {"Bucket": self.bucket, "Key": self.key(source)}, self.bucket, self.key(name)
            ),
        )
        copied = self.stat(name)
        if copied is None or copied.sha256 != sha256:
            raise PublishError(f"{SETTING}={self.url}: the copy {self.location(name)} differs")

    def read(self, name: str) -> bytes | None:
        got = self._call(
            "get",
            lambda: self._client.get_object(Bucket=self.bucket, Key=self.key(name)),
            missing_ok=True,
        )
        return None if got is None else got["Body"].read()

    def delete(self, name: str) -> None:
        self._call(
            "delete", lambda: self._client.delete_object(Bucket=self.bucket, Key=self.key(name))
        )

    def tidy(self, names: list[str]) -> None:
        """Abort the multipart uploads a killed run left open for these files (they are never
        visible, but the store keeps their parts until aborted)."""
        keys = {self.key(name) for name in names}
        listing = self._call(
            "list uploads",
            lambda: self._client.list_multipart_uploads(
                Bucket=self.bucket, Prefix=self.prefix or ""
            ),
        )
        for upload in listing.get("Uploads", []):
            if upload["Key"] in keys:
                self._call(
                    "abort upload",
                    lambda u=upload: self._client.abort_multipart_upload(
                        Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"]
                    ),
                )


def s3_problem(exc: BaseException, bucket: str) -> str | None:
    """What went wrong talking to the store, in words a person can act on, or None when the
    object is simply not there. Never the request, its headers or a key."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
    )

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return f"the bucket {bucket!r} does not exist"
        if code in ("404", "NoSuchKey", "NoSuchUpload"):
            return None
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403") or (
            status == 403
        ):
            return (
                "the store refused the credentials (check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
            )
        return f"the store answered {code or status}"
    if isinstance(exc, NoCredentialsError):
        return "no credentials (set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
    if isinstance(exc, EndpointConnectionError):
        return "the store is unreachable (check AWS_ENDPOINT_URL_S3 and the network)"
    if isinstance(exc, BotoCoreError):
        return f"the store is unreachable ({type(exc).__name__})"
    return f"{type(exc).__name__}"


def open_store(url: str) -> Store:
    if url.startswith("s3://"):
        return S3Store(url)
    return DirectoryStore(url)


@dataclass
class Published:
    version: str
    location: str  # where the manifest (the commit marker) is
    files: int
    bytes: int
    uploaded_files: int
    uploaded_bytes: int
    seconds: float

    @property
    def mb_per_second(self) -> float:
        return self.uploaded_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


def local_manifest(datasets_dir: Path, version: str, manifest_sha256: str) -> tuple[bytes, dict]:
    path = datasets_dir / manifest_name(version)
    try:
        body = path.read_bytes()
    except OSError as exc:
        raise PublishError(
            f"{version}: its manifest {path} is unreadable ({exc.strerror})"
        ) from None
    if hashlib.sha256(body).hexdigest() != manifest_sha256:
        raise PublishError(f"{version}: {path} differs from the sha256 its row committed")
    return body, json.loads(body)


def _matches(store: Store, entry: Entry, remote: RemoteObject | None) -> bool:
    if remote is None or remote.size != entry.size:
        return False
    if remote.sha256 is not None:
        return remote.sha256 == entry.sha256
    return store.digest(entry.name) == entry.sha256


def upload_version(
    store: Store,
    datasets_dir: Path,
    version: str,
    manifest_sha256: str,
    commit: Callable[[Callable[[], None]], None] | None = None,
    on_file: Callable[[str], None] | None = None,
) -> Published:
    """Upload a committed version's files (what is missing or differs), each verified, then its
    manifest. `commit(write_manifest)` runs the manifest's write (under the writer lock, so a
    forget cannot race it); by default it is called directly."""
    started = time.monotonic()
    body, manifest = local_manifest(datasets_dir, version, manifest_sha256)
    marker = manifest_name(version)
    remote_manifest = store.read(marker)
    if remote_manifest is not None and hashlib.sha256(remote_manifest).hexdigest() != (
        manifest_sha256
    ):
        raise PublishError(
            f"{SETTING}={store.url}: {store.location(marker)} holds another dataset's {version}; "
            "refusing to overwrite an immutable version (publish to another prefix)"
        )
    entries = version_entries(manifest)
    store.tidy([e.name for e in entries] + [marker])
    uploaded = uploaded_bytes = 0
    for entry in entries:
        if _matches(store, entry, store.stat(entry.name)):
            continue
        local = datasets_dir / entry.name
        if on_file is not None:
            on_file(entry.name)
        try:
            store.put(entry.name, local, entry.sha256)
        except FileNotFoundError:
            raise PublishError(
                f"{version}: {local} is missing; nothing of it was published"
            ) from None
        if not _matches(store, entry, store.stat(entry.name)):
            raise PublishError(
                f"{SETTING}={store.url}: {store.location(entry.name)} does not match its sha256 "
                "after upload"
            )
        uploaded += 1
        uploaded_bytes += entry.size
    if remote_manifest is None:

        def write_manifest() -> None:
            store.put_bytes(marker, body, manifest_sha256)

        (commit or (lambda write: write()))(write_manifest)
        uploaded += 1
        uploaded_bytes += len(body)
    return Published(
        version,
        store.location(marker),
        len(entries) + 1,
        sum(e.size for e in entries) + len(body),
        uploaded,
        uploaded_bytes,
        time.monotonic() - started,
    )


@dataclass
class RemoteState:
    """Whether a published version's remote copy still matches its manifest."""

    version: str
    location: str
    state: str  # matches | missing (no manifest) | differs
    problems: list[str]


def remote_state(
    store: Store, version: str, manifest_sha256: str, *, deep: bool = False
) -> RemoteState:
    """Check a version's remote copy: its manifest and, by size and stored sha256 (`deep`: by
    reading every byte), every file the manifest lists."""
    marker = manifest_name(version)
    location = store.location(marker)
    body = store.read(marker)
    if body is None:
        return RemoteState(version, location, "missing", [f"{location} is not there"])
    if hashlib.sha256(body).hexdigest() != manifest_sha256:
        return RemoteState(version, location, "differs", [f"{location} is another manifest"])
    problems = []
    for entry in version_entries(json.loads(body)):
        remote = store.stat(entry.name)
        if remote is None:
            problems.append(f"{store.location(entry.name)} is missing")
        elif remote.size != entry.size:
            problems.append(
                f"{store.location(entry.name)} has {remote.size} bytes, not {entry.size}"
            )
        elif (store.digest(entry.name) if deep or remote.sha256 is None else remote.sha256) != (
            entry.sha256
        ):
            problems.append(f"{store.location(entry.name)} differs from its sha256")
    return RemoteState(version, location, "differs" if problems else "matches", problems)


def unpublish(store: Store, version: str, manifest_sha256: str, *, delete: bool) -> None:
    """Take a version out of readers' sight: its manifest first (the commit marker), then, with
    `delete`, every file it listed."""
    marker = manifest_name(version)
    body = store.read(marker)
    if body is None:
        return
    if hashlib.sha256(body).hexdigest() != manifest_sha256:
        raise PublishError(
            f"{SETTING}={store.url}: {store.location(marker)} is another dataset's {version}; "
            "left alone"
        )
    store.delete(marker)
    if delete:
        for entry in version_entries(json.loads(body)):
            store.delete(entry.name)


# The store's record of where each version went (table version_publications).
RECORD = """
INSERT INTO version_publications VALUES (?, ?, ?, ?, ?, ?, ?, 'published', now()::TIMESTAMP)
ON CONFLICT (version, destination) DO UPDATE SET
    location = excluded.location, manifest_sha256 = excluded.manifest_sha256,
    files = excluded.files, bytes = excluded.bytes, seconds = excluded.seconds,
    status = 'published', updated_at = excluded.updated_at
"""


def record_publication(
    conn: duckdb.DuckDBPyConnection, destination: str, manifest_sha256: str, done: Published
) -> None:
    conn.execute(
        RECORD,
        [
            done.version,
            destination,
            done.location,
            manifest_sha256,
            done.files,
            done.bytes,
            round(done.seconds, 3),
        ],
    )


# Committed versions a release may publish: every blocking check passed, which a version shows
# by a fine-tune run other than `rejected` (fine_tuned_model runs only after the checks pass) or
# by being the version this very run cut and checked; never one a check rejected, and never one
# `qe forget` superseded.
PUBLISHABLE = """
SELECT v.version, v.manifest_sha256 FROM dataset_versions v
WHERE NOT EXISTS (
    SELECT 1 FROM fine_tune_runs r WHERE r.dataset_version = v.version AND r.status = 'rejected'
)
  AND NOT EXISTS (SELECT 1 FROM version_supersessions s WHERE s.version = v.version)
  AND (v.version = $checked OR EXISTS (
      SELECT 1 FROM fine_tune_runs r WHERE r.dataset_version = v.version
  ))
  AND ($again OR NOT EXISTS (
      SELECT 1 FROM version_publications p
      WHERE p.version = v.version AND p.destination = $destination AND p.status = 'published'
  ))
ORDER BY v.number
"""


def publishable(
    conn: duckdb.DuckDBPyConnection, destination: str, checked: str | None, again: bool = False
) -> list[tuple[str, str]]:
    """(version, manifest sha256) of the versions to publish to `destination`, oldest first;
    with `again`, those recorded as published too (to verify and repair their remote copy)."""
    params = {"checked": checked, "destination": destination, "again": again}
    rows = conn.execute(PUBLISHABLE, params).fetchall()
    return [(str(v), str(s)) for v, s in rows]


def iter_publications(conn: duckdb.DuckDBPyConnection) -> Iterator[dict[str, Any]]:
    cursor = conn.execute(
        "SELECT version, destination, location, manifest_sha256, status, updated_at "
        "FROM version_publications ORDER BY version, destination"
    )
    names = [d[0] for d in cursor.description]
    for row in cursor.fetchall():
        yield dict(zip(names, row, strict=True))
