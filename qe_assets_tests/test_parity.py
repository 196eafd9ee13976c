"""The train/serve parity probe's verdicts (evaluation/parity.py), pure; the probe against
served models is in test_model_server.py and test_serving.py."""

from __future__ import annotations

import json
from pathlib import Path

from qe_assets.evaluation.parity import (
    PROBE_MAX_TOKENS,
    base_budgets,
    judge_probe,
    probe_samples,
    system_mismatch,
)

SYSTEM = "You are a knowledge-base assistant."


def test_a_candidate_that_answers_as_its_base_is_an_adapter_not_applied() -> None:
    same = [("The documents say: x", "stop"), ("The documents say: y", "stop")]
    result = judge_probe(same, list(same))
    assert not result.ok and "answers exactly as its base on all 2" in result.reason


def test_a_candidate_that_never_ends_its_turn_fails_naming_how_often() -> None:
    result = judge_probe([("a", "length"), ("b", "stop"), ("c", "length")], [("z", "stop")] * 3)
    assert not result.ok and "did not end its turn on 2 of 3 train prompts" in result.reason


def test_a_candidate_with_an_unanswered_prompt_fails() -> None:
    result = judge_probe([("a", "stop"), (None, None)], [("z", "stop")] * 2)
    assert not result.ok and "did not answer every probe prompt" in result.reason


def test_a_candidate_that_differs_and_stops_passes() -> None:
    result = judge_probe([("a", "stop"), ("b", "stop")], [("a", "stop"), ("z", "length")])
    assert result.ok and result.candidate_answers == ("a", "b")


def test_the_system_message_must_be_the_one_the_evaluation_sends(tmp_path: Path) -> None:
    lines = []
    for n in range(6):
        turns = [{"role": "system", "content": SYSTEM}] if n % 2 else []
        turns += [{"role": "user", "content": f"q{n}"}, {"role": "assistant", "content": "a"}]
        lines.append(json.dumps({"messages": turns}))
    path = tmp_path / "train.chat.jsonl"
    path.write_text("\n".join(lines) + "\n", "utf-8")
    samples = probe_samples(path, count=4)
    assert [s.prompt for s in samples] == ["q0", "q1", "q2", "q3"]
    assert "trained without a system message" in (system_mismatch(samples, {SYSTEM}) or "")
    with_system = [s for s in samples if s.system]
    assert system_mismatch(with_system, {SYSTEM}) is None
    assert "differs from the one the evaluation sends" in (
        system_mismatch(with_system, {"Another system message."}) or ""
    )


def test_the_base_is_asked_only_as_long_as_an_identical_answer_would_take() -> None:
    """A candidate that stopped after n tokens: an identical base answer stops within n + 1, so
    the base is not asked for 256 tokens; a cut candidate, or one without a token count, gets
    the full budget for its base."""
    candidate = [("a b", "stop", 3), ("x" * 9, "length", PROBE_MAX_TOKENS), ("c", "stop", 0)]
    assert base_budgets(candidate) == [4, PROBE_MAX_TOKENS, PROBE_MAX_TOKENS]
