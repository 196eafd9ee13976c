"""The loop closed on this machine, CPU only, with a tiny local model: the entry point of
`make demo-loop` (qe_assets/testing/demo_loop.py) at a small size, two rounds.

Demo events → corrections from the local OpenAI-compatible server → v001 → a LoRA adapter trained
by the `command` backend (real TRL) → served by `transformers serve` under `model_rag_qa_v001`
(started by the model_server resource) → the parity probe → judged (reference judge) against
the served base → promoted → rollout.json names `model_rag_qa_v001` with the URL that serves it
→ `choose` → a real call through the openai client to that URL → `capture(..., model=…)` →
`ab_test`. Then v002, trained on from the v001 adapter, judged against the served v001.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import dagster as dg
import pytest

from qe_assets.store import connect

pytest.importorskip("trl", reason="the train extra: pip install -e '.[train]'")
pytest.importorskip("fastapi", reason="the train extra (transformers serve)")
# Two real trainings, two `transformers serve` evaluations and two served rounds: minutes, not
# the suite's default 300 s, on a busy machine.
pytestmark = [pytest.mark.train, pytest.mark.timeout(1500)]

EVENTS = 160  # per round: ~55 train samples, ~25 held out
REQUESTS = 4  # service calls per round


def test_two_rounds_train_serve_judge_promote_and_route_on_a_tiny_local_model(
    tmp_path: Path,
) -> None:
    from qe_assets.testing.demo_loop import run_loop

    started = time.monotonic()
    first, second = run_loop(tmp_path, events=EVENTS, requests=REQUESTS)
    elapsed = time.monotonic() - started
    print(f"\n{first.table()}\n{second.table()}\nboth rounds: {elapsed:.0f} s")
    data = tmp_path / "data"

    # Round 1: the adapter learned the corrected reply and its end of turn (else the parity
    # probe would have failed the evaluation), won on held-out questions and was promoted.
    assert first.loss_first is not None and first.loss_last is not None
    assert first.loss_last < first.loss_first / 4
    assert first.eval_loss_after is not None and first.eval_loss_before is not None
    assert first.eval_loss_after < first.eval_loss_before
    assert first.parity == "passed" and first.n >= 10
    # The round is reproducible bit for bit (the version's files do not depend on which
    # correction came back first, TRL and the base are seeded): the adapter wins every held-out
    # question here (20 of 20, lower bound 0.84) and the gate promotes it.
    assert first.decision == "promote" and first.ci_low is not None and first.ci_low > 0.5
    assert first.wins > first.losses, first.table()
    assert first.production == "model_rag_qa_v001"
    assert sum(first.routed.values()) == REQUESTS
    assert first.served_answer is not None  # asked and answered, whatever it says
    log = (data / "served" / "server.log").read_text("utf-8")
    assert "model_rag_qa_v001" in log and "model_rag_qa_base" in log  # the gate served both
    assert first.ab_decision is not None
    # rollout.json names the served adapter and the server the service must call; the service
    # called it there, for real, and captured with its served name.
    assert first.base_url == first.server_url
    assert first.base_url is not None and first.base_url.startswith("http://127.0.0.1:")
    assert first.routed == {"model_rag_qa_v001": REQUESTS}
    with connect(data / "qe.duckdb", read_only=True) as conn:
        counted = dict(
            conn.execute("SELECT model, sum(answers)::INT FROM answer_counts GROUP BY 1").fetchall()
        )
        captured = conn.execute(
            "SELECT count(*) FROM raw_events WHERE model = 'model_rag_qa_v001'"
        ).fetchone()
    # Counted under the served name (ab_test counts it for the adapter's id), and the low-score
    # answers came back as events.
    assert counted["model_rag_qa_v001"] >= REQUESTS
    assert captured is not None and captured[0] >= 1

    # Round 2 starts from the v001 adapter and is judged against production.
    with connect(data / "qe.duckdb", read_only=True) as conn:
        (recipe,) = conn.execute(
            "SELECT recipe FROM fine_tune_runs WHERE dataset_version = 'v002'"
        ).fetchone()
    assert second.previous_model == json.loads(recipe)["previous_model"]
    assert second.previous_model is not None
    assert second.previous_model.endswith("v001-command-1")
    assert second.parity == "passed" and second.n >= 10 and second.decision is not None
    promoted = second.decision == "promote"
    assert second.production == ("model_rag_qa_v002" if promoted else "model_rag_qa_v001")
    assert sum(second.routed.values()) == REQUESTS


def test_the_daemon_trains_serves_judges_and_promotes_a_local_adapter_with_no_click(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same round hands-free: a real `dagster dev` (webserver + daemon) with the settings
    of `make demo-loop`; events dropped into the inbox, then no click and no `qe run`. The queue
    sensor ingests and completes, the fine-tune sensor cuts v001 at the threshold, and the
    release run trains the LoRA, serves it, probes it, judges it and promotes it."""
    from qe_assets.finetune.serving.transformers_engine import free_port
    from qe_assets.ingest.queues import FileInbox
    from qe_assets.ops.runner import prepare_dagster_home
    from qe_assets.service.rollout import read_state, state_path
    from qe_assets.settings import Settings
    from qe_assets.testing.demo_loop import build_base, corrections, demo_events, loop_environment
    from qe_assets.testing.openai_server import OpenAIServer
    from qe_assets_tests.dagster_dev import DagsterDev
    from qe_assets_tests.test_hands_free import count, runs_of, wait_until

    # The base as `make demo-loop` builds it (its tokenizer knows both rounds' text).
    events, later = demo_events(EVENTS, seed=100), demo_events(EVENTS, seed=101)
    base = build_base(tmp_path / "base-model", events + later)
    llm = OpenAIServer().start()
    llm.responder = corrections
    loop_env = loop_environment(tmp_path, llm, base, free_port(), EVENTS)
    settings = Settings.from_env(loop_env)
    home = tmp_path / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    prepare_dagster_home(settings)  # dagster.yaml as `make ui` writes it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QE_", "OPENAI_"))}
    # The demo loop's settings; only the threshold (a third of the samples) and the tick differ.
    env.update(loop_env, QE_FINETUNE_THRESHOLD="30", QE_SENSOR_INTERVAL_SECONDS="5")
    server = DagsterDev(home, env, tmp_path / "dagster_dev.log")
    try:
        server.start(timeout=120)
        FileInbox(settings.inbox_dir).put(events)

        waited = wait_until(
            "v001 trained, served, probed and judged by the daemon",
            lambda: count(settings, "SELECT count(*) FROM model_evaluations") > 0,
            server,
            timeout=900,
        )
        print(f"\ndrop → v001 judged, hands-free: {waited:.0f} s")
        wait_until(
            "the release run ended",
            lambda: not [r for r in runs_of(server, "qe_release") if r["status"] == "STARTED"],
            server,
        )
    finally:
        server.stop()
        llm.stop()
    state = read_state(state_path(settings))
    with connect(settings.database, read_only=True) as conn:
        ((decision, ci_low, promoted_by),) = conn.execute(
            "SELECT e.decision, e.ci_low, p.promoted_by FROM model_evaluations e "
            "LEFT JOIN promoted_models p ON p.evaluation_id = e.evaluation_id"
        ).fetchall()
        (status, version) = conn.execute(
            "SELECT status, dataset_version FROM fine_tune_runs"
        ).fetchone()
    assert (status, version) == ("succeeded", "v001")
    # The same events and base as round 1 of the test above, committed at once (one LLM batch),
    # so the sensor's cut holds every sample and the verdict is the same: promoted by the gate.
    print(f"decision {decision} (lower bound {ci_low:.3f})")
    assert decision == "promote" and ci_low > 0.5 and promoted_by == "gate"
    assert state is not None and state.production == "model_rag_qa_v001", state
    # The release run was the fine-tune sensor's, not a click.
    with dg.DagsterInstance.from_config(str(home)) as instance:
        releases = instance.get_run_records(dg.RunsFilter(job_name="qe_release"))
    assert releases and all("qe/ready_samples" in r.dagster_run.tags for r in releases)
