"""Answer every evaluation prompt with two models and have the judge compare each pair.

The machinery is the completions stage's (`qe_assets.annotate.llm`): one `AsyncOpenAI` client,
`chat()`
under a semaphore of `concurrency` calls in flight, the client's own retries (429/5xx, timeouts,
`Retry-After`), answers cached in `llm_cache` under the sha256 of the exact request, failures
returned as data. Finished items are handed to `commit` in batches (run in a worker thread), so a
killed evaluation keeps what it paid for and a re-run makes no call it already made.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qe_assets.annotate.llm import (
    EMPTY,
    FILTERED,
    MALFORMED_VERDICT,
    REFUSAL,
    TRUNCATED,
    CallOutcome,
    chat,
    request_key,
)
from qe_assets.evaluation.judge import (
    JudgeItem,
    candidate_first,
    candidate_verdict,
    pairwise_request,
    parse_pairwise,
)
from qe_assets.evaluation.metrics import FAILED, LOSS, TIE

if TYPE_CHECKING:
    import openai

ANSWER_PURPOSE, JUDGE_PURPOSE = "eval_answer", "eval_judge"
# A reply that does not parse is asked once more (a fresh call: failures are never cached), then
# the pair counts as failed.
JUDGE_TRIES = 2
IDENTICAL = "identical answers: a tie without a judge call"
# The model was reached and answered, but nothing usable: its own failure. A candidate that does
# this loses the item (issue #26: 80 % empty answers left out of the count got promoted). Any
# other error (HTTP, connection, timeout, a malformed body) is the endpoint's, and the item is
# `failed`: left out of the count, within QE_EVAL_MAX_FAILED_SHARE.
ANSWER_FAULTS = frozenset({EMPTY, TRUNCATED, REFUSAL, FILTERED})
NO_VERDICT = "no_verdict"  # a local judge that cannot compare the pair (no reference answer)


@dataclass(frozen=True)
class Pairing:
    """Who is compared and how: model ids as recorded, names as the endpoint serves them."""

    candidate: str
    baseline: str
    candidate_served: str
    baseline_served: str
    judge_model: str
    max_tokens: int
    concurrency: int
    batch_size: int
    # Turns put before the prompt in the baseline's requests only: the ICL baseline's examples.
    baseline_shots: tuple[dict[str, str], ...] = ()
    # A judge computed here instead of asked over HTTP (QE_EVAL_JUDGE=reference): the pairwise
    # request → the reply text a model would give, or None when it has no verdict to give.
    local_judge: Callable[[dict[str, Any]], str | None] | None = None


@dataclass
class ItemResult:
    sample_id: str
    label: str
    candidate_answer: str | None = None
    baseline_answer: str | None = None
    candidate_first: bool = True
    verdict: str = FAILED
    winner: str | None = None
    reason: str | None = None
    error: str | None = None
    calls: int = 0  # requests sent (retries included); 0: everything came from the cache
    judge_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_rows: list[dict[str, Any]] = field(default_factory=list)


def answer_request(
    model: str,
    system: str,
    prompt: str,
    max_tokens: int,
    shots: tuple[dict[str, str], ...] = (),
) -> dict[str, Any]:
    """What a model is asked: the training files' system message, any example turns, and the
    sample's prompt, temperature 0 so the answers, and the verdicts on them, are reproducible."""
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": system},
            *shots,
            {"role": "user", "content": prompt},
        ],
        "temperature": 0.0,
        "max_tokens": max_tokens,
    }


Commit = Callable[[list[ItemResult]], None]


class _Evaluation:
    def __init__(
        self,
        client: openai.AsyncOpenAI,
        pairing: Pairing,
        cache: dict[str, str],
        judge_client: openai.AsyncOpenAI | None = None,
    ) -> None:
        self.client = client
        self.judge_client = judge_client or client
        self.pairing = pairing
        self.cache = cache
        self.slots = asyncio.Semaphore(pairing.concurrency)

    async def call(
        self,
        request: dict[str, Any],
        result: ItemResult,
        *,
        fresh: bool = False,
        client: openai.AsyncOpenAI | None = None,
    ) -> tuple[str, CallOutcome]:
        key = request_key(request)
        cached = None if fresh else self.cache.get(key)
        if cached is not None:
            return key, CallOutcome(content=cached, cached=True)
        outcome = await chat(client or self.client, self.slots, request)
        result.calls += outcome.attempts
        result.prompt_tokens += outcome.prompt_tokens
        result.completion_tokens += outcome.completion_tokens
        return key, outcome

    def _keep(self, result: ItemResult, key: str, purpose: str, model: str, out: CallOutcome):
        if out.cached or not out.ok or out.content is None:
            return
        self.cache[key] = out.content
        result.cache_rows.append(
            {
                "cache_key": key,
                "purpose": purpose,
                "model": model,
                "content": out.content,
                "finish_reason": out.finish_reason,
                "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.completion_tokens,
            }
        )

    async def evaluate(self, item: dict[str, Any]) -> ItemResult:
        p = self.pairing
        result = ItemResult(item["sample_id"], item["label"])
        requests = [
            answer_request(model, item["system"], item["prompt"], p.max_tokens, shots)
            for model, shots in ((p.candidate_served, ()), (p.baseline_served, p.baseline_shots))
        ]
        answers = await asyncio.gather(*(self.call(r, result) for r in requests))
        errors = []
        for (key, out), who, request in zip(
            answers, ("candidate", "baseline"), requests, strict=True
        ):
            self._keep(result, key, ANSWER_PURPOSE, request["model"], out)
            if not out.ok:
                errors.append(f"{who}:{out.error}")
        result.candidate_answer, result.baseline_answer = (
            None if out.content is None else out.content.strip() for _, out in answers
        )
        if errors:
            result.error = ",".join(errors)
            candidate_error = answers[0][1].error
            if candidate_error in ANSWER_FAULTS:
                result.verdict = LOSS
                result.reason = f"the candidate gave no usable answer ({candidate_error})"
            return result
        if result.candidate_answer == result.baseline_answer:
            result.verdict, result.winner, result.reason = TIE, "tie", IDENTICAL
            return result
        await self.judge(item, result)
        return result

    async def judge(self, item: dict[str, Any], result: ItemResult) -> None:
        p = self.pairing
        first = candidate_first(item["sample_id"], p.candidate, p.baseline)
        pair = (result.candidate_answer, result.baseline_answer)
        answer_1, answer_2 = pair if first else pair[::-1]
        judged = JudgeItem(item["language"], item["question"], item["documents"], item["reference"])
        request = pairwise_request(p.judge_model, judged, answer_1 or "", answer_2 or "")
        result.candidate_first = first
        for attempt in range(JUDGE_TRIES):
            key, out = await self._ask_judge(request, result, fresh=attempt > 0)
            result.judge_calls += 0 if out.cached else 1
            parsed = parse_pairwise(out.content) if out.ok else None
            if parsed is not None:
                self._keep(result, key, JUDGE_PURPOSE, p.judge_model, out)
                result.winner, result.reason = parsed
                result.verdict = candidate_verdict(parsed[0], first)
                result.error = None
                return
            result.error = f"judge:{out.error or MALFORMED_VERDICT}"

    async def _ask_judge(
        self, request: dict[str, Any], result: ItemResult, *, fresh: bool
    ) -> tuple[str, CallOutcome]:
        """The judge's reply: computed here by a local judge, else asked on the judge's own
        endpoint (QE_EVAL_JUDGE_BASE_URL, else the LLM's)."""
        local = self.pairing.local_judge
        if local is None:
            return await self.call(request, result, fresh=fresh, client=self.judge_client)
        reply = local(request)
        outcome = CallOutcome(content=reply) if reply is not None else CallOutcome(error=NO_VERDICT)
        return request_key(request), outcome


async def _run(
    make_client: Callable[[], openai.AsyncOpenAI],
    pairing: Pairing,
    items: list[dict[str, Any]],
    cache: dict[str, str],
    commit: Commit,
    make_judge_client: Callable[[], openai.AsyncOpenAI] | None = None,
) -> list[ItemResult]:
    client = make_client()
    judge_client = make_judge_client() if make_judge_client and not pairing.local_judge else None
    evaluation = _Evaluation(client, pairing, cache, judge_client)
    results: list[ItemResult] = []
    committed = 0
    try:
        tasks = [asyncio.create_task(evaluation.evaluate(item)) for item in items]
        for finished in asyncio.as_completed(tasks):
            results.append(await finished)
            if len(results) - committed >= pairing.batch_size or len(results) == len(tasks):
                await asyncio.to_thread(commit, results[committed:])
                committed = len(results)
    finally:
        await client.close()
        if judge_client is not None:
            await judge_client.close()
    return results


def evaluate_pairs(
    make_client: Callable[[], openai.AsyncOpenAI],
    pairing: Pairing,
    items: list[dict[str, Any]],
    cache: dict[str, str],
    commit: Commit,
    make_judge_client: Callable[[], openai.AsyncOpenAI] | None = None,
) -> list[ItemResult]:
    """Every item answered by both models and judged; `cache` maps request keys to the answers
    already paid for (it is filled as the run goes). Items need sample_id, label, language,
    system, prompt, question, documents (list of texts) and reference (or None). The judge is
    asked through `make_judge_client`'s client when given (its own endpoint), else through the
    models' client."""
    return asyncio.run(_run(make_client, pairing, items, cache, commit, make_judge_client))
