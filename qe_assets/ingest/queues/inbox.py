"""The embedded queue: JSONL files in a folder.

Producers write `*.jsonl.part` (or any name not ending in `.jsonl`) and rename it into place, so the
ingester never sees a half-written file. The ingester claims a file by renaming it into
`.processing/` under a name of its own, `<claim stamp>-<token>@<name>`, and archives it only after
its records are committed; files left in `.processing/` by a crash are replayed first, in claim
order. The claim name is unique, so producers may re-use a name (`events.jsonl` every time) even
while an earlier file of that name is still claimed: no claim ever replaces another. Records keep
the producer's name in their `source` (`inbox:<name>:<line>`).

Only regular files are read, and never through a symbolic link: a symlink, directory, FIFO or
device named `*.jsonl` is refused (one `rejected_events` row naming it, no content) and moved to
`archive/refused/`.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path
from typing import BinaryIO

from qe_assets.ingest.queues.base import Backlog, Batch
from qe_assets.service.producers import (  # noqa: F401 (fsync_dir, write_atomically re-exported)
    STAMP_FORMAT,
    InboxWriter,
    fsync_dir,
    write_atomically,
)

PROCESSING = ".processing"
ARCHIVE = "archive"
REFUSED = "refused"
_STAMP = STAMP_FORMAT
# `<stamp>-<token>@<name>`: a claim by this code. Anything else in `.processing/` was claimed by
# the code before it, which kept the producer's name (and so could replace a claimed file).
_CLAIM_NAME = re.compile(r"(?P<stamp>\d{8}T\d{12})-[0-9a-f]{12}@(?P<name>.+)")


def _open_regular(path: Path) -> BinaryIO:
    """Open a claimed file without following a symlink or blocking on a FIFO; a non-regular
    file (swapped in after the claim looked at it) is an error naming it, not something read."""
    flags = os.O_NOFOLLOW | os.O_NONBLOCK
    fh = open(path, "rb", opener=lambda p, f: os.open(p, f | flags))  # noqa: SIM115 (returned)
    if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
        fh.close()
        raise OSError(f"{path}: not a regular file; move it out of the inbox")
    return fh


def _refusal(path: Path) -> str | None:
    """Why the inbox will not read `path` (a symlink or anything but a regular file), or None."""
    mode = path.lstat().st_mode
    if stat.S_ISREG(mode):
        return None
    kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
    return (
        f"file: {kind}; the inbox reads only regular files and never follows links "
        f"(moved to {ARCHIVE}/{REFUSED}/, not read)"
    )


@dataclass(frozen=True)
class Claimed:
    path: Path  # where it is now, in `.processing/`
    name: str  # the producer's name: record sources and the archive use it


class FileInbox(InboxWriter):
    """The ingester's side of the inbox; `put` (what producers do) is `InboxWriter`'s."""

    # Acks only archive finished files; each claimed file is replayed whole after a crash.
    reads_ahead = True

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.processing = self.root / PROCESSING
        self.archive = self.root / ARCHIVE
        self._last_stamp = ""

    def _ensure(self) -> None:
        for folder in (self.root, self.processing, self.archive):
            folder.mkdir(parents=True, exist_ok=True)

    def claimed_files(self) -> list[Claimed]:
        """Files claimed and not archived yet, in claim order: the old code's claims first (they
        are older than any claim with a stamp), then by claim stamp."""
        if not self.processing.exists():
            return []
        legacy: list[Claimed] = []
        stamped: list[tuple[str, Claimed]] = []
        for path in sorted(self.processing.glob("*.jsonl")):
            match = _CLAIM_NAME.fullmatch(path.name)
            if match is None:
                legacy.append(Claimed(path, path.name))
            else:
                stamped.append((match["stamp"], Claimed(path, match["name"])))
        stamped.sort(key=lambda item: item[0])
        if stamped:
            self._last_stamp = max(self._last_stamp, stamped[-1][0])
        return legacy + [claimed for _, claimed in stamped]

    def ready_files(self) -> list[Path]:
        """Files dropped in the inbox, in name order (refused ones included: they get a row)."""
        if not self.root.exists():
            return []
        # Dot-files are producers' temporary names (pathlib's glob would match them).
        return sorted(p for p in self.root.glob("*.jsonl") if not p.name.startswith("."))

    def pending_files(self) -> list[Path]:
        """Claimed-but-unfinished files first (crash recovery), then the inbox in name order."""
        return [c.path for c in self.claimed_files()] + self.ready_files()

    def _claim_stamp(self) -> str:
        # Strictly after every earlier claim, even if the clock stepped back: replay order is
        # claim order, and which of two conflicting re-sends is kept depends on it.
        stamp = datetime.now(UTC).strftime(_STAMP)
        if stamp <= self._last_stamp:
            after = datetime.strptime(self._last_stamp, _STAMP) + timedelta(microseconds=1)
            stamp = after.strftime(_STAMP)
        self._last_stamp = stamp
        return stamp

    def _claim(self, path: Path) -> Claimed | None:
        # The target name is new (stamp + random token), so the rename cannot replace anything,
        # however often producers re-use `path.name`.
        target = self.processing / f"{self._claim_stamp()}-{uuid.uuid4().hex[:12]}@{path.name}"
        try:
            os.rename(path, target)  # atomic: a concurrent ingester loses the race cleanly
        except FileNotFoundError:
            return None
        return Claimed(target, path.name)

    def _move_out(self, path: Path, folder: Path, name: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / name
        if target.exists() or target.is_symlink():
            stem, dot, suffix = name.partition(".")
            target = folder / f"{stem}-{uuid.uuid4().hex[:8]}{dot}{suffix}"
        os.rename(path, target)

    def _archive(self, claimed: Claimed) -> None:
        day = self.archive / datetime.now(UTC).strftime("%Y-%m-%d")
        self._move_out(claimed.path, day, claimed.name)

    def batches(self, max_records: int) -> Iterator[Batch]:
        self._ensure()
        for claimed in self.claimed_files():
            yield from self._file_batches(claimed, max_records)
        for path in self.ready_files():
            try:
                reason = _refusal(path)
            except FileNotFoundError:
                continue  # claimed by a concurrent ingester
            if reason is not None:
                yield self._refused(path, reason)
                continue
            claimed = self._claim(path)
            if claimed is not None:
                yield from self._file_batches(claimed, max_records)

    def _refused(self, path: Path, reason: str) -> Batch:
        # Not claimed: the row is committed first and the entry moved out by the ack, so a crash
        # in between refuses it again, and the row's content key makes that a no-op.
        refused = self.archive / REFUSED
        return Batch(
            [],
            [],
            lambda: self._move_out(path, refused, path.name),
            refused=[(f"inbox:{path.name}", reason)],
        )

    def _file_batches(self, claimed: Claimed, max_records: int) -> Iterator[Batch]:
        # A large file is read in bounded chunks; only the last chunk's ack archives the file,
        # so a crash mid-file replays the whole file (the ingester is idempotent).
        line_no = 0
        with _open_regular(claimed.path) as fh:
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

    def backlog(self) -> Backlog:
        """Files waiting, claimed ones included, and the oldest one's modification time: file
        metadata only, so a sensor can look every few seconds at any inbox size."""
        times: list[float] = []
        for path in self.pending_files():
            with contextlib.suppress(FileNotFoundError):  # claimed or archived meanwhile
                times.append(path.lstat().st_mtime)
        oldest = datetime.fromtimestamp(min(times), UTC) if times else None
        return Backlog(len(times), "files", oldest)

    def depth(self) -> int:
        """Records waiting: lines of claimed and ready files, one for each entry to refuse."""
        total = 0
        for path in self.pending_files():
            try:
                if _refusal(path) is not None:
                    total += 1
                    continue
                with _open_regular(path) as fh:
                    total += sum(1 for line in fh if line.strip())
            except FileNotFoundError:
                continue
        return total
