"""Immutable dataset versions on disk: `rag_quality_tuning_vNNN.{jsonl,chat.jsonl,manifest.json}`.

Files are written under temporary names, fsynced and renamed into place; the manifest comes last
and the DuckDB row after it. A crash before that row leaves files of a version the database never
heard of: `remove_uncommitted` deletes them before the next cut reuses the number, so every file on
disk belongs to a committed version and a committed version is never rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import polars as pl

from qe_assets.transforms.validation import chat_format_problems, record_problems

DATASET_NAME = "rag_quality_tuning"
_VERSION_FILE = re.compile(rf"^{DATASET_NAME}_v(\d{{3,}})\.(jsonl|chat\.jsonl|manifest\.json)$")


def version_name(number: int) -> str:
    return f"v{number:03d}"


@dataclass(frozen=True)
class VersionFiles:
    jsonl: Path
    chat: Path
    manifest: Path

    @classmethod
    def at(cls, directory: Path, version: str) -> VersionFiles:
        stem = directory / f"{DATASET_NAME}_{version}"
        return cls(Path(f"{stem}.jsonl"), Path(f"{stem}.chat.jsonl"), Path(f"{stem}.manifest.json"))

    def all(self) -> tuple[Path, Path, Path]:
        return (self.jsonl, self.chat, self.manifest)


def remove_uncommitted(directory: Path, committed: Iterable[str]) -> list[Path]:
    """Delete version files (and temp files) that no committed version owns; returns them."""
    if not directory.exists():
        return []
    keep = set(committed)
    removed = []
    for path in directory.iterdir():
        match = _VERSION_FILE.match(path.name)
        stale_temp = path.name.startswith(f".{DATASET_NAME}_") and path.name.endswith(".tmp")
        if stale_temp or (match and f"v{match.group(1)}" not in keep):
            path.unlink()
            removed.append(path)
    return removed


@dataclass
class _Sink:
    final: Path
    temp: Path
    handle: IO[bytes]
    digest: Any = field(default_factory=hashlib.sha256)
    size: int = 0
    lines: int = 0

    def write_lines(self, lines: Iterable[str]) -> None:
        data = "".join(f"{line}\n" for line in lines).encode("utf-8")
        self.handle.write(data)
        self.digest.update(data)
        self.size += len(data)
        self.lines += data.count(b"\n")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.final.name,
            "sha256": self.digest.hexdigest(),
            "bytes": self.size,
            "lines": self.lines,
        }


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class VersionWriter:
    """Streams one version's two line files chunk by chunk, then publishes them with the manifest.

    Use as a context manager: leaving it without `publish` (an error) removes the temp files.
    """

    def __init__(self, directory: Path, version: str) -> None:
        self.directory = directory
        self.version = version
        self.files = VersionFiles.at(directory, version)
        existing = [p for p in self.files.all() if p.exists()]
        if existing:
            raise FileExistsError(f"dataset {version} already exists: {existing[0]}")
        self._sinks: dict[str, _Sink] = {}

    def __enter__(self) -> VersionWriter:
        self.directory.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:8]
        for key, final in (("jsonl", self.files.jsonl), ("chat", self.files.chat)):
            temp = self.directory / f".{final.name}.{tag}.tmp"
            self._sinks[key] = _Sink(final, temp, open(temp, "wb"))
        return self

    def write(self, records: pl.DataFrame, chat_lines: pl.Series) -> None:
        if records.height != chat_lines.len():
            raise ValueError("records and chat lines must describe the same samples")
        self._sinks["jsonl"].write_lines(
            records.select(pl.struct(pl.all()).struct.json_encode()).to_series()
        )
        self._sinks["chat"].write_lines(chat_lines)

    def publish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """fsync and rename the line files, then write the manifest (with their hashes) last."""
        manifest = {**manifest, "files": {}}
        for key, sink in self._sinks.items():
            sink.handle.flush()
            os.fsync(sink.handle.fileno())
            sink.handle.close()
            manifest["files"][key] = sink.describe()
        for sink in self._sinks.values():
            os.replace(sink.temp, sink.final)
        body = json.dumps(manifest, ensure_ascii=False, indent=2, sort_keys=True).encode("utf-8")
        temp = self.directory / f".{self.files.manifest.name}.tmp"
        with open(temp, "wb") as handle:
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, self.files.manifest)
        _fsync_dir(self.directory)
        manifest["files"]["manifest"] = {
            "name": self.files.manifest.name,
            "sha256": hashlib.sha256(body).hexdigest(),
            "bytes": len(body),
        }
        self._sinks.clear()
        return manifest

    def __exit__(self, *exc_info: object) -> None:
        for sink in self._sinks.values():
            sink.handle.close()
            sink.temp.unlink(missing_ok=True)
        self._sinks.clear()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json_lines(path: Path) -> tuple[pl.DataFrame | None, str | None]:
    """A version file as a frame, or why it cannot be read."""
    try:
        return pl.read_ndjson(path, infer_schema_length=None), None
    except (pl.exceptions.PolarsError, OSError) as exc:
        return None, f"{path.name} is not readable as JSON lines: {exc}"


def version_format_problems(files: VersionFiles, min_examples: int) -> tuple[list[str], int]:
    """(problems, examples) of a version's chat and record files under the format rules: what the
    blocking check reports, and what fine-tuning refuses to train on."""
    problems: list[str] = []
    chat, error = read_json_lines(files.chat)
    problems += [error] if error else chat_format_problems(chat)
    records, error = read_json_lines(files.jsonl)
    problems += [error] if error else record_problems(records, min_examples)
    return problems, 0 if records is None else records.height
