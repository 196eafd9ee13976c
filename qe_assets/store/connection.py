"""Connections to the store: readers that never block a run, one writer at a time behind the writer
lock."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from pathlib import Path
from types import TracebackType
from typing import Any

import duckdb

from qe_assets.store.schema import ensure_schema

_LOG = logging.getLogger("qe_assets.store")


# What the batch loops of the writing stages take: a fresh write connection per transaction
# (`WriterSession.connection` in the assets, `connect` in tests).
ConnectionFactory = Callable[[], AbstractContextManager[duckdb.DuckDBPyConnection]]


# Settings of every writing connection. Writers close after each short transaction, so each batch
# ends in a checkpoint; DuckDB's checkpoint vacuum then merged the small row groups of earlier
# batches again and again (1, 2, 4, 8 ... batches rewritten), tripling the checkpoint time of a
# long ingest and leaving the file half as large again. Only small tables (watermarks, review
# queue, fine-tune runs) ever update or delete rows, so there is little space to reclaim.
# Text is stored with ZSTD: what the stages write is mostly long text (documents, prompts,
# completions) in which the same knowledge-base passages come back again and again. DuckDB's own
# choice (dictionary + FSST) checkpointed far slower and gave a larger file on the bench's events
# (docs/performance.md); numeric columns keep their own encodings.
# A batch commit larger than `checkpoint_threshold` checkpoints at once and skips the write-ahead
# log (DuckDB's auto_checkpoint_skip_wal_threshold): a stage's batch (tens of MB of text) was
# written twice, to the WAL at commit and into the file at close, and is now written once. Small
# commits (a review decision, a watermark) still go through the WAL.
WRITER_CONFIG: dict[str, str | int] = {
    "max_vacuum_tasks": 0,
    "force_compression": "zstd",
    "checkpoint_threshold": "1MB",
}


# How long `qe sql` may hold the file at most (its --timeout), and how long a write connection
# waits for readers: longer than that, so a reader never fails a writer. Before these bounds a
# query of minutes made a concurrent run fail after the writer's 60 s wait (issue 26).
READ_SECONDS_MAX = 300.0


WRITER_WAIT_SECONDS = READ_SECONDS_MAX + 60.0


class DatabaseBusy(RuntimeError):
    """The database stayed locked by a writer for longer than the caller was willing to wait."""


def _is_lock_error(exc: Exception) -> bool:
    text = str(exc).lower()
    # "different configuration": this process has the file open with other settings (a
    # read-only connection beside a write one); it is closed again in a moment, like a lock.
    return (
        "lock" in text
        or "conflicting" in text
        or "being used" in text
        or "different configuration" in text
    )


@contextmanager
def connect(
    database: str | Path,
    *,
    read_only: bool = False,
    wait_seconds: float | None = None,
    on_wait: Callable[[float], None] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open DuckDB, waiting (bounded) while another process holds the file; always closes."""
    conn = open_connection(
        database, read_only=read_only, wait_seconds=wait_seconds, on_wait=on_wait, config=config
    )
    try:
        yield conn
    finally:
        conn.close()


def open_connection(
    database: str | Path,
    *,
    read_only: bool = False,
    wait_seconds: float | None = None,
    on_wait: Callable[[float], None] | None = None,
    config: Mapping[str, Any] | None = None,
) -> duckdb.DuckDBPyConnection:
    """`connect` without the context: the caller closes. Writers get WRITER_CONFIG, then
    `config` on top (memory limit and the like); readers get `config` alone. The wait defaults
    to 60 s for a reader and to WRITER_WAIT_SECONDS, past the longest `qe sql`, for a writer."""
    path = Path(database)
    if wait_seconds is None:
        wait_seconds = 60.0 if read_only else WRITER_WAIT_SECONDS
    settings = {**(config or {})} if read_only else {**WRITER_CONFIG, **(config or {})}
    # Locked only once the time zone below is set (`qe sql` locks its sandbox).
    lock = bool(settings.pop("lock_configuration", False))
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_seconds
    delay = 0.02
    warned = False
    while True:
        try:
            conn = duckdb.connect(str(path), read_only=read_only, config=settings)
        except (duckdb.IOException, duckdb.ConnectionException) as exc:
            if not _is_lock_error(exc):
                raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DatabaseBusy(
                    f"{path} stayed locked by another process for {wait_seconds:.0f}s: {exc}"
                ) from exc
            if on_wait is not None:
                on_wait(remaining)
            elif not read_only and not warned:
                # Writers queue on the writer lock, so what holds the file is a reader (`qe sql`
                # most likely): say why the stage stands still.
                _LOG.warning(
                    "%s is open in another process (a reader such as qe sql): waiting up to "
                    "%.0fs for it",
                    path,
                    remaining,
                )
                warned = True
            time.sleep(min(delay, remaining))
            # Readers poll fast: writers leave only short gaps between their transactions.
            delay = min(delay * 2, 0.05 if read_only else 0.5)
            continue
        try:
            # Every TIMESTAMP the stages write is UTC (Python's datetime.now(UTC) and SQL's
            # now()::TIMESTAMP alike); DuckDB would otherwise cast now() in the machine's zone.
            conn.execute("SET TimeZone = 'UTC'")
            if lock:
                conn.execute("SET lock_configuration = true")
        except BaseException:
            conn.close()
            raise
        return conn


class DatabaseCloseFailed(RuntimeError):
    """A write connection's close (its checkpoint) failed on the session's helper thread."""


class WriterSession:
    """Short write connections to one database, one after another, each closed on a helper thread.

    Closing a write connection is when DuckDB checkpoints: it compresses what the transaction
    wrote into the file, about a third of a long ingest's time. That work needs no Python, so it
    runs on a second core while the stage prepares its next batch in Python and Polars. The next
    `connection()` waits for it first (a process must not reopen a file it is still closing), and
    leaving the session waits for the last one, so the stage's writer lock outlives every close.
    A failed close is raised from the next `connection()` or the session's exit.
    """

    def __init__(self, database: str | Path, *, config: Mapping[str, Any] | None = None) -> None:
        self.database = Path(database)
        self.config = dict(config or {})
        self._closing: threading.Thread | None = None
        self._close_error: BaseException | None = None

    def __enter__(self) -> WriterSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.wait()
            return
        # The body's error is the one to report; still never leave a close running.
        with suppress(Exception):
            self.wait()

    def wait(self) -> None:
        """Block until the last connection is closed; raise what its close raised."""
        if self._closing is not None:
            self._closing.join()
            self._closing = None
        if self._close_error is not None:
            error, self._close_error = self._close_error, None
            # Raised from the next batch's `connection()`: say that it is the previous close
            # (its transaction had committed) rather than let it pass for this batch's failure.
            raise DatabaseCloseFailed(
                f"closing the previous write connection to {self.database} failed after its "
                f"transaction committed: {error!r}"
            ) from error

    def _close(self, conn: duckdb.DuckDBPyConnection) -> None:
        try:
            conn.close()
        except BaseException as exc:  # handed to the thread that waits
            self._close_error = exc

    @contextmanager
    def connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A write connection with the schema in place; closed behind the caller on success,
        at once when the body fails (its transaction is rolled back by the close)."""
        self.wait()
        conn = open_connection(self.database, config=self.config)
        try:
            ensure_schema(conn)
            yield conn
        except BaseException:
            with suppress(Exception):  # the body's error is the one to report
                conn.close()
            raise
        self._closing = threading.Thread(
            target=self._close, args=(conn,), name="duckdb-close", daemon=True
        )
        self._closing.start()


def writer_lock_path(database: str | Path) -> Path:
    return Path(f"{database}.writer.lock")


# Writer locks this process holds (lock path -> holds), so that a query a stage makes through
# `writer_connection` while its `writer_lock` is taken does not wait for itself. Process-wide, not
# per thread: a stage's LLM pages and commits run on worker threads.
_HELD: dict[str, int] = {}


_HELD_GUARD = threading.Lock()


def holds_writer_lock(database: str | Path) -> bool:
    with _HELD_GUARD:
        return _HELD.get(str(writer_lock_path(database).absolute()), 0) > 0


def _mark_held(path: Path, step: int) -> None:
    key = str(path.absolute())
    with _HELD_GUARD:
        _HELD[key] = _HELD.get(key, 0) + step
        if _HELD[key] <= 0:
            del _HELD[key]


@contextmanager
def writer_lock(
    database: str | Path,
    *,
    on_wait: Callable[[str], None] | None = None,
    poll_seconds: float = 0.1,
    report_seconds: float = 30.0,
    wait_seconds: float | None = None,
) -> Iterator[None]:
    """The right to write to `database`, exclusive across the processes of this host: held by a
    writing stage for the whole stage, and by every other write (a run's queries between stages,
    a reviewer's transaction) for its one short transaction (see `writer_connection`).

    DuckDB's own file lock guards a transaction, not a stage: a stage that claims queue records,
    commits and acks over many short transactions must not interleave with another run's. A
    kernel lock (flock) does this without races and is released by the kernel when its holder
    exits or is killed, so a crash never leaves it taken. `on_wait(holder)` is called when the
    lock is busy, and again every `report_seconds` while waiting. Stages wait as long as it takes
    (another run's stage ends); with `wait_seconds`, `DatabaseBusy` is raised after that long.
    """
    path = writer_lock_path(database)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = None if wait_seconds is None else time.monotonic() + wait_seconds
    try:
        reported_at: float | None = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    holder = os.pread(fd, 256, 0).decode("utf-8", errors="replace").strip()
                    raise DatabaseBusy(
                        f"{database} stayed locked by a writer ({holder or 'another process'}) "
                        f"for {wait_seconds:.0f}s"
                    ) from None
                if on_wait is not None and (
                    reported_at is None or now - reported_at >= report_seconds
                ):
                    holder = os.pread(fd, 256, 0).decode("utf-8", errors="replace").strip()
                    on_wait(holder or "another process")
                    reported_at = now
                time.sleep(poll_seconds)
        # Who holds it, for the next waiter's message; never read for correctness.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        _mark_held(path, 1)
        try:
            yield
        finally:
            _mark_held(path, -1)
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def writer_connection(
    database: str | Path,
    *,
    config: Mapping[str, Any] | None = None,
    wait_seconds: float | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[duckdb.DuckDBPyConnection]:
    """One short write connection with the schema in place, under the writer lock (taken here
    unless this process holds it already, as a stage does), closed before the lock is released.

    Every write outside a stage's `WriterSession` comes through here, so writers never race on
    DuckDB's own file lock: they queue on the writer lock, and only short read-only readers
    (`qe sql`, the sensor) can make `open_connection` wait. `wait_seconds` bounds both waits
    (None: as long as a stage takes for the lock, then `open_connection`'s default).
    """
    lock = (
        nullcontext()
        if holds_writer_lock(database)
        else writer_lock(database, wait_seconds=wait_seconds, on_wait=on_wait)
    )
    started = time.monotonic()
    with lock:
        spent = time.monotonic() - started
        left = WRITER_WAIT_SECONDS if wait_seconds is None else max(0.0, wait_seconds - spent)
        with connect(database, config=config, wait_seconds=left) as conn:
            ensure_schema(conn)
            yield conn


@contextmanager
def transaction(conn: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """BEGIN … COMMIT, rolled back on any error (crashes roll back by themselves)."""
    conn.execute("BEGIN TRANSACTION")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
