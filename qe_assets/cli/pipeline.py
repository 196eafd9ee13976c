"""`qe enqueue`, `qe run` and `qe purge`: put events in, run the loop, redact old text."""

from __future__ import annotations

import argparse
from pathlib import Path

from qe_assets.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    UserError,
    _chain,
    _disk_full,
    _err,
    _require_store,
)
from qe_assets.settings import Settings


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
