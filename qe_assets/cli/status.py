"""`qe status`: what the store, the queue and the rollout say now."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qe_assets.settings import Settings, estimated_cost

if TYPE_CHECKING:
    import duckdb

from qe_assets.cli.common import EXIT_OK, _where


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
    from qe_assets.release.forget import pending_takedowns
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
        still_published = pending_takedowns(conn)
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
    if still_published:
        copies = "; ".join(f"{version} at {where}" for version, where, _ in still_published)
        print(
            f"WARNING: superseded by `qe forget` but still published: {copies} (its store failed "
            "the takedown; the next published_dataset run or `qe forget` retries it)"
        )
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
