"""`qe sql`: one read statement against our tables, and its result in a form every output takes.

"Read-only" used to mean only that our database was opened read-only: `COPY … TO` and `EXPORT
DATABASE` wrote any file, `ATTACH … (READ_WRITE)` changed other databases, `read_text` read any
file, and `;` ran several statements. Now DuckDB's own parser must find exactly one statement of a
read kind, and the connection has no file system access (`enable_external_access=false`, locked
so the query cannot turn it back on). `--allow-files` gives file access back, and COPY/EXPORT.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import duckdb
import polars as pl
from duckdb.sqltypes import DuckDBPyType

READ_KINDS = (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN)
FILE_KINDS = (duckdb.StatementType.COPY, duckdb.StatementType.EXPORT)

# Only the tables of the database that was opened, and the query cannot change that.
SANDBOX: Mapping[str, bool] = {"enable_external_access": False, "lock_configuration": True}
WITH_FILES: Mapping[str, bool] = {"lock_configuration": True}

# DuckDB types that Polars takes and writes in every output (table, csv, json, parquet), alone
# and inside lists, arrays, structs and maps. Anything else (VARIANT, UNION, INTERVAL, BIT, BLOB,
# TIME WITH TIME ZONE, BIGNUM, (U)HUGEINT, GEOMETRY, a type a later DuckDB adds) is written as text:
# Polars refuses it (CSV), panics on it (JSON), cannot import it, or imports it wrong (the largest
# UHUGEINT came out as -1, the largest HUGEINT rounded).
_POLARS_LEAVES = frozenset(
    {
        "boolean",
        "tinyint",
        "smallint",
        "integer",
        "bigint",
        "utinyint",
        "usmallint",
        "uinteger",
        "ubigint",
        "float",
        "double",
        "decimal",
        "varchar",
        "date",
        "time",
        "time_ns",
        "timestamp",
        "timestamp_s",
        "timestamp_ms",
        "timestamp_ns",
        "timestamp with time zone",
        "uuid",
        "enum",
        "null",
    }
)
# Nested types, kept as they are in json/parquet and written as JSON text in csv and tables.
_NESTED = frozenset({"list", "struct", "map", "array"})


class AdHocError(ValueError):
    """A query qe sql will not run, or a result it cannot show; one line for the user."""


def read_statement(query: str, *, allow_files: bool) -> duckdb.Statement:
    """The query's one statement, if it is of a kind qe sql runs (a syntax error is raised as
    DuckDB's own `ParserException`, like any other error in the query)."""
    statements = duckdb.extract_statements(query)
    if len(statements) != 1:
        raise AdHocError(f"qe sql runs exactly one statement, not {len(statements)}")
    (statement,) = statements
    allowed = READ_KINDS + FILE_KINDS if allow_files else READ_KINDS
    if statement.type not in allowed:
        kind = statement.type.name
        extra = "" if allow_files else "; COPY … TO / EXPORT DATABASE need --allow-files"
        raise AdHocError(f"qe sql is read-only: one SELECT (or EXPLAIN), not {kind}{extra}")
    return statement


def result_frame(relation: duckdb.DuckDBPyRelation, *, nested_as_json: bool) -> pl.DataFrame:
    """The relation as a Polars frame: types Polars lacks as text, nested values as JSON text
    when the output (csv, a printed table) has no room for nesting."""
    names = relation.columns
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise AdHocError(f"column {twice[0]!r} appears twice in the result: name them apart (AS)")
    exprs = [
        _output_expression(n, t, nested_as_json) for n, t in zip(names, relation.types, strict=True)
    ]
    if any(expr != _quoted(n) for expr, n in zip(exprs, names, strict=True)):
        relation = relation.project(", ".join(exprs))
    return relation.pl()


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _polars_takes(column_type: DuckDBPyType) -> bool:
    """Whether Polars takes this type, and every type nested in it, in every output."""
    type_id = column_type.id
    if type_id in _NESTED:
        return all(
            _polars_takes(child)
            for _, child in column_type.children
            if isinstance(child, DuckDBPyType)  # an array's size is an int
        )
    return type_id in _POLARS_LEAVES


def _output_expression(name: str, column_type: DuckDBPyType, nested_as_json: bool) -> str:
    column = _quoted(name)
    nested = column_type.id in _NESTED
    if _polars_takes(column_type) and not (nested and nested_as_json):
        return column
    if nested:
        # JSON keeps the structure readable wherever text goes; to_json spells every DuckDB
        # type (an interval as "1 day", a union as its member, a variant as its value).
        return f"CAST(to_json({column}) AS VARCHAR) AS {column}"
    return f"CAST({column} AS VARCHAR) AS {column}"


# After its --timeout a query is interrupted; one that does not stop within this grace (DuckDB
# checks for interrupts between chunks, not inside every function) ends the process, which
# releases the file: the writers' wait (store.WRITER_WAIT_SECONDS) counts on the bound.
INTERRUPT_GRACE_SECONDS = 10.0


@contextmanager
def time_bound(conn: duckdb.DuckDBPyConnection, seconds: float) -> Iterator[None]:
    """Interrupt what `conn` runs after `seconds` (DuckDB raises `InterruptException` in the
    caller); exit the process if the query still runs `INTERRUPT_GRACE_SECONDS` later."""
    done = threading.Event()

    def watch() -> None:
        if done.wait(seconds):
            return
        conn.interrupt()
        if done.wait(INTERRUPT_GRACE_SECONDS):
            return
        print(
            f"qe: query stopped after --timeout {seconds:g}s (it did not stop when interrupted)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)

    watcher = threading.Thread(target=watch, name="qe-sql-timeout", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
