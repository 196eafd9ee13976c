"""The embedded queue: JSONL files in a folder.

Producers write `*.jsonl.part` (or any name not ending in `.jsonl`) and rename it into place, so the
ingester never sees a half-written file. The ingester claims a file by renaming it into
`.processing/`, and archives it only after its records are committed; files left in `.processing/`
by a crash are replayed first.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path

from qe_assets.queues.base import Batch

PROCESSING = ".processing"
ARCHIVE = "archive"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, rename: readers see all of the file or none of it."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class FileInbox:
    name = "inbox"
    # Acks only archive finished files; each claimed file is replayed whole after a crash.
    reads_ahead = True

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.processing = self.root / PROCESSING
        self.archive = self.root / ARCHIVE

    def _ensure(self) -> None:
        for folder in (self.root, self.processing, self.archive):
            folder.mkdir(parents=True, exist_ok=True)

    def warm_up(self) -> None:
        pass  # nothing to connect ahead: a folder

    def put(self, payloads: Sequence[str]) -> int:
        if not payloads:
            return 0
        self._ensure()
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        target = self.root / f"{stamp}-{uuid.uuid4().hex[:12]}.jsonl"
        body = "".join(p if p.endswith("\n") else p + "\n" for p in payloads)
        write_atomically(target, body.encode("utf-8"))
        return len(payloads)

    def pending_files(self) -> list[Path]:
        """Claimed-but-unfinished files first (crash recovery), then the inbox in name order."""
        if not self.root.exists():
            return []
        claimed = sorted(self.processing.glob("*.jsonl")) if self.processing.exists() else []
        # Dot-files are producers' temporary names (pathlib's glob would match them).
        ready = sorted(
            p for p in self.root.glob("*.jsonl") if not p.name.startswith(".") and p.is_file()
        )
        return claimed + ready

    def _claim(self, path: Path) -> Path | None:
        if path.parent == self.processing:
            return path
        target = self.processing / path.name
        try:
            os.rename(path, target)  # atomic: a concurrent ingester loses the race cleanly
        except FileNotFoundError:
            return None
        return target

    def _archive(self, claimed: Path) -> None:
        day = self.archive / datetime.now(UTC).strftime("%Y-%m-%d")
        day.mkdir(parents=True, exist_ok=True)
        target = day / claimed.name
        if target.exists():
            target = day / f"{claimed.stem}-{uuid.uuid4().hex[:8]}{claimed.suffix}"
        os.rename(claimed, target)

    def batches(self, max_records: int) -> Iterator[Batch]:
        self._ensure()
        for path in self.pending_files():
            claimed = self._claim(path)
            if claimed is None:
                continue
            yield from self._file_batches(claimed, max_records)

    def _file_batches(self, claimed: Path, max_records: int) -> Iterator[Batch]:
        # A large file is read in bounded chunks; only the last chunk's ack archives the file,
        # so a crash mid-file replays the whole file (the ingester is idempotent).
        line_no = 0
        with open(claimed, "rb") as fh:
            numbered = (
                (n, line.rstrip(b"\r\n")) for n, line in enumerate(fh, start=1) if line.strip()
            )
            chunk = list(islice(numbered, max_records))
            while chunk:
                following = list(islice(numbered, max_records))
                records = [line for _, line in chunk]
                sources = [f"inbox:{claimed.name}:{n}" for n, _ in chunk]
                line_no = chunk[-1][0]
                last = not following
                yield Batch(
                    records, sources, (lambda: self._archive(claimed)) if last else (lambda: None)
                )
                chunk = following
        if line_no == 0:  # an empty file: nothing to commit, archive it straight away
            self._archive(claimed)

    def depth(self) -> int:
        total = 0
        for path in self.pending_files():
            try:
                with open(path, "rb") as fh:
                    total += sum(1 for line in fh if line.strip())
            except FileNotFoundError:
                continue
        return total
