"""A release is done only when its evaluation and decision are committed (issue #26, item 3):
`qe run` and the release sensor resume a gate that a kill or a judge outage left unfinished,
through the real Dagster definitions, the real DuckDB file and the local OpenAI-compatible server.
The kills themselves are in test_crash.py (`test_sigkill_around_the_gate`)."""

from __future__ import annotations

import dagster as dg
import pytest

from qe_assets.evaluation.assets import commit_decision
from qe_assets.ops.runner import run_pipeline
from qe_assets.release.forget import forget
from qe_assets.release.readiness import settings_release_decision
from qe_assets.settings import Settings
from qe_assets.store import connect, ensure_schema
from qe_assets.store.evaluations import FLAGGED_REASON, gate_pending
from qe_assets_tests.openai_server import EvalModels, OpenAIServer
from qe_assets_tests.runs import checks, materialize, metadata, scalar
from qe_assets_tests.test_cli import qe
from qe_assets_tests.test_evaluation import (  # noqa: F401 (eval_settings is a fixture)
    BASE,
    eval_settings,
    promotions,
    release,
)
from qe_assets_tests.test_finetune import evaluate_sensor, processed, run_requests
from qe_assets_tests.test_finetune_openai import openai_settings  # noqa: F401 (a fixture)

GOOD = {"ft:": 3, BASE: 1}


@pytest.fixture
def gate_settings(request: pytest.FixtureRequest) -> Settings:
    """test_evaluation's settings: the openai backend and the judge on the test server."""
    return request.getfixturevalue("eval_settings")


def gate_due(settings: Settings):
    with connect(settings.database, read_only=True) as conn:
        return settings_release_decision(conn, settings, resume_gate=True)


def qe_run(settings: Settings):
    outcome = run_pipeline(settings, instance=dg.DagsterInstance.ephemeral(), log_level="ERROR")
    assert outcome.success, outcome.error
    return outcome


def test_a_release_killed_before_its_evaluation_committed_is_finished_by_the_next_run(
    gate_settings: Settings, openai_server: OpenAIServer
) -> None:
    processed(gate_settings, 120)
    openai_server.responder = EvalModels(GOOD)
    # Trained, then killed inside model_evaluation: no model_evaluations row.
    assert materialize(gate_settings, selection=["tuning_dataset", "fine_tuned_model"]).success
    candidate = scalar(gate_settings, "SELECT model_id FROM fine_tune_runs")
    due = gate_due(gate_settings)
    assert due.due and due.gate == candidate and due.version == "v001"
    assert "has no committed evaluation" in due.reason
    # The sensor asks for the evaluation alone, under a key of its own.
    with dg.instance_for_test() as instance:
        result, _ = evaluate_sensor(gate_settings, instance)
        (request,) = run_requests(result)
    assert request.asset_selection == [dg.AssetKey("model_evaluation")]
    assert request.run_key is not None and request.run_key.endswith("/gate0")

    outcome = qe_run(gate_settings)
    assert any("has no committed evaluation" in line for line in outcome.summary)
    assert any("check candidate_beats_production: passed" in line for line in outcome.summary)
    ((model, by, evaluation_id, action),) = promotions(gate_settings)
    assert (model, by, action) == (candidate, "gate", "promote") and evaluation_id
    assert not gate_due(gate_settings).due
    qe_run(gate_settings)  # nothing left: no second evaluation, no second promotion
    assert len(promotions(gate_settings)) == 1
    assert scalar(gate_settings, "SELECT count(*) FROM model_evaluations") == 1


def test_a_promote_decision_without_its_promotion_is_promoted_by_the_next_run(
    gate_settings: Settings, openai_server: OpenAIServer
) -> None:
    """A store the old code left behind: killed between the decision and the promotion."""
    assert release(gate_settings, openai_server, EvalModels(GOOD)).success
    with connect(gate_settings.database) as conn:
        conn.execute("DELETE FROM promoted_models")
    assert "never promoted" in gate_due(gate_settings).reason
    calls = openai_server.chat_count
    qe_run(gate_settings)
    assert openai_server.chat_count == calls  # every answer and verdict came from the cache
    assert [p[1:2] + p[3:] for p in promotions(gate_settings)] == [("gate", "promote")]


def test_a_judge_outage_is_insufficient_data_and_the_next_run_evaluates_again(
    gate_settings: Settings, openai_server: OpenAIServer
) -> None:
    # A third of the verdicts unparseable twice: left out of the count, but far above 5 %.
    models = EvalModels(GOOD, garbage_every=3, garbage_times=2)
    result = release(gate_settings, openai_server, models)
    meta = metadata(result, "model_evaluation")
    assert meta["failed"] > 0.05 * (meta["n"] + meta["failed"]) and meta["wins"] == meta["n"]
    assert meta["decision"] == "insufficient_data" and meta["promoted"] is False
    assert "QE_EVAL_MAX_FAILED_SHARE=0.05" in meta["reason"]
    gate = checks(result)["candidate_beats_production"]
    assert not gate.passed and gate.severity == dg.AssetCheckSeverity.WARN
    assert gate.metadata["retry"].value is True
    assert promotions(gate_settings) == []
    due = gate_due(gate_settings)
    assert due.due and due.gate == meta["candidate"] and "after 1 of 3 evaluations" in due.reason
    env = {"QE_DATA_DIR": gate_settings.data_dir}
    assert "retry (1 of 3)" in qe("models", "list", env=env).stdout

    # The judge answers again (its garbage was for the first two asks of each prompt).
    qe_run(gate_settings)
    assert [p[:2] for p in promotions(gate_settings)] == [(meta["candidate"], "gate")]
    assert scalar(gate_settings, "SELECT decision FROM model_evaluations") == "promote"
    assert not gate_due(gate_settings).due


def test_a_lasting_judge_outage_is_retried_at_most_three_times(
    gate_settings: Settings, openai_server: OpenAIServer
) -> None:
    models = EvalModels(GOOD, judge_down=True)
    assert release(gate_settings, openai_server, models).success
    for attempt in (2, 3):
        assert f"after {attempt - 1} of 3" in gate_due(gate_settings).reason
        qe_run(gate_settings)
    assert scalar(gate_settings, "SELECT attempts FROM model_evaluations") == 3
    assert not gate_due(gate_settings).due  # given up: no run every tick for ever
    judged = [r for r in openai_server.chat_requests() if r.json()["model"] == "judge"]
    qe_run(gate_settings)
    assert len([r for r in openai_server.chat_requests() if r.json()["model"] == "judge"]) == len(
        judged
    )
    env = {"QE_DATA_DIR": gate_settings.data_dir}
    assert "gave up after 3" in qe("models", "list", env=env).stdout
    assert promotions(gate_settings) == []


def test_a_candidate_flagged_before_its_gate_is_blocked_cleanly_and_not_resumed(
    gate_settings: Settings, openai_server: OpenAIServer
) -> None:
    """`qe forget` between the fine-tune and the gate: the gate records `block` (the flag as its
    reason) without asking anything, promotes nothing, starts no canary, raises nothing, and
    the release is not resumed for it."""
    processed(gate_settings, 120)
    openai_server.responder = EvalModels(GOOD)
    assert materialize(gate_settings, selection=["tuning_dataset", "fine_tuned_model"]).success
    candidate = scalar(gate_settings, "SELECT model_id FROM fine_tune_runs")
    subject = scalar(
        gate_settings,
        "SELECT min(s.request_id) FROM dataset_samples d JOIN annotated_samples s "
        "USING (sample_id) WHERE d.version = 'v001'",
    )
    report = forget(gate_settings.database, gate_settings.datasets_dir, request_ids=[subject])
    assert [m for m, *_ in report.subject.models] == [candidate]
    assert gate_due(gate_settings).gate is None  # nothing to resume for a flagged model
    with connect(gate_settings.database, read_only=True) as conn:
        assert gate_pending(conn, "openai") is None  # the old code: "no committed evaluation"

    calls = openai_server.chat_count
    result = materialize(gate_settings, selection=["model_evaluation"], raise_on_error=False)
    assert result.success  # the old code: ModelFlagged out of the promotion, a failed step
    meta = metadata(result, "model_evaluation")
    assert meta["candidate"] == candidate and meta["decision"] == "block"
    assert meta["reason"].startswith(FLAGGED_REASON) and meta["promoted"] is False
    assert "nothing promoted, no traffic" in meta["outcome"]
    gate = checks(result)["candidate_beats_production"]
    assert not gate.passed and gate.severity == dg.AssetCheckSeverity.WARN
    assert gate.metadata["flagged"].value is True
    assert openai_server.chat_count == calls  # neither model nor the judge was asked
    assert promotions(gate_settings) == []
    assert scalar(gate_settings, "SELECT count(*) FROM ab_decisions") == 0
    assert gate_due(gate_settings).gate is None
    assert "flagged" in qe("models", "list", env={"QE_DATA_DIR": gate_settings.data_dir}).stdout


def test_a_candidate_flagged_during_its_evaluation_is_committed_as_block(
    gate_settings: Settings,
) -> None:
    """The other order: `qe forget` commits while the gate is judging; the decision `promote`
    reaches commit_decision for a model flagged meanwhile, in canary mode too."""
    with connect(gate_settings.database) as conn:
        ensure_schema(conn)
        conn.execute(
            "INSERT INTO flagged_models VALUES ('ft:flagged', 'v001', 'f1', 'trained on an "
            "affected version', now()::TIMESTAMP)"
        )
    for mode in ("canary", "direct"):
        settings = gate_settings.model_copy(update={"rollout_mode": mode})
        row = {
            "evaluation_id": f"e-{mode}",
            "candidate": "ft:flagged",
            "baseline": BASE,
            "dataset_version": "v001",
            **dict.fromkeys(("n", "wins", "ties", "losses", "failed"), 30),
            "win_rate": 1.0,
            "ci_low": 0.9,
            "decision": "promote",
            "reason": "wins",
            "retry": False,
            "judge_model": "judge",
            "per_label": {},
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "estimated_cost": 0.0,
            "dagster_run_id": "r",
            "comparison": "production",
        }
        with connect(gate_settings.database) as conn:
            assert commit_decision(conn, row, settings, "r") == (False, False)
        assert row["decision"] == "block" and row["reason"].startswith(FLAGGED_REASON)
    assert promotions(gate_settings) == []
    assert scalar(gate_settings, "SELECT count(*) FROM ab_decisions") == 0
    assert (
        scalar(gate_settings, "SELECT count(*) FROM model_evaluations WHERE decision = 'block'")
        == 2
    )
