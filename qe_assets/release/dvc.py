"""`qe versions dvc vNNN`: a `.dvc` file for a published version, so that `dvc pull` restores it
in a Git checkout.

DVC finds data by content: a remote holds each file at `files/md5/<2 hex>/<30 hex>` (DVC 3's
layout). The published objects are copied there inside the store (S3 CopyObject: no byte goes
through this machine; a directory copies), under `<QE_PUBLISH_URL>/dvc`, and the `.dvc` file
lists every file of the version with its md5 and size. Configure that remote once in the
checkout (`dvc remote add -d qe <url>`), commit the `.dvc` file, and `dvc pull` restores the
version byte for byte."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml

from qe_assets.release.export import DATASET_NAME
from qe_assets.release.publish import (
    SETTING,
    DirectoryStore,
    Entry,
    PublishError,
    Store,
    local_manifest,
    manifest_name,
    remote_state,
    version_entries,
)

DVC_PREFIX = "dvc"


@dataclass(frozen=True)
class DvcExport:
    dvc_file: Path
    remote_url: str
    files: int


def _digests(path: Path) -> tuple[str, str]:
    """(md5, sha256) of a file in one read."""
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            md5.update(block)
            sha.update(block)
    return md5.hexdigest(), sha.hexdigest()


def dvc_object(md5: str) -> str:
    return f"{DVC_PREFIX}/files/md5/{md5[:2]}/{md5[2:]}"


def export_dvc(
    store: Store, datasets_dir: Path, version: str, manifest_sha256: str, out_dir: Path
) -> DvcExport:
    """Copy a published version's objects into the store's DVC remote layout and write
    `<out_dir>/rag_quality_tuning_vNNN.dvc`."""
    if isinstance(store, DirectoryStore) and store.hf:
        raise PublishError(f"{SETTING}={store.url}: a hf:// folder is not a DVC remote")
    if remote_state(store, version, manifest_sha256).state != "matches":
        raise PublishError(
            f"{version} is not published intact at {store.url}: run `qe versions publish "
            f"{version}` first"
        )
    body, manifest = local_manifest(datasets_dir, version, manifest_sha256)
    entries = [
        *version_entries(manifest),
        Entry(manifest_name(version), manifest_sha256, len(body)),
    ]
    outs = []
    for entry in entries:
        md5, sha = _digests(datasets_dir / entry.name)
        if sha != entry.sha256:
            raise PublishError(f"{version}: {entry.name} differs from its manifest's sha256")
        target = dvc_object(md5)
        existing = store.stat(target)
        if existing is None or existing.size != entry.size:
            store.copy(entry.name, target, entry.sha256)
        outs.append({"md5": md5, "size": entry.size, "hash": "md5", "path": entry.name})
    out_dir.mkdir(parents=True, exist_ok=True)
    dvc_file = out_dir / f"{DATASET_NAME}_{version}.dvc"
    dvc_file.write_text(
        f"# {DATASET_NAME} {version}, published at {store.location(manifest_name(version))}\n"
        + yaml.safe_dump({"outs": outs}, sort_keys=False),
        "utf-8",
    )
    return DvcExport(dvc_file, store.location(DVC_PREFIX), len(outs))
