"""What every `qe` command shares: exit codes, one-line errors, where the store is, disk-full
diagnosis."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qe_assets.settings import Settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BUSY = 0, 1, 2, 3


class UserError(Exception):
    """A mistake the user can fix; printed without a traceback."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def _err(message: str) -> None:
    print(f"qe: {message}", file=sys.stderr)


def _where(settings: Settings) -> str:
    """Where the data directory came from, for messages that name a path: a relative default
    depends on the directory `qe` was started in."""
    data_dir = Path(settings.data_dir).absolute()
    if os.environ.get("QE_DUCKDB_PATH", "").strip():
        return f"QE_DUCKDB_PATH={settings.database}"
    if os.environ.get("QE_DATA_DIR", "").strip():
        return f"QE_DATA_DIR={data_dir}"
    return f"QE_DATA_DIR is not set: {data_dir}, under the current directory"


def _require_store(settings: Settings, consequence: str = "run `qe run` there first") -> Path:
    """The database's absolute path; a command that only reads or decides on existing data stops
    here, creating nothing, when it is not there (typically `qe` started in another directory)."""
    database = settings.database.absolute()
    if not database.exists():
        raise UserError(
            f"no database at {database} yet ({_where(settings)}): {consequence}, or set "
            "QE_DATA_DIR to the directory that holds qe.duckdb"
        )
    return database


# What SQLite (Dagster's instance), DuckDB and the OS say when a disk fills up. SQLite often says
# only "disk I/O error": that counts as full when the disk has (next to) nothing left.
_FULL = ("no space left on device", "database or disk is full", "disk quota exceeded")


_MAYBE_FULL = ("disk i/o error",)


_NEARLY_EMPTY = 1 << 20


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and every cause and context behind it."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _nearest_existing(path: Path) -> Path:
    return next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())


def _disk_full(settings: Settings, *errors: BaseException | str) -> str | None:
    """One line for a full disk under the data directory or DAGSTER_HOME, else None."""
    import errno
    import shutil

    texts = [str(e).lower() for e in errors]
    certain = any(
        isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in errors
    )
    certain = certain or any(marker in t for t in texts for marker in _FULL)
    if not certain and not any(marker in t for t in texts for marker in _MAYBE_FULL):
        return None
    home = Path(os.environ.get("DAGSTER_HOME") or settings.dagster_home)
    places = [_nearest_existing(settings.database.parent), _nearest_existing(home)]
    free, place = min((shutil.disk_usage(p).free, p) for p in places)
    if not certain and free >= _NEARLY_EMPTY:
        return None
    return (
        f"disk full at {place} ({free // 1024} KiB free): free space and re-run; "
        "nothing committed was lost"
    )


def _reviewer(args: argparse.Namespace) -> str:
    return args.reviewer or os.environ.get("QE_REVIEWER") or os.environ.get("USER") or "reviewer"
