"""The pairwise judge: what it is asked and how its reply is read. Pure, no network.

The contract (README, docs/evaluation.md; keep it, other judges are built against it): the user
message quotes the two answers between `<<<BEGIN ANSWER 1>>>` … `<<<END ANSWER 1>>>` and
`<<<BEGIN ANSWER 2>>>` … `<<<END ANSWER 2>>>`; the reply is strict JSON
`{"winner": "1" | "2" | "tie", "reason": "…"}`. Which model's answer is shown first is drawn
per item from a hash, so position bias cancels out over the set and a re-run asks the very same
request (and hits the cache).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from qe_assets.annotate.llm import json_reply
from qe_assets.evaluation.metrics import LOSS, TIE, WIN
from qe_assets.lib.completions import JUDGE_PARAMETERS, neutralise_text

PAIRWISE_KEYS = ("system", "intro", "reminder")


@cache
def pairwise_texts() -> dict[str, dict[str, str]]:
    """language → the pairwise judge's system prompt, intro and reminder (texts.json)."""
    text = resources.files("qe_assets.lib.templates").joinpath("texts.json").read_text("utf-8")
    texts = json.loads(text)["pairwise"]
    for language, keys in texts.items():
        missing = [k for k in PAIRWISE_KEYS if k not in keys]
        if missing:
            raise ValueError(f"templates: pairwise.{language}.{missing[0]} is missing")
    return texts


def candidate_first(sample_id: str, candidate: str, baseline: str) -> bool:
    """Whether the candidate's answer is shown as answer 1: a fair coin per (item, pair of
    models), fixed so the request, and so its cache key, is the same on every run."""
    digest = hashlib.sha256(f"{sample_id}\n{candidate}\n{baseline}".encode()).digest()
    return digest[0] % 2 == 0


def _block(name: str, text: str) -> str:
    return f"<<<BEGIN {name}>>>\n{neutralise_text(text)}\n<<<END {name}>>>"


@dataclass(frozen=True)
class JudgeItem:
    """What the judge sees of one evaluation prompt."""

    language: str
    question: str
    documents: list[str]
    reference: str | None = None


def pairwise_request(model: str, item: JudgeItem, answer_1: str, answer_2: str) -> dict[str, Any]:
    """The judge call for one pair, answers already in display order."""
    texts = pairwise_texts().get(item.language) or pairwise_texts()["en"]
    parts = [texts["intro"], _block("QUESTION", item.question)]
    parts += [_block(f"DOCUMENT {i}", doc) for i, doc in enumerate(item.documents, 1)]
    if item.reference:
        parts.append(_block("REFERENCE ANSWER", item.reference))
    parts += [_block("ANSWER 1", answer_1), _block("ANSWER 2", answer_2), texts["reminder"]]
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": texts["system"]},
            {"role": "user", "content": "\n\n".join(parts)},
        ],
        **JUDGE_PARAMETERS,
    }


def parse_pairwise(text: str | None) -> tuple[str, str] | None:
    """(winner "1" | "2" | "tie", reason) from a strict JSON reply, or None when it is not one.
    A Markdown code fence around the object is tolerated, as for the scoring judge."""
    reply = json_reply(text)
    if reply is None:
        return None
    winner, reason = reply.get("winner"), reply.get("reason", "")
    if isinstance(winner, int) and not isinstance(winner, bool):
        winner = str(winner)
    if winner not in ("1", "2", "tie") or not isinstance(reason, str):
        return None
    return winner, reason


def candidate_verdict(winner: str, first: bool) -> str:
    """The judge's winner (by position) as the candidate's win, loss or tie."""
    if winner == "tie":
        return TIE
    return WIN if (winner == "1") == first else LOSS
