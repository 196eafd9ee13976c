"""The model server resource (QE_MODEL_SERVER): a locally trained adapter is registered under
`model_rag_qa_vNNN`, and the gate asks for it by that name, against the base model the training
command reported. Real materializations; the local OpenAI-compatible test server stands for an
external vLLM (its runtime LoRA loading route included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qe_assets.finetune.serving.resource import ModelServerResource, served_names
from qe_assets.settings import Settings, SettingsError
from qe_assets.store import connect
from qe_assets_tests.openai_server import EvalModels, OpenAIServer
from qe_assets_tests.runs import materialize, metadata
from qe_assets_tests.test_cli import qe
from qe_assets_tests.test_finetune import SCRIPTS, command_settings, processed

BASE = "/models/tiny-base"  # what the stand-in training command reports it adapted


@pytest.fixture
def served_settings(
    settings: Settings, openai_server: OpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The command backend (stand-in script) with an external model server and the gate on."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-serving")
    monkeypatch.setenv("FAKE_BASE_MODEL", BASE)
    return command_settings(settings, SCRIPTS / "pipes_train.py").model_copy(
        update={
            "model_server": "external",
            "model_server_url": openai_server.base_url,
            "openai_base_url": openai_server.base_url,
            "eval_share": 0.5,
            "eval_min_items": 20,
            "eval_judge_model": "judge",
            "llm_max_retries": 1,
            "llm_concurrency": 8,
        }
    )


def test_an_external_server_loads_the_adapter_by_name_and_the_gate_asks_for_it(
    served_settings: Settings, openai_server: OpenAIServer
) -> None:
    processed(served_settings, 120)
    openai_server.responder = EvalModels({"model_rag_qa_": 3, BASE: 1})
    result = materialize(
        served_settings,
        selection=["tuning_dataset", "fine_tuned_model", "model_evaluation"],
        raise_on_error=False,
    )
    model = metadata(result, "fine_tuned_model")
    assert openai_server.lora_adapters == {"model_rag_qa_v001": "/models/v001-command-1"}
    assert model["base_model"] == BASE
    meta = metadata(result, "model_evaluation")
    assert meta["candidate"] == "/models/v001-command-1" and meta["baseline"] == BASE
    assert meta["decision"] == "passed" and meta["failed"] == 0
    asked = {r.json()["model"] for r in openai_server.chat_requests()}
    assert {"model_rag_qa_v001", BASE, "judge"} <= asked
    assert "/models/v001-command-1" not in asked
    with connect(served_settings.database, read_only=True) as conn:
        ((metrics,),) = conn.execute("SELECT metrics FROM fine_tune_runs").fetchall()
    assert json.loads(metrics)["served_as"] == "model_rag_qa_v001"
    # Promoted: the RAG service is routed to the served name at the server that serves it.
    state = json.loads((Path(served_settings.data_dir) / "rollout.json").read_text("utf-8"))
    assert state["production"] == "model_rag_qa_v001"
    assert state["base_urls"] == {"model_rag_qa_v001": openai_server.base_url}
    # `qe models list` shows the served name beside the model id.
    listed = qe("models", "list", env={"QE_DATA_DIR": served_settings.data_dir}).stdout
    assert "model_rag_qa_v001" in listed and "served_as" in listed


def test_a_server_without_runtime_loading_says_what_to_run_and_keeps_the_model(
    served_settings: Settings, openai_server: OpenAIServer
) -> None:
    openai_server.lora_loading = False
    processed(served_settings, 20)
    result = materialize(served_settings, selection=["tuning_dataset", "fine_tuned_model"])
    with connect(served_settings.database, read_only=True) as conn:
        ((status, metrics),) = conn.execute("SELECT status, metrics FROM fine_tune_runs").fetchall()
    note = json.loads(metrics)["serving_note"]
    assert status == "succeeded" and metadata(result, "fine_tuned_model")["status"] == "succeeded"
    assert "cannot load adapters at run time" in note
    assert "--lora-modules model_rag_qa_v001=/models/v001-command-1" in note


def test_the_transformers_server_gets_served_folders_and_a_names_file(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}", "utf-8")
    adapter = tmp_path / "models" / "v003-command-1"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}", "utf-8")
    server = ModelServerResource(kind="transformers", data_dir=str(tmp_path / "data"))
    registration = server.register(str(adapter), "v003", str(base))
    assert registration is not None and registration.loaded
    assert (registration.name, registration.base_name) == ("model_rag_qa_v003", "model_rag_qa_base")
    served = tmp_path / "data" / "served"
    assert (served / "model_rag_qa_v003" / "adapter_config.json").is_symlink()
    assert (served / "model_rag_qa_base" / "config.json").is_symlink()
    assert served_names(tmp_path / "data") == {
        str(adapter): "model_rag_qa_v003",
        str(base): "model_rag_qa_base",
    }
    assert ModelServerResource(kind="none").register(str(adapter), "v003", str(base)) is None


def test_an_external_server_without_its_url_fails_at_load_time() -> None:
    with pytest.raises(SettingsError, match="QE_MODEL_SERVER=external needs QE_MODEL_SERVER_URL"):
        Settings.from_env({"QE_MODEL_SERVER": "external"})
    with pytest.raises(SettingsError, match="QE_MODEL_SERVER"):
        Settings.from_env({"QE_MODEL_SERVER": "tgi"})


def test_a_served_candidate_that_answers_as_its_base_fails_the_parity_probe(
    served_settings: Settings, openai_server: OpenAIServer
) -> None:
    """The server took the adapter's name but answers with the base: nothing is judged, the
    evaluation fails with the probe's one line."""
    processed(served_settings, 120)
    openai_server.responder = EvalModels({"model_rag_qa_": 1, BASE: 1})
    result = materialize(
        served_settings,
        selection=["tuning_dataset", "fine_tuned_model", "model_evaluation"],
        raise_on_error=False,
    )
    assert not result.success
    (failure,) = result.get_step_failure_events()
    message = failure.step_failure_data.error.message  # type: ignore[union-attr]
    assert "parity: the served candidate answers exactly as its base on all 4" in message
    with connect(served_settings.database, read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM model_evaluations").fetchone() == (0,)
