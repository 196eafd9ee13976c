"""Immutable dataset versions on disk: `rag_quality_tuning_vNNN.{jsonl,chat.jsonl,manifest.json}`.

Files are written under temporary names, fsynced and renamed into place; the manifest comes last
and the DuckDB row after it. A crash before that row leaves files of a version the database never
heard of: `remove_uncommitted` deletes them before the next cut reuses the number, so every file on
disk belongs to a committed version and a committed version is never rewritten.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
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


# Lines joined and written per slice (~8 KB a line: ~16 MB a slice).
WRITE_SLICE_LINES = 2_000


@dataclass
class _Sink:
    final: Path
    temp: Path
    handle: IO[bytes]
    digest: Any = field(default_factory=hashlib.sha256)
    size: int = 0
    lines: int = 0

    def write_lines(self, lines: pl.Series) -> None:
        if lines.null_count():
            # str.join would skip them and the two line files would fall out of step.
            raise ValueError(f"{self.final.name}: {lines.null_count()} lines to write are null")
        # A slice at a time: joined into one string by Polars, so the bytes of a whole batch
        # never exist twice over as Python strings.
        for start in range(0, lines.len(), WRITE_SLICE_LINES):
            piece = lines.slice(start, WRITE_SLICE_LINES)
            data = (piece.str.join("\n").item() + "\n").encode("utf-8")
            self.handle.write(data)
            self.digest.update(data)
            self.size += len(data)
            self.lines += piece.len()

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


# Version files are checked and split in chunks of lines, so memory stays flat however large a
# version grows.
LINES_PER_CHUNK = 20_000


def line_chunks(path: Path, lines: int = LINES_PER_CHUNK) -> Iterator[list[bytes]]:
    """A JSON lines file in chunks of at most `lines` lines (line endings kept)."""
    with open(path, "rb") as handle:
        while chunk := list(islice(handle, lines)):
            yield chunk


def _json_chunks(path: Path) -> Iterator[tuple[int, pl.DataFrame | None, str | None]]:
    """(first line number, frame or None, why it is unreadable) per chunk of a version file."""
    first = 1
    try:
        for chunk in line_chunks(path):
            try:
                frame = pl.read_ndjson(io.BytesIO(b"".join(chunk)), infer_schema_length=None)
            except pl.exceptions.PolarsError as exc:
                last = first + len(chunk) - 1
                yield first, None, f"{path.name} lines {first}-{last} are not JSON lines: {exc}"
            else:
                yield first, frame, None
            first += len(chunk)
    except OSError as exc:
        yield first, None, f"{path.name} is not readable: {exc}"


def version_format_problems(files: VersionFiles, min_examples: int) -> tuple[list[str], int]:
    """(problems, examples) of a version's chat and record files under the format rules: what the
    blocking check reports, and what fine-tuning refuses to train on."""
    problems: list[str] = []
    for first, chat, error in _json_chunks(files.chat):
        problems += [error] if chat is None else chat_format_problems(chat, first)
    examples = 0
    for first, records, error in _json_chunks(files.jsonl):
        if records is None:
            problems.append(error or "")
            continue
        examples += records.height
        problems += record_problems(records, 0, first)
    if examples < min_examples:
        problems.insert(0, f"{examples} examples, fewer than the minimum of {min_examples}")
    return problems, examples
