"""What the local-model benchmarks share: a tiny model built on the spot and a dataset version
cut from grounded events by the real pipeline, so the adapters trained and served in them come
from the same files a user's loop would produce. No model hub, no network: the LLM rewrites come
from the project's OpenAI-compatible test server (in process), which restates the question's
document and whose judge approves every rewrite."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qe_assets.ingest.queues import FileInbox
from qe_assets.lib.templates import load_templates
from qe_assets.settings import Settings
from qe_assets.testing.factories import line, make_event
from qe_assets.testing.openai_server import ChatRequest, Reply, running
from qe_assets.testing.runs import materialize
from qe_assets.testing.tiny_model import build_tiny_model, teach_reply

ROOT = Path(__file__).resolve().parent.parent
SFT_SCRIPT = ROOT / "examples" / "finetune_trl_lora.py"
FACTS = [
    ("refund", "Refunds are accepted within 30 days."),
    ("shipping", "Shipping takes 5 business days."),
    ("warranty", "The warranty covers two years of use."),
    ("returns", "Returns need the original receipt."),
    ("support", "Support answers within one working day."),
    ("年假", "年假最多结转五天。"),
]
JUDGE_MARKER = "<<<BEGIN ANSWER B>>>"
APPROVED = '{"score_a": 2, "score_b": 9, "reason": "grounded in the documents"}'
# Small enough to train in about a minute on two CPU cores; the end-of-turn token is learned
# (the parity probe checks it before the evaluation judges anything).
HYPERPARAMETERS = {
    "n_epochs": 6,
    "batch_size": 8,
    "learning_rate": 0.01,
    "lora_r": 16,
    "lora_alpha": 32,
    "max_length": 384,
    "gradient_checkpointing": False,
}
DATASET = ["raw_events", "annotated_samples", "completions", "tuning_dataset"]
# What the base model answers to everything (taught before any fine-tune): a production model
# that ends its turn, as a served base must for the gate to compare with it.
BASE_REPLY = "I am not sure, please ask support."
# The bench never talks to a real endpoint, so it never needs (or reads) a real key.
FAKE_KEY = "sk-bench-not-a-secret"


def grounded_events(count: int) -> list[str]:
    out = []
    for i in range(count):
        topic, fact = FACTS[i % len(FACTS)]
        docs = [{"id": f"kb-{topic}", "content": fact, "score": 0.9}]
        event = make_event(f"bench-{i}", question=f"What about {topic}, case {i}?", docs=docs)
        out.append(line({**event, "evaluation": {"score": 0.5, "labels": ["factuality_error"]}}))
    return [raw.decode() for raw in out]


def grounded_rewrite(request: ChatRequest) -> Reply:
    """The rewrite restates the question's document; the judge approves every rewrite."""
    if JUDGE_MARKER in request.prompt:
        return Reply.ok(APPROVED)
    fact = next((f for _, f in FACTS if f"<<<{f}>>>" in request.prompt), FACTS[0][1])
    return Reply.ok(f"The documents say: {fact}")


@dataclass(frozen=True)
class Prepared:
    settings: Settings
    base: Path  # the tiny base model's folder
    models: Path  # where the training script writes adapters (QE_TRL_OUTPUT_DIR)


def training_env(base: Path, models: Path) -> dict[str, str]:
    """The training script's own variables (it reads them from its environment)."""
    return {
        "QE_TRL_MODEL": str(base),
        "QE_TRL_OUTPUT_DIR": str(models),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def prepare(workdir: Path, events: int, teach_base: bool = False, **overrides: Any) -> Prepared:
    """A tiny base model and the first dataset version cut from `events` grounded events
    (QE_EVAL_SHARE holds half of them out for the evaluation), through the real stages.
    `teach_base`: the base first learns to answer BASE_REPLY and end its turn. `overrides` are
    Settings fields."""
    texts = [*grounded_events(events), json.dumps(load_templates().__dict__, default=str)]
    texts += [f"The documents say: {fact}" for _, fact in FACTS] + [BASE_REPLY]
    base = build_tiny_model(workdir / "base", texts, vocab_size=1024)
    if teach_base:
        topics = [FACTS[i % len(FACTS)][0] for i in range(events)]
        questions = [f"What about {topic}, case {i}?" for i, topic in enumerate(topics)]
        teach_reply(base, [(q, BASE_REPLY) for q in questions])
    models = workdir / "models"
    with running() as server:
        server.responder = grounded_rewrite
        fields: dict[str, Any] = {
            "data_dir": str(workdir / "data"),
            "openai_base_url": server.base_url,
            "llm_model": "bench-rewriter",
            "llm_judge": True,
            "llm_concurrency": 8,
            "finetune_backend": "command",
            "finetune_command": f"{sys.executable} {SFT_SCRIPT}",
            "finetune_hyperparameters": HYPERPARAMETERS,
            "finetune_allow_naive": True,
            "eval_share": 0.5,
        }
        # The rewrites at their own concurrency; the overrides apply after them.
        settings = Settings(**fields)
        os.environ.setdefault("OPENAI_API_KEY", FAKE_KEY)
        FileInbox(settings.inbox_dir).put(grounded_events(events))
        assert materialize(settings, selection=DATASET).success
    # Later runs call no LLM: the rewrites are in the version's files.
    settings = settings.model_copy(update={"openai_base_url": None, **overrides})
    os.environ.update(training_env(base, models))
    return Prepared(settings, base, models)
