"""LLM completion throughput against the test server: `python -m qe_assets_bench.llm_throughput`.

The completions asset runs for real (Dagster, DuckDB, the openai client) against the fake
OpenAI-compatible server from the test suite, in its own process, which answers every call after
a fixed latency.
With concurrency C and latency L the bound is C / L calls/s; the target is 90 % of it. A second
run must make no calls at all, and so must a run that re-completes everything from the cache.
Exits 1 when a target is missed.

Then the evaluation gate (`--eval-items`, 0 to skip): `model_evaluation` on a frozen set of about
that many prompts, the server serving a candidate, the base model and a pairwise judge. Each item
is two answers (in parallel) and one verdict, so the bound is C / (3 L) items/s for a full
evaluation and C / L items judged/s when the answers are cached (a second judge model).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dagster as dg

from qe_assets.ingest.queues import FileInbox
from qe_assets.settings import Settings
from qe_assets.store import connect
from qe_assets.testing.factories import line, make_event
from qe_assets.testing.openai_server import spawned
from qe_assets.testing.runs import materialize, metadata

# The benchmark never talks to a real endpoint, so it never needs (or reads) a real key.
FAKE_KEY = "sk-bench-not-a-secret"


def events(count: int) -> list[str]:
    labels = ["factuality_error", "incomplete_answer", "low_relevance", "overconfidence"]
    return [
        line(
            make_event(
                f"bench-{i}",
                question=f"Benchmark question number {i}?",
                answer=f"Benchmark answer {i}.",
                evaluation={"score": 0.5, "labels": [labels[i % len(labels)]]},
            )
        ).decode()
        for i in range(count)
    ]


def evaluation_bench(args: argparse.Namespace) -> list[str]:
    """Items evaluated and judged per second by the real `model_evaluation` asset; returns the
    targets missed."""
    base = "bench-base"
    with (
        tempfile.TemporaryDirectory(prefix="qe-bench-eval-") as tmp,
        spawned(eval_models={"ft:": 3, base: 1}) as server,
    ):
        settings = Settings(
            data_dir=str(Path(tmp) / "data"),
            openai_base_url=server.base_url,
            finetune_backend="openai",
            finetune_base_model=base,
            finetune_poll_seconds=0.01,
            eval_share=0.5,
            eval_judge_model="judge",
            llm_concurrency=args.concurrency,
            llm_batch_size=args.batch_size,
            llm_timeout_seconds=30.0,
            llm_max_retries=2,
        )
        FileInbox(settings.inbox_dir).put(events(2 * args.eval_items))
        # Through the real stages to a fine-tuned model (a job on the server), no latency yet.
        stages = ["raw_events", "annotated_samples", "completions", "tuning_dataset"]
        assert materialize(settings, selection=[*stages, "fine_tuned_model"]).success
        server.set_latency(args.latency)
        server.reset()
        # Without the gate check: a promotion would leave nothing to compare the second time.
        evaluation = dg.AssetSelection.assets("model_evaluation").without_checks()
        full = metadata(materialize(settings, selection=evaluation), "model_evaluation")
        full_calls = server.chat_count
        # A second judge: the answers come from the cache, only verdicts are asked.
        judged = settings.model_copy(update={"eval_judge_model": "judge-2"})
        server.reset()
        verdicts = metadata(materialize(judged, selection=evaluation), "model_evaluation")
        verdict_calls = server.chat_count
    return _evaluation_report(args, full, verdicts, full_calls, verdict_calls)


def _evaluation_report(
    args: argparse.Namespace,
    full: dict[str, Any],
    verdicts: dict[str, Any],
    full_calls: int,
    verdict_calls: int,
) -> list[str]:
    items = full["n"] + full["failed"]
    full_bound = args.concurrency / (3 * args.latency)
    judge_bound = args.concurrency / args.latency
    full_rate, judge_rate = float(full["items_per_s"]), float(verdicts["items_per_s"])
    print(
        f"\nEvaluation gate: {items} held-out items, concurrency {args.concurrency}, "
        f"{args.latency * 1000:.0f} ms per call"
    )
    print(
        f"  answered + judged  {full_rate:>8.1f} items/s  {full_calls} calls; bound "
        f"{full_bound:.1f} ({full_rate / full_bound:.0%})"
    )
    print(
        f"  judged (answers cached)  {judge_rate:>8.1f} items/s  {verdict_calls} calls; bound "
        f"{judge_bound:.1f} ({judge_rate / judge_bound:.0%})"
    )
    missed = []
    for name, rate, bound in (
        ("evaluated", full_rate, full_bound),
        ("judged", judge_rate, judge_bound),
    ):
        if rate < args.target_share * bound:
            missed.append(f"items {name} {rate:.1f}/s < {args.target_share:.0%} of {bound:.1f}")
    if full_calls != 3 * items or verdict_calls != items:
        missed.append(f"expected {3 * items} and {items} calls, got {full_calls}, {verdict_calls}")
    return missed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per call")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--target-share", type=float, default=0.9)
    parser.add_argument("--eval-items", type=int, default=2500, help="0: skip the gate's bench")
    parser.add_argument("--only-eval", action="store_true", help="only the gate's bench")
    args = parser.parse_args(argv)

    os.environ["OPENAI_API_KEY"] = FAKE_KEY
    if args.only_eval:
        missed = evaluation_bench(args)
        for failure in missed:
            print(f"FAILED: {failure}", file=sys.stderr)
        return 1 if missed else 0

    os.environ["OPENAI_API_KEY"] = FAKE_KEY
    with tempfile.TemporaryDirectory(prefix="qe-bench-") as tmp, spawned() as server:
        settings = Settings(
            data_dir=str(Path(tmp) / "data"),
            llm_model="bench-model",
            openai_base_url=server.base_url,
            llm_concurrency=args.concurrency,
            llm_batch_size=args.batch_size,
            llm_timeout_seconds=30.0,
            llm_max_retries=2,
        )
        # Samples through the real ingest and annotate stages, with no LLM involved yet.
        FileInbox(settings.inbox_dir).put(events(args.samples))
        assert materialize(
            settings, selection=dg.AssetSelection.assets("raw_events", "annotated_samples")
        ).success
        with connect(settings.database, read_only=True) as conn:
            ((train,),) = conn.execute(
                "SELECT count(*) FROM annotated_samples WHERE route = 'train' "
                "AND duplicate_of IS NULL"
            ).fetchall()

        only_completions = dg.AssetSelection.assets("completions")
        server.set_latency(args.latency)
        started = time.monotonic()
        first = materialize(settings, selection=only_completions)
        elapsed = time.monotonic() - started
        stats = metadata(first, "completions")
        calls = server.chat_count

        server.reset()
        materialize(settings, selection=only_completions)
        second_calls = server.chat_count

        # Forget the completions (not the cache): everything must come back without a call.
        with connect(settings.database) as conn:
            conn.execute("DELETE FROM completions")
            conn.execute("DELETE FROM watermarks WHERE stage = 'completions'")
        server.reset()
        replay = metadata(materialize(settings, selection=only_completions), "completions")
        replay_calls = server.chat_count

    bound = args.concurrency / args.latency
    # The asset's own clock over the LLM path; the wall time above also holds Dagster's start-up.
    rate = float(stats["llm/calls_per_s"])
    target = args.target_share * bound
    rows = [
        ("samples (train)", f"{train}", ""),
        ("calls, first run", f"{calls}", f"= {train}" if calls == train else "!"),
        ("wall time, first run", f"{elapsed:.2f} s", "materialize(), Dagster included"),
        ("LLM path time", f"{stats['llm/elapsed_s']:.2f} s", "read, call, commit"),
        ("throughput", f"{rate:.1f} calls/s", f"target ≥ {target:.0f} ({rate / bound:.0%} of "),
        ("latency p50", f"{stats['llm/latency_p50_ms']:.0f} ms", "client side, per call"),
        ("latency p99", f"{stats['llm/latency_p99_ms']:.0f} ms", ""),
        ("calls, second run", f"{second_calls}", "must be 0"),
        ("calls, replay from cache", f"{replay_calls}", f"{replay['llm/cache_hits']} cache hits"),
    ]
    rows[4] = (rows[4][0], rows[4][1], rows[4][2] + f"{bound:.0f} bound)")
    width = max(len(r[0]) for r in rows)
    print(
        f"\nLLM completions: {args.samples} samples, concurrency {args.concurrency}, "
        f"{args.latency * 1000:.0f} ms per call, batch {args.batch_size}"
    )
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>14}  {note}")
    failures = []
    if rate < target:
        failures.append(f"throughput {rate:.1f} < {target:.1f} calls/s")
    if second_calls or replay_calls:
        failures.append(f"calls on re-runs: {second_calls} and {replay_calls}, expected 0")
    if calls != train or replay["new_completions"] != train:
        failures.append(f"expected {train} calls and completions, got {calls}")
    if args.eval_items:
        failures += evaluation_bench(args)
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
