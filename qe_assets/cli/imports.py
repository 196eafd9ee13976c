"""`qe import phoenix|langfuse`: judged traces from an observability server into the queue."""

from __future__ import annotations

import argparse

from qe_assets.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, UserError, _err
from qe_assets.settings import Settings


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "import",
        help="import judged traces from Arize Phoenix or Langfuse as events (docs/importing.md)",
    )
    sources = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for name, text in (
        ("phoenix", "root spans of QE_PHOENIX_PROJECT on QE_PHOENIX_URL, with span annotations"),
        ("langfuse", "traces scored on QE_LANGFUSE_URL (v3 scores, v2 observations)"),
    ):
        r = sources.add_parser(name, help=text)
        r.add_argument(
            "--from-start",
            action="store_true",
            help="ignore the saved cursor and read everything again (already imported events "
            "are duplicates; a changed judgement is a conflicting duplicate, the first kept)",
        )
    p.set_defaults(func=cmd_import)


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    from qe_assets.imports.state import ImportFailed, ImportNotConfigured

    try:
        if args.source == "phoenix":
            from qe_assets.imports.phoenix import import_phoenix

            outcome = import_phoenix(settings, from_start=args.from_start)
        else:
            from qe_assets.imports.langfuse import import_langfuse

            outcome = import_langfuse(settings, from_start=args.from_start)
    except ImportFailed as exc:
        # A setting not set is a usage error (2); a server that failed, a failure (1).
        code = EXIT_USAGE if isinstance(exc, ImportNotConfigured) else EXIT_FAILED
        raise UserError(f"import {args.source}: {exc}; the cursor is unchanged", code) from None
    for problem in outcome.problems:
        _err(f"import {args.source}: {problem}")
    print(outcome.summary(args.source))
    return EXIT_OK
