"""The judge measured against the reviewers: the agreement, the gate it sets, and the completion
stage obeying it in both directions (real Dagster runs, a real DuckDB file, the real openai client
against the local OpenAI-compatible server, decisions through `qe_assets.review.decisions`)."""

from __future__ import annotations

import json
from typing import Any

import dagster as dg
import pytest

from qe_assets.review import decisions as review
from qe_assets.review.calibration import (
    JUDGE_CHECK,
    Agreement,
    Calibration,
    judge_agreement,
    judge_gate,
)
from qe_assets.settings import Settings, SettingsError
from qe_assets.store import connect, writer_connection
from qe_assets_tests.openai_server import ChatRequest, OpenAIServer, Reply
from qe_assets_tests.runs import checks, materialize, metadata
from qe_assets_tests.test_llm import JUDGE_MARKER, UP_TO_COMPLETIONS, llm, put

APPROVE = json.dumps({"score_a": 2, "score_b": 9, "reason": "grounded"})


def gate(overall: Agreement, **labels: Agreement) -> Any:
    return judge_gate(Calibration(overall, labels), min_agreement=0.8, min_decisions=30)


def test_agreement_counts_kappa_and_the_gate_decision() -> None:
    # 24 agreements of 30: 0.8, at the bar, so trusted; one fewer is under it.
    at_bar = Agreement(both_ok=20, judge_only=5, human_only=1, both_not=4)
    assert (at_bar.decisions, at_bar.agreed, at_bar.rate) == (30, 24, 0.8)
    assert gate(at_bar).trusted
    under = Agreement(both_ok=20, judge_only=6, human_only=1, both_not=3)
    assert gate(under).route_all and gate(under).routes("anything")
    assert "overall: judge agrees with reviewers on 77% of the last 30" in gate(under).problems[0]
    # Too few decisions say nothing, however bad.
    assert gate(Agreement(judge_only=29)).trusted
    assert Agreement().rate is None and Agreement().kappa is None
    # A judge that approves everything agrees with lenient reviewers, by chance: kappa 0.
    assert Agreement(both_ok=45, judge_only=5).kappa == pytest.approx(0.0)
    assert Agreement(both_ok=10, both_not=10).kappa == pytest.approx(1.0)
    # Overall fine, one label under the bar with enough decisions of its own: only that label.
    per_label = gate(
        at_bar + Agreement(both_ok=60),
        low_relevance=Agreement(both_ok=10, judge_only=20),
        overconfidence=Agreement(judge_only=5),  # under the bar, but only 5 decisions
    )
    assert not per_label.route_all and per_label.labels == {"low_relevance"}
    assert per_label.routes("low_relevance") and not per_label.routes("overconfidence")
    assert not per_label.trusted and len(per_label.problems) == 1


def test_settings_are_typed_and_checked_at_load() -> None:
    settings = Settings.from_env({})
    assert (settings.judge_min_agreement, settings.judge_min_decisions) == (0.8, 30)
    assert settings.serve_url == "http://127.0.0.1:8787"
    loaded = Settings.from_env(
        {"QE_JUDGE_MIN_AGREEMENT": "0.9", "QE_SERVE_URL": "https://qe.example.org:9000/"}
    )
    assert loaded.judge_min_agreement == 0.9 and loaded.serve_url == "https://qe.example.org:9000"
    with pytest.raises(SettingsError, match="QE_JUDGE_MIN_AGREEMENT must be a number between"):
        Settings.from_env({"QE_JUDGE_MIN_AGREEMENT": "1.5"})
    with pytest.raises(SettingsError, match="QE_JUDGE_MIN_DECISIONS must be an integer"):
        Settings.from_env({"QE_JUDGE_MIN_DECISIONS": "many"})
    with pytest.raises(SettingsError, match=r"QE_JUDGE_AGREEMENT_WINDOW \(20\) must be at least"):
        Settings.from_env({"QE_JUDGE_AGREEMENT_WINDOW": "20"})
    with pytest.raises(SettingsError, match="QE_SERVE_URL must be the base URL"):
        Settings.from_env({"QE_SERVE_URL": "127.0.0.1:8787"})


def approving_judge(request: ChatRequest) -> Reply | None:
    """The judge approves every regenerated answer; regenerations get the default answer."""
    return Reply.ok(APPROVE) if JUDGE_MARKER in request.prompt else None


def decide(settings: Settings, accept: list[str], reject: list[str]) -> None:
    """Reviewers' decisions, one transaction each (as `qe review` makes them), in order."""
    with writer_connection(settings.database) as conn:
        for sample_id in accept:
            review.accept(conn, sample_id, "ann")
        for sample_id in reject:
            review.reject(conn, sample_id, "bo", note="not grounded")


def queue(settings: Settings) -> dict[str, tuple[str, str]]:
    with connect(settings.database, read_only=True) as conn:
        found = conn.execute("SELECT sample_id, reason, status FROM review_queue").fetchall()
    return {sample_id: (reason, status) for sample_id, reason, status in found}


def version_ids(result: dg.ExecuteInProcessResult, settings: Settings) -> set[str]:
    version = metadata(result, "tuning_dataset")["version"]
    path = settings.datasets_dir / f"rag_quality_tuning_{version}.jsonl"
    return {json.loads(line)["sample_id"] for line in path.read_text("utf-8").splitlines()}


def sample_ids(topics: list[str]) -> list[str]:
    return [f"req-{topic}#factuality_error" for topic in topics]


def test_an_untrusted_judge_sends_its_approvals_to_review_until_agreement_recovers(
    settings: Settings, openai_server: OpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-calibration")
    openai_server.responder = approving_judge
    settings = llm(
        settings,
        openai_server,
        llm_judge=True,
        llm_judge_model="judge-model",
        judge_min_decisions=10,
        judge_agreement_window=10,
        min_dataset_examples=1,
        spot_check_share=1.0,  # the first samples are all spot-checked
    )
    cut = dg.AssetSelection.assets("tuning_dataset", "fine_tuned_model")

    # 1. Twelve judged, spot-checked completions; reviewers accept 2 and reject 10: the judge
    #    approved all twelve, so it agrees on 2 of 12, and on none of the last 10.
    first = [f"first{i}" for i in range(12)]
    put(settings, first)
    result = materialize(settings, selection=UP_TO_COMPLETIONS)
    assert metadata(result, "completions")["judge/gate"] == "open"
    assert checks(result)["judge_agreement"].passed
    ids = sample_ids(first)
    decide(settings, accept=ids[:2], reject=ids[2:])
    with connect(settings.database, read_only=True) as conn:
        calibration = judge_agreement(conn, margin=1.0, window=10)
        everything = judge_agreement(conn, margin=1.0, window=100)
    assert calibration.overall == Agreement(judge_only=10)
    assert everything.overall == Agreement(both_ok=2, judge_only=10)
    assert everything.per_label == {"factuality_error": everything.overall}
    # A margin the judge's scores (2 → 9) do not reach turns its approvals into rejections.
    with connect(settings.database, read_only=True) as conn:
        strict = judge_agreement(conn, margin=8.0, window=100)
    assert strict.overall == Agreement(human_only=2, both_not=10)

    # 2. No spot checks now: the judge approves ten new completions, and all ten wait for a
    #    person instead of going into a version.
    settings = settings.model_copy(update={"spot_check_share": 0.0})
    second = [f"second{i}" for i in range(10)]
    put(settings, second)
    result = materialize(settings, selection=UP_TO_COMPLETIONS)
    meta = metadata(result, "completions")
    assert (meta["judge/agreement"], meta["judge/decisions"], meta["judge/gate"]) == (
        0.0,
        10,
        "all",
    )
    assert meta["judge/held_for_review"] == 10 and meta["llm/ok"] == 10
    assert meta["judge/agreement/factuality_error"] == 0.0
    assert meta["dashboards"] == "http://127.0.0.1:8787/dashboards/#completions"
    check = checks(result)["judge_agreement"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert "judge agrees with reviewers on 0% of the last 10 decisions" in str(check.description)
    held = sample_ids(second)
    assert {queue(settings)[i] for i in held} == {(JUDGE_CHECK, review.PENDING)}
    assert version_ids(materialize(settings, selection=cut), settings) == set(ids[:2])

    # 3. Reviewers accept the ten: the last ten decisions all agree with the judge, the check
    #    passes and new approvals go straight into the next version again.
    decide(settings, accept=held, reject=[])
    third = [f"third{i}" for i in range(3)]
    put(settings, third)
    result = materialize(settings, selection=UP_TO_COMPLETIONS)
    meta = metadata(result, "completions")
    assert (meta["judge/agreement"], meta["judge/gate"], meta["judge/held_for_review"]) == (
        1.0,
        "open",
        0,
    )
    assert checks(result)["judge_agreement"].passed
    assert not set(sample_ids(third)) & set(queue(settings))
    assert version_ids(materialize(settings, selection=cut), settings) == set(
        held + sample_ids(third)
    )
