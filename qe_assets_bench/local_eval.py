"""Evaluation throughput against a locally served model, against the engine's own:
`python -m qe_assets_bench.local_eval`.

A tiny model built here, a LoRA adapter trained on it by the real `command` backend (the TRL
example through Dagster Pipes), both served by the real `transformers serve` that the
`model_server` resource starts (QE_MODEL_SERVER=transformers). Then, on the frozen evaluation
set's N held-out prompts:

(a) the engine alone: every answer the evaluation asks for (the candidate's and the base's, the
    same requests: system message, prompt, temperature 0, max_tokens) sent straight to the
    server with the plain `openai` client, the same number in flight;
(b) the real `model_evaluation` asset (Dagster, DuckDB, the reference judge: no judge LLM) on the
    same prompts against a server started the same way; its own `elapsed_s` of the comparison.

Both in answers/s; the target is (b) ≥ 80 % of (a). Exits 1 when it is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qe_assets.annotate.llm import chat
from qe_assets.evaluation.assets import job_items, served
from qe_assets.evaluation.engine import answer_request
from qe_assets.finetune.serving.resource import ModelServerResource
from qe_assets.settings import Settings
from qe_assets.store import connect
from qe_assets.store.evaluations import evaluation_items, latest_candidate
from qe_assets.testing.runs import materialize, metadata
from qe_assets_bench.local_model import FAKE_KEY, prepare

TARGET = 0.80


def direct_requests(settings: Settings) -> list[dict[str, Any]]:
    """The answer requests `model_evaluation` sends, built by its own functions: per held-out
    prompt, the candidate's and the base's."""
    with connect(settings.database, read_only=True) as conn:
        items = job_items(evaluation_items(conn))
        candidate = latest_candidate(conn, "command")
    assert candidate is not None and candidate.base_model
    names = [served(settings, candidate.model_id), served(settings, candidate.base_model)]
    return [
        answer_request(name, item["system"], item["prompt"], settings.llm_max_tokens)
        for item in items
        for name in names
    ]


async def _send(base_url: str, requests: list[dict[str, Any]], concurrency: int) -> float:
    """Seconds to answer every request with `concurrency` in flight (the engine's throughput
    through the plain client; the same `chat` call the evaluation makes)."""
    import openai

    client = openai.AsyncOpenAI(api_key=FAKE_KEY, base_url=base_url, max_retries=0, timeout=300)
    slots = asyncio.Semaphore(concurrency)
    try:
        started = time.monotonic()
        outcomes = await asyncio.gather(*(chat(client, slots, r) for r in requests))
        elapsed = time.monotonic() - started
    finally:
        await client.close()
    answered = sum(o.content is not None for o in outcomes)
    assert answered == len(requests), f"only {answered} of {len(requests)} answered"
    return elapsed


def engine_alone(settings: Settings, requests: list[dict[str, Any]], rounds: int) -> list[float]:
    """(a): answers/s of each round, on a server the model_server resource starts, warmed up
    (both models loaded) first, as the evaluation's parity probe warms its own."""
    resource = ModelServerResource.from_settings(settings)
    with resource.serving() as base_url:
        assert base_url is not None
        warm = {r["model"]: r for r in requests}
        asyncio.run(_send(base_url, list(warm.values()), 1))
        return [
            len(requests) / asyncio.run(_send(base_url, requests, settings.llm_concurrency))
            for _ in range(rounds)
        ]


def through_the_asset(settings: Settings) -> tuple[float, dict[str, Any]]:
    """(b): answers/s of the comparison inside `model_evaluation` (its metadata's elapsed_s; the
    server's start and the parity probe come before it), and the metadata."""
    result = materialize(settings, selection=["model_evaluation"], raise_on_error=False)
    meta = metadata(result, "model_evaluation")
    if not meta:
        failures = [e.step_failure_data.error for e in result.get_step_failure_events()]
        raise SystemExit(f"model_evaluation did not materialize: {failures}")
    answers = 2 * meta["dagster/row_count"]
    return answers / meta["elapsed_s"], meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=80, help="half are held out")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (a) and of (b)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qe-bench-local-eval-") as tmp:
        started = time.monotonic()
        prepared = prepare(
            Path(tmp),
            args.events,
            teach_base=True,  # a base that ends its turn: every item is judged
            model_server="transformers",
            eval_judge="reference",
            eval_min_items=5,
            llm_concurrency=args.concurrency,
            llm_max_tokens=args.max_tokens,
        )
        settings = prepared.settings
        trained = materialize(settings, selection=["fine_tuned_model"])
        assert trained.success
        print(f"tiny model, dataset and adapter ready in {time.monotonic() - started:.0f} s")
        requests = direct_requests(settings)
        engine: list[float] = []
        evaluation: list[float] = []
        meta: dict[str, Any] = {}
        for _ in range(args.rounds):  # alternated, so a drift of the machine hits both
            engine += engine_alone(settings, requests, 1)
            rate, meta = through_the_asset(settings)
            evaluation.append(rate)
            with connect(settings.database) as conn:
                # The next round answers again: nothing from the first comes from the cache.
                conn.execute("DELETE FROM llm_cache WHERE purpose = 'eval_answer'")
                conn.execute("DELETE FROM evaluation_items")
                conn.execute("DELETE FROM model_evaluations")
    a, b = statistics.median(engine), statistics.median(evaluation)
    print(
        f"{len(requests)} answers ({len(requests) // 2} held-out prompts x candidate and base), "
        f"concurrency {args.concurrency}, max_tokens {args.max_tokens}"
    )
    print(f"(a) transformers serve alone: {_spread(engine)} answers/s")
    print(f"(b) model_evaluation:         {_spread(evaluation)} answers/s")
    print(
        f"(b)/(a) = {b / a:.1%} (target >= {TARGET:.0%}); last evaluation: {meta.get('decision')}, "
        f"{meta.get('wins')} wins / {meta.get('ties')} ties / {meta.get('losses')} losses / "
        f"{meta.get('failed')} failed"
    )
    if b < TARGET * a:
        print(f"MISSED: the evaluation reaches {b / a:.1%} of the engine's throughput")
        return 1
    return 0


def _spread(rates: list[float]) -> str:
    return (
        f"median {statistics.median(rates):.2f} (min {min(rates):.2f}, max {max(rates):.2f}, "
        f"{len(rates)} rounds)"
    )


if __name__ == "__main__":
    sys.exit(main())
