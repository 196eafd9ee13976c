"""`qe`: enqueue events, run the loop headlessly, query and inspect the store.

Exit codes scripts can rely on: 0 success, 1 the work failed (a run failed, records were
invalid), 2 bad usage or configuration, 3 the database stayed locked by a writer too long."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from qe_assets.cli import imports as imports_cli
from qe_assets.cli import versions as versions_cli
from qe_assets.cli.common import EXIT_BUSY, EXIT_USAGE, UserError, _err
from qe_assets.cli.models import cmd_models
from qe_assets.cli.pipeline import cmd_enqueue, cmd_purge, cmd_run
from qe_assets.cli.review import _review_filters, cmd_review
from qe_assets.cli.serve import UI_STOP_SECONDS, _ui_review_command, cmd_serve, cmd_ui  # noqa: F401
from qe_assets.cli.sql import cmd_sql
from qe_assets.cli.status import cmd_status
from qe_assets.settings import Settings, SettingsError


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
    imports_cli.add_commands(sub)
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
