"""The `openai` fine-tune backend against the local OpenAI-compatible server, real client."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from qe_assets.release.export import VersionFiles
from qe_assets.settings import Settings, SettingsError
from qe_assets.store import connect
from qe_assets_tests.openai_server import ChatRequest, OpenAIServer, Reply
from qe_assets_tests.runs import materialize, metadata
from qe_assets_tests.test_finetune import processed
from qe_assets_tests.test_llm import JUDGE_MARKER, llm

KEY = "sk-test-finetune-7788"


@pytest.fixture
def openai_settings(
    settings: Settings, openai_server: OpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    return settings.model_copy(
        update={
            "finetune_backend": "openai",
            "openai_base_url": openai_server.base_url,
            "finetune_poll_seconds": 0.01,
            "finetune_deadline_seconds": 10.0,
            "finetune_hyperparameters": {"n_epochs": 2},
            "llm_max_retries": 0,
            "finetune_allow_naive": True,  # no LLM here: every completion is naive
        }
    )


def run_row(settings: Settings) -> dict:
    with connect(settings.database, read_only=True) as conn:
        rows = conn.execute("SELECT * FROM fine_tune_runs ORDER BY created_at").fetchall()
        names = [d[0] for d in conn.description]
    assert rows, "no fine_tune_runs row"
    return dict(zip(names, rows[-1], strict=True))


def jobs(server: OpenAIServer) -> list:
    return [
        r for r in server.requests if r.method == "POST" and r.path.endswith("/fine_tuning/jobs")
    ]


def test_success_uploads_splits_creates_job_and_records_the_model(
    openai_settings: Settings, openai_server: OpenAIServer
) -> None:
    processed(openai_settings, 40)
    result = materialize(openai_settings, selection=["tuning_dataset", "fine_tuned_model"])
    model = metadata(result, "fine_tuned_model")
    assert model["status"] == "succeeded"
    assert model["model_id"].startswith("ft:gpt-4o-mini-2024-07-18:qe:ftjob-")
    row = run_row(openai_settings)
    assert (row["status"], row["job_id"], row["model_id"]) == (
        "succeeded",
        model["job_id"],
        model["model_id"],
    )
    (create,) = jobs(openai_server)
    body = create.json()
    assert body["training_file"] == row["training_file_id"]
    assert body["validation_file"] == row["validation_file_id"]
    assert body["metadata"]["qe_run_id"] == "v001-openai-1"
    assert body["method"]["supervised"]["hyperparameters"] == {"n_epochs": 2}
    recipe = json.loads(row["recipe"])
    uploaded = openai_server.file_content(row["training_file_id"]).decode()
    assert uploaded == Path(recipe["train_chat_path"]).read_text()
    assert any("succeeded" in event for event in json.loads(row["metrics"])["events"])
    # The key went to the server as a bearer token, and nowhere into our records.
    assert create.headers.get("authorization") == f"Bearer {KEY}"
    assert KEY not in json.dumps(row, default=str)


def test_failed_job_fails_the_asset_with_the_providers_message(
    openai_settings: Settings, openai_server: OpenAIServer
) -> None:
    openai_server.job_script = ["validating_files", "running", "failed"]
    openai_server.job_error = {
        "code": "invalid_training_file",
        "param": "training_file",
        "message": "line 3: messages must not be empty",
    }
    processed(openai_settings, 15)
    result = materialize(
        openai_settings, selection=["tuning_dataset", "fine_tuned_model"], raise_on_error=False
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "line 3: messages must not be empty" in failure.step_failure_data.error.message
    row = run_row(openai_settings)
    assert row["status"] == "failed" and "messages must not be empty" in row["message"]


def test_restart_mid_job_follows_the_same_job(
    openai_settings: Settings, openai_server: OpenAIServer
) -> None:
    openai_server.job_script = ["validating_files", *["running"] * 30, "succeeded"]
    processed(openai_settings, 15)
    impatient = openai_settings.model_copy(update={"finetune_deadline_seconds": 0.05})
    first = materialize(
        impatient, selection=["tuning_dataset", "fine_tuned_model"], raise_on_error=False
    )
    assert not first.success
    row = run_row(openai_settings)
    assert row["status"] == "running" and row["job_id"].startswith("ftjob-")
    job_id = row["job_id"]
    second = materialize(openai_settings, selection=["fine_tuned_model"])
    model = metadata(second, "fine_tuned_model")
    assert (model["job_id"], model["status"], model["run_id"]) == (
        job_id,
        "succeeded",
        "v001-openai-1",
    )
    assert len(jobs(openai_server)) == 1  # no second job was started


def test_job_created_but_id_not_saved_is_found_by_its_run_id(
    openai_settings: Settings, openai_server: OpenAIServer
) -> None:
    openai_server.job_script = ["validating_files", *["running"] * 30, "succeeded"]
    processed(openai_settings, 15)
    impatient = openai_settings.model_copy(update={"finetune_deadline_seconds": 0.05})
    materialize(impatient, selection=["tuning_dataset", "fine_tuned_model"], raise_on_error=False)
    with connect(openai_settings.database) as conn:
        # As if the process died between creating the job and saving its id.
        conn.execute("UPDATE fine_tune_runs SET job_id = NULL")
    result = materialize(openai_settings, selection=["fine_tuned_model"])
    assert metadata(result, "fine_tuned_model")["status"] == "succeeded"
    assert len(jobs(openai_server)) == 1


def cancel_and_materialize(
    settings: Settings, server: OpenAIServer
) -> tuple[dg.ExecuteInProcessResult, dict]:
    """A version whose job the provider cancels (e.g. someone cancelled it in their console)."""
    server.job_script = ["validating_files", "running", "cancelled"]
    processed(settings, 15)
    result = materialize(
        settings, selection=["tuning_dataset", "fine_tuned_model"], raise_on_error=False
    )
    return result, run_row(settings)


def test_cancelled_job_fails_the_asset_with_the_providers_status_and_a_retry_starts_anew(
    openai_settings: Settings, openai_server: OpenAIServer
) -> None:
    result, row = cancel_and_materialize(openai_settings, openai_server)
    assert not result.success
    # The version was cut; only the fine-tune step failed, and it produced no model.
    assert metadata(result, "tuning_dataset")["version"] == "v001"
    assert metadata(result, "fine_tuned_model") == {}
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert failure.step_key == "fine_tuned_model"
    # The provider's verdict (its status; a cancelled job carries no error message) is in the
    # failure a user reads in the UI, naming the job.
    job_id = row["job_id"]
    assert job_id and job_id.startswith("ftjob-")
    assert f"fine-tuning job {job_id} cancelled" in failure.step_failure_data.error.message
    # The registry row is terminal, not `running`: nothing will try to resume a cancelled job.
    assert row["run_id"] == "v001-openai-1" and row["model_id"] is None
    assert row["status"] != "running" and "cancelled" in row["message"]

    # Materializing again starts a new attempt with a new job instead of following the dead one.
    openai_server.job_script = ["validating_files", "running", "succeeded"]
    again = metadata(
        materialize(openai_settings, selection=["fine_tuned_model"]), "fine_tuned_model"
    )
    assert (again["run_id"], again["status"]) == ("v001-openai-2", "succeeded")
    assert again["job_id"] != job_id and len(jobs(openai_server)) == 2


def test_cancelled_job_is_recorded_as_cancelled(
    openai_settings: Settings, openai_server: OpenAIServer
) -> None:
    _, row = cancel_and_materialize(openai_settings, openai_server)
    assert row["status"] == "cancelled"
    # The provider's events are kept for the post-mortem, as for a successful job.
    assert json.loads(row["metrics"])["events"]


def approve_every_rewrite(request: ChatRequest) -> Reply | None:
    if JUDGE_MARKER in request.prompt:
        return Reply.ok('{"score_a": 2, "score_b": 9, "reason": "grounded"}')
    return None  # the server's default rewrite


def test_dpo_uploads_the_preference_splits_and_names_the_method(
    openai_settings: Settings, openai_server: OpenAIServer
) -> None:
    settings = llm(openai_settings, openai_server, llm_judge=True)
    settings = settings.model_copy(update={"finetune_method": "dpo"})
    openai_server.responder = approve_every_rewrite
    processed(settings, 40)
    result = materialize(settings, selection=["tuning_dataset", "fine_tuned_model"])
    assert metadata(result, "fine_tuned_model")["status"] == "succeeded"
    row = run_row(settings)
    (create,) = jobs(openai_server)
    body = create.json()
    # The server refuses a DPO job whose files are not preference examples (OpenAI's format).
    assert body["method"] == {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 2}}}
    recipe = json.loads(row["recipe"])
    assert recipe["method"] == "dpo" and recipe["preference_pairs"] == 40
    files = VersionFiles.at(Path(recipe["jsonl_path"]).parent, "v001")
    manifest = json.loads(files.manifest.read_text("utf-8"))
    for key, split in (("training_file_id", "train"), ("validation_file_id", "validation")):
        uploaded = openai_server.file_content(row[key])
        assert uploaded == files.split_file(split, "openai_preference", manifest).read_bytes()
        assert b'"non_preferred_output"' in uploaded


def test_dpo_without_preference_pairs_fails_with_the_reason(
    openai_settings: Settings, openai_server: OpenAIServer
) -> None:
    settings = openai_settings.model_copy(
        update={"finetune_method": "dpo", "finetune_allow_naive": True}
    )
    processed(settings, 15)  # naive completions: never a pair
    result = materialize(
        settings, selection=["tuning_dataset", "fine_tuned_model"], raise_on_error=False
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "QE_FINETUNE_METHOD=dpo but the version has no preference pair" in str(
        failure.event_specific_data
    )
    assert jobs(openai_server) == []


def test_an_unknown_finetune_method_fails_at_load() -> None:
    with pytest.raises(SettingsError, match="QE_FINETUNE_METHOD must be one of sft, dpo"):
        Settings.from_env({"QE_FINETUNE_METHOD": "ppo"})
