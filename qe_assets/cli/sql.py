"""`qe sql`: one read statement against our tables, printed in the format asked for."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from qe_assets.settings import Settings

if TYPE_CHECKING:
    import duckdb
    import polars as pl

from qe_assets.cli.common import EXIT_FAILED, EXIT_OK, UserError, _err, _require_store


def cmd_sql(args: argparse.Namespace, settings: Settings) -> int:
    import duckdb

    from qe_assets.ops import adhoc
    from qe_assets.store import READ_SECONDS_MAX, connect

    _require_store(settings)
    if args.format == "parquet" and not args.output:
        raise UserError("--format parquet needs --output FILE")
    if not 0 < args.timeout <= READ_SECONDS_MAX:
        # Writers wait for readers a little longer than this, so no query can fail a run.
        raise UserError(f"--timeout must be above 0 and at most {READ_SECONDS_MAX:.0f} seconds")
    try:
        statement = adhoc.read_statement(args.query, allow_files=args.allow_files)
    except (adhoc.AdHocError, duckdb.Error) as exc:  # the query's fault: exit 1, as at run time
        raise UserError(str(exc).splitlines()[0], EXIT_FAILED) from exc
    waited = False

    def on_wait(remaining: float) -> None:
        nonlocal waited
        if not waited:
            _err(f"database busy with a writer, waiting up to {remaining:.0f}s ...")
            waited = True

    config = adhoc.WITH_FILES if args.allow_files else adhoc.SANDBOX
    with (
        connect(
            settings.database,
            read_only=True,
            wait_seconds=args.wait,
            on_wait=on_wait,
            config=config,
        ) as conn,
        adhoc.time_bound(conn, args.timeout),
    ):
        frame = _run_statement(conn, statement, args)
    if frame is not None:
        _write_frame(frame, args)
    return EXIT_OK


def _run_statement(
    conn: duckdb.DuckDBPyConnection, statement: duckdb.Statement, args: argparse.Namespace
) -> pl.DataFrame | None:
    """The statement's rows (None for a COPY/EXPORT, which --allow-files lets through)."""
    import duckdb

    from qe_assets.ops import adhoc

    try:
        if statement.type in adhoc.FILE_KINDS:
            conn.execute(statement.query)
            print(f"{statement.type.name} done")
            return None
        return adhoc.result_frame(
            conn.sql(statement.query), nested_as_json=args.format in ("table", "csv")
        )
    except duckdb.PermissionException as exc:
        hint = "qe sql reads the database's tables only; --allow-files lifts this"
        raise UserError(f"{str(exc).splitlines()[0]} ({hint})", EXIT_FAILED) from exc
    except duckdb.InterruptException as exc:
        raise UserError(
            f"query stopped after --timeout {args.timeout:g}s, so that it does not hold up "
            "the runs that write (raise --timeout, or narrow the query)",
            EXIT_FAILED,
        ) from exc
    except (duckdb.Error, adhoc.AdHocError) as exc:
        raise UserError(str(exc).splitlines()[0], EXIT_FAILED) from exc


def _write_frame(frame: pl.DataFrame, args: argparse.Namespace) -> None:
    import polars as pl

    if args.format == "table":
        with pl.Config(
            tbl_rows=args.max_rows, tbl_cols=-1, fmt_str_lengths=80, tbl_width_chars=160
        ):
            print(frame)
        return
    target = args.output or sys.stdout
    if args.format == "csv":
        frame.write_csv(target)
    elif args.format == "json":
        frame.write_ndjson(target)
    else:
        frame.write_parquet(args.output)
    if args.output:
        print(f"wrote {frame.height} rows to {args.output}")
