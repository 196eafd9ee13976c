"""`qe review`: list, show, accept, edit and reject samples waiting for a person."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from qe_assets.settings import Settings

if TYPE_CHECKING:
    import duckdb

    from qe_assets.review import decisions as review
    from qe_assets.review import queue as review_queue
from qe_assets.cli.common import (
    EXIT_BUSY,
    EXIT_FAILED,
    EXIT_OK,
    UserError,
    _err,
    _require_store,
    _reviewer,
)


def _edited_text(args: argparse.Namespace, current: str) -> tuple[str, Path | None]:
    """The new completion, and the file it was edited in (kept until the edit is recorded, so a
    refused edit loses no work)."""
    if args.completion is not None:
        return str(args.completion), None
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR")
    if not editor:
        raise UserError("give --completion TEXT, or set $EDITOR to edit interactively")
    import shlex
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


def _review_filters(parser: argparse.ArgumentParser) -> None:
    from qe_assets.review.queue import REASONS

    parser.add_argument("--label", help="only this primary label")
    parser.add_argument("--reason", choices=REASONS, help="why it was queued")
    parser.add_argument("--max-confidence", type=float, metavar="C", help="confidence <= C")
