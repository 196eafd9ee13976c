"""Serving locally trained adapters: served folders (links, no copies) and `transformers serve`
answering under the stable names with exactly what the adapter generates in process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qe_assets.finetune.serving.folders import (
    BASE_NAME,
    ServingError,
    serve_adapter,
    serve_base,
    served_name,
)
from qe_assets.finetune.serving.transformers_engine import TransformersServer
from qe_assets.ingest.queues import FileInbox
from qe_assets.settings import Settings
from qe_assets_tests.openai_server import OpenAIServer
from qe_assets_tests.runs import materialize, metadata
from qe_assets_tests.test_evaluation import RELEASE
from qe_assets_tests.test_finetune import SCRIPTS

QUESTION = [{"role": "user", "content": "What about refund, case 3?"}]


def fake_model(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text, "utf-8")
    return folder


def test_served_names_follow_the_seed() -> None:
    assert served_name("v001") == "model_rag_qa_v001" and served_name("v1234").endswith("v1234")
    with pytest.raises(ServingError, match="not vNNN"):
        served_name("data/models/v001-command-1")


def test_a_served_folder_links_base_and_adapter_the_adapter_s_files_first(tmp_path: Path) -> None:
    base = fake_model(
        tmp_path / "base",
        {"config.json": "{}", "model.safetensors": "w", "tokenizer.json": "base tok"},
    )
    adapter = fake_model(
        tmp_path / "run" / "v001-command-1",
        {"adapter_config.json": "{}", "adapter_model.safetensors": "a", "tokenizer.json": "tok"},
    )
    served = tmp_path / "served"
    folder = serve_adapter(served, served_name("v001"), adapter, base)
    assert folder == served / "model_rag_qa_v001"
    links = {p.name: p.resolve() for p in folder.iterdir()}
    assert all(p.is_symlink() for p in folder.iterdir())
    assert links["tokenizer.json"] == (adapter / "tokenizer.json").resolve()
    assert links["model.safetensors"] == (base / "model.safetensors").resolve()
    assert set(links) == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    # Served again: the same folder, nothing left behind.
    assert serve_adapter(served, served_name("v001"), adapter, base) == folder
    assert sorted(p.name for p in served.iterdir()) == ["model_rag_qa_v001"]
    assert serve_base(served, base).name == BASE_NAME
    with pytest.raises(ServingError, match="not a PEFT adapter"):
        serve_adapter(served, served_name("v002"), base, base)


@pytest.mark.train
def test_transformers_serve_answers_as_the_adapter_does_in_process(tmp_path: Path) -> None:
    pytest.importorskip("peft", reason="the train extra")
    pytest.importorskip("fastapi", reason="the train extra (transformers serve)")
    import openai
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qe_assets_tests.tiny_model import build_tiny_model

    base = build_tiny_model(tmp_path / "base", [json.dumps(QUESTION)] * 20, vocab_size=400)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    with torch.no_grad():  # a LoRA that changes the answers (B starts at zero)
        torch.manual_seed(1)
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.5)
    adapter = tmp_path / "models" / "v001-command-1"
    model.save_pretrained(adapter)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.save_pretrained(adapter)

    def in_process(peft: bool) -> str:
        loaded = AutoModelForCausalLM.from_pretrained(base)
        if peft:
            loaded = PeftModel.from_pretrained(loaded, adapter)
        inputs = tokenizer.apply_chat_template(
            QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = loaded.generate(**inputs, max_new_tokens=12, do_sample=False)
        return tokenizer.decode(out[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    served = tmp_path / "served"
    serve_adapter(served, "model_rag_qa_v001", adapter, base)
    serve_base(served, base)
    with TransformersServer(served) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="local", timeout=120)

        def ask(name: str) -> str:
            reply = client.chat.completions.create(
                model=name, messages=QUESTION, max_tokens=12, temperature=0
            )
            return reply.choices[0].message.content or ""

        tuned, untuned = ask("model_rag_qa_v001"), ask(BASE_NAME)
    assert tuned == in_process(peft=True) and untuned == in_process(peft=False)
    assert tuned != untuned  # the adapter was applied, not the base served twice
    assert server.process is None


@pytest.mark.train
def test_the_gate_probes_the_served_adapter_against_the_served_base_on_a_server_it_starts(
    settings: Settings,
    openai_server: OpenAIServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """command backend (a real, untrained adapter) → registered as model_rag_qa_v001 →
    model_evaluation starts `transformers serve` and probes the adapter and the base it was
    trained on by their served names. The adapter is applied (its answers differ from the
    base's), but a random model never emits its end-of-turn token: the parity probe fails the
    evaluation with that one line, before anything is judged, and the server is stopped."""
    pytest.importorskip("peft", reason="the train extra")
    pytest.importorskip("fastapi", reason="the train extra (transformers serve)")
    from qe_assets_tests.test_evaluation_judges import grounded_events, grounded_models
    from qe_assets_tests.tiny_model import build_tiny_model

    base = build_tiny_model(tmp_path / "base", grounded_events(40), vocab_size=512)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-serving")
    monkeypatch.setenv("QE_TRL_MODEL", str(base))
    monkeypatch.setenv("QE_TRL_OUTPUT_DIR", str(tmp_path / "models"))
    openai_server.responder = grounded_models
    configured = settings.model_copy(
        update={
            "finetune_backend": "command",
            "finetune_command": f"python {SCRIPTS / 'pipes_lora.py'}",
            "model_server": "transformers",
            "openai_base_url": openai_server.base_url,
            "llm_model": "test-model",
            "llm_judge": True,
            "eval_judge": "reference",
            "eval_share": 0.5,
            "eval_min_items": 5,
            "llm_concurrency": 4,
        }
    )
    FileInbox(configured.inbox_dir).put(grounded_events(40))
    assert materialize(configured, selection=["raw_events", "annotated_samples", "completions"])
    result = materialize(configured, selection=RELEASE, raise_on_error=False)
    model = metadata(result, "fine_tuned_model")
    assert model["base_model"] == str(base)
    assert not result.success
    (failure,) = result.get_step_failure_events()
    message = failure.step_failure_data.error.message  # type: ignore[union-attr]
    assert "parity: the served candidate did not end its turn on" in message
    assert "of 4 train prompts" in message
    asked = {r.json()["model"] for r in openai_server.chat_requests()}
    assert not any(name.startswith("model_rag_qa_") for name in asked)
    log = (Path(configured.data_dir) / "served" / "server.log").read_text("utf-8")
    assert "model_rag_qa_v001" in log and "model_rag_qa_base" in log
