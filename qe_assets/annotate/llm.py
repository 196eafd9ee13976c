"""LLM completions: the per-sample calls and the loop that keeps them flowing.

Design:
- Concurrency: one `AsyncOpenAI` client, an `asyncio.Semaphore(concurrency)` around each call.
  Work is read a page at a time (`batch_size` samples) and dispatched as tasks; the next page is
  read while the previous page's last calls are still in flight, so the pool never drains at a
  page boundary, and one slow call delays only its own sample.
- Retries: the openai client's own (`max_retries` on the resource): it retries 408/409/429/5xx,
  timeouts and connection errors with exponential backoff and honours `Retry-After`. We only read
  how many requests it sent, from the `x-stainless-retry-count` header it puts on each request.
  An answer that arrives but is unusable (empty, refused, truncated, malformed) is not retried in
  the run: it is stored as failed and asked again on the next run.
- Cache: `llm_cache` in DuckDB, keyed by sha256 of the request JSON (model, messages, params).
  Looked up per page before any call; only usable answers are stored.
- Durability: finished samples are committed in batches of `batch_size`, each in one short DuckDB
  transaction (results + cache entries + watermark) opened only for the commit; the network is
  never awaited with the database open. A killed run loses at most the uncommitted calls.
- Failures are data: an error class per sample, never an exception out of the run — except the
  endpoint refusing us outright (bad key, unknown model), which stops the run early.

DuckDB access goes through the two callables the asset passes in (`next_page`, `commit`), run in
a worker thread one at a time so the event loop keeps serving responses meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import httpx2
import polars as pl

from qe_assets.lib.completions import judge_request, outcome_frame
from qe_assets.settings import Settings

if TYPE_CHECKING:  # openai is slow to import (docs/performance.md); only LLM runs need it
    import openai

# Answers that are not completions: the reason is stored as the sample's error class.
EMPTY, TRUNCATED, REFUSAL, FILTERED = "EmptyCompletion", "Truncated", "Refusal", "ContentFiltered"
MALFORMED, MALFORMED_VERDICT = "MalformedResponse", "MalformedVerdict"
# The endpoint rejects the configuration itself: every further call would fail the same way.
FATAL_ERRORS = frozenset({"AuthenticationError", "PermissionDeniedError", "NotFoundError"})


class LLMFatalError(RuntimeError):
    """The endpoint rejected the configuration (key, permissions, model); carries only the class."""


@dataclass(frozen=True)
class LLMConfig:
    model: str
    temperature: float
    max_tokens: int
    concurrency: int
    batch_size: int
    judge_model: str | None  # None: no judge
    judge_margin: float
    price_input_per_1m: float
    price_output_per_1m: float
    # Samples routed to review get a completion too, stored as `proposed` for the reviewer.
    propose_review: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> LLMConfig:
        if not settings.llm_model:
            raise ValueError("LLM mode needs QE_LLM_MODEL")
        return cls(
            model=settings.llm_model,
            temperature=settings.llm_temperature,
            max_tokens=settings.llm_max_tokens,
            concurrency=settings.llm_concurrency,
            batch_size=settings.llm_batch_size,
            judge_model=(settings.llm_judge_model or settings.llm_model)
            if settings.llm_judge
            else None,
            judge_margin=settings.llm_judge_margin,
            price_input_per_1m=settings.llm_price_input_per_1m,
            price_output_per_1m=settings.llm_price_output_per_1m,
            propose_review=settings.llm_propose_review,
        )


@dataclass(frozen=True)
class CallOutcome:
    """One logical call: its answer or error class, and what it cost."""

    content: str | None = None
    finish_reason: str | None = None
    error: str | None = None
    attempts: int = 0  # HTTP requests sent, retries included; 0 for a cache hit
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float | None = None  # from getting a concurrency slot to the answer
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


def response_problem(
    content: str | None, refusal: str | None, finish_reason: str | None
) -> str | None:
    """Why an answered call is still not a completion, or None when it is one."""
    if refusal:
        return REFUSAL
    if finish_reason == "length":
        return TRUNCATED
    if finish_reason == "content_filter":
        return FILTERED
    if content is None or not content.strip():
        return EMPTY
    return None


def request_key(request: dict[str, Any]) -> str:
    """Cache key of a request built in Python (the judge's): sha256 of its canonical JSON."""
    canonical = json.dumps(request, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def json_reply(text: str | None) -> dict[str, Any] | None:
    """The one JSON object a judge replied, or None. A Markdown code fence around it is
    tolerated because many models add one even when told not to."""
    if text is None:
        return None
    body = text.strip()
    if body.startswith("```"):
        body = body.strip("`").removeprefix("json").strip()
    try:
        reply = json.loads(body)
    except ValueError:
        return None
    return reply if isinstance(reply, dict) else None


def parse_verdict(text: str | None) -> tuple[float, float] | None:
    """(score of the original, score of the new answer) from the judge's JSON, or None.

    Strict: one JSON object with numeric score_a and score_b in 1..10; a Markdown code fence
    around it is tolerated because many models add one even when told not to.
    """
    verdict = json_reply(text)
    if verdict is None:
        return None
    scores = verdict.get("score_a"), verdict.get("score_b")
    if not all(
        isinstance(s, int | float) and not isinstance(s, bool) and 1 <= s <= 10 for s in scores
    ):
        return None
    return float(scores[0]), float(scores[1])  # type: ignore[arg-type]


def _attempts_of(exc: openai.APIError) -> int:
    # The client stamps every request with how many retries preceded it; the failing one is last.
    try:
        return int(exc.request.headers.get("x-stainless-retry-count", "0")) + 1
    except (AttributeError, RuntimeError, ValueError):
        return 1


def read_chat_response(body: bytes) -> CallOutcome:
    """Answer, finish reason and usage of a chat completion body; MalformedResponse when the body
    is not the documented shape."""
    try:
        data = json.loads(body)
        choice = data["choices"][0]
        message = choice["message"]
        content, refusal = message.get("content"), message.get("refusal")
        finish_reason = choice.get("finish_reason")
        usage = data.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or 0)
        if not isinstance(content, str | None) or not isinstance(refusal, str | None):
            raise TypeError("message content and refusal must be strings")
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return CallOutcome(error=MALFORMED)
    return CallOutcome(
        content=content,
        finish_reason=finish_reason,
        error=response_problem(content, refusal, finish_reason),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
    )


async def chat(
    client: openai.AsyncOpenAI, slots: asyncio.Semaphore, request: dict[str, Any]
) -> CallOutcome:
    """One chat completion with the client's retries; never raises for API or shape errors.

    Sent with `client.post` (the client's documented raw-request method: same auth, timeouts,
    retries and Retry-After handling as `chat.completions.create`) because the typed method
    re-walks the messages through its parameter transform on every call, CPU that alone kept a
    32-way run short of its throughput target (docs/performance.md); our requests are plain JSON
    already. The raw response also tells how many requests were sent.
    """
    import openai

    async with slots:
        started = time.monotonic()
        try:
            response = await client.post("/chat/completions", cast_to=httpx2.Response, body=request)
        except openai.APIError as exc:
            # Only the class: messages can echo request details (a masked key on a 401).
            return CallOutcome(
                error=type(exc).__name__,
                attempts=_attempts_of(exc),
                latency_s=time.monotonic() - started,
            )
        latency = time.monotonic() - started
    attempts = int(response.request.headers.get("x-stainless-retry-count", "0")) + 1
    return replace(read_chat_response(response.content), attempts=attempts, latency_s=latency)


@dataclass
class Page:
    """One page of samples to complete, read by the asset in one short DuckDB connection.

    jobs: sample_id, seq, retry, regen_key, request, cached_content, cached_finish_reason and,
    with the judge on, judge_system, judge_head, judge_tail.
    judge_cache: judge cache_key → cached verdict, for the judge calls these samples may make.
    scanned_to: for new samples, the annotated_samples.seq this page has looked through.
    """

    jobs: pl.DataFrame
    judge_cache: dict[str, str] = field(default_factory=dict)
    scanned_to: int | None = None


NextPage = Callable[[], Page | None]
# (outcomes of finished samples, watermark safe to store or None) → None
Commit = Callable[[pl.DataFrame, int | None], None]


class _Run:
    def __init__(self, client: openai.AsyncOpenAI, config: LLMConfig) -> None:
        self.client = client
        self.config = config
        self.slots = asyncio.Semaphore(config.concurrency)
        # New samples dispatched and not yet committed: the watermark may not pass them.
        self.outstanding = pl.DataFrame(schema={"sample_id": pl.String, "seq": pl.Int64})
        self.scanned_to: int | None = None

    async def complete(self, job: dict[str, Any], judge_cache: dict[str, str]) -> dict[str, Any]:
        if job["cached_content"] is not None:
            regen = CallOutcome(
                content=job["cached_content"],
                finish_reason=job["cached_finish_reason"],
                cached=True,
            )
        else:
            regen = await chat(self.client, self.slots, json.loads(job["request"]))
        record: dict[str, Any] = {
            "sample_id": job["sample_id"],
            "seq": job["seq"],
            "retry": job["retry"],
            "regen_key": job["regen_key"],
            "content": regen.content,
            "finish_reason": regen.finish_reason,
            "error": regen.error,
            "attempts": regen.attempts,
            "cached": regen.cached,
            "prompt_tokens": regen.prompt_tokens,
            "completion_tokens": regen.completion_tokens,
            "latency_s": regen.latency_s,
            "judge_key": None,
            "judge_content": None,
            "judge_error": None,
            "judge_attempts": None,
            "judge_cached": None,
            "judge_prompt_tokens": None,
            "judge_completion_tokens": None,
            "score_original": None,
            "score_completion": None,
        }
        if self.config.judge_model is None or not regen.ok or regen.content is None:
            return record
        request = judge_request(
            self.config.judge_model,
            job["judge_system"],
            job["judge_head"],
            job["judge_tail"],
            regen.content.strip(),
        )
        key = request_key(request)
        cached = judge_cache.get(key)
        judge = (
            CallOutcome(content=cached, cached=True)
            if cached is not None
            else await chat(self.client, self.slots, request)
        )
        scores = parse_verdict(judge.content) if judge.ok else None
        record.update(
            judge_key=key,
            judge_content=judge.content,
            judge_error=judge.error or (None if scores else MALFORMED_VERDICT),
            judge_attempts=judge.attempts,
            judge_cached=judge.cached,
            judge_prompt_tokens=judge.prompt_tokens,
            judge_completion_tokens=judge.completion_tokens,
            score_original=scores[0] if scores else None,
            score_completion=scores[1] if scores else None,
        )
        return record

    def watermark(self) -> int | None:
        if self.outstanding.height:
            return int(self.outstanding["seq"].min()) - 1  # type: ignore[operator]
        return self.scanned_to

    async def run(self, next_page: NextPage, commit: Commit) -> list[pl.DataFrame]:
        """Call the LLM for every page `next_page` hands out, `config.concurrency` calls at a
        time, and commit the outcomes in batches; returns the committed outcomes (texts
        dropped). A fatal error (bad key, unknown model) stops the run after committing what
        finished."""
        loop = _Loop(self, next_page, commit)
        try:
            while True:
                await loop.fill()
                if not loop.tasks:
                    break
                await loop.collect()
                await loop.commit_if_due()
            await loop.finish()
        finally:
            for task in loop.tasks:
                task.cancel()
        if loop.fatal is not None:
            raise LLMFatalError(loop.fatal)
        return loop.committed

    def _dispatch(
        self,
        page: Page,
        tasks: set[asyncio.Task[dict[str, Any]]],
        done: asyncio.Queue[asyncio.Task[dict[str, Any]]],
    ) -> None:
        if page.scanned_to is not None:
            self.scanned_to = page.scanned_to
        jobs = page.jobs
        if jobs.is_empty():
            return
        new = jobs.filter(~pl.col("retry")).select("sample_id", "seq")
        self.outstanding = pl.concat([self.outstanding, new])
        for job in jobs.iter_rows(named=True):
            task = asyncio.create_task(self.complete(job, page.judge_cache))
            task.add_done_callback(done.put_nowait)
            tasks.add(task)


class _Loop:
    """The state of one `_Run.run`: the calls in flight, the outcomes waiting for a commit, the
    commit running in the background, and whether the pages or the run have ended."""

    def __init__(self, run: _Run, next_page: NextPage, commit: Commit) -> None:
        self.run = run
        self.next_page = next_page
        self.commit = commit
        self.database = asyncio.Lock()  # one DuckDB connection at a time, reads and commits alike
        self.tasks: set[asyncio.Task[dict[str, Any]]] = set()
        # Tasks report here when done: waiting on one queue stays O(1) per finished call, where
        # asyncio.wait over hundreds of pending tasks would re-register callbacks on each wake-up.
        self.done: asyncio.Queue[asyncio.Task[dict[str, Any]]] = asyncio.Queue()
        self.finished: list[dict[str, Any]] = []
        self.committed: list[pl.DataFrame] = []
        self.committing: asyncio.Task[None] | None = None
        self.stored_watermark: int | None = None
        self.exhausted = False
        self.fatal: str | None = None

    async def fill(self) -> None:
        """Keep a page queued behind the calls in flight, so the slots stay busy while the next
        page is read."""
        config = self.run.config
        while (
            not self.exhausted
            and self.fatal is None
            and len(self.tasks) < config.concurrency + config.batch_size
        ):
            async with self.database:
                page = await asyncio.to_thread(self.next_page)
            if page is None:
                self.exhausted = True
                return
            self.run._dispatch(page, self.tasks, self.done)

    async def collect(self) -> None:
        """Take every call that has finished (waiting for one); on a fatal error, cancel the
        rest."""
        ready = [await self.done.get()]
        while not self.done.empty():
            ready.append(self.done.get_nowait())
        for task in ready:
            self.tasks.discard(task)
            record = task.result()
            self.finished.append(record)
            if record["error"] in FATAL_ERRORS or record["judge_error"] in FATAL_ERRORS:
                self.fatal = record["error"] or record["judge_error"]
        if self.fatal is not None:
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            self.tasks.clear()

    async def commit_if_due(self) -> None:
        """Commit a batch of outcomes in the background, so dispatching continues meanwhile;
        commits stay in order because each waits for the one before."""
        if len(self.finished) >= self.run.config.batch_size or (self.finished and not self.tasks):
            if self.committing is not None:
                await self.committing
            batch, self.finished = self.finished, []
            self.committing = asyncio.create_task(self.flush(batch))

    async def finish(self) -> None:
        if self.committing is not None:
            await self.committing
        if self.fatal is None and self.run.watermark() != self.stored_watermark:
            # Pages that held nothing to call (review samples only) still move the watermark.
            await self.flush([])

    async def flush(self, records: list[dict[str, Any]]) -> None:
        # In sample order, not the order the calls finished: completions.seq follows the rows,
        # and the versions cut from them (and so what a model trains on) must not depend on
        # which answer came back first.
        outcomes = outcome_frame(records).sort("seq")
        self.run.outstanding = self.run.outstanding.join(
            outcomes.select("sample_id"), on="sample_id", how="anti"
        )
        watermark = self.stored_watermark = self.run.watermark()
        async with self.database:
            await asyncio.to_thread(self.commit, outcomes, watermark)
        # Texts are in DuckDB now; keep only what the run totals need.
        self.committed.append(
            outcomes.with_columns(
                content=pl.lit(None, dtype=pl.String),
                judge_content=pl.lit(None, dtype=pl.String),
            )
        )


async def _complete_all(
    make_client: Callable[[], openai.AsyncOpenAI],
    config: LLMConfig,
    next_page: NextPage,
    commit: Commit,
) -> pl.DataFrame:
    client = make_client()
    try:
        batches = await _Run(client, config).run(next_page, commit)
    finally:
        await client.close()
    return pl.concat(batches) if batches else outcome_frame([])


def complete_with_llm(
    make_client: Callable[[], openai.AsyncOpenAI],
    config: LLMConfig,
    next_page: NextPage,
    commit: Commit,
) -> pl.DataFrame:
    """Complete every page `next_page` yields, committing as it goes; returns the outcomes
    committed (without answer texts), for totals. Raises LLMFatalError after committing what
    finished when the endpoint rejects the configuration."""
    return asyncio.run(_complete_all(make_client, config, next_page, commit))
