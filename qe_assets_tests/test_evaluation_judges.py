"""The evaluation's judges: the reference judge (token-F1 against the reference answer, computed
here) and an LLM judge on its own endpoint. Real materializations on a real DuckDB file, the
models and the judge on the local OpenAI-compatible test server."""

from __future__ import annotations

import json
import re

import pytest

from qe_assets.evaluation.judge import JudgeItem, pairwise_request
from qe_assets.evaluation.reference_judge import (
    REFERENCE_JUDGE,
    reference_reply,
    token_f1,
    tokens,
)
from qe_assets.ingest.queues import FileInbox
from qe_assets.settings import Settings, SettingsError
from qe_assets.store import connect
from qe_assets_tests.factories import line, make_event
from qe_assets_tests.openai_server import ChatRequest, EvalModels, OpenAIServer, Reply, running
from qe_assets_tests.runs import materialize, metadata
from qe_assets_tests.test_evaluation import BASE, RELEASE, eval_settings  # noqa: F401 (fixture)
from qe_assets_tests.test_finetune import processed
from qe_assets_tests.test_finetune_openai import openai_settings  # noqa: F401 (a fixture)

# The completions stage's judge (scoring a rewrite) is told where answer B starts.
SCORING_MARKER = "<<<BEGIN ANSWER B>>>"
APPROVED = '{"score_a": 2, "score_b": 9, "reason": "grounded in the documents"}'
FACTS = [
    ("refund", "Refunds are accepted within 30 days."),
    ("shipping", "Shipping takes 5 business days."),
    ("warranty", "The warranty covers two years of use."),
    ("年假", "年假最多结转五天。"),
]
FIRST_DOCUMENT = re.compile(r"\] <<<(.*?)>>>", re.S)


def test_token_f1_counts_shared_words_and_chinese_characters() -> None:
    assert tokens("Refunds: 30 days!") == ["refunds", "30", "days"]
    assert tokens("年假最多") == ["年", "假", "最", "多"]
    assert token_f1("Refunds take 30 days.", "Refunds take 30 days.") == 1.0
    assert token_f1("No idea.", "Refunds take 30 days.") == 0.0
    # 2 of 3 said words in a 4-word reference: P 2/3, R 1/2, F1 4/7.
    assert token_f1("refunds 30 weeks", "refunds take 30 days") == pytest.approx(4 / 7)
    assert token_f1("", "") == 1.0 and token_f1("", "something") == 0.0


def test_the_reference_judge_reads_the_pairwise_request_and_keeps_its_contract() -> None:
    item = JudgeItem("en", "How long for refunds?", ["Refunds within 30 days."], "Within 30 days.")
    reply = reference_reply(pairwise_request(REFERENCE_JUDGE, item, "No idea.", "Within 30 days."))
    assert reply is not None
    verdict = json.loads(reply)
    assert verdict["winner"] == "2" and "answer 2 1.000" in verdict["reason"]
    same = reference_reply(pairwise_request(REFERENCE_JUDGE, item, "30 days", "30 days"))
    assert same is not None and json.loads(same)["winner"] == "tie"
    # Without a reference there is nothing to measure against: no verdict at all.
    unreferenced = JudgeItem("en", "How long for refunds?", ["Refunds within 30 days."])
    assert reference_reply(pairwise_request(REFERENCE_JUDGE, unreferenced, "a", "b")) is None


def test_an_unknown_judge_fails_at_load_time_naming_the_variable() -> None:
    with pytest.raises(SettingsError, match="QE_EVAL_JUDGE"):
        Settings.from_env({"QE_EVAL_JUDGE": "oracle"})


def fact_of(prompt: str) -> str:
    match = FIRST_DOCUMENT.search(prompt)
    return match.group(1) if match else ""


def grounded_models(request: ChatRequest) -> Reply:
    """The LLM rewrites and the fine-tuned model restate the first document; the scoring judge
    approves every rewrite; the base model knows nothing."""
    if SCORING_MARKER in request.prompt:
        return Reply.ok(APPROVED)
    if request.model == "test-model" or request.model.startswith("ft:"):
        return Reply.ok(f"The documents say: {fact_of(request.prompt)}")
    return Reply.ok("I am not sure, please ask support.")


def grounded_events(n: int) -> list[str]:
    out = []
    for i in range(n):
        topic, fact = FACTS[i % len(FACTS)]
        docs = [{"id": f"kb-{topic}", "content": fact, "score": 0.9}]
        event = make_event(f"r-{i}", question=f"What about {topic}, case {i}?", docs=docs)
        evaluation = {"score": 0.5, "labels": ["factuality_error"]}
        out.append(line({**event, "evaluation": evaluation}).decode())
    return out


def test_the_reference_judge_promotes_the_grounded_model_with_no_judge_call(
    eval_settings: Settings,  # noqa: F811 (the fixture)
    openai_server: OpenAIServer,
) -> None:
    settings = eval_settings.model_copy(
        update={"eval_judge": "reference", "llm_model": "test-model", "llm_judge": True}
    )
    openai_server.responder = grounded_models
    FileInbox(settings.inbox_dir).put(grounded_events(120))
    assert materialize(settings, selection=["raw_events", "annotated_samples", "completions"])
    result = materialize(settings, selection=RELEASE, raise_on_error=False)
    meta = metadata(result, "model_evaluation")
    assert meta["judge_model"] == REFERENCE_JUDGE and meta["baseline"] == BASE
    assert meta["n"] >= 20 and meta["failed"] == 0 and meta["wins"] == meta["n"]
    assert meta["decision"] == "passed" and meta["judge_calls"] == meta["n"]
    asked = {r.json()["model"] for r in openai_server.chat_requests()}
    assert REFERENCE_JUDGE not in asked and "judge" not in asked
    with connect(settings.database, read_only=True) as conn:
        reasons = conn.execute("SELECT DISTINCT reason FROM evaluation_items").fetchall()
    assert all("token-F1 against the reference" in r for (r,) in reasons)


def test_without_references_the_reference_judge_fails_items_never_ties_them(
    eval_settings: Settings,  # noqa: F811
    openai_server: OpenAIServer,
) -> None:
    """Naive completions (no LLM) are no reference: every pair fails, nothing is promoted."""
    settings = eval_settings.model_copy(update={"eval_judge": "reference"})
    processed(settings, 120)
    openai_server.responder = EvalModels({"ft:": 3, BASE: 1})
    meta = metadata(
        materialize(settings, selection=RELEASE, raise_on_error=False), "model_evaluation"
    )
    assert meta["n"] == 0 and meta["failed"] > 0 and meta["decision"] not in ("promote", "passed")
    assert meta["error/judge:no_verdict"] == meta["failed"]


def test_the_llm_judge_is_asked_on_its_own_endpoint_with_its_own_key(
    eval_settings: Settings,  # noqa: F811
    openai_server: OpenAIServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Candidate and baseline where the models are served (here the LLM's endpoint), the judge
    on another server with another key: a hosted judge next to a local candidate."""
    monkeypatch.setenv("QE_EVAL_JUDGE_API_KEY", "sk-judge-only")
    with running() as judging:
        judging.responder = EvalModels({}, judge_model="judge")
        openai_server.responder = EvalModels({"ft:": 3, BASE: 1})
        settings = eval_settings.model_copy(update={"eval_judge_base_url": judging.base_url})
        processed(settings, 120)
        result = materialize(settings, selection=RELEASE, raise_on_error=False)
        judged = judging.chat_requests()
    meta = metadata(result, "model_evaluation")
    assert meta["decision"] == "passed" and meta["failed"] == 0
    assert {r.json()["model"] for r in judged} == {"judge"} and len(judged) == meta["n"]
    assert {r.headers.get("authorization") for r in judged} == {"Bearer sk-judge-only"}
    answered = {r.json()["model"] for r in openai_server.chat_requests()}
    assert "judge" not in answered and BASE in answered
