"""Polars frames in and out of DuckDB, and SQL over frames on a private in-memory database."""

from __future__ import annotations

import os
import threading

import duckdb
import polars as pl


def select_frame(
    conn: duckdb.DuckDBPyConnection, query: str, params: dict | list | None = None
) -> pl.DataFrame:
    """Run a SELECT on a store connection and return it as a Polars frame."""
    relation = conn.sql(query, params=params)
    if relation is None:
        raise ValueError("select_frame needs a query that returns rows")
    return relation.pl()


def register_frame(conn: duckdb.DuckDBPyConnection, name: str, frame: pl.DataFrame) -> None:
    """Make `frame` readable by SQL on `conn` as `name`, in place.

    Handed over as Arrow with Polars' own string views: registering the frame itself converts
    every string column to classic Arrow strings first, a copy of all the batch's text."""
    conn.register(name, frame.to_arrow(compat_level=pl.CompatLevel.newest()))


def owned_copy(column: str) -> pl.Expr:
    """The string column rebuilt into buffers of its own.

    Every column of a frame from `select_frame` keeps the memory of the whole query result alive,
    so a narrow column kept past its batch (ids, say) would keep every prompt of that batch too.
    """
    return pl.concat_str([pl.col(column), pl.lit("")]).alias(column)


# The private in-memory DuckDB of `sql_over_frames`, one per process (a forked child makes its own):
# a new database per call cost time and fresh memory for every call.
_PRIVATE_LOCK = threading.Lock()


_private: tuple[int, duckdb.DuckDBPyConnection] | None = None


# A parent's database as a forked child inherits it: never used, and never freed either, since
# its destructor would wait for worker threads that do not exist in the child.
_inherited: list[duckdb.DuckDBPyConnection] = []


PRIVATE_MEMORY_LIMIT = "1GB"


def _private_database() -> duckdb.DuckDBPyConnection:
    global _private
    with _PRIVATE_LOCK:
        if _private is None or _private[0] != os.getpid():
            if _private is not None:
                _inherited.append(_private[1])
            conn = duckdb.connect(config={"memory_limit": PRIVATE_MEMORY_LIMIT})
            conn.execute("SET GLOBAL TimeZone = 'UTC'")
            _private = (os.getpid(), conn)
        return _private[1]


def sql_over_frames(query: str, **frames: pl.DataFrame) -> pl.DataFrame:
    """Run a query over in-memory frames in a private DuckDB: no store, no lock, no waiting.

    Each call has a connection of its own (a cursor of the process's private database), so
    threads may call it at once; the frames are visible to that connection only."""
    with _private_database().cursor() as conn:
        for name, frame in frames.items():
            register_frame(conn, name, frame)
        return select_frame(conn, query)
