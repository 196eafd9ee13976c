"""`qe`: enqueue events, run the loop headlessly, query and inspect the store.

Exit codes scripts can rely on: 0 success, 1 the work failed (a run failed, records were
invalid), 2 bad usage or configuration, 3 the database stayed locked by a writer too long.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qe_assets import versions_cli
from qe_assets.settings import Settings, SettingsError, estimated_cost

if TYPE_CHECKING:
    import duckdb
    import polars as pl

    from qe_assets.review import decisions as review
    from qe_assets.review import queue as review_queue
    from qe_assets.rollout.registry import ActiveTest

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


def cmd_enqueue(args: argparse.Namespace, settings: Settings) -> int:
    from qe_assets.ingest.events import parse_records
    from qe_assets.ingest.queues import QueueUnavailable, open_queue

    queue = open_queue(settings)
    accepted = invalid = 0
    for name in args.files:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        raw_lines = [line.rstrip(b"\r\n") for line in path.read_bytes().splitlines()]
        numbered = [(n, line) for n, line in enumerate(raw_lines, start=1) if line.strip()]
        sources = [f"{path}:{n}" for n, _ in numbered]
        parsed = parse_records([line for _, line in numbered], sources)
        for row in parsed.rejected.iter_rows(named=True):
            _err(f"{row['source']}: {row['reason']}")
        invalid += parsed.rejected.height
        payloads = parsed.events["payload"].to_list()
        if args.keep_invalid:
            # Forwarded so they land in rejected_events, where the pipeline keeps a record.
            payloads += parsed.rejected["payload"].to_list()
        try:
            accepted += queue.put(payloads)
        except QueueUnavailable as exc:
            raise UserError(str(exc), EXIT_FAILED) from exc
    target = f" ({settings.inbox_dir.absolute()})" if queue.name == "inbox" else ""
    print(f"enqueued {accepted} records on the {queue.name} queue; {invalid} invalid{target}")
    return EXIT_FAILED if invalid and not args.keep_invalid else EXIT_OK


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from qe_assets.ops.runner import run_pipeline

    try:
        outcome = run_pipeline(
            settings, cut_version=args.cut_version, log_level="WARNING" if args.quiet else "INFO"
        )
    except Exception as exc:
        # Dagster's own SQLite or a write of ours failing for space ends here, not in a step.
        if (full := _disk_full(settings, *_chain(exc))) is not None:
            raise UserError(full, EXIT_FAILED) from exc
        raise
    for line in outcome.summary:
        print(line)
    if not outcome.success:
        full = _disk_full(settings, outcome.error or "")
        _err(full or f"run {outcome.run_id} failed: {outcome.error}")
        return EXIT_FAILED
    return EXIT_OK


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


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    # A missing store is a state to report, not an error: events may already wait in the queue
    # before the first run. Nothing is created; the line says where it looked and what to set.
    database = settings.database.absolute()
    if database.exists():
        print(f"database: {database} ({_where(settings)})")
        _print_store_status(args, settings)
    else:
        print(
            f"database: none yet at {database} ({_where(settings)}): `qe run` creates it, or "
            "set QE_DATA_DIR to the directory that holds qe.duckdb"
        )
    _print_queue_status(settings)
    return EXIT_OK


def _print_store_status(args: argparse.Namespace, settings: Settings) -> None:
    """Counts per table, the review queue, ready samples, the latest version, LLM use, the
    production model and the models per version."""
    from qe_assets.release.readiness import ready_sample_count
    from qe_assets.store import connect, table_counts

    with connect(settings.database, read_only=True, wait_seconds=args.wait) as conn:
        for table, count in table_counts(conn).items():
            print(f"  {table:<18} {count:>10,}")
        review = conn.execute(
            "SELECT count(*) FROM review_queue WHERE status = 'pending'"
        ).fetchall()[0][0]
        latest = conn.execute(
            "SELECT version, sample_count, created_at FROM dataset_versions "
            "ORDER BY number DESC LIMIT 1"
        ).fetchall()
        ready = ready_sample_count(conn, eval_share=settings.eval_share)
        models = conn.execute(
            """
            SELECT dataset_version, backend, status, coalesce(model_id, message, '')
            FROM fine_tune_runs
            QUALIFY row_number() OVER (
                PARTITION BY dataset_version ORDER BY updated_at DESC) = 1
            ORDER BY dataset_version DESC LIMIT 10
            """
        ).fetchall()
        completions = conn.execute(
            """
            SELECT mode, status, count(*), coalesce(sum(attempts), 0),
                   coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0)
            FROM completions GROUP BY ALL ORDER BY ALL
            """
        ).fetchall()
        failures = conn.execute(
            "SELECT error, count(*) FROM completions WHERE status = 'failed' "
            "GROUP BY 1 ORDER BY 2 DESC"
        ).fetchall()
        conn_rows = _production_rows(conn)
        rollout = _status_rollout(conn, settings)
    print(f"review queue: {review:,} samples waiting for a human")
    print(
        f"pending samples: {ready:,} ready for the next version "
        f"(fine-tune threshold {settings.finetune_threshold:,})"
    )
    if latest:
        version, count, created = latest[0]
        print(f"latest dataset: {version} ({count:,} samples, {created:%Y-%m-%d %H:%M} UTC)")
    else:
        print("latest dataset: none yet")
    if completions:
        print("completions (mode, status: samples, HTTP requests, tokens in/out):")
        for mode, status, samples, requests, tokens_in, tokens_out in completions:
            print(
                f"  {mode:<6} {status:<18} {samples:>8,} {requests:>8,} "
                f"{tokens_in:>12,} {tokens_out:>12,}"
            )
        tokens_in = sum(row[4] for row in completions)
        tokens_out = sum(row[5] for row in completions)
        cost = estimated_cost(
            tokens_in, tokens_out, settings.llm_price_input_per_1m, settings.llm_price_output_per_1m
        )
        print(f"  LLM tokens {tokens_in:,} in / {tokens_out:,} out, estimated cost {cost:.4f}")
    if failures:
        print(
            "failed completions by error: "
            + ", ".join(f"{error} {count:,}" for error, count in failures)
        )
    production, evaluation = _production_line(conn_rows, rollout.base_model)
    print(f"production model: {production}")
    if evaluation:
        print(f"latest evaluation: {evaluation}")
    print(f"rollout: {rollout.line}")
    if rollout.steps:
        print("release timeline:")
        for line in rollout.steps:
            print(line)
    if models:
        print("models (latest run per dataset version):")
        for version, backend, status, model in models:
            print(f"  {version}  {backend:<8} {status:<10} {model}")


def _print_queue_status(settings: Settings) -> None:
    from qe_assets.ingest.queues import QueueUnavailable, durability_warning, open_queue

    queue = open_queue(settings)
    try:
        print(f"queue ({queue.name}): {queue.depth():,} pending")
        warning = durability_warning(queue)  # asked only of a server that answers
        if warning is not None:
            print(f"WARNING: {warning}")
    except QueueUnavailable as exc:
        print(f"queue ({queue.name}): unavailable ({exc})")


def _production_rows(conn: duckdb.DuckDBPyConnection) -> tuple[list[tuple], list[tuple]]:
    """The newest promotion and the newest evaluation ([] on a store from before the gate)."""
    import duckdb

    try:
        promoted = conn.execute(
            "SELECT model, action, promoted_by, promoted_at FROM promoted_models "
            "ORDER BY promotion_id DESC LIMIT 1"
        ).fetchall()
        evaluated = conn.execute(
            "SELECT candidate, baseline, n, win_rate, ci_low, decision FROM model_evaluations "
            "ORDER BY created_at DESC LIMIT 1"
        ).fetchall()
    except duckdb.CatalogException:
        return [], []
    return promoted, evaluated


def _production_line(
    rows: tuple[list[tuple], list[tuple]], base_model: str
) -> tuple[str, str | None]:
    promoted, evaluated = rows
    if promoted:
        model, action, by, at = promoted[0]
        done = "promoted" if action == "promote" else "rolled back to"
        production = f"{model} ({done} by {by}, {at:%Y-%m-%d %H:%M} UTC)"
    else:
        production = f"{base_model or 'the base model'} (the base model; none promoted yet)"
    if not evaluated:
        return production, None
    candidate, baseline, n, win_rate, ci_low, decision = evaluated[0]
    # The stored `promote` means "passed the gate": what followed is on the rollout line.
    verdict = "passed the gate" if decision == "promote" else decision
    if not n:
        return production, f"{candidate} vs {baseline}: {verdict} (no judged pair)"
    return production, (
        f"{candidate} vs {baseline}: {verdict}, win rate {win_rate:.3f} "
        f"(95% lower bound {ci_low:.3f}, n={n:,})"
    )


@dataclass(frozen=True)
class _Rollout:
    line: str
    base_model: str
    steps: list[str]


def _status_rollout(conn: duckdb.DuckDBPyConnection, settings: Settings) -> _Rollout:
    """`qe status`'s rollout line (the canary and its share, or none) and the release timeline,
    from the same rows as the asset pages and the dashboards."""
    import duckdb

    from qe_assets.rollout import registry as ab
    from qe_assets.rollout import timeline
    from qe_assets.rollout.sequential import distance_to_decision, policy_of

    base = settings.finetune_base_model
    try:
        test = ab.active_test(conn)
        rows = ab.newest_test_rows(conn)
        state = ab.current_state(conn)
    except duckdb.CatalogException:  # a store from before the rollout
        return _Rollout("no A/B test yet", base, [])
    # Before any promotion, production is the model the tests ran against (the base model).
    base = (state.production if not _production_rows(conn)[0] else None) or base
    progress = None
    if test is None:
        line = f"no candidate has traffic; every request goes to {state.production or base}"
        if rows:
            last = rows[-1]
            line += (
                f" (the last test, {last['candidate']}, ended {last['decided_at']:%Y-%m-%d %H:%M}"
                f" UTC: {last['decision']} by {last['decided_by']})"
            )
    else:
        arms = ab.arm_counts(conn, test)
        distance = distance_to_decision(arms, test.share, policy_of(settings))
        progress = distance.text()
        line = (
            f"canary {test.candidate} at {test.share:.0%} of traffic against {test.production} "
            f"since {test.started_at:%Y-%m-%d %H:%M} UTC; {progress}"
        )
    steps = timeline.release_timeline(timeline.read_rows(conn), progress)
    return _Rollout(line, base, timeline.text_lines(steps))


def _reviewer(args: argparse.Namespace) -> str:
    return args.reviewer or os.environ.get("QE_REVIEWER") or os.environ.get("USER") or "reviewer"


def _edited_text(args: argparse.Namespace, current: str) -> tuple[str, Path | None]:
    """The new completion, and the file it was edited in (kept until the edit is recorded, so a
    refused edit loses no work)."""
    if args.completion is not None:
        return str(args.completion), None
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR")
    if not editor:
        raise UserError("give --completion TEXT, or set $EDITOR to edit interactively")
    import shlex
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile("w+", suffix=".txt", encoding="utf-8", delete=False) as fh:
        fh.write(current)
        path = Path(fh.name)
    if subprocess.run([*shlex.split(editor), str(path)], check=False).returncode != 0:
        path.unlink(missing_ok=True)
        raise UserError(f"{editor} exited with an error; nothing changed", EXIT_FAILED)
    return path.read_text(encoding="utf-8"), path


_LIST_COLUMNS = (
    "sample_id",
    "priority",
    "reason",
    "status",
    "label",
    "language",
    "confidence",
    "judge",
    "question",
)


def _queue_filter(args: argparse.Namespace, status: str | None) -> review_queue.QueueFilter:
    from qe_assets.review import queue as review_queue

    return review_queue.QueueFilter(
        status=status,
        reason=args.reason,
        label=args.label,
        language=getattr(args, "language", None),
        min_confidence=getattr(args, "min_confidence", None),
        max_confidence=args.max_confidence,
    )


def _list_rows(rows: list[dict]) -> list[dict]:
    """What `review list` prints of each row: plain values, the judge's two scores as one."""
    out = []
    for row in rows:
        judged = row["judge_completion_score"] is not None
        out.append(
            {
                **{name: row.get(name) for name in _LIST_COLUMNS},
                "judge": (
                    f"{row['judge_original_score']:g}->{row['judge_completion_score']:g}"
                    if judged
                    else ""
                ),
                "question": " ".join(str(row["question"]).split()),
            }
        )
    return out


def _print_rows(rows: list[dict], fmt: str) -> None:
    """table: aligned columns without dtype rows; csv: a header and rows; json: one per line."""
    import csv
    import json

    if fmt == "json":
        for row in rows:
            print(json.dumps(row, ensure_ascii=False, default=str))
        return
    if fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(_LIST_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
        return
    cells = [[("" if r[c] is None else str(r[c])) for c in _LIST_COLUMNS] for r in rows]
    widths = [
        min(60, max(len(c), *(len(line[i]) for line in cells)) if cells else len(c))
        for i, c in enumerate(_LIST_COLUMNS)
    ]
    print("  ".join(c.ljust(w) for c, w in zip(_LIST_COLUMNS, widths, strict=True)).rstrip())
    for line in cells:
        print("  ".join(v[:w].ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


def _review_read(args: argparse.Namespace, settings: Settings) -> int:
    """list / show: one short read-only connection, never the writer's."""
    from qe_assets.review import decisions as review
    from qe_assets.review import queue as review_queue
    from qe_assets.store import connect

    with connect(settings.database, read_only=True, wait_seconds=args.wait) as conn:
        if args.action == "list":
            status = None if args.status == "all" else args.status
            queue_filter = _queue_filter(args, status)
            rows = review_queue.page(conn, queue_filter, limit=args.limit, offset=args.offset)
            total = review_queue.count(conn, queue_filter)
            _print_rows(_list_rows(rows), args.format)
            if args.format == "table":
                first = args.offset + 1 if rows else 0
                print(
                    f"{first:,}-{args.offset + len(rows):,} of {total:,} "
                    f"({queue_filter.describe()}); highest priority first, see docs/review.md"
                    if args.offset
                    else f"{len(rows):,} of {total:,} ({queue_filter.describe()}); "
                    "highest priority first, see docs/review.md"
                )
            return EXIT_OK
        item = review.show(conn, args.sample_id)
    _print_item(item)
    return EXIT_OK


def _print_item(item: review.ReviewItem) -> None:
    sample, queued = item.sample, item.review
    print(
        f"sample {sample['sample_id']}  label={sample['label']}  "
        f"confidence={sample['confidence']:.3f}  route={sample['route']}"
        + (f"  in {item.released_in}" if item.released_in else "")
    )
    print(
        f"review: {queued['status']} ({queued['reason']})"
        + (f" by {queued['reviewer']}" if queued["reviewer"] else "")
        + (f": {queued['note']}" if queued["note"] else "")
    )
    print("\n--- prompt ---\n" + sample["prompt"])
    print("\n--- original answer ---\n" + sample["original_answer"])
    c = item.completion
    if not c:
        print("\n--- completion: none yet (accept keeps the naive completion) ---")
        return
    kind = "proposed completion" if c["status"] == "proposed" else "completion"
    print(f"\n--- {kind} ({c['mode']}, {c['status']}) ---\n" + (c["completion"] or ""))
    if c.get("judge_completion_score") is not None:
        print(
            f"judge {c['judge_model']}: original {c['judge_original_score']:g}, "
            f"completion {c['judge_completion_score']:g}"
        )


def _review_write(
    args: argparse.Namespace, settings: Settings
) -> AbstractContextManager[duckdb.DuckDBPyConnection]:
    """A reviewer's write: the writer lock every stage takes, one short transaction, released.
    Waits at most --wait seconds in all, saying once that it waits."""
    from qe_assets.store import writer_connection

    def waiting(holder: str) -> None:
        _err(f"database busy with a writer ({holder}), waiting up to {args.wait:.0f}s ...")

    return writer_connection(settings.database, wait_seconds=args.wait, on_wait=waiting)


def _review_edit(args: argparse.Namespace, settings: Settings, reviewer: str) -> int:
    """Read with a short read-only connection, close it, let the person edit for as long as
    they like, then write in one short transaction if nobody decided on the sample meanwhile."""
    from qe_assets.review import decisions as review
    from qe_assets.store import DatabaseBusy, connect

    with connect(settings.database, read_only=True, wait_seconds=args.wait) as conn:
        item = review.open_item(conn, args.sample_id)
    current = (item.completion or {}).get("completion") or item.sample["original_answer"]
    text, path = _edited_text(args, current)
    try:
        with _review_write(args, settings) as conn:
            review.edit(conn, args.sample_id, text, reviewer, args.note, seen=item.token)
    except (review.ReviewError, DatabaseBusy) as exc:
        kept = f"; your text is kept in {path}" if path is not None and text.strip() else ""
        code = EXIT_BUSY if isinstance(exc, DatabaseBusy) else EXIT_FAILED
        raise UserError(f"{exc}{kept}", code) from exc
    if path is not None:
        path.unlink(missing_ok=True)
    print(f"edited {args.sample_id}: a human completion by {reviewer}")
    return EXIT_OK


def _check_selection(args: argparse.Namespace) -> None:
    """Ids, or --all-matching with filters: a usage error (exit 2, with usage) otherwise."""
    filtered = any(v is not None for v in (args.label, args.reason, args.max_confidence))
    if args.sample_ids and (args.all_matching or filtered):
        args.usage_error("give sample ids or --all-matching with filters, not both")
    if not args.all_matching and filtered:
        args.usage_error("filters select samples only with --all-matching")
    if not args.all_matching and not args.sample_ids:
        args.usage_error("give one or more SAMPLE_IDs, or --all-matching with filters")


def _decision_ids(args: argparse.Namespace, settings: Settings) -> list[str]:
    """The ids named, or with --all-matching every pending sample the filters match, after a
    confirmation that states the count (--yes, or y at a terminal)."""
    from qe_assets.review import queue as review_queue
    from qe_assets.store import connect

    if not args.all_matching:
        return list(args.sample_ids)
    queue_filter = _queue_filter(args, review_queue.PENDING)
    with connect(settings.database, read_only=True, wait_seconds=args.wait) as conn:
        ids = review_queue.matching_ids(conn, queue_filter)
    if not ids:
        raise UserError(f"no pending sample matches ({queue_filter.describe()})", EXIT_FAILED)
    question = f"{args.action} {len(ids):,} pending samples ({queue_filter.describe()})?"
    if not args.yes:
        if not sys.stdin.isatty():
            raise UserError(f"would {question[:-1]}: add --yes to confirm")
        answer = input(f"{question[0].upper()}{question[1:]} [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            raise UserError("nothing changed", EXIT_FAILED)
    return ids


def cmd_review(args: argparse.Namespace, settings: Settings) -> int:
    from qe_assets.review import decisions as review

    if args.action in ("accept", "reject"):
        _check_selection(args)
    _require_store(settings)
    try:
        if args.action in ("list", "show"):
            return _review_read(args, settings)
        reviewer = _reviewer(args)
        if args.action == "edit":
            return _review_edit(args, settings, reviewer)
        ids = _decision_ids(args, settings)
        action = review.accept if args.action == "accept" else review.reject
        with _review_write(args, settings) as conn:
            # --all-matching: samples decided by someone else since the listing (or while the
            # y/N prompt waited) are skipped, not overwritten. Named ids: decided as asked.
            skipped = action(conn, ids, reviewer, args.note, only_pending=args.all_matching)
        done = "accepted" if args.action == "accept" else "rejected"
        extra = (
            f"; {skipped} skipped: decided by someone else meanwhile, their decision stands"
            if skipped
            else ""
        )
        print(f"{done} {len(set(ids)) - skipped} sample(s) as {reviewer}{extra}")
        return EXIT_OK
    except review.ReviewError as exc:
        raise UserError(str(exc), EXIT_FAILED) from exc


def _dagster_dev_command(host: str, port: int) -> list[str]:
    """`dagster dev` of this environment: the interpreter running `qe`, not a `dagster` looked up
    on PATH (none there on a fresh clone whose venv is not activated). The workspace file is
    the project's, wherever `qe ui` is started from."""
    import importlib.util

    for module, package in (("dagster", "dagster"), ("dagster_webserver", "dagster-webserver")):
        if importlib.util.find_spec(module) is None:
            raise UserError(f"{package} is not installed in {sys.prefix}: run `make install`")
    workspace = Path(__file__).resolve().parents[1] / "workspace.yaml"
    location = (
        ["-w", str(workspace)]
        if workspace.is_file()
        else ["-m", "qe_assets.definitions", "-a", "defs"]
    )
    return [sys.executable, "-m", "dagster", "dev", "-h", host, "-p", str(port), *location]


def _models_list(settings: Settings, wait: float) -> int:
    import duckdb
    import polars as pl

    from qe_assets.finetune.serving.resource import served_names
    from qe_assets.store import connect, select_frame
    from qe_assets.store.evaluations import MODELS_QUERY

    with connect(settings.database, read_only=True, wait_seconds=wait) as conn:
        try:
            frame = select_frame(conn, MODELS_QUERY)
        except duckdb.CatalogException:  # a store from before the evaluation gate
            frame = pl.DataFrame()
        rollout = _rollout_lines(conn)
    names = served_names(settings.data_dir)
    if names and not frame.is_empty():
        # The name the model server serves each model under (QE_MODEL_SERVER, docs/serving.md).
        served = pl.col("model").replace_strict(names, default=None, return_dtype=pl.String)
        frame = frame.insert_column(1, frame.select(served.alias("served_as")).to_series())
    if frame.is_empty():
        print("no fine-tuned or promoted model yet")
    else:
        with pl.Config(tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=70, tbl_width_chars=200):
            print(frame)
    for line in rollout:
        print(line)
    return EXIT_OK


def _rollout_lines(conn: duckdb.DuckDBPyConnection) -> list[str]:
    """The A/B rollout state for `qe models list`: the running test and its last look."""
    import duckdb

    from qe_assets.rollout import registry as ab

    try:
        test = ab.active_test(conn)
        rows = ab.newest_test_rows(conn)
    except duckdb.CatalogException:  # a store from before the rollout
        return []
    if not rows:
        return ["rollout: no A/B test yet"]
    last = rows[-1]
    looked = (
        f"last look {last['decided_at']:%Y-%m-%d %H:%M} UTC: {last['decision']} by "
        f"{last['decided_by']} ({last['reason']})"
    )
    if test is None:
        return [
            f"rollout: no candidate has traffic; the last test ({last['candidate']}) "
            f"ended: {looked}"
        ]
    return [
        f"rollout: {test.candidate} at {test.share:.0%} of traffic against {test.production}, "
        f"since {test.started_at:%Y-%m-%d %H:%M} UTC",
        f"  {looked}",
    ]


def _models_change(args: argparse.Namespace, conn: duckdb.DuckDBPyConnection, by: str) -> str:
    """Record one `qe models promote|rollback|rollout` under the writer lock; what happened."""
    from qe_assets.rollout import registry as ab
    from qe_assets.store import evaluations as registry

    current = registry.production_model(conn)
    test = ab.active_test(conn)
    if args.action == "rollout":
        return _rollout_change(args, conn, by, current, test)
    if args.action == "rollback" and test is not None:
        ab.stop_test(conn, test, by, args.reason)
        return f"rollback: {test.candidate} gets no traffic any more; {test.production} stays"
    if args.action == "promote":
        model, action = args.model, registry.PROMOTE_ACTION
        if not registry.known_model(conn, model):
            raise UserError(
                f"{model}: no such model (not a trained, base or earlier production model)",
                EXIT_FAILED,
            )
        if model == current:
            return f"{model} is already the production model; nothing recorded"
    else:
        model, action = registry.rollback_target(conn), registry.ROLLBACK_ACTION
        if model is None:
            raise UserError(
                f"nothing to roll back to: {current or 'no model'} is the only "
                "production model on record",
                EXIT_FAILED,
            )
    try:
        registry.record_promotion(conn, model, by, action=action, reason=args.reason)
    except registry.ModelFlagged as exc:
        raise UserError(str(exc), EXIT_FAILED) from None
    return f"{action}: {model} is the production model (was {current or 'none'}), by {by}"


def _rollout_change(
    args: argparse.Namespace,
    conn: duckdb.DuckDBPyConnection,
    by: str,
    current: str | None,
    test: ActiveTest | None,
) -> str:
    from qe_assets.rollout import registry as ab
    from qe_assets.store.evaluations import ModelFlagged

    model, share = args.model, args.share
    if not 0.0 <= share <= 1.0:
        raise UserError(f"--share {share}: give a share of traffic between 0 and 1, e.g. 0.1")
    if model == current:
        raise UserError(f"{model} is the production model already; nothing to roll out")
    if ab.gate_passed(conn, model) is None:
        raise UserError(
            f"{model}: only a candidate that passed the evaluation gate may get traffic "
            "(see `qe models list`)",
            EXIT_FAILED,
        )
    production = test.production if test is not None and test.candidate == model else current
    # Before any promotion: the model the last test ran against (the gate's base model).
    production = production or ab.current_state(conn).production
    if production is None:
        raise UserError(f"no production model on record to test {model} against", EXIT_FAILED)
    try:
        ab.start_test(conn, model, production, share, by, args.reason, decision=ab.SET_SHARE)
    except ModelFlagged as exc:
        raise UserError(str(exc), EXIT_FAILED) from None
    return f"rollout: {model} at {share:.0%} of traffic against {production}, by {by}"


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    from qe_assets.rollout.registry import sync_state_file
    from qe_assets.service.rollout import state_path
    from qe_assets.store import connect, ensure_schema, writer_lock

    _require_store(settings)
    if args.action in (None, "list"):
        return _models_list(settings, args.wait)
    reviewer = _reviewer(args)

    def waiting(holder: str) -> None:
        _err(f"waiting for the DuckDB writer lock, held by {holder}")

    with (
        writer_lock(settings.database, on_wait=waiting),
        connect(settings.database, wait_seconds=args.wait) as conn,
    ):
        ensure_schema(conn)
        message = _models_change(args, conn, reviewer)
        sync_state_file(conn, state_path(settings))
        event = _rollout_event(conn, settings, reviewer, message)
    print(message)
    problem = _report_to_dagster(settings, event)
    if problem:
        _err(f"warning: {problem}")
    return EXIT_OK


def _rollout_event(
    conn: duckdb.DuckDBPyConnection, settings: Settings, by: str, what: str
) -> object:
    """ab_test as it stands after a person's change, to report to Dagster."""
    from qe_assets.rollout.assets import rollout_changed

    return rollout_changed(conn, settings, by, what)


def _report_to_dagster(settings: Settings, event: object) -> str | None:
    """Tell the Dagster instance of this data directory (DAGSTER_HOME) that ab_test changed, so
    its page agrees with rollout.json at once; a problem is a warning, the change stands."""
    import dagster as dg

    from qe_assets.ops.runner import prepare_dagster_home
    from qe_assets.rollout.assets import report_rollout_change

    try:
        instance = dg.DagsterInstance.from_config(str(prepare_dagster_home(settings)))
    except Exception as exc:  # any: the change is recorded; Dagster is only told
        return f"could not open the Dagster instance ({type(exc).__name__}: {exc})"
    with instance:
        return report_rollout_change(instance, event)  # type: ignore[arg-type]


def _age_seconds(text: str) -> float:
    """`30d`, `12h`, `45m` or `0d` as seconds; anything else is a usage error."""
    from qe_assets.settings import parse_duration

    seconds = parse_duration(text)
    if seconds is None:
        raise UserError(f"--older-than {text!r}: give a number of days, hours or minutes: 30d")
    return seconds


def cmd_purge(args: argparse.Namespace, settings: Settings) -> int:
    from qe_assets.release.purge import purge_exported

    age = _age_seconds(args.older_than)
    _require_store(settings, "nothing to purge")
    counts = purge_exported(
        settings.database, age, config={"memory_limit": settings.duckdb_memory_limit}
    )
    print(
        f"redacted {counts.raw_events} raw events, {counts.annotated_samples} samples and "
        f"{counts.completions} completions already in a dataset version and older than "
        f"{args.older_than}; deleted {counts.llm_cache} LLM cache entries holding PII"
    )
    return EXIT_OK


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from qe_assets.lib.web_security import InsecureBind, require_safe_bind
    from qe_assets.settings import serve_token
    from qe_assets.web.app import create_app

    token = serve_token()
    try:
        require_safe_bind(args.host, token)
    except InsecureBind as exc:
        raise UserError(str(exc)) from exc
    app = create_app(settings, token=token, write_wait_seconds=args.write_wait)
    print(f"review page on http://{args.host}:{args.port}/review", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return EXIT_OK


def _ui_review_command(args: argparse.Namespace) -> tuple[list[str], str | None]:
    """The `qe serve` of `qe ui`, and a line to print when it cannot take the requested host.

    Beyond loopback the review page needs QE_SERVE_TOKEN (`qe serve` refuses otherwise, and its
    exit would stop dagster too): without one the page stays on 127.0.0.1, dagster keeps the
    host asked for."""
    from qe_assets.lib.web_security import is_loopback
    from qe_assets.settings import serve_token

    host, notice = args.host, None
    if not is_loopback(host) and serve_token() is None:
        host = "127.0.0.1"
        notice = (
            f"review page on 127.0.0.1:{args.review_port} only, not {args.host}: set "
            "QE_SERVE_TOKEN (16+ characters) to serve it beyond this machine"
        )
    command = [sys.executable, "-m", "qe_assets.cli", "serve", "--host", host]
    return [*command, "--port", str(args.review_port)], notice


def _ui_serve_url(review_host: str, review_port: int) -> str:
    """Where the review page of `qe ui` listens, for the dashboards links in the assets'
    metadata (an explicit QE_SERVE_URL, e.g. behind a proxy, wins)."""
    if os.environ.get("QE_SERVE_URL"):
        return os.environ["QE_SERVE_URL"]
    host = "127.0.0.1" if review_host in ("0.0.0.0", "::", "") else review_host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{review_port}"


# How long `qe ui` gives Dagster to stop on its own (as after Ctrl+C in a terminal) before it
# kills what is left of it. dagster dev itself waits up to 60 s for each service; it stopped in
# 4 to 10 s here on a loaded machine.
UI_STOP_SECONDS = 30.0


def _stop_process_groups(children: Sequence[subprocess.Popen[bytes]], gentle: float) -> None:
    """Stop each child and everything it started: SIGINT to its process group (what Ctrl+C in a
    terminal sends to the whole group), then SIGKILL to the group after `gentle` seconds.

    Signalling the child alone orphaned `dagster dev`'s webserver, daemon and code servers when
    it was killed: they kept the port and went on firing sensors (issue 26)."""
    import signal

    def group_alive(child: subprocess.Popen[bytes]) -> bool:
        child.poll()  # reap the leader: a zombie still counts as a member of its group
        try:
            os.killpg(child.pid, 0)
        except ProcessLookupError:
            return False
        return child.returncode is None or _group_has_live_members(child.pid)

    for child in children:
        with suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGINT)
    deadline = time.monotonic() + gentle
    while any(group_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    for child in children:
        if group_alive(child):
            what = " ".join(str(a) for a in child.args[2:4])  # "dagster dev", "qe_assets.cli serve"
            _err(f"{what} still running {gentle:.0f}s after the interrupt: killed")
            with suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def _group_has_live_members(pgid: int) -> bool:
    """Whether a process of group `pgid` is still running, zombies (exited, not yet reaped by
    their new parent) aside. Without /proc (not Linux) every member counts as running."""
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def cmd_ui(args: argparse.Namespace, settings: Settings) -> int:
    """`dagster dev`, and beside it (unless --no-review) the review page of `qe serve`; both
    stop together: Ctrl+C, SIGTERM, or either one ending, ends the other and every process
    either one started."""
    import signal

    from qe_assets.ops.runner import prepare_dagster_home

    home = prepare_dagster_home(settings)
    # The code server must use this data directory whatever directory it starts in.
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "QE_DATA_DIR": str(Path(settings.data_dir).absolute()),
    }
    commands = [_dagster_dev_command(args.host, args.port)]
    print(f"DAGSTER_HOME={home}; UI on http://{args.host}:{args.port}", flush=True)
    if not args.no_review:
        review, notice = _ui_review_command(args)
        if notice:
            print(notice, flush=True)
        # The links in the metadata point at this review port, not the default one.
        env["QE_SERVE_URL"] = _ui_serve_url(review[review.index("--host") + 1], args.review_port)
        commands.insert(0, review)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Handlers of our own, installed before the children start: a child inherits an *ignored*
    # signal. Started in the background of a script (`qe ui &`), SIGINT is ignored, and dagster
    # dev (which maps SIGTERM to its SIGINT handler) then ignored both and never stopped.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    children: list[subprocess.Popen[bytes]] = []
    try:
        # Each child leads a process group of its own, so that stopping it reaches everything
        # it started (dagster dev's webserver, daemon, code servers and runs); a terminal's
        # Ctrl+C now reaches only `qe ui`, which passes it on.
        for command in commands:
            children.append(subprocess.Popen(command, env=env, start_new_session=True))
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        # A second SIGTERM or Ctrl+C must not cut the stop short and orphan what is left.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop_process_groups(children, UI_STOP_SECONDS)
    return max((child.returncode or 0) for child in children) and EXIT_FAILED


def _review_filters(parser: argparse.ArgumentParser) -> None:
    from qe_assets.review.queue import REASONS

    parser.add_argument("--label", help="only this primary label")
    parser.add_argument("--reason", choices=REASONS, help="why it was queued")
    parser.add_argument("--max-confidence", type=float, metavar="C", help="confidence <= C")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qe",
        description="Turn low-quality RAG answers into versioned fine-tuning datasets.",
        epilog=(
            "Configuration comes from QE_* environment variables (docs/configuration.md); "
            "without QE_DATA_DIR the data directory is ./data under the current directory."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("enqueue", help="validate event files (JSONL) and put them on the queue")
    p.add_argument("files", nargs="+", metavar="FILE", help="JSONL files, one event per line")
    p.add_argument(
        "--keep-invalid",
        action="store_true",
        help="forward invalid records too, so they are kept in rejected_events",
    )
    p.set_defaults(func=cmd_enqueue)

    p = sub.add_parser("run", help="one pass of the whole loop, in process, through Dagster")
    p.add_argument(
        "--cut-version", action="store_true", help="cut a dataset version even below the threshold"
    )
    p.add_argument(
        "--quiet", "-q", action="store_true", help="no progress lines on stderr, only the summary"
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sql", help="read-only ad hoc query of the DuckDB tables")
    p.add_argument("query", help='e.g. "SELECT label, count(*) FROM annotated_samples GROUP BY 1"')
    p.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table")
    p.add_argument("--output", "-o", help="write to this file instead of standard output")
    p.add_argument("--max-rows", type=int, default=50, help="rows shown in table format")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for a busy writer")
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="stop the query after this long (at most 300): runs wait for it to end",
    )
    p.add_argument(
        "--allow-files",
        action="store_true",
        help="let the query read and write files (read_csv, COPY … TO, EXPORT DATABASE)",
    )
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("status", help="counts per table, queue depth, latest dataset version")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for a busy writer")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("review", help="the human review queue: list, show, accept, edit, reject")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    r = actions.add_parser("list", help="samples in the queue, highest priority first")
    r.add_argument(
        "--status", default="pending", choices=["pending", "accepted", "edited", "rejected", "all"]
    )
    _review_filters(r)
    r.add_argument("--language", help="only this language (zh, en)")
    r.add_argument("--min-confidence", type=float, metavar="C")
    r.add_argument("--limit", type=int, default=20)
    r.add_argument("--offset", type=int, default=0, help="skip this many (the next page)")
    r.add_argument("--format", choices=["table", "csv", "json"], default="table")
    r = actions.add_parser(
        "show", help="prompt, original answer and completion (proposed or not) of a sample"
    )
    r.add_argument("sample_id")
    for name, text in (
        ("accept", "keep the samples' completions (proposed ones included) for training"),
        ("reject", "keep the samples out of every dataset"),
    ):
        r = actions.add_parser(name, help=text)
        r.add_argument("sample_ids", nargs="*", metavar="SAMPLE_ID")
        _review_filters(r)
        r.add_argument(
            "--all-matching",
            action="store_true",
            help="every pending sample the filters match (asks to confirm the count)",
        )
        r.add_argument("--yes", "-y", action="store_true", help="confirm --all-matching")
        r.set_defaults(usage_error=r.error)
        r.add_argument("--reviewer", help="default: $QE_REVIEWER or $USER")
        r.add_argument("--note")
    r = actions.add_parser("edit", help="write a better completion ($EDITOR or --completion)")
    r.add_argument("sample_id")
    r.add_argument("--completion", help="the new completion text (else $EDITOR opens)")
    r.add_argument("--reviewer", help="default: $QE_REVIEWER or $USER")
    r.add_argument("--note")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for a busy writer")
    p.set_defaults(func=cmd_review)

    p = sub.add_parser(
        "models", help="models, evaluations, production and the A/B rollout: list, promote, …"
    )
    actions = p.add_subparsers(dest="action", required=False, metavar="ACTION")
    actions.add_parser(
        "list", help="every model, its evaluation, production flag and the rollout (default)"
    )
    r = actions.add_parser("promote", help="make MODEL the production model (recorded)")
    r.add_argument("model", metavar="MODEL", help="a model_id from `qe models list`")
    r = actions.add_parser(
        "rollback",
        help="stop the running A/B test (share 0); without one, return to the model in "
        "production before this one",
    )
    r = actions.add_parser(
        "rollout", help="give a gate-passed MODEL this share of traffic in the A/B test"
    )
    r.add_argument("model", metavar="MODEL", help="a model_id that passed the evaluation gate")
    r.add_argument("--share", type=float, required=True, help="0 to 1, e.g. 0.1 (0 stops it)")
    for r in (actions.choices[a] for a in ("promote", "rollback", "rollout")):
        r.add_argument(
            "--reason", required=True, help="why; recorded in promoted_models / ab_decisions"
        )
        r.add_argument("--reviewer", help="default: $QE_REVIEWER or $USER")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for a busy writer")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "purge", help="redact the stored text of samples already in a version, past an age"
    )
    p.add_argument("--older-than", required=True, metavar="AGE", help="e.g. 30d, 12h, 0d")
    p.set_defaults(func=cmd_purge)

    p = sub.add_parser(
        "ui", help="dagster dev on 127.0.0.1 with a persistent DAGSTER_HOME, and the review page"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--review-port", type=int, default=8787, help="where `qe serve` listens")
    p.add_argument("--no-review", action="store_true", help="dagster dev alone")
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("serve", help="the review page (and dashboards) on 127.0.0.1:8787")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="another address than the loopback needs QE_SERVE_TOKEN (docs/review.md)",
    )
    p.add_argument("--port", type=int, default=8787)
    p.add_argument(
        "--write-wait",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long a decision waits for a run's writer lock before the page retries it",
    )
    p.set_defaults(func=cmd_serve)
    versions_cli.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        return int(args.func(args, settings))
    except SettingsError as exc:
        _err(f"configuration error: {exc}")
        return EXIT_USAGE
    except UserError as exc:
        _err(str(exc))
        return exc.code
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except OSError as exc:
        # The reader went away (`qe sql … | head`): not an error. Polars reports it as a plain
        # OSError naming the pipe. Silence the interpreter's complaint when it flushes stdout.
        if not (isinstance(exc, BrokenPipeError) or "Broken pipe" in str(exc)):
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        from qe_assets.store import DatabaseBusy

        if isinstance(exc, DatabaseBusy):
            _err(str(exc))
            return EXIT_BUSY
        raise


if __name__ == "__main__":
    sys.exit(main())
