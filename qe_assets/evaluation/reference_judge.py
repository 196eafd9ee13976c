"""The reference judge (QE_EVAL_JUDGE=reference): token-F1 against the reference answer, a cheap,
deterministic second opinion and the offline option. Pure, no network.

It keeps the pairwise judge's contract (judge.py): it reads the very request an LLM judge would
get (the two answers between `<<<BEGIN ANSWER n>>>` markers, the reference between
`<<<BEGIN REFERENCE ANSWER>>>` markers) and replies `{"winner": "1" | "2" | "tie", "reason"}`,
so the verdicts, the cache, the metrics and the gate are the same as with a model as the judge.

What it measures: overlap of words (a Chinese character counts as a word) with the reference,
the harmonic mean of precision and recall (SQuAD's F1). It rewards saying what the reference
says in its words; it cannot see a correct paraphrase, a wrong number in a right sentence, or
anything beyond the reference. A prompt without a reference (an unreviewed, unjudged
completion) gets no verdict: it counts as failed, never as a tie.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

REFERENCE_JUDGE = "reference-token-f1"  # recorded as the judge model of its evaluations
# F1 scores closer than this are a tie: a word or two on a long answer decides nothing.
TIE_MARGIN = 0.02

# Latin words and digits as runs, each CJK character alone (Chinese has no spaces).
_TOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_]+", re.UNICODE)


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def token_f1(answer: str, reference: str) -> float:
    """SQuAD-style F1 of the answer's words against the reference's (multiset overlap)."""
    said, expected = tokens(answer), tokens(reference)
    if not said or not expected:
        return float(said == expected)
    common = sum((Counter(said) & Counter(expected)).values())
    if not common:
        return 0.0
    precision, recall = common / len(said), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def _block(text: str, name: str) -> str | None:
    match = re.search(rf"<<<BEGIN {name}>>>\n(.*?)\n<<<END {name}>>>", text, re.S)
    return match.group(1) if match else None


def reference_reply(request: dict[str, Any]) -> str | None:
    """The reply to a pairwise judge request (judge.pairwise_request), as JSON text; None
    without a reference answer (no verdict: the pair counts as failed)."""
    user = next(m["content"] for m in request["messages"] if m["role"] == "user")
    reference = _block(user, "REFERENCE ANSWER")
    if reference is None:
        return None
    first, second = (_block(user, f"ANSWER {n}") or "" for n in (1, 2))
    f1_1, f1_2 = token_f1(first, reference), token_f1(second, reference)
    winner = "tie" if abs(f1_1 - f1_2) < TIE_MARGIN else "1" if f1_1 > f1_2 else "2"
    reason = f"token-F1 against the reference: answer 1 {f1_1:.3f}, answer 2 {f1_2:.3f}"
    return json.dumps({"winner": winner, "reason": reason})
