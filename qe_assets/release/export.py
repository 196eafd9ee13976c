"""Immutable dataset versions on disk: `rag_quality_tuning_vNNN.{jsonl,chat.jsonl,
preference.jsonl,manifest.json}` with every sample, and the folder `rag_quality_tuning_vNNN/`
with the same formats per split and a dataset card (`datasets.load_dataset(<folder>)`).

A version's number is claimed in DuckDB (`dataset_version_claims`) before its cut starts, and no
later cut takes a claimed number: a name never stands for two contents, even when a cut failed
or died after its files had their final names. Files are written under temporary names (the
folder as a temp folder), fsynced and renamed into place; the manifest is written beside them
under a temp name, the DuckDB row is committed, and only then is the manifest renamed into place,
so a manifest never exists without its committed row. A failed commit removes the version's
files; a crash before the commit leaves files of an uncommitted (claimed) number, which
`remove_uncommitted` deletes at the next cut; a crash between the commit and the rename leaves
the manifest under its temp name, which `settle_manifests` renames once its sha256 matches the
committed row.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import queue
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import IO, Any

import polars as pl

from qe_assets.ingest.queues.inbox import fsync_dir
from qe_assets.ingest.validation import (
    chat_format_problems,
    preference_problems,
    record_problems,
)

DATASET_NAME = "rag_quality_tuning"
_VERSION_FILE = re.compile(
    rf"^{DATASET_NAME}_v(\d{{3,}})(\.(jsonl|chat\.jsonl|preference\.jsonl|manifest\.json))?$"
)
SPLITS = ("train", "validation")
# The per-split files of a version's folder: format → file name after `<split>.`.
SPLIT_FORMATS = {
    "records": "jsonl",
    "chat": "chat.jsonl",
    "preference": "preference.jsonl",
    "openai_preference": "openai_preference.jsonl",
}
CARD = "README.md"
# Hex digits of the version's fingerprint in its per-split file names (64 bits).
FINGERPRINT_CHARS = 16


def split_file_name(split: str, fmt: str, fingerprint: str) -> str:
    """A per-split file's name. The fingerprint (of the folder's data) is in it because
    `datasets` caches a local folder by its name and the card's `data_files` patterns only: two
    folders of one name with other rows would load each other's cached rows."""
    return f"{split}-{fingerprint}.{SPLIT_FORMATS[fmt]}"


def folder_fingerprint(digests: dict[tuple[str, str], str]) -> str:
    """The fingerprint of a version's per-split files, from their sha256 by (split, format)."""
    listing = "".join(
        f"{split}/{fmt}:{digest}\n" for (split, fmt), digest in sorted(digests.items())
    )
    return hashlib.sha256(listing.encode()).hexdigest()[:FINGERPRINT_CHARS]


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

    @property
    def preference(self) -> Path:
        """Every preference pair of the version, in TRL's conversational preference format."""
        return self.jsonl.with_name(self.jsonl.name.removesuffix(".jsonl") + ".preference.jsonl")

    @property
    def folder(self) -> Path:
        """The per-split files and the dataset card."""
        return self.jsonl.with_name(self.jsonl.name.removesuffix(".jsonl"))

    def split_file(self, split: str, fmt: str, manifest: dict[str, Any]) -> Path:
        """Where the manifest says the split's file of `fmt` is: `<split>-<fingerprint>.<ext>`
        (`<split>.<ext>` in versions cut before the fingerprint, and where the manifest names no
        such file)."""
        entry = (manifest.get("split_files") or {}).get(split, {}).get(fmt)
        if entry is None:
            return self.folder / f"{split}.{SPLIT_FORMATS[fmt]}"
        return self.jsonl.parent / entry["name"]

    def all(self) -> tuple[Path, ...]:
        return (self.jsonl, self.chat, self.preference, self.manifest, self.folder)


def manifest_temp(files: VersionFiles) -> Path:
    """Where a version's manifest waits for the commit of its row."""
    return files.manifest.with_name(f".{files.manifest.name}.tmp")


def settle_manifests(directory: Path, committed: dict[str, str]) -> list[str]:
    """Put in place the manifest of each committed version (version → manifest sha256 of its row)
    whose cut died between the commit and the manifest's rename; returns those versions. A temp
    manifest whose bytes differ from the committed sha256 is left for `remove_uncommitted`."""
    settled = []
    for version, digest in committed.items():
        files = VersionFiles.at(directory, version)
        temp = manifest_temp(files)
        if files.manifest.exists() or not temp.exists() or sha256_file(temp) != digest:
            continue
        os.replace(temp, files.manifest)
        fsync_dir(directory)
        settled.append(version)
    return settled


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
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
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
    name: str = ""  # as the manifest names it: relative to the datasets directory
    digest: Any = field(default_factory=hashlib.sha256)
    size: int = 0
    lines: int = 0

    def pieces(self, lines: pl.Series) -> Iterator[tuple[bytes, int]]:
        """The lines as UTF-8 bytes, a slice at a time, with the number of lines in each."""
        if lines.null_count():
            # str.join would skip them and the two line files would fall out of step.
            raise ValueError(f"{self.final.name}: {lines.null_count()} lines to write are null")
        # Joined by Polars and handed over as its UTF-8 bytes, so the bytes of a whole batch
        # never exist at once, and never pass through a Python str (decoding Chinese text into
        # one and encoding it back cost more than hashing and writing it).
        for start in range(0, lines.len(), WRITE_SLICE_LINES):
            piece = lines.slice(start, WRITE_SLICE_LINES)
            yield piece.str.join("\n").cast(pl.Binary).item() + b"\n", piece.len()

    def put(self, data: bytes, lines: int) -> None:
        self.handle.write(data)
        self.digest.update(data)
        self.size += len(data)
        self.lines += lines

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name or self.final.name,
            "sha256": self.digest.hexdigest(),
            "bytes": self.size,
            "lines": self.lines,
        }


# Slices handed to the writing thread and not yet written, at most (~12 MB each).
WRITES_IN_FLIGHT = 4


class _WritingThread:
    """Hashes and writes the sinks' slices, in order, on a thread of its own: file writes and
    sha256 run outside the GIL, so they overlap the next batch's read, redaction and encoding
    instead of following them. The queue is bounded, so memory stays a few slices deep. A
    failure is raised from the next `put` or from `finish`."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[_Sink, bytes, int] | None] = queue.Queue(WRITES_IN_FLIGHT)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="version-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:  # after a failure, only drain what is queued
                try:
                    item[0].put(item[1], item[2])
                except BaseException as exc:
                    self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, sink: _Sink, data: bytes, lines: int) -> None:
        self._raise()
        self._queue.put((sink, data, lines))

    def finish(self) -> None:
        """Wait until every slice is written; raise what writing raised."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()


class VersionWriter:
    """Streams one version's line files chunk by chunk, then publishes them with the manifest.

    Use as a context manager: leaving it without `publish` (an error) removes the temp files.
    """

    def __init__(self, directory: Path, version: str) -> None:
        self.directory = directory
        self.version = version
        self.files = VersionFiles.at(directory, version)
        existing = [p for p in self.files.all() if p.exists()]
        if existing:
            raise FileExistsError(f"dataset {version} already exists: {existing[0]}")
        self._sinks: dict[str | tuple[str, str], _Sink] = {}
        self._temp_folder = directory / f".{self.files.folder.name}.{uuid.uuid4().hex[:8]}.tmp"
        self._writing: _WritingThread | None = None

    def __enter__(self) -> VersionWriter:
        self.directory.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:8]
        flat = (("jsonl", self.files.jsonl), ("chat", self.files.chat))
        for key, final in (*flat, ("preference", self.files.preference)):
            temp = self.directory / f".{final.name}.{tag}.tmp"
            self._sinks[key] = _Sink(final, temp, open(temp, "wb"))
        self._temp_folder.mkdir()
        for split in SPLITS:
            for fmt in SPLIT_FORMATS:
                # Named at `publish`, once the fingerprint of their bytes is known.
                temp = self._temp_folder / f".{split}.{SPLIT_FORMATS[fmt]}.tmp"
                self._sinks[(split, fmt)] = _Sink(temp, temp, open(temp, "wb"))
        self._writing = _WritingThread()
        return self

    def _write(self, sink: _Sink, lines: pl.Series) -> None:
        assert self._writing is not None, "VersionWriter is used as a context manager"
        for data, count in sink.pieces(lines):
            self._writing.put(sink, data, count)

    def write(
        self,
        records: pl.DataFrame,
        chat_lines: pl.Series,
        splits: pl.Series,
        preference: pl.DataFrame | None = None,
    ) -> None:
        """A batch: its records and chat lines (same samples, same order), each sample's split,
        and its preference pairs (`trl`, `openai` lines and `split`), if any."""
        if not records.height == chat_lines.len() == splits.len():
            raise ValueError("records, chat lines and splits must describe the same samples")
        lines = pl.DataFrame(
            {
                "records": records.select(pl.struct(pl.all()).struct.json_encode()).to_series(),
                "chat": chat_lines,
                "split": splits,
            }
        )
        self._write(self._sinks["jsonl"], lines["records"])
        self._write(self._sinks["chat"], lines["chat"])
        frames = {"records": lines, "chat": lines}
        if preference is not None and preference.height:
            self._write(self._sinks["preference"], preference["trl"])
            pairs = preference.rename({"trl": "preference", "openai": "openai_preference"})
            frames |= {"preference": pairs, "openai_preference": pairs}
        for split in SPLITS:
            for fmt, frame in frames.items():
                part = frame.filter(pl.col("split") == split)[fmt]
                if part.len():
                    self._write(self._sinks[(split, fmt)], part)

    def publish(
        self, manifest: dict[str, Any], card: Callable[[dict[str, Any]], str]
    ) -> dict[str, Any]:
        """fsync and rename the line files and the folder (with `card(manifest)` as its
        README.md), then write the manifest (with every file's hash) under its temp name:
        `place_manifest` puts it in place once the version's row is committed."""
        manifest = {**manifest, "files": {}, "split_files": {split: {} for split in SPLITS}}
        assert self._writing is not None, "VersionWriter is used as a context manager"
        self._writing.finish()
        for sink in self._sinks.values():
            sink.handle.flush()
            os.fsync(sink.handle.fileno())
            sink.handle.close()
        fingerprint = folder_fingerprint(
            {
                key: sink.digest.hexdigest()
                for key, sink in self._sinks.items()
                if isinstance(key, tuple)
            }
        )
        manifest["fingerprint"] = fingerprint
        for key, sink in self._sinks.items():
            if isinstance(key, tuple):
                name = split_file_name(*key, fingerprint)
                os.replace(sink.temp, self._temp_folder / name)
                sink.temp = self._temp_folder / name
                sink.final = self.files.folder / name
                sink.name = f"{self.files.folder.name}/{name}"
                manifest["split_files"][key[0]][key[1]] = sink.describe()
            else:
                manifest["files"][key] = sink.describe()
        body = card(manifest).encode("utf-8")
        _write_synced(self._temp_folder / CARD, body)
        manifest["files"]["card"] = _described(f"{self.files.folder.name}/{CARD}", body)
        fsync_dir(self._temp_folder)
        for key, sink in self._sinks.items():
            if not isinstance(key, tuple):
                os.replace(sink.temp, sink.final)
        os.replace(self._temp_folder, self.files.folder)
        body = json.dumps(manifest, ensure_ascii=False, indent=2, sort_keys=True).encode("utf-8")
        _write_synced(manifest_temp(self.files), body)
        fsync_dir(self.directory)
        manifest["files"]["manifest"] = _described(self.files.manifest.name, body)
        self._sinks.clear()
        return manifest

    def place_manifest(self) -> None:
        """The commit point has passed: the manifest takes its name."""
        os.replace(manifest_temp(self.files), self.files.manifest)
        fsync_dir(self.directory)

    def discard(self) -> None:
        """The version's commit failed: remove every file published under its name (its number
        stays claimed, so no later cut gives the name to other bytes)."""
        for path in (*self.files.all(), manifest_temp(self.files)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        fsync_dir(self.directory)

    def __exit__(self, *exc_info: object) -> None:
        if self._writing is not None:
            with contextlib.suppress(Exception):  # the body's error is the one to report
                self._writing.finish()
        for sink in self._sinks.values():
            sink.handle.close()
            sink.temp.unlink(missing_ok=True)
        self._sinks.clear()
        shutil.rmtree(self._temp_folder, ignore_errors=True)


def _write_synced(path: Path, body: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(body)
        handle.flush()
        os.fsync(handle.fileno())


def _described(name: str, body: bytes) -> dict[str, Any]:
    return {"name": name, "sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body)}


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


# Version files are parsed in blocks of whole lines of about this size: cut at a newline from
# plain reads, without a Python object per line (splitting and joining lines was a large part of
# a check's time, docs/performance.md), and still a bounded amount in memory at once.
BLOCK_BYTES = 16 << 20


def line_blocks(path: Path, block_bytes: int = BLOCK_BYTES) -> Iterator[bytes]:
    """A file in blocks of whole lines, each about `block_bytes` (longer when one line is)."""
    with open(path, "rb") as handle:
        rest = b""
        while data := handle.read(block_bytes):
            data = rest + data
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            if cut:
                yield data[:cut]
        if rest:  # the last line, without its newline
            yield rest


def _json_chunks(path: Path) -> Iterator[tuple[int, pl.DataFrame | None, str | None]]:
    """(first line number, frame or None, why it is unreadable) per block of a version file."""
    first = 1
    try:
        for block in line_blocks(path):
            lines = block.count(b"\n") + (not block.endswith(b"\n"))
            try:
                frame = pl.read_ndjson(io.BytesIO(block), infer_schema_length=None)
            except pl.exceptions.PolarsError as exc:
                last = first + lines - 1
                yield first, None, f"{path.name} lines {first}-{last} are not JSON lines: {exc}"
            else:
                yield first, frame, None
            first += lines
    except OSError as exc:
        yield first, None, f"{path.name} is not readable: {exc}"


def format_stamps(files: VersionFiles) -> dict[str, list[int]]:
    """(size, mtime_ns, inode) of the two files the format rules read. Recorded by the check that
    validated them: a later reader finding the same stamps (and the committed sha256) knows the
    bytes are the ones validated, without parsing them again."""
    stamps = {}
    for name, path in (("jsonl", files.jsonl), ("chat", files.chat)):
        stat = path.stat()
        stamps[name] = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    return stamps


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


def preference_format_problems(
    files: VersionFiles, manifest: dict[str, Any]
) -> tuple[list[str], int]:
    """(problems, pairs) of a version's preference files: the TRL file of the whole version and
    each split's TRL and OpenAI files (named by its `manifest`), under the providers' rules."""
    targets = [(files.preference, "trl")] + [
        (files.split_file(split, fmt, manifest), flavour)
        for split in SPLITS
        for fmt, flavour in (("preference", "trl"), ("openai_preference", "openai"))
    ]
    problems: list[str] = []
    pairs = 0
    for path, flavour in targets:
        name = path.relative_to(files.jsonl.parent).as_posix()
        first = 1
        try:
            for chunk in line_chunks(path):
                problems += preference_problems(chunk, flavour, name, first)
                first += len(chunk)
        except OSError as exc:
            problems.append(f"{name} is not readable: {exc}")
        if path == files.preference:
            pairs = first - 1
    return problems, pairs


def split_file_problems(files: VersionFiles, manifest: dict[str, Any]) -> list[str]:
    """Per-split files and card missing or differing from the sha256 the manifest holds (the
    manifest itself is checked against the committed row by the caller)."""
    expected = [
        entry for split in manifest.get("split_files", {}).values() for entry in split.values()
    ]
    if "card" in manifest.get("files", {}):
        expected.append(manifest["files"]["card"])
    problems = []
    for entry in expected:
        path = files.jsonl.parent / entry["name"]
        if not path.exists():
            problems.append(f"{entry['name']} is missing")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['name']} differs from the sha256 in its manifest")
    return problems


def dataset_card(manifest: dict[str, Any]) -> str:
    """README.md of a version's folder: YAML `configs` so that `datasets.load_dataset(<folder>)`
    gives `train` and `validation` (records by default; `chat`, `preference`,
    `openai_preference` by name), and a short description."""
    lines = ["---", f"pretty_name: {DATASET_NAME} {manifest['version']}", "configs:"]
    for fmt in SPLIT_FORMATS:
        present = [s for s in SPLITS if manifest["split_files"][s][fmt]["lines"]]
        if not present:
            continue  # a config needs at least one split with data
        lines.append(f"- config_name: {'default' if fmt == 'records' else fmt}")
        lines.append("  data_files:")
        for split in present:
            path = manifest["split_files"][split][fmt]["name"].rsplit("/", 1)[-1]
            lines += [f"  - split: {split}", f"    path: {path}"]
    counts = {
        fmt: {s: manifest["split_files"][s][fmt]["lines"] for s in SPLITS} for fmt in SPLIT_FORMATS
    }
    lines += [
        "---",
        "",
        f"# {DATASET_NAME} {manifest['version']}",
        "",
        "Corrections of low-quality RAG answers, exported by qe_assets. The split is a hash of the",
        "normalised question: a question is always on the same side.",
        "",
        "| config | file | train | validation |",
        "|---|---|---:|---:|",
        *(
            f"| {'default' if fmt == 'records' else fmt} "
            f"| `<split>-{manifest.get('fingerprint', '')}.{name}` "
            f"| {counts[fmt]['train']} | {counts[fmt]['validation']} |"
            for fmt, name in SPLIT_FORMATS.items()
        ),
        "",
        "* `default`: prompt, completion, label, confidence, score, weight (= confidence).",
        "* `chat`: OpenAI chat fine-tuning format (`messages`).",
        "* `preference`: TRL conversational preference format (`prompt`, `chosen`, `rejected`):",
        "  chosen = a human's edit or a judge-approved rewrite, rejected = the original answer.",
        "* `openai_preference`: OpenAI preference fine-tuning format (`input`,",
        "  `preferred_output`, `non_preferred_output`).",
        "",
        f"The manifest `../{DATASET_NAME}_{manifest['version']}.manifest.json` holds the sha256",
        "of every file and the settings the version was built with. The file names carry the",
        "fingerprint of the folder's data, so `datasets` never serves a cached copy of another",
        "folder of the same name.",
        "",
    ]
    return "\n".join(lines)
