"""`make demo-loop`: the whole loop, twice, offline on a CPU, with a tiny model built on the spot.

Each round: demo events (qe_assets.ops.demo) into the inbox → annotated → corrected answers from
the project's own OpenAI-compatible test server → a dataset version → a LoRA adapter trained by
the `command` backend (examples/finetune_trl_lora.py, real TRL) → served by `transformers serve`
(QE_MODEL_SERVER=transformers) as `model_rag_qa_vNNN` → the parity probe → judged against the
served production model by the reference judge (token-F1 against the corrected answer, no LLM)
→ promoted → rollout.json → `choose` → a real call through the openai client to the URL it gives
→ `capture(..., model=route.model)` → `ab_test`. Round 2 trains v002 on from the v001 adapter.

Where the corrected answers come from: offline there is no strong LLM, so the project's own test
server answers every regeneration request with a deterministic correction, a short reply in the
question's language saying the documents hold the answer (`corrected_answer`), and its judge
approves them; the base model (a random two-layer model taught one reply) says they do not.
What the win rate shows: that the loop's machinery learns (the loss falls, the adapter learns
the corrected reply and to end its turn) and measures (held-out win rate against the served
production model by token-F1 against the corrected answer, with its 95 % Wilson lower bound).
It does not show that a real model gets better: the model knows nothing, and the reply is a
fixed form.

    python -m qe_assets.testing.demo_loop [--events 200] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qe_assets.testing.openai_server import ChatRequest, OpenAIServer, Reply

ROOT = Path(__file__).resolve().parents[2]
SFT_SCRIPT = ROOT / "examples" / "finetune_trl_lora.py"
ROUND_SELECTION = [
    "raw_events",
    "annotated_samples",
    "completions",
    "tuning_dataset",
    "fine_tuned_model",
    "model_evaluation",
]
AB_SELECTION = ["raw_events", "annotated_samples", "ab_test"]
# Short documents so a sample fits a tiny model's context; the demo generator's own texts.
DOC_CHARS = (40, 100)
DOCS_PER_EVENT = (1, 1)
VOCABULARY = 4096  # tokens; a small one splits Chinese into many
# A few seconds of CPU per round: the tiny model learns the answer's form and its end of turn.
HYPERPARAMETERS = {
    "n_epochs": 3,
    "batch_size": 4,
    "learning_rate": 0.02,
    "lora_r": 16,
    "lora_alpha": 32,
    "max_length": 384,
    "gradient_checkpointing": False,
    "logging_steps": 1,
}
CONTINUED_HYPERPARAMETERS = {**HYPERPARAMETERS, "learning_rate": 0.002}
# What the test server answers to a regeneration request, per language of the question.
ANSWERS = {"en": "The answer is in the documents.", "zh": "资料中有答案。"}
# What the base model says to everything, per language (taught in BASE_STEPS full-parameter
# steps): it answers and ends its turn, as a served production model must for the gate to
# compare with it. It differs from the corrected reply by one word: the wrong refusal a
# production model gives, which a few LoRA steps learn to drop.
BASE_REPLIES = {"en": "The answer is not in the documents.", "zh": "资料中没有答案。"}
BASE_STEPS = 20
SCORING_MARKER = "<<<BEGIN ANSWER B>>>"
APPROVED = '{"score_a": 2, "score_b": 9, "reason": "grounded in the best document"}'
CJK = re.compile(r"[\u4e00-\u9fff]")


def corrected_answer(prompt: str) -> str:
    """The deterministic correction: a fixed short reply in the prompt's language."""
    return ANSWERS["zh"] if CJK.search(prompt) else ANSWERS["en"]


def corrections(request: ChatRequest) -> Reply:
    """The test server's behaviour for the demo: its scoring judge approves every rewrite, and a
    regeneration gets the corrected answer."""
    if SCORING_MARKER in request.prompt:
        return Reply.ok(APPROVED)
    return Reply.ok(corrected_answer(request.prompt))


@dataclass
class Round:
    """What one round measured (the table's row), and what the service saw."""

    version: str
    train_samples: int = 0
    loss_first: float | None = None
    loss_last: float | None = None
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    n: int = 0
    wins: int = 0
    ties: int = 0
    losses: int = 0
    win_rate: float | None = None
    ci_low: float | None = None
    decision: str | None = None
    reason: str | None = None
    parity: str | None = None
    production: str | None = None
    base_url: str | None = None
    previous_model: str | None = None
    served_answer: str | None = None
    server_url: str | None = None
    routed: dict[str, int] = field(default_factory=dict)
    ab_decision: str | None = None
    seconds: float = 0.0

    def table(self) -> str:
        def num(value: float | None, digits: int = 3) -> str:
            return "—" if value is None else f"{value:.{digits}f}"

        rows = [
            ("training samples", str(self.train_samples)),
            ("training loss first → last", f"{num(self.loss_first)} → {num(self.loss_last)}"),
            (
                "validation loss before → after",
                f"{num(self.eval_loss_before)} → {num(self.eval_loss_after)}",
            ),
            ("parity probe", self.parity or "—"),
            (
                "held-out win rate (95 % lower bound)",
                f"{num(self.win_rate)} ({num(self.ci_low)}) on {self.n}: "
                f"{self.wins} wins, {self.ties} ties, {self.losses} losses",
            ),
            ("decision", f"{self.decision} ({self.reason})"),
            ("production model (rollout.json)", f"{self.production} at {self.base_url}"),
            ("requests routed", ", ".join(f"{m}: {n}" for m, n in sorted(self.routed.items()))),
            ("ab_test", self.ab_decision or "—"),
            ("round wall time", f"{self.seconds:.0f} s"),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [
            f"round {self.version}" + (" (from the previous adapter)" * bool(self.previous_model))
        ]
        lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
        return "\n".join(lines)


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` for the block: the training command (a subprocess) and the
    service side read their variables from it."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def loop_environment(
    workdir: Path, server: OpenAIServer, base: Path, port: int, events: int
) -> dict[str, str]:
    held_out = max(12, events // 10)
    return {
        "QE_DATA_DIR": str(workdir / "data"),
        "OPENAI_API_KEY": "sk-local-demo",  # the local servers take any key
        "OPENAI_BASE_URL": server.base_url,
        "QE_LLM_MODEL": "test-model",
        "QE_LLM_JUDGE": "true",
        "QE_LLM_CONCURRENCY": "8",
        "QE_LLM_MAX_TOKENS": "48",
        "QE_SPOT_CHECK_SHARE": "0",
        "QE_FINETUNE_BACKEND": "command",
        "QE_FINETUNE_COMMAND": f"{sys.executable} {SFT_SCRIPT}",
        "QE_FINETUNE_HYPERPARAMETERS": json.dumps(HYPERPARAMETERS),
        "QE_FINETUNE_ALLOW_NAIVE": "true",
        "QE_TRL_MODEL": str(base),
        "QE_TRL_OUTPUT_DIR": str(workdir / "models"),
        "QE_MODEL_SERVER": "transformers",
        # Where the service reaches the served models (the server started after each round).
        "QE_MODEL_SERVER_URL": f"http://127.0.0.1:{port}/v1",
        "QE_EVAL_JUDGE": "reference",
        # About a third of the events score low enough to become samples.
        "QE_EVAL_SHARE": f"{min(0.5, 3 * held_out / events):.3f}",
        "QE_EVAL_MIN_ITEMS": "10",
        "QE_COUNT_FLUSH_SECONDS": "3600",  # flushed at close
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # The tables are the demo's output; the training's progress bars and notices are noise.
        "TQDM_DISABLE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }


def demo_events(count: int, seed: int) -> list[str]:
    from qe_assets.ops.demo import generate_events

    return generate_events(count, seed=seed, doc_chars=DOC_CHARS, docs_per_event=DOCS_PER_EVENT)


def build_base(folder: Path, events: list[str]) -> Path:
    """The tiny base model, its tokenizer trained on the demo's own text, taught to answer
    every question with BASE_REPLIES: the production model before any fine-tune."""
    from qe_assets.lib.templates import load_templates
    from qe_assets.testing.tiny_model import build_tiny_model, teach_reply

    templates = json.dumps(load_templates().__dict__, ensure_ascii=False, default=str)
    texts = [*events, templates, *ANSWERS.values(), *BASE_REPLIES.values()]
    base = build_tiny_model(folder, texts, vocab_size=VOCABULARY, embedding_std=0.1)
    questions = [json.loads(event)["question"] for event in events]
    pairs = [(q, BASE_REPLIES["zh" if CJK.search(q) else "en"]) for q in questions]
    return teach_reply(base, pairs, steps=BASE_STEPS)


def run_round(
    settings: Any,
    events: list[str],
    version: str,
    served_port: int,
    requests: int,
    log_level: str | None = None,
) -> Round:
    """One round through the real graph, then the service side against the served model."""
    import openai

    from qe_assets.finetune.serving.transformers_engine import TransformersServer
    from qe_assets.ingest.queues import FileInbox
    from qe_assets.service.capture import QualityCapture
    from qe_assets.service.rollout import Router, state_path
    from qe_assets.store import connect
    from qe_assets.testing.runs import materialize, metadata

    started = time.monotonic()
    FileInbox(settings.inbox_dir).put(events)
    print(
        f"round {version}: ingest, annotate, complete, cut, train, serve, probe, judge …",
        flush=True,
    )
    result = materialize(
        settings, selection=ROUND_SELECTION, raise_on_error=False, log_level=log_level
    )
    row = Round(version)
    with connect(settings.database, read_only=True) as conn:
        runs = conn.execute(
            "SELECT status, metrics, recipe, message FROM fine_tune_runs "
            "WHERE dataset_version = ? ORDER BY created_at DESC LIMIT 1",
            [version],
        ).fetchall()
        evaluation = conn.execute(
            "SELECT n, wins, ties, losses, win_rate, ci_low, decision, reason "
            "FROM model_evaluations WHERE dataset_version = ? AND comparison = 'production' "
            "ORDER BY created_at DESC LIMIT 1",
            [version],
        ).fetchall()
    if not runs or runs[0][0] != "succeeded":
        raise RuntimeError(
            f"{version}: training did not succeed: {runs[0][3] if runs else 'no run'}"
        )
    metrics, recipe = json.loads(runs[0][1]), json.loads(runs[0][2])
    row.train_samples = int(metrics.get("train_samples", 0))
    row.loss_first, row.loss_last = metrics.get("train_loss_first"), metrics.get("train_loss_last")
    row.eval_loss_before, row.eval_loss_after = (
        metrics.get("base_eval_loss"),
        metrics.get("eval_loss"),
    )
    row.previous_model = recipe.get("previous_model")
    # A blocking check failing (the gate blocked the candidate) is a measured outcome, not an
    # error: only a failed asset step stops the demo.
    failures = [f for f in result.get_step_failure_events() if f.step_key in ROUND_SELECTION]
    if failures:
        message = failures[0].step_failure_data.error.message  # type: ignore[union-attr]
        raise RuntimeError(f"{version}: {failures[0].step_key} failed: {message.strip()}")
    if evaluation:
        n, wins, ties, losses, rate, low, decision, reason = evaluation[0]
        row.n, row.wins, row.ties, row.losses = n, wins, ties, losses
        row.win_rate, row.ci_low, row.decision, row.reason = rate, low, decision, reason
    # The probe runs before anything is judged and fails the evaluation when it fails.
    row.parity = "passed" if evaluation else "not run"
    # The service side: the model the rollout names, at the URL it gives, called for real.
    router = Router(state_path(settings), settings=settings, check_seconds=0)
    capture = QualityCapture(settings)
    with TransformersServer(Path(settings.data_dir) / "served", port=served_port) as server:
        for i in range(requests):
            request_id = f"service-{version}-{i}"
            route = router.choose(request_id)
            row.routed[route.model] = row.routed.get(route.model, 0) + 1
            client = openai.OpenAI(base_url=route.base_url, api_key="local", timeout=120)
            question = "How long is an SSO session valid?"
            docs = [{"id": "kb-1", "content": "Sessions last eight hours.", "score": 0.9}]
            reply = client.chat.completions.create(
                model=route.model,
                messages=[{"role": "user", "content": question}],
                max_tokens=24,
                temperature=0,
            )
            answer = reply.choices[0].message.content or ""
            row.served_answer = row.served_answer or answer
            score = 0.9 if i % 4 else 0.3  # what the RAG service's own evaluator said
            capture(
                request_id=request_id,
                question=question,
                docs=docs,
                answer=answer or "(empty)",
                evaluation={"score": score, "labels": [] if score > 0.7 else ["incomplete_answer"]},
                model=route.model,
            )
        served_url = server.base_url
    capture.counter.flush()
    state = router.state()
    row.production, row.base_url = state.production, state.base_urls.get(state.production or "")
    row.server_url = served_url
    ab = materialize(settings, selection=AB_SELECTION, raise_on_error=False, log_level=log_level)
    look = metadata(ab, "ab_test")
    # Direct promotion (QE_ROLLOUT=direct): no A/B test runs; ab_test only keeps rollout.json.
    decided = look.get("decision")
    row.ab_decision = (
        str(decided)
        if decided not in (None, "", "none")
        else f"no test running; rollout.json kept (production {look.get('production') or '—'})"
    )
    row.seconds = time.monotonic() - started
    return row


def run_loop(
    workdir: Path,
    events: int = 200,
    requests: int = 8,
    rounds: int = 2,
    log_level: str | None = None,
) -> list[Round]:
    """The rounds, each on `events` new demo events; returns what each measured."""
    from qe_assets.finetune.serving.transformers_engine import free_port
    from qe_assets.settings import Settings

    workdir.mkdir(parents=True, exist_ok=True)
    batches = [demo_events(events, seed=100 + r) for r in range(rounds)]
    base = build_base(workdir / "base-model", [e for batch in batches for e in batch])
    port = free_port()
    out = []
    server = OpenAIServer().start()
    try:
        server.responder = corrections
        env = loop_environment(workdir, server, base, port, events)
        with environment(env):
            settings = Settings.from_env(env)
            for number, batch in enumerate(batches, start=1):
                if number == 2:
                    # Trained on from the previous adapter: at the first rate Adam's first steps
                    # would throw away what it learned (measured: validation loss 0.29 → 3.0).
                    settings = settings.model_copy(
                        update={"finetune_hyperparameters": CONTINUED_HYPERPARAMETERS}
                    )
                out.append(run_round(settings, batch, f"v{number:03d}", port, requests, log_level))
    finally:
        server.stop()
    return out


HEADER = """\
make demo-loop: two rounds of the loop, offline, on this CPU.
Corrected answers: the project's own OpenAI-compatible test server (qe_assets/testing/
openai_server.py) answers each regeneration with a deterministic correction, a short grounded
reply ("The answer is in the documents." / "资料中有答案。"), where the base model answers "The
answer is not in the documents." / "资料中没有答案。". The
judge is the reference judge (token-F1 against that corrected answer): nothing leaves this
machine. What the win rate shows: the loop's machinery learns and measures. It does not show
that a real model gets better: the base is a tiny random model built on the spot.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200, help="new demo events per round")
    parser.add_argument("--requests", type=int, default=8, help="service calls per round")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temp dir)")
    parser.add_argument("--verbose", action="store_true", help="Dagster's run logs too")
    args = parser.parse_args(argv)

    print(HEADER)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qe-demo-loop-") as temp:
        workdir = args.workdir or Path(temp)
        try:
            # A blocked candidate is an outcome the tables report, not an error to trace.
            level = "INFO" if args.verbose else "CRITICAL"
            rounds = run_loop(workdir, args.events, args.requests, log_level=level)
        except RuntimeError as exc:
            print(f"demo-loop failed: {exc}", file=sys.stderr)
            return 1
        for row in rounds:
            print(row.table(), "\n", flush=True)
    print(f"total wall time {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
