"""The train/serve parity probe, run before a locally trained model is judged.

A served adapter can look fine and still not be what was trained: the server applies no adapter
(the candidate answers exactly as its base), the model never learned to end its turn (every
answer runs to max_tokens), or the evaluation asks with another system message than the training
files carried. The gate would then judge noise, and a tie would look like "no better". The probe
asks the served candidate and the served base a few of the version's own train prompts, exactly
as the evaluation asks (answer_request: the system message, temperature 0), and fails with one
line naming what is wrong.

The chat template needs no request: the served folder carries the tokenizer and chat template
saved with the adapter (serving/folders.py), i.e. the ones the training used.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb

from qe_assets.annotate.llm import chat
from qe_assets.evaluation.engine import answer_request

if TYPE_CHECKING:
    import openai

PROBE_PROMPTS = 4
# Room to restate the trained completion; a model that learned to end its turn stops well
# within it.
PROBE_MAX_TOKENS = 256


@dataclass(frozen=True)
class ProbeSample:
    system: str | None
    prompt: str


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str
    candidate_answers: tuple[str, ...] = ()


def probe_samples(train_chat_path: str | Path, count: int = PROBE_PROMPTS) -> list[ProbeSample]:
    """The first `count` train prompts of the version, with the system message they were
    trained with (None when the chat file has none)."""
    samples = []
    with open(train_chat_path, encoding="utf-8") as handle:
        for raw in handle:
            if len(samples) == count:
                break
            if not raw.strip():
                continue
            turns = json.loads(raw)["messages"]
            system = next((t["content"] for t in turns if t["role"] == "system"), None)
            user = next(t["content"] for t in turns if t["role"] == "user")
            samples.append(ProbeSample(system, user))
    return samples


def train_chat_of(conn: duckdb.DuckDBPyConnection, model_id: str) -> str | None:
    """The train chat file of the run that produced `model_id` (its recipe), if it still
    exists."""
    rows = conn.execute(
        "SELECT recipe FROM fine_tune_runs WHERE model_id = ? AND status = 'succeeded' "
        "ORDER BY created_at DESC LIMIT 1",
        [model_id],
    ).fetchall()
    if not rows or not rows[0][0]:
        return None
    path = json.loads(rows[0][0]).get("train_chat_path")
    return path if path and Path(path).is_file() else None


def probe(
    conn_reader: Callable[[], AbstractContextManager[duckdb.DuckDBPyConnection | None]],
    make_client: Callable[[], openai.AsyncOpenAI],
    model_id: str,
    candidate_served: str,
    baseline_served: str,
    evaluation_systems: set[str],
) -> ProbeResult:
    """The whole probe for a locally trained candidate: its train prompts, the system message
    check, then the served answers."""
    with conn_reader() as conn:
        path = train_chat_of(conn, model_id) if conn is not None else None
    if path is None:
        return ProbeResult(
            False, f"parity: the train files of {model_id} are gone: nothing to probe"
        )
    samples = probe_samples(path)
    if mismatch := system_mismatch(samples, evaluation_systems):
        return ProbeResult(False, mismatch)
    return run_probe(make_client, candidate_served, baseline_served, samples)


def system_mismatch(samples: list[ProbeSample], evaluation_systems: set[str]) -> str | None:
    """Why the training's system message is not the evaluation's, or None."""
    trained = {s.system for s in samples}
    if None in trained:
        return (
            "parity: the model was trained without a system message (QE_CHAT_SYSTEM_MESSAGE=false)"
            " but the evaluation sends one"
        )
    if not trained <= evaluation_systems:
        return (
            "parity: the system message the model was trained with differs from the one the "
            "evaluation sends (templates changed since the version was cut)"
        )
    return None


def judge_probe(
    candidate: list[tuple[str | None, str | None]], base: list[tuple[str | None, str | None]]
) -> ProbeResult:
    """`candidate` / `base`: (answer, finish_reason) per probe prompt, answer None on an error."""
    answers = tuple((a or "").strip() for a, _ in candidate)
    if any(a is None for a, _ in candidate):
        return ProbeResult(False, "parity: the served candidate did not answer every probe prompt")
    if answers == tuple((a or "").strip() for a, _ in base):
        return ProbeResult(
            False,
            f"parity: the served candidate answers exactly as its base on all {len(answers)} "
            "train prompts probed: the adapter is not applied where it is served",
            answers,
        )
    unfinished = sum(reason != "stop" for _, reason in candidate)
    if unfinished:
        return ProbeResult(
            False,
            f"parity: the served candidate did not end its turn on {unfinished} of "
            f"{len(candidate)} train prompts (cut at {PROBE_MAX_TOKENS} tokens): the end-of-turn "
            "token was not learned, or the served chat template is not the trained one",
            answers,
        )
    return ProbeResult(True, f"parity: {len(candidate)} train prompts answered as trained", answers)


def base_budgets(candidate: list[tuple[str | None, str | None, int]]) -> list[int]:
    """How many tokens the base needs per probe prompt to tell whether it answers exactly as the
    candidate: one more than the candidate's answer when that ended its turn (an identical base
    answer ends within it; one still going there is a different answer), else the full
    PROBE_MAX_TOKENS. Saves generating 256 tokens four times from a base that never stops,
    without changing any verdict."""
    return [
        min(PROBE_MAX_TOKENS, tokens + 1) if reason == "stop" and tokens > 0 else PROBE_MAX_TOKENS
        for _, reason, tokens in candidate
    ]


async def _ask(
    client: openai.AsyncOpenAI, model: str, samples: list[ProbeSample], budgets: list[int]
) -> list[tuple[str | None, str | None, int]]:
    slots = asyncio.Semaphore(4)
    outcomes = await asyncio.gather(
        *(
            chat(client, slots, answer_request(model, s.system or "", s.prompt, budget))
            for s, budget in zip(samples, budgets, strict=True)
        )
    )
    # A cut answer is an error for the evaluation, but the probe wants its text and reason.
    return [(o.content, o.finish_reason, o.completion_tokens) for o in outcomes]


def run_probe(
    make_client: Callable[[], openai.AsyncOpenAI],
    candidate_served: str,
    baseline_served: str,
    samples: list[ProbeSample],
) -> ProbeResult:
    """Ask both served models the probe prompts and judge the answers."""

    async def both() -> ProbeResult:
        client = make_client()
        try:
            candidate = await _ask(
                client, candidate_served, samples, [PROBE_MAX_TOKENS] * len(samples)
            )
            base = await _ask(client, baseline_served, samples, base_budgets(candidate))
        finally:
            await client.close()
        return judge_probe([(a, r) for a, r, _ in candidate], [(a, r) for a, r, _ in base])

    return asyncio.run(both())
