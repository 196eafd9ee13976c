"""The evaluation gate end to end: real Dagster materializations, a real DuckDB file, and the
local OpenAI-compatible server serving a fine-tune job, several models and a pairwise judge."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from qe_assets.ingest.queues import FileInbox
from qe_assets.release.readiness import ready_sample_count
from qe_assets.settings import Settings
from qe_assets.store import connect
from qe_assets_tests.factories import line, make_event
from qe_assets_tests.openai_server import (
    EMPTY_ANSWERS,
    ChatRequest,
    EvalModels,
    OpenAIServer,
    Reply,
    running,
)
from qe_assets_tests.runs import checks, column, materialize, metadata, scalar
from qe_assets_tests.test_cli import qe
from qe_assets_tests.test_finetune import processed
from qe_assets_tests.test_finetune_openai import openai_settings  # noqa: F401 (a fixture)

BASE = "gpt-4o-mini-2024-07-18"
PROCESSING = ["raw_events", "annotated_samples", "completions"]
RELEASE = ["tuning_dataset", "fine_tuned_model", "model_evaluation"]


@pytest.fixture
def eval_settings(request: pytest.FixtureRequest) -> Settings:
    """The openai fine-tune backend on the test server (its job gives the candidate's id), a
    large held-out share so a few dozen events make an evaluation set."""
    base: Settings = request.getfixturevalue("openai_settings")
    return base.model_copy(
        update={
            "llm_max_retries": 1,
            "llm_timeout_seconds": 5.0,
            "eval_share": 0.5,
            "eval_min_items": 20,
            "eval_judge_model": "judge",
            "llm_concurrency": 8,
            "llm_batch_size": 16,
        }
    )


def release(settings: Settings, server: OpenAIServer, models: EvalModels, n: int = 120):
    """n samples processed, then one release run: cut, fine-tune (a job on the server), evaluate
    and the checks; the server answers evaluation calls with `models`."""
    processed(settings, n)
    server.responder = models
    return materialize(settings, selection=RELEASE, raise_on_error=False)


def promotions(settings: Settings) -> list[tuple]:
    with connect(settings.database, read_only=True) as conn:
        return conn.execute(
            "SELECT model, promoted_by, evaluation_id, action FROM promoted_models "
            "ORDER BY promotion_id"
        ).fetchall()


def test_a_better_candidate_is_promoted_by_the_gate(
    eval_settings: Settings, openai_server: OpenAIServer
) -> None:
    result = release(eval_settings, openai_server, EvalModels({"ft:": 3, BASE: 1}))
    meta = metadata(result, "model_evaluation")
    assert meta["candidate"].startswith(f"ft:{BASE}:qe:") and meta["baseline"] == BASE
    held = scalar(eval_settings, "SELECT count(*) FROM evaluation_set")
    assert meta["n"] == held >= 20 and meta["wins"] == held and meta["failed"] == 0
    assert meta["decision"] == "passed" and meta["ci_low"] > 0.5
    assert "| factuality_error |" in meta["per_label"] and "### Won" in meta["examples"]
    check = checks(result)["candidate_beats_production"]
    assert check.passed
    ((model, by, evaluation_id, action),) = promotions(eval_settings)
    assert (model, by, evaluation_id, action) == (
        meta["candidate"],
        "gate",
        meta["evaluation_id"],
        "promote",
    )
    with connect(eval_settings.database, read_only=True) as conn:
        row = conn.execute(
            "SELECT candidate, baseline, dataset_version, n, wins, ties, losses, decision, "
            "judge_model FROM model_evaluations"
        ).fetchall()
        items = column(conn, "SELECT verdict FROM evaluation_items")
        # Both orders were shown to the judge.
        firsts = column(conn, "SELECT DISTINCT candidate_first FROM evaluation_items")
    assert row == [(meta["candidate"], BASE, "v001", held, held, 0, 0, "promote", "judge")]
    assert items == ["win"] * held and sorted(firsts) == [False, True]


def test_a_re_run_makes_no_new_calls_and_keeps_one_row(
    eval_settings: Settings, openai_server: OpenAIServer
) -> None:
    models = EvalModels({"ft:": 1, BASE: 3})
    first = release(eval_settings, openai_server, models)
    calls = openai_server.chat_count
    again = materialize(eval_settings, selection=["model_evaluation"], raise_on_error=False)
    assert openai_server.chat_count == calls
    assert metadata(again, "model_evaluation")["calls"] == 0
    assert (
        metadata(again, "model_evaluation")["evaluation_id"]
        == metadata(first, "model_evaluation")["evaluation_id"]
    )
    assert scalar(eval_settings, "SELECT count(*) FROM model_evaluations") == 1


def test_a_worse_candidate_is_blocked_and_stays_recorded(
    eval_settings: Settings, openai_server: OpenAIServer
) -> None:
    result = release(eval_settings, openai_server, EvalModels({"ft:": 1, BASE: 3}))
    meta = metadata(result, "model_evaluation")
    assert meta["decision"] == "block" and meta["wins"] == 0 and meta["losses"] == meta["n"]
    check = checks(result)["candidate_beats_production"]
    assert not check.passed and "lower bound" in (check.description or "")
    assert promotions(eval_settings) == []
    assert scalar(eval_settings, "SELECT decision FROM model_evaluations") == "block"


def test_an_equal_candidate_ties_without_judge_calls_and_is_not_promoted(
    eval_settings: Settings, openai_server: OpenAIServer
) -> None:
    result = release(eval_settings, openai_server, EvalModels({"ft:": 2, BASE: 2}))
    meta = metadata(result, "model_evaluation")
    assert meta["ties"] == meta["n"] > 0 and meta["judge_calls"] == 0
    assert meta["win_rate"] == 0.5 and meta["decision"] == "block"
    judged = [r for r in openai_server.chat_requests() if r.json()["model"] == "judge"]
    assert judged == []
    assert not checks(result)["candidate_beats_production"].passed
    assert promotions(eval_settings) == []


def test_judge_faults_are_retried_then_counted_failed_never_won(
    eval_settings: Settings, openai_server: OpenAIServer
) -> None:
    # Every 3rd prompt's verdict is garbage twice (retried, then failed); with garbage once
    # the retry is judged.
    models = EvalModels({"ft:": 3, BASE: 1}, garbage_every=3, garbage_times=2)
    result = release(eval_settings, openai_server, models)
    meta = metadata(result, "model_evaluation")
    held = scalar(eval_settings, "SELECT count(*) FROM evaluation_set")
    assert meta["failed"] > 0 and meta["n"] + meta["failed"] == held
    assert meta["wins"] == meta["n"] and meta["error/judge:MalformedVerdict"] == meta["failed"]
    with connect(eval_settings.database, read_only=True) as conn:
        failed = conn.execute(
            "SELECT DISTINCT verdict, winner FROM evaluation_items WHERE error IS NOT NULL"
        ).fetchall()
    assert failed == [("failed", None)]
    judge_requests = [r for r in openai_server.chat_requests() if r.json()["model"] == "judge"]
    assert len(judge_requests) == meta["n"] + 2 * meta["failed"]


def test_a_judge_fault_once_is_retried_and_judged(
    eval_settings: Settings, openai_server: OpenAIServer
) -> None:
    models = EvalModels({"ft:": 3, BASE: 1}, garbage_every=3, garbage_times=1)
    meta = metadata(release(eval_settings, openai_server, models), "model_evaluation")
    assert meta["failed"] == 0 and meta["decision"] == "passed"


def test_a_failing_model_gives_failed_items_and_no_promotion(
    eval_settings: Settings, openai_server: OpenAIServer
) -> None:
    result = release(eval_settings, openai_server, EvalModels({"ft:": None, BASE: 1}))
    meta = metadata(result, "model_evaluation")
    assert meta["n"] == 0 and meta["failed"] > 0
    assert meta["error/candidate:InternalServerError"] == meta["failed"]
    assert meta["decision"] == "insufficient_data"
    assert not checks(result)["candidate_beats_production"].passed
    assert promotions(eval_settings) == []


def test_empty_answers_are_losses_not_wins(
    eval_settings: Settings, openai_server: OpenAIServer
) -> None:
    result = release(eval_settings, openai_server, EvalModels({"ft:": EMPTY_ANSWERS, BASE: 1}))
    meta = metadata(result, "model_evaluation")
    assert meta["wins"] == meta["failed"] == 0 and meta["losses"] == meta["n"] > 0
    assert meta["error/candidate:EmptyCompletion"] == meta["n"] and meta["decision"] == "block"
    assert promotions(eval_settings) == []


class MostlyEmpty:
    """Issue #26's candidate: empty answers to 4 prompts in 5 (by hash), good ones to the rest."""

    def __init__(self, models: EvalModels) -> None:
        self.models = models

    def __call__(self, request: ChatRequest) -> Reply:
        if request.model.startswith("ft:") and int(request.prompt_hash[:8], 16) % 5:
            return Reply.empty()
        return self.models(request)


def test_a_candidate_that_fails_to_answer_loses_those_items(
    eval_settings: Settings, openai_server: OpenAIServer
) -> None:
    # Before the fix its empty answers were left out: its few answers all won, and it was
    # promoted.
    settings = eval_settings.model_copy(update={"eval_min_items": 5})
    result = release(settings, openai_server, MostlyEmpty(EvalModels({"ft:": 3, BASE: 1})))
    meta = metadata(result, "model_evaluation")
    empty = meta["error/candidate:EmptyCompletion"]
    assert empty > 2 * meta["wins"] > 0 and meta["failed"] == 0
    assert meta["losses"] == empty and meta["n"] == meta["wins"] + empty
    assert meta["decision"] == "block" and promotions(settings) == []
    assert not checks(result)["candidate_beats_production"].passed
    with connect(settings.database, read_only=True) as conn:
        lost = conn.execute(
            "SELECT DISTINCT verdict, reason FROM evaluation_items WHERE error IS NOT NULL"
        ).fetchall()
    assert lost == [("loss", "the candidate gave no usable answer (EmptyCompletion)")]


def test_endpoint_down_finishes_with_every_item_failed(
    eval_settings: Settings, openai_server: OpenAIServer
) -> None:
    with running() as gone:
        dead_url = gone.base_url  # closed once the block ends: connection refused
    settings = eval_settings.model_copy(update={"eval_base_url": dead_url})
    result = release(settings, openai_server, EvalModels({"ft:": 3, BASE: 1}))
    meta = metadata(result, "model_evaluation")
    assert meta["n"] == 0 and meta["decision"] == "insufficient_data"
    assert meta["error/candidate:APIConnectionError,baseline:APIConnectionError"] == meta["failed"]
    assert not checks(result)["candidate_beats_production"].passed


def test_a_separate_endpoint_serves_the_adapter_under_a_mapped_name(
    eval_settings: Settings, openai_server: OpenAIServer
) -> None:
    with running() as serving:
        serving.responder = EvalModels({"qe-adapter": 3, BASE: 1})
        openai_server.responder = EvalModels({})  # the judge
        processed(eval_settings, 120)
        # The fine-tune job runs on one server; its model id is known once it has succeeded.
        assert materialize(eval_settings, selection=["tuning_dataset", "fine_tuned_model"]).success
        model_id = scalar(eval_settings, "SELECT model_id FROM fine_tune_runs")
        settings = eval_settings.model_copy(
            update={"eval_base_url": serving.base_url, "eval_model_map": {model_id: "qe-adapter"}}
        )
        serving.plan(Reply.rate_limited(0.05), Reply.rate_limited(0.05))
        result = materialize(settings, selection=["model_evaluation"])
        served_models = {r.json()["model"] for r in serving.chat_requests()}
    meta = metadata(result, "model_evaluation")
    assert meta["candidate"] == model_id and meta["decision"] == "passed" and meta["failed"] == 0
    # The models where they are served; the judge on the LLM's endpoint (QE_EVAL_JUDGE_BASE_URL
    # unset), which serves no adapter.
    assert served_models == {"qe-adapter", BASE}
    assert {r.json()["model"] for r in openai_server.chat_requests()} == {"judge"}
    # Two 429s were retried after Retry-After: one request more each, no item lost.
    assert meta["calls"] == 3 * meta["n"] + 2


def test_answers_paid_for_are_not_asked_again_after_a_failed_judge(
    eval_settings: Settings, openai_server: OpenAIServer
) -> None:
    first = release(eval_settings, openai_server, EvalModels({"ft:": 3, BASE: 1}, judge_down=True))
    held = metadata(first, "model_evaluation")["failed"]
    assert held > 0 and metadata(first, "model_evaluation")["n"] == 0
    openai_server.reset()
    openai_server.responder = EvalModels({"ft:": 3, BASE: 1})
    again = metadata(materialize(eval_settings, selection=["model_evaluation"]), "model_evaluation")
    asked = {r.json()["model"] for r in openai_server.chat_requests()}
    assert asked == {"judge"} and again["n"] == held and again["decision"] == "passed"


def test_an_icl_baseline_is_reported_beside_the_gate(
    eval_settings: Settings, openai_server: OpenAIServer
) -> None:
    settings = eval_settings.model_copy(update={"eval_icl_examples": 2})
    # In-context examples lift the base model above the candidate: reported, not gating.
    result = release(settings, openai_server, EvalModels({"ft:": 3, BASE: 1}, icl_bonus=3))
    meta = metadata(result, "model_evaluation")
    assert meta["decision"] == "passed" and meta["icl/baseline"] == f"{BASE}+icl2"
    assert meta["icl/n"] == meta["n"] and meta["icl/win_rate"] == 0.0
    assert checks(result)["candidate_beats_production"].passed
    with connect(settings.database, read_only=True) as conn:
        rows = conn.execute(
            "SELECT comparison, baseline, decision FROM model_evaluations ORDER BY comparison"
        ).fetchall()
        train = set(
            column(
                conn,
                "SELECT s.prompt FROM dataset_samples d JOIN annotated_samples s "
                "USING (sample_id) WHERE d.split = 'train'",
            )
        )
    assert rows == [("icl", f"{BASE}+icl2", "block"), ("production", BASE, "promote")]
    icl_requests = [
        r.json() for r in openai_server.chat_requests() if len(r.json()["messages"]) > 2
    ]
    assert icl_requests and all(r["model"] == BASE for r in icl_requests)
    shots = icl_requests[0]["messages"][1:-1]
    assert [m["role"] for m in shots] == ["user", "assistant"] * 2
    assert {shots[0]["content"], shots[2]["content"]} <= train
    # The candidate's answers were asked once for both comparisons.
    candidate_calls = [r for r in openai_server.chat_requests() if r.json()["model"] != BASE]
    assert len([r for r in candidate_calls if r.json()["model"] != "judge"]) == meta["n"]


def test_too_few_items_is_insufficient_data(
    eval_settings: Settings, openai_server: OpenAIServer
) -> None:
    settings = eval_settings.model_copy(update={"eval_min_items": 50})
    result = release(settings, openai_server, EvalModels({"ft:": 3, BASE: 1}), n=60)
    meta = metadata(result, "model_evaluation")
    assert meta["n"] < 50 and meta["decision"] == "insufficient_data"
    gate = checks(result)["candidate_beats_production"]
    assert "QE_EVAL_MIN_ITEMS=50" in (gate.description or "")
    # Not promoted, but a warning: the release run itself succeeded.
    assert not gate.passed and gate.severity == dg.AssetCheckSeverity.WARN
    assert result.success
    assert promotions(settings) == []


def test_no_backend_means_no_evaluation(settings: Settings) -> None:
    processed(settings, 30)
    instance = dg.DagsterInstance.ephemeral()
    result = materialize(settings, selection=RELEASE, instance=instance)
    assert metadata(result, "model_evaluation") == {}
    # With backend none fine_tuned_model materializes no model (an observation says why), so the
    # evaluation step does not even run.
    skipped = [e.step_key for e in result.all_events if e.event_type_value == "STEP_SKIPPED"]
    assert "model_evaluation" in skipped


def test_no_judge_configured_means_no_evaluation_and_the_release_still_succeeds(
    eval_settings: Settings, openai_server: OpenAIServer
) -> None:
    settings = eval_settings.model_copy(update={"eval_judge_model": None})
    processed(settings, 60)
    instance = dg.DagsterInstance.ephemeral()
    result = materialize(settings, selection=RELEASE, instance=instance)
    assert result.success and metadata(result, "model_evaluation") == {}
    assert metadata(result, "fine_tuned_model")["status"] == "succeeded"
    logs = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert any("nothing to evaluate: no judge model: set QE_EVAL_JUDGE_MODEL" in m for m in logs)
    assert promotions(settings) == []


def rounds_of_events(round_: int) -> list[str]:
    """60 events whose questions overlap the previous round's by half (same normalised question,
    new request id, different answer), so held-out questions come back in later versions."""
    return [
        line(
            make_event(
                f"r{round_}-{i}",
                question=f"  Question NUMBER {i}? ",  # normalises like "question number i?"
                answer=f"Answer {i} of round {round_}.",
                evaluation={"score": 0.5, "labels": ["factuality_error"]},
            )
        ).decode()
        for i in range(30 * round_, 30 * round_ + 60)
    ]


def test_the_frozen_set_never_enters_a_later_train_split(settings: Settings) -> None:
    settings = settings.model_copy(update={"eval_share": 0.3})
    for round_ in range(3):
        FileInbox(settings.inbox_dir).put(rounds_of_events(round_))
        assert materialize(settings, selection=PROCESSING).success
        with connect(settings.database, read_only=True) as conn:
            # What the sensor compares to the threshold is exactly what the cut trains on: the
            # held-out questions (new ones and ones frozen by earlier cuts) do not count.
            ready = ready_sample_count(conn, eval_share=settings.eval_share)
            assert ready < ready_sample_count(conn)
        assert materialize(settings, selection=RELEASE[:2]).success
        assert scalar(settings, "SELECT max_by(sample_count, number) FROM dataset_versions") == (
            ready
        )
    with connect(settings.database, read_only=True) as conn:
        versions = column(conn, "SELECT version FROM dataset_versions ORDER BY number")
        per_version = dict(
            conn.execute(
                "SELECT dataset_version, count(*) FROM evaluation_set GROUP BY 1"
            ).fetchall()
        )
        leaked = conn.execute(
            """
            SELECT d.version, d.sample_id FROM dataset_samples d
            JOIN annotated_samples s USING (sample_id)
            WHERE s.question_key IN (SELECT question_key FROM evaluation_set)
            """
        ).fetchall()
        in_files = column(conn, "SELECT sample_id FROM evaluation_set")
        repeated = conn.execute(
            """
            SELECT count(*) FROM evaluation_set e JOIN annotated_samples s USING (sample_id)
            WHERE s.request_id NOT LIKE 'r0-%'
              AND s.question_key IN (
                SELECT s0.question_key FROM annotated_samples s0 WHERE s0.request_id LIKE 'r0-%')
            """
        ).fetchall()[0][0]
    assert versions == ["v001", "v002", "v003"]
    assert set(per_version) == set(versions) and all(n > 0 for n in per_version.values())
    assert leaked == []
    assert repeated > 0  # a question held out in v001 came back and was held out again
    texts = "".join(p.read_text() for p in settings.datasets_dir.glob("*.jsonl"))
    assert not [s for s in in_files if f'"sample_id":"{s}"' in texts]


def test_people_promote_and_roll_back_with_reviewer_and_reason(
    eval_settings: Settings, openai_server: OpenAIServer
) -> None:
    release(eval_settings, openai_server, EvalModels({"ft:": 3, BASE: 1}))
    ((candidate, *_),) = promotions(eval_settings)
    env = {"QE_DATA_DIR": eval_settings.data_dir, "QE_REVIEWER": "ana"}
    listed = qe("models", "list", env=env).stdout
    assert candidate in listed and "promote" in listed and "true" in listed
    unknown = qe("models", "promote", "no-such-model", "--reason", "x", env=env, check=False)
    assert unknown.returncode == 1 and unknown.stderr.count("\n") == 1
    assert "no-such-model: no such model" in unknown.stderr
    qe("models", "promote", BASE, "--reason", "complaints about tone", env=env)
    back = qe("models", "rollback", "--reason", "base was fine", "--reviewer", "bo", env=env)
    assert f"rollback: {candidate} is the production model (was {BASE}), by bo" in back.stdout
    again = qe("models", "rollback", "--reason", "again", env=env, check=False)
    assert again.returncode == 1 and "nothing to roll back to" in again.stderr
    with connect(eval_settings.database, read_only=True) as conn:
        rows = conn.execute(
            "SELECT model, promoted_by, action, reason FROM promoted_models ORDER BY promotion_id"
        ).fetchall()
    assert rows == [
        (candidate, "gate", "promote", rows[0][3]),
        (BASE, "ana", "promote", "complaints about tone"),
        (candidate, "bo", "rollback", "base was fine"),
    ]
    assert "lower bound" in rows[0][3]
    status = qe("status", env=env).stdout
    assert f"production model: {candidate} (rolled back to by bo, " in status
    assert f"latest evaluation: {candidate} vs {BASE}: passed the gate, win rate 1.000" in status
    no_reason = qe("models", "promote", BASE, env=env, check=False)
    assert no_reason.returncode == 2 and "--reason" in no_reason.stderr


@pytest.mark.parametrize(
    "command", [["models"], ["models", "list"], ["models", "promote"], ["models", "rollback"]]
)
def test_models_help_and_no_database_are_one_liners(command: list[str], tmp_path: Path) -> None:
    env = {"QE_DATA_DIR": str(tmp_path / "data")}
    help_text = qe(*command, "--help", env=env).stdout
    assert help_text.startswith(f"usage: qe {' '.join(command)}") and "options:" in help_text
    if command == ["models", "list"]:
        missing = qe(*command, env=env, check=False)
        assert missing.returncode == 2 and missing.stderr.startswith("qe: no database at")
        assert missing.stderr.count("\n") == 1
