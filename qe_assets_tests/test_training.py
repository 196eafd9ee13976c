"""Real training on this machine's CPU, no dry run: the TRL examples adapt a tiny model built on
the spot (tiny_model.py) through the `command` backend and Dagster Pipes, on a few hundred
samples whose completions come from the local OpenAI-compatible server, approved by its judge.

Needs the `train` extra (torch, transformers, trl, peft); skipped without it, run by `make test`.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from qe_assets.ingest.queues import FileInbox
from qe_assets.lib.templates import load_templates
from qe_assets.release.export import VersionFiles
from qe_assets.settings import Settings
from qe_assets.store import connect
from qe_assets_tests.factories import line, make_event
from qe_assets_tests.openai_server import ChatRequest, OpenAIServer, Reply
from qe_assets_tests.runs import materialize, metadata
from qe_assets_tests.test_pipeline import LABELS
from qe_assets_tests.test_single_writer import child_env
from qe_assets_tests.tiny_model import build_tiny_model

pytest.importorskip("trl", reason="the train extra: pip install -e '.[train]'")
pytestmark = pytest.mark.train

ROOT = Path(__file__).parent.parent
SFT = ROOT / "examples" / "finetune_trl_lora.py"
DPO = ROOT / "examples" / "finetune_trl_dpo.py"
EVENTS = 300
# Up to the fine-tune (with the dataset checks); the evaluation gate after it is not ours here.
TRAINING = ["raw_events", "annotated_samples", "completions", "tuning_dataset", "fine_tuned_model"]
HYPERPARAMETERS = {
    "n_epochs": 2,
    "batch_size": 8,
    "learning_rate": 0.005,
    "lora_r": 8,
    "lora_alpha": 16,
    "max_length": 384,
    "gradient_checkpointing": False,
}
JUDGE_MARKER = "<<<BEGIN ANSWER B>>>"
# Room for the system message, the prompt with its first document and the completion, not for
# the whole handbook document (test_long_samples_give_up_context_documents_…).
LONG_SAMPLE_BUDGET = 200
APPROVED = '{"score_a": 2, "score_b": 9, "reason": "grounded in the documents"}'
FACTS = [
    ("refund", "Refunds are accepted within 30 days.", "You have 14 days."),
    ("shipping", "Shipping takes 5 business days.", "Shipping is instant."),
    ("warranty", "The warranty covers two years of use.", "There is no warranty."),
    ("returns", "Returns need the original receipt.", "No receipt is needed."),
    ("support", "Support answers within one working day.", "Support never answers."),
    ("年假", "年假最多结转五天。", "不可以。"),
]


# A long, barely relevant document: retrieved last, the first context to give way to max_length.
FILLER = " ".join(f"Paragraph {n} of the staff handbook repeats general policy." for n in range(12))


def events(n: int, filler: bool = False) -> list[str]:
    out = []
    for i in range(n):
        topic, fact, wrong = FACTS[i % len(FACTS)]
        docs = [{"id": f"kb-{topic}", "content": fact, "score": 0.9}]
        if filler:
            docs.append({"id": "kb-handbook", "content": FILLER, "score": 0.1})
        question = f"What about {topic}, case {i}?"
        # Confidence 0.675 … 0.975: every sample trains, each with its own loss weight.
        evaluation = {"score": 0.45 + (i % 5) * 0.05, "labels": [LABELS[i % len(LABELS)]]}
        event = make_event(f"t-{i}", question=question, docs=docs, answer=wrong)
        out.append(line({**event, "evaluation": evaluation}).decode())
    return out


def corrected(request: ChatRequest) -> Reply:
    """The regenerated answer restates the document; the judge approves every rewrite."""
    if JUDGE_MARKER in request.prompt:
        return Reply.ok(APPROVED)
    fact = next(f for topic, f, _ in FACTS if f"<<<{f}>>>" in request.prompt)
    return Reply.ok(f"The documents say: {fact}")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trained on the dataset's own text: the events and every template of the prompts."""
    templates = json.dumps(load_templates().__dict__, ensure_ascii=False, default=str)
    texts = [*events(EVENTS), templates, *(f"The documents say: {f}" for _, f, _ in FACTS)]
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), texts)


@pytest.fixture
def server(openai_server: OpenAIServer) -> OpenAIServer:
    openai_server.responder = corrected
    return openai_server


def llm_env(server: OpenAIServer) -> dict[str, str]:
    return {
        "OPENAI_API_KEY": "sk-test-training",
        "OPENAI_BASE_URL": server.base_url,
        "QE_LLM_MODEL": "test-model",
        "QE_LLM_JUDGE": "true",
        "QE_LLM_CONCURRENCY": "8",
    }


def train_env(tiny_model: Path, models: Path, script: Path) -> dict[str, str]:
    return {
        "QE_FINETUNE_BACKEND": "command",
        "QE_FINETUNE_COMMAND": f"{sys.executable} {script}",
        "QE_FINETUNE_HYPERPARAMETERS": json.dumps(HYPERPARAMETERS),
        # The completions are LLM rewrites; set for branches that refuse naive-only versions.
        "QE_FINETUNE_ALLOW_NAIVE": "true",
        "QE_TRL_MODEL": str(tiny_model),
        "QE_TRL_OUTPUT_DIR": str(models),
    }


def the_run(database: Path) -> dict[str, Any]:
    with connect(database, read_only=True) as conn:
        ((status, model_id, metrics, recipe),) = conn.execute(
            "SELECT status, model_id, metrics, recipe FROM fine_tune_runs"
        ).fetchall()
    return {
        "status": status,
        "model_id": model_id,
        "metrics": json.loads(metrics),
        "recipe": json.loads(recipe),
    }


def assert_adapter(path: str) -> None:
    folder = Path(path)
    assert (folder / "adapter_config.json").exists(), sorted(p.name for p in folder.iterdir())
    assert (folder / "adapter_model.safetensors").stat().st_size > 0


def validation_losses(model_dir: Path, adapter: Path, records: Path) -> tuple[float, float]:
    """(base, adapted) mean completion loss over the version's own validation records, computed
    here, independently of the training script."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    model.eval()
    samples = []
    for raw in records.read_text("utf-8").splitlines():
        record = json.loads(raw)
        prompt = [{"role": "user", "content": record["prompt"]}]
        full = [*prompt, {"role": "assistant", "content": record["completion"]}]
        head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        ids = tokenizer.apply_chat_template(full, tokenize=True)
        head, ids = (list(x["input_ids"]) if hasattr(x, "keys") else list(x) for x in (head, ids))
        labels = [-100] * len(head) + ids[len(head) :]
        samples.append((torch.tensor([ids]), torch.tensor([labels])))

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(float(model(input_ids=i, labels=lab).loss) for i, lab in samples) / len(
                samples
            )

    adapted = mean_loss()
    with model.disable_adapter():
        base = mean_loss()
    return base, adapted


def test_qe_run_trains_a_lora_adapter_that_lowers_the_validation_loss(
    tmp_path: Path, server: OpenAIServer, tiny_model: Path
) -> None:
    data = tmp_path / "data"
    FileInbox(data / "inbox").put(events(EVENTS))
    env = {
        **child_env(data, tmp_path / "home"),
        **llm_env(server),
        **train_env(tiny_model, tmp_path / "models", SFT),
        "QE_SPOT_CHECK_SHARE": "0",
    }
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "qe_assets.cli", "run", "--cut-version"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    elapsed = time.monotonic() - started
    # No judge and no held-out set: the evaluation gate has nothing to decide (a warning at
    # most), so the run succeeds with the adapter trained and nothing promoted.
    assert run.returncode == 0, run.stderr[-4000:]
    result = the_run(data / "qe.duckdb")
    assert result["status"] == "succeeded", result
    assert_adapter(result["model_id"])
    metrics = result["metrics"]
    assert metrics["model_path"] == result["model_id"] and metrics["data"] == "records"
    assert metrics["train_loss"] > 0 and metrics["eval_loss"] < metrics["base_eval_loss"]
    # The version's own validation split, read from its folder: no database needed.
    files = VersionFiles.at(data / "datasets", "v001")
    manifest = json.loads(files.manifest.read_text("utf-8"))
    base, adapted = validation_losses(
        tiny_model, Path(result["model_id"]), files.split_file("validation", "records", manifest)
    )
    assert adapted < base
    print(
        f"\nrecords/SFT: qe run {elapsed:.1f}s; eval loss {metrics['base_eval_loss']:.3f} -> "
        f"{metrics['eval_loss']:.3f} (weighted, script); {base:.3f} -> {adapted:.3f} (test)"
    )


def trained_in_process(
    settings: Settings,
    server: OpenAIServer,
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    count: int = EVENTS,
    filler: bool = False,
) -> tuple[dict[str, Any], float]:
    """The whole graph in process (the same definitions `qe run` uses), the training command
    run through Pipes as a subprocess that reads its own variables."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-training")
    FileInbox(settings.inbox_dir).put(events(count, filler))
    started = time.monotonic()
    result = materialize(settings, selection=TRAINING)
    elapsed = time.monotonic() - started
    assert metadata(result, "fine_tuned_model")["status"] == "succeeded"
    return the_run(settings.database), elapsed


def in_process_settings(settings: Settings, server: OpenAIServer, script: Path) -> Settings:
    return settings.model_copy(
        update={
            "llm_model": "test-model",
            "openai_base_url": server.base_url,
            "llm_judge": True,
            "llm_concurrency": 8,
            "finetune_backend": "command",
            "finetune_command": f"{sys.executable} {script}",
            "finetune_hyperparameters": HYPERPARAMETERS,
        }
    )


def test_the_chat_file_trains_with_assistant_only_loss(
    settings: Settings,
    server: OpenAIServer,
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {"QE_TRL_DATA": "chat", "QE_TRL_MODEL": str(tiny_model)}
    env["QE_TRL_OUTPUT_DIR"] = str(tmp_path / "models")
    result, elapsed = trained_in_process(
        in_process_settings(settings, server, SFT), server, env, monkeypatch
    )
    assert_adapter(result["model_id"])
    metrics = result["metrics"]
    assert metrics["data"] == "chat"
    assert metrics["eval_loss"] < metrics["base_eval_loss"]
    print(
        f"\nchat/SFT: {elapsed:.1f}s; eval loss {metrics['base_eval_loss']:.3f} -> "
        f"{metrics['eval_loss']:.3f}"
    )
    # The next round trains the v001 adapter further on v002.
    later = [x.replace('"t-', '"u-').replace("case ", "later case ") for x in events(60)]
    FileInbox(settings.inbox_dir).put(later)
    assert materialize(in_process_settings(settings, server, SFT), selection=TRAINING).success
    with connect(settings.database, read_only=True) as conn:
        ((recipe, model_id, status),) = conn.execute(
            "SELECT recipe, model_id, status FROM fine_tune_runs WHERE dataset_version = 'v002'"
        ).fetchall()
    assert status == "succeeded" and json.loads(recipe)["previous_model"] == result["model_id"]
    assert_adapter(model_id)


def test_dpo_on_the_preference_pairs(
    settings: Settings,
    server: OpenAIServer,
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {"QE_TRL_MODEL": str(tiny_model), "QE_TRL_OUTPUT_DIR": str(tmp_path / "models")}
    dpo = in_process_settings(settings, server, DPO).model_copy(
        # One epoch is plenty for DPO, whose steps cost four forward passes.
        update={
            "finetune_method": "dpo",
            "finetune_hyperparameters": {**HYPERPARAMETERS, "n_epochs": 1},
        }
    )
    result, elapsed = trained_in_process(dpo, server, env, monkeypatch)
    assert_adapter(result["model_id"])
    recipe, metrics = result["recipe"], result["metrics"]
    assert recipe["method"] == "dpo" and recipe["preference_pairs"] == metrics["pairs"] > 200
    # log 2 before training (the adapter starts at zero: policy = reference), lower after.
    assert metrics["base_eval_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert metrics["eval_loss"] < metrics["base_eval_loss"]
    print(
        f"\nDPO: {elapsed:.1f}s; eval loss {metrics['base_eval_loss']:.3f} -> "
        f"{metrics['eval_loss']:.3f}, reward accuracy {metrics['eval_reward_accuracy']:.2f}"
    )


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("finetune_trl_lora", SFT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_weighted_loss_is_the_weighted_mean_of_the_per_sample_losses(
    tiny_model: Path,
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    example = load_example()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    texts = ["Refunds are accepted within 30 days.", "年假最多结转五天。", "Shipping takes 5 days"]
    weights = torch.tensor([0.9, 0.3, 0.6])
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[0, :2] = -100  # a prompt part, as completion-only loss masks it
    with torch.no_grad():
        logits = model(**batch).logits
        weighted = example.weighted_loss(logits, labels, weights)
        # Each sample alone, by the model's own loss: the mean over its labelled tokens.
        alone = torch.stack(
            [
                model(
                    input_ids=batch["input_ids"][
                        i : i + 1, : int(batch["attention_mask"][i].sum())
                    ],
                    labels=labels[i : i + 1, : int(batch["attention_mask"][i].sum())],
                ).loss
                for i in range(len(texts))
            ]
        )
    expected = (alone * weights).sum() / weights.sum()
    assert float(weighted) == pytest.approx(float(expected), rel=1e-5)
    assert float(weighted) != pytest.approx(float(alone.mean()), rel=1e-3)  # weights matter


def test_without_qe_trl_model_the_run_fails_saying_so(
    settings: Settings, server: OpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("QE_TRL_MODEL", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-training")
    FileInbox(settings.inbox_dir).put(events(20))
    result = materialize(
        in_process_settings(settings, server, SFT), selection=TRAINING, raise_on_error=False
    )
    assert not result.success
    with connect(settings.database, read_only=True) as conn:
        ((status, message),) = conn.execute("SELECT status, message FROM fine_tune_runs").fetchall()
    assert status == "failed" and "QE_TRL_MODEL must name the model to adapt" in message


def test_gradient_accumulation_does_not_scale_the_reported_loss(
    settings: Settings,
    server: OpenAIServer,
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With learning rate 0 the model stays the untrained one, so the training loss must equal
    its loss on held-out data (both ~ln(vocabulary)); a trainer that took the example's batch
    mean for an already accumulated loss would report it twice as large."""
    frozen = {**HYPERPARAMETERS, "n_epochs": 1, "learning_rate": 0.0}
    frozen["gradient_accumulation_steps"] = 2
    env = {"QE_TRL_MODEL": str(tiny_model), "QE_TRL_OUTPUT_DIR": str(tmp_path / "models")}
    configured = in_process_settings(settings, server, SFT).model_copy(
        update={"finetune_hyperparameters": frozen}
    )
    result, _ = trained_in_process(configured, server, env, monkeypatch, count=80)
    metrics = result["metrics"]
    assert metrics["train_loss"] == pytest.approx(metrics["base_eval_loss"], rel=0.02)
    assert metrics["eval_loss"] == pytest.approx(metrics["base_eval_loss"], rel=1e-4)


def test_long_samples_give_up_context_documents_never_their_completion(
    settings: Settings,
    server: OpenAIServer,
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TRL cuts every sequence at max_length (the completion's end first) and drops a sample whose
    prompt alone fills it. The example fits each one beforehand: the handbook document (lowest
    score) is shortened or removed, and every sample trains whole."""
    short = {**HYPERPARAMETERS, "max_length": LONG_SAMPLE_BUDGET, "max_steps": 1}
    env = {"QE_TRL_MODEL": str(tiny_model), "QE_TRL_OUTPUT_DIR": str(tmp_path / "models")}
    configured = in_process_settings(settings, server, SFT).model_copy(
        update={"finetune_hyperparameters": short}
    )
    result, _ = trained_in_process(configured, server, env, monkeypatch, count=60, filler=True)
    metrics, recipe = result["metrics"], result["recipe"]
    print(f"\nfitted: {metrics}")
    assert metrics["train_samples"] == recipe["train"] and metrics["train_dropped_samples"] == 0
    assert metrics["validation_samples"] == recipe["validation"]
    assert metrics["train_trimmed_samples"] == recipe["train"]  # every one had the handbook
    assert metrics["train_dropped_sample_ids"] == []


def refused_for_length(
    configured: Settings, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    """Twenty events trained at max_length 24, where nothing fits: the run must fail, recorded
    as such with the reason; returns fine_tune_runs.message for the caller's own checks."""
    monkeypatch.setenv("QE_TRL_MODEL", str(tiny_model))
    monkeypatch.setenv("QE_TRL_OUTPUT_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-training")
    FileInbox(configured.inbox_dir).put(events(20))
    tiny = configured.model_copy(
        update={"finetune_hyperparameters": {**HYPERPARAMETERS, "max_length": 24}}
    )
    result = materialize(tiny, selection=TRAINING, raise_on_error=False)
    assert not result.success
    with connect(configured.database, read_only=True) as conn:
        ((status, message),) = conn.execute("SELECT status, message FROM fine_tune_runs").fetchall()
    assert status == "failed" and "train samples do not fit max_length" in message, message
    return str(message)


def test_a_run_that_would_lose_samples_is_refused_naming_them(
    settings: Settings,
    server: OpenAIServer,
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refused = in_process_settings(settings, server, SFT)
    message = refused_for_length(refused, tiny_model, tmp_path, monkeypatch)
    assert "QE_TRAIN_MAX_DROPPED_SHARE=0.01" in message and "t-" in message


def test_records_train_with_the_system_message_the_gate_sends(tmp_path: Path) -> None:
    """The evaluation asks with the training files' system message (evaluate.py): records-mode
    training must see it too, not the bare user prompt."""
    system = load_templates().system["en"]
    record = {"sample_id": "s-1", "prompt": "Q?", "completion": "A.", "weight": 0.8}
    chat = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "Q?"}]}
    chat["messages"].append({"role": "assistant", "content": "A."})
    (tmp_path / "r.jsonl").write_text(json.dumps(record) + "\n", "utf-8")
    (tmp_path / "c.jsonl").write_text(json.dumps(chat) + "\n", "utf-8")
    recipe = {
        "train_records_path": str(tmp_path / "r.jsonl"),
        "train_chat_path": str(tmp_path / "c.jsonl"),
    }
    ((row, sample_id),) = load_example().rows(recipe, "train", "records")
    assert sample_id == "s-1" and row["weight"] == 0.8
    assert row["prompt"] == chat["messages"][:2]
    assert row["completion"] == [{"role": "assistant", "content": "A."}]


def test_dpo_pairs_give_up_context_documents_never_their_answers(
    settings: Settings,
    server: OpenAIServer,
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TRL's DPO cuts a pair at max_length from the end (the chosen and rejected answers it
    compares) and drops one whose prompt fills it. The example fits each pair as the SFT one
    fits a sample: the handbook document gives way, every pair trains whole, with the system
    message the evaluation sends."""
    short = {**HYPERPARAMETERS, "max_length": LONG_SAMPLE_BUDGET, "max_steps": 1}
    env = {"QE_TRL_MODEL": str(tiny_model), "QE_TRL_OUTPUT_DIR": str(tmp_path / "models")}
    dpo = in_process_settings(settings, server, DPO).model_copy(
        update={"finetune_method": "dpo", "finetune_hyperparameters": short}
    )
    result, _ = trained_in_process(dpo, server, env, monkeypatch, count=60, filler=True)
    metrics, recipe = result["metrics"], result["recipe"]
    train_pairs = Path(recipe["train_preference_path"]).read_text("utf-8").splitlines()
    assert metrics["train_samples"] == len(train_pairs) > 20
    assert metrics["train_trimmed_samples"] == len(train_pairs)  # every one had the handbook
    assert metrics["train_dropped_samples"] == 0 and metrics["train_dropped_sample_ids"] == []
    assert metrics["validation_dropped_samples"] == 0
    assert metrics["pairs"] == recipe["preference_pairs"]
    # Each pair with its own language's system message (one topic in six is Chinese).
    system = load_templates().system
    for pair in train_pairs:
        prompt = json.loads(pair)["prompt"]
        language = "zh" if "年假" in prompt[1]["content"] else "en"
        assert prompt[0] == {"role": "system", "content": system[language]}


def test_a_dpo_run_that_would_lose_pairs_is_refused_naming_them(
    settings: Settings,
    server: OpenAIServer,
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refused = in_process_settings(settings, server, DPO).model_copy(
        update={"finetune_method": "dpo"}
    )
    message = refused_for_length(refused, tiny_model, tmp_path, monkeypatch)
    assert "QE_TRAIN_MAX_DROPPED_SHARE=0.01" in message and "train pair 1" in message
