"""The A/B rollout: the router, per-model answer counts through the real capture API and queues,
the sequential test, and `ab_test` in real Dagster materializations on a real DuckDB file."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from qe_assets.ingest.queues import FileInbox
from qe_assets.rollout.assets import look_at_test
from qe_assets.rollout.registry import start_test
from qe_assets.rollout.sequential import CONTINUE, PROMOTE, ROLLBACK, Arms, Policy, decide
from qe_assets.service.answer_counts import RECORD_PREFIX
from qe_assets.service.capture import CaptureStatus, QualityCapture
from qe_assets.service.rollout import RolloutState, Route, Router, bucket, write_state
from qe_assets.settings import Settings
from qe_assets.store import connect, ensure_schema
from qe_assets.store.evaluations import record_promotion
from qe_assets_bench.rollout import simulate
from qe_assets_tests.conftest import RedisServer
from qe_assets_tests.factories import make_event
from qe_assets_tests.openai_server import EvalModels, OpenAIServer
from qe_assets_tests.runs import checks, materialize, metadata, scalar
from qe_assets_tests.test_cli import qe
from qe_assets_tests.test_evaluation import BASE, eval_settings, release  # noqa: F401 (fixture)
from qe_assets_tests.test_finetune_openai import openai_settings  # noqa: F401 (a fixture)

AB_RUN = ["raw_events", "annotated_samples", "ab_test"]
REPO = Path(__file__).resolve().parents[1]


# --- what the RAG service imports ------------------------------------------------------------


def test_capture_and_rollout_import_no_database_dataframe_or_broker_library() -> None:
    code = (
        "import sys, qe_assets.service.capture, qe_assets.service.rollout; "
        "print(','.join(m for m in ('duckdb', 'polars', 'dagster', 'redis', 'confluent_kafka') "
        "if m in sys.modules))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("QE_")}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout.strip() == ""


# --- the router --------------------------------------------------------------------------------


def test_the_split_matches_the_share_and_is_stable_per_request(tmp_path: Path) -> None:
    path = tmp_path / "rollout.json"
    ids = [f"req-{i}" for i in range(100_000)]
    chosen: dict[float, set[str]] = {}
    for share in (0.05, 0.25, 0.5):
        write_state(path, RolloutState("prod", "cand", share))
        router = Router(path, default="fallback", check_seconds=0)
        picks = [router.choose_model(rid) for rid in ids]
        assert set(picks) == {"prod", "cand"}
        assert abs(picks.count("cand") / len(ids) - share) <= 0.01
        assert [router.choose_model(rid) for rid in ids[:1000]] == picks[:1000]  # stable
        chosen[share] = {rid for rid, model in zip(ids, picks, strict=True) if model == "cand"}
    # The ramp only adds ids: whoever had the candidate at 5 % keeps it at 25 % and 50 %.
    assert chosen[0.05] <= chosen[0.25] <= chosen[0.5]
    # Another candidate draws another split.
    assert {rid for rid in ids if bucket("other", rid) < 0.05} != chosen[0.05]


def test_no_candidate_routes_everything_to_production(tmp_path: Path) -> None:
    path = tmp_path / "rollout.json"
    write_state(path, RolloutState("prod", None, 0.0))
    router = Router(path, default="fallback", check_seconds=0)
    assert {router.choose_model(f"r{i}") for i in range(1000)} == {"prod"}
    write_state(path, RolloutState("prod", "cand", 0.0))
    assert {router.choose_model(f"r{i}") for i in range(1000)} == {"prod"}


def test_missing_or_corrupt_state_routes_to_production_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "rollout.json"
    router = Router(path, default="base-model", check_seconds=0)
    with caplog.at_level(logging.INFO, "qe_assets.service.rollout"):
        assert {router.choose_model(f"r{i}") for i in range(200)} == {"base-model"}
    assert len(caplog.records) == 1 and "does not exist" in caplog.text
    write_state(path, RolloutState("prod", "cand", 0.5))
    assert {router.choose_model(f"r{i}") for i in range(200)} == {"prod", "cand"}
    caplog.clear()
    for corrupt in (b'{"production": "prod", "candidate": "cand", "sha', b'{"share": 7}', b"[]"):
        path.write_bytes(corrupt)
        with caplog.at_level(logging.INFO, "qe_assets.service.rollout"):
            picks = {router.choose_model(f"r{i}") for i in range(200)}
        # The last production a good file named keeps the traffic; the candidate gets none.
        assert picks == {"prod"}
    assert len(caplog.records) == 3 and all(r.levelname == "WARNING" for r in caplog.records)
    assert "share: expected a number in [0, 1], got 7" in caplog.text
    write_state(path, RolloutState("prod2", None, 0.0))
    assert router.choose_model("r1") == "prod2"


def test_the_router_looks_at_the_file_at_most_once_per_interval(tmp_path: Path) -> None:
    path = tmp_path / "rollout.json"
    write_state(path, RolloutState("prod", None, 0.0))
    router = Router(path, default="x", check_seconds=3600)
    assert router.choose_model("r") == "prod"
    write_state(path, RolloutState("prod2", None, 0.0))
    assert router.choose_model("r") == "prod"  # not looked at again within the hour
    router.check_seconds = 0
    assert router.choose_model("r") == "prod2"


# --- counting through the real capture API ----------------------------------------------------


def serve(
    capture: QualityCapture,
    router: Router,
    rates: dict[str, float],
    n: int,
    rng: random.Random,
    prefix: str,
) -> dict[str, list[int]]:
    """n answers routed by the router; each is low-score with its model's rate. Returns what
    was served: model → [answers, low-score answers]."""
    served: dict[str, list[int]] = {}
    for i in range(n):
        request_id = f"{prefix}-{i}"
        model = router.choose_model(request_id)
        low = rng.random() < rates[model]
        event = make_event(request_id, evaluation={"score": 0.3 if low else 0.9, "labels": []})
        del event["timestamp"]
        event["evaluation"]["labels"] = ["factuality_error" if i % 2 else "low_relevance"]
        result = capture(**event, model=model)
        assert result.status in (CaptureStatus.SKIPPED, CaptureStatus.ENQUEUED)
        count = served.setdefault(model, [0, 0])
        count[0] += 1
        count[1] += int(low)
    assert capture.counter.flush()
    return served


def stored_counts(settings: Settings) -> dict[str, tuple[int, int]]:
    with connect(settings.database, read_only=True) as conn:
        rows = conn.execute(
            "SELECT model, sum(answers)::BIGINT, sum(low)::BIGINT FROM answer_counts GROUP BY 1"
        ).fetchall()
    return {model: (answers, low) for model, answers, low in rows}


def test_every_answer_is_counted_once_skipped_ones_included(settings: Settings) -> None:
    capture = QualityCapture(settings.model_copy(update={"count_flush_seconds": 3600}))
    path = settings.data_dir + "/rollout.json"
    write_state(Path(path), RolloutState("prod", "cand", 0.5))
    served = serve(
        capture, Router(path, default="x"), {"prod": 0.2, "cand": 0.2}, 200, random.Random(1), "a"
    )
    count_files = [
        p
        for p in FileInbox(settings.inbox_dir).ready_files()
        if p.read_bytes().startswith(RECORD_PREFIX)
    ]
    assert len(count_files) == 1  # one flush: one record, never one write per answer
    # A re-send of the same flush (a lost ack, a replay) must not count twice.
    (settings.inbox_dir / "resent.jsonl").write_bytes(count_files[0].read_bytes())
    result = materialize(settings, selection=["raw_events"])
    assert metadata(result, "raw_events")["rejected"] == 0
    assert stored_counts(settings) == {m: tuple(c) for m, c in served.items()}
    low_events = sum(c[1] for c in served.values())
    assert scalar(settings, "SELECT count(*) FROM raw_events WHERE model IS NOT NULL") == low_events
    # `model` is also kept among the extra fields, as before it was a field: same fingerprints.
    assert scalar(settings, "SELECT count(*) FROM raw_events WHERE extra->>'model' = model") == (
        low_events
    )
    assert metadata(result, "raw_events")["new_count_rows"] == len(served)
    # A malformed count record is rejected naming its field, not taken for an event.
    bad = RECORD_PREFIX.decode() + ',"flush_id":"x","counts":{"m":{"answers":1,"low":2}}}'
    FileInbox(settings.inbox_dir).put([bad])
    materialize(settings, selection=["raw_events"])
    reason = scalar(settings, "SELECT reason FROM rejected_events")
    assert "(count record)" in reason and reason.startswith("producer:")


def test_a_blank_model_name_is_rejected_naming_the_field(settings: Settings) -> None:
    capture = QualityCapture(settings)
    result = capture(**make_event("r-blank"), model="  ")
    assert result.status is CaptureStatus.INVALID and result.reason.startswith("model:")
    assert capture.counter.pending() == {}


PRODUCER = textwrap.dedent(
    """
    import os, sys, time
    from qe_assets.service.capture import QualityCapture
    from qe_assets.settings import Settings
    from qe_assets_tests.factories import make_event

    settings = Settings.from_env()
    capture = QualityCapture(settings)
    name, first, second = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    for i in range(first):
        capture(**make_event(f"{name}-a{i}", evaluation={"score": 0.9}), model="m")
    assert capture.counter.flush()
    for i in range(second):
        capture(**make_event(f"{name}-b{i}", evaluation={"score": 0.9}), model="m")
    print("counted", flush=True)
    if os.environ.get("HANG"):
        time.sleep(600)
    """
)


def producer(
    settings: Settings, name: str, first: int, second: int, **env: str
) -> subprocess.Popen[str]:
    variables = {
        **os.environ,
        "QE_DATA_DIR": settings.data_dir,
        "PYTHONPATH": str(REPO),
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-c", PRODUCER, name, str(first), str(second)],
        env=variables,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_a_producer_killed_before_its_flush_loses_only_that_interval(settings: Settings) -> None:
    # The interval is long: the 300 answers after the explicit flush are still in memory when
    # the process is killed. They are lost, nothing else is, and replays add nothing.
    process = producer(settings, "k", 500, 300, HANG="1", QE_COUNT_FLUSH_SECONDS="3600")
    assert process.stdout is not None and process.stdout.readline().strip() == "counted"
    process.send_signal(signal.SIGKILL)
    process.wait()
    materialize(settings, selection=["raw_events"])
    materialize(settings, selection=["raw_events"])
    assert stored_counts(settings) == {"m": (500, 0)}


def test_two_processes_flushing_at_once_through_redis_count_exactly_once(
    settings: Settings, redis_url: str, redis_server: RedisServer
) -> None:
    redis_server.client().flushdb()
    on_redis = settings.model_copy(update={"queue_url": redis_url})
    # Flushing every 50 ms while counting, and at exit: many records from both at once.
    env = {"QE_QUEUE_URL": redis_url, "QE_COUNT_FLUSH_SECONDS": "0.05"}
    processes = [producer(on_redis, name, 1500, 1500, **env) for name in ("p1", "p2")]
    for process in processes:
        assert process.wait(timeout=120) == 0
    records = redis_server.client().llen("quality_events")
    assert records > 2
    materialize(on_redis, selection=["raw_events"])
    assert stored_counts(on_redis) == {"m": (6000, 0)}
    assert not settings.inbox_dir.exists() or not FileInbox(settings.inbox_dir).ready_files()


# --- the sequential test (pure simulations, the asset's own rule) -----------------------------


def test_a_clearly_better_candidate_is_promoted_within_a_bounded_number_of_looks() -> None:
    outcomes = [simulate(0.2, 0.12, seed, Policy(), looks=20) for seed in range(20)]
    assert all(o.decision == PROMOTE for o in outcomes)
    assert max(o.looks for o in outcomes) <= 10


def test_an_equal_candidate_is_never_promoted_in_twenty_looks() -> None:
    outcomes = [simulate(0.2, 0.2, seed, Policy(), looks=20) for seed in range(30)]
    assert not [o for o in outcomes if o.decision == PROMOTE]
    assert sum(o.decision == CONTINUE for o in outcomes) >= 25


def test_a_worse_candidate_is_rolled_back() -> None:
    outcomes = [simulate(0.2, 0.3, seed, Policy(), looks=20) for seed in range(20)]
    assert all(o.decision == ROLLBACK for o in outcomes)


def test_the_ramp_moves_on_only_after_enough_answers_at_a_share_and_while_safe() -> None:
    policy = Policy(min_answers=200, ramp=(0.05, 0.25, 0.5), ramp_max_harm=0.01)
    even = Arms(4000, 800, 400, 80)  # equal rates, no evidence either way
    assert decide(even, 0.05, 0, policy).share == 0.25
    assert decide(even, 0.05, 300, policy).share == 0.05  # only 100 answers at this share
    assert decide(even, 0.5, 0, policy).share == 0.5  # the top of the ramp
    slightly_worse = Arms(4000, 800, 400, 88)  # 22 % vs 20 %: not significant, not safe
    ramped = decide(slightly_worse, 0.05, 0, policy)
    assert ramped.decision == CONTINUE and ramped.share == 0.05
    few = decide(Arms(4000, 800, 150, 0), 0.05, 0, policy)
    assert few.decision == CONTINUE and few.reason.startswith("collecting")


def test_a_test_stops_when_someone_promotes_another_model_meanwhile(settings: Settings) -> None:
    with connect(settings.database) as conn:
        ensure_schema(conn)
        start_test(conn, "cand", "prod", 0.25, "gate", "passed")
        record_promotion(conn, "other", "ana", reason="hotfix")
        look = look_at_test(conn, settings, None)
        assert look.test is None and look.state == RolloutState(
            "other", None, 0.0, "set_share", "ab_test", look.state.updated_at
        )
        reason = conn.execute(
            "SELECT reason FROM ab_decisions ORDER BY decision_id DESC LIMIT 1"
        ).fetchall()[0][0]
    assert "production changed to other" in reason
    state = json.loads(Path(settings.data_dir, "rollout.json").read_text())
    assert (state["production"], state["candidate"]) == ("other", None)


def test_choose_gives_the_served_name_and_the_url_of_its_server(tmp_path: Path) -> None:
    path = tmp_path / "rollout.json"
    served = "http://127.0.0.1:8000/v1"
    state = RolloutState(
        "model_rag_qa_v001", "ft:cand", 0.5, base_urls={"model_rag_qa_v001": served}
    )
    write_state(path, state)
    router = Router(path, default="base", check_seconds=0, base_url="https://llm.example/v1")
    routes = {router.choose(f"r{i}") for i in range(200)}
    # A served model at its server; any other at the service's QE_ROUTE_BASE_URL.
    assert routes == {
        Route("model_rag_qa_v001", served),
        Route("ft:cand", "https://llm.example/v1"),
    }
    assert {router.choose_model(f"r{i}") for i in range(200)} == {"model_rag_qa_v001", "ft:cand"}
    model, base_url = router.choose("r1")  # one call, unpacked
    assert (model, base_url) in routes
    # A bad URL in the file: the file is unreadable, production keeps its last good server.
    path.write_text(json.dumps({**json.loads(state.to_json()), "base_urls": {"x": "file:/x"}}))
    assert {router.choose(f"r{i}") for i in range(50)} == {Route("model_rag_qa_v001", served)}
    # A file without base_urls reads as before, and is written as before.
    assert "base_urls" not in RolloutState("prod").to_json()
    assert Router(tmp_path / "none.json", default="base").choose("r") == Route("base", None)


def test_a_served_model_goes_by_its_served_name_and_its_answers_count_under_it(
    settings: Settings,
) -> None:
    """rollout.json names the model the RAG service can call (`model_rag_qa_v001`, with the
    model server's URL); the service captures with that name, and ab_test counts it for the
    candidate whose id is the adapter's folder."""
    url = "http://127.0.0.1:8011/v1"
    served = settings.model_copy(
        update={"model_server": "external", "model_server_url": url, "ab_min_answers": 10_000}
    )
    with connect(settings.database) as conn:
        ensure_schema(conn)
        conn.execute(
            "INSERT INTO fine_tune_runs (run_id, dataset_version, backend, status, base_model, "
            "model_id, metrics, created_at, updated_at) VALUES ('v001-command-1', 'v001', "
            "'command', 'succeeded', '/models/base', '/models/v001', ?, now(), now())",
            [json.dumps({"served_as": "model_rag_qa_v001", "base_served_as": "model_rag_qa_base"})],
        )
        start_test(conn, "/models/v001", "/models/base", 0.5, "gate", "passed")
        for model, answers, low in (("model_rag_qa_v001", 300, 30), ("model_rag_qa_base", 300, 90)):
            conn.execute(
                "INSERT INTO answer_counts VALUES (?, ?, ?, ?, 0.7, 'h:1', now() - INTERVAL 1 "
                "MINUTE, now() + INTERVAL 1 MINUTE, 'test', now())",
                [f"f-{model}", model, answers, low],
            )
        look = look_at_test(conn, served, None)
    assert (look.state.production, look.state.candidate) == (
        "model_rag_qa_base",
        "model_rag_qa_v001",
    )
    assert look.state.base_urls == {"model_rag_qa_base": url, "model_rag_qa_v001": url}
    assert look.arms is not None and (look.arms.answers_candidate, look.arms.low_candidate) == (
        300,
        30,
    )
    assert (look.arms.answers_production, look.arms.low_production) == (300, 90)
    assert look.ignored == {}
    router = Router(Path(settings.data_dir, "rollout.json"), default="x", check_seconds=0)
    assert {router.choose(f"r{i}").base_url for i in range(100)} == {url}
    # People may name it as the service does: `qe models promote model_rag_qa_v001`.
    env = {
        "QE_DATA_DIR": settings.data_dir,
        "QE_REVIEWER": "ana",
        "QE_MODEL_SERVER": "external",
        "QE_MODEL_SERVER_URL": url,
    }
    promoted = qe("models", "promote", "model_rag_qa_v001", "--reason", "by name", env=env)
    assert "promote: /models/v001 is the production model" in promoted.stdout
    state = json.loads(Path(settings.data_dir, "rollout.json").read_text())
    assert (state["production"], state["base_urls"]) == (
        "model_rag_qa_v001",
        {"model_rag_qa_v001": url},
    )


# --- ab_test in real materializations ---------------------------------------------------------


@pytest.fixture
def canary(eval_settings: Settings, openai_server: OpenAIServer) -> tuple[Settings, str]:  # noqa: F811
    """A candidate that passed the real gate with QE_ROLLOUT=canary: an A/B test at 20 %."""
    settings = eval_settings.model_copy(
        update={
            "rollout_mode": "canary",
            "ab_ramp": [0.2, 0.5],
            "ab_min_answers": 150,
            "count_flush_seconds": 3600,
        }
    )
    result = release(settings, openai_server, EvalModels({"ft:": 3, BASE: 1}))
    check = checks(result)["candidate_beats_production"]
    assert check.passed and check.metadata["promoted"].value is False
    candidate = metadata(result, "model_evaluation")["candidate"]
    state = json.loads(Path(settings.data_dir, "rollout.json").read_text())
    assert (state["production"], state["candidate"], state["share"]) == (BASE, candidate, 0.2)
    assert scalar(settings, "SELECT count(*) FROM promoted_models") == 0
    return settings, candidate


@pytest.mark.parametrize(
    ("candidate_rate", "expected"), [(0.1, PROMOTE), (0.5, ROLLBACK)], ids=["better", "worse"]
)
def test_ab_test_promotes_a_better_canary_and_rolls_back_a_worse_one(
    canary: tuple[Settings, str],
    candidate_rate: float,
    expected: str,
    redis_url: str,
    redis_server: RedisServer,
) -> None:
    # Through Redis, as a RAG service on another host would send its events and counts.
    redis_server.client().flushdb()
    settings = canary[0].model_copy(update={"queue_url": redis_url})
    candidate = canary[1]
    capture = QualityCapture(settings)
    router = Router(Path(settings.data_dir, "rollout.json"), default=BASE, check_seconds=0)
    rng = random.Random(18)
    rates = {BASE: 0.3, candidate: candidate_rate}
    decisions: list[str] = []
    for run in range(6):
        serve(capture, router, rates, 1000, rng, f"run{run}")
        result = materialize(settings, selection=AB_RUN)
        meta = metadata(result, "ab_test")
        decisions.append(meta["decision"])
        if meta["decision"] != CONTINUE:
            break
    assert decisions[-1] == expected, decisions
    assert len(decisions) <= 4
    harm = checks(result)["candidate_not_worse"]
    assert harm.passed is (expected == PROMOTE)
    assert "| factuality_error |" in meta["per_label"]
    assert meta["rates_over_time"].count("| ab_test |") == len(decisions)
    state = json.loads(Path(settings.data_dir, "rollout.json").read_text())
    promoted = scalar(settings, "SELECT list(model || '/' || promoted_by) FROM promoted_models")
    if expected == PROMOTE:
        assert (state["production"], state["candidate"]) == (candidate, None)
        assert promoted == [f"{candidate}/ab_test"]
        assert {router.choose_model(f"x{i}") for i in range(200)} == {candidate}
    else:
        assert (state["production"], state["share"]) == (BASE, 0.0)
        assert promoted is None or promoted == []
        assert {router.choose_model(f"x{i}") for i in range(200)} == {BASE}
    with connect(settings.database, read_only=True) as conn:
        rows = conn.execute(
            "SELECT decision, decided_by, share FROM ab_decisions ORDER BY decision_id"
        ).fetchall()
    assert rows[0] == ("start", "gate", 0.2) and rows[-1][:2] == (expected, "ab_test")


def test_people_set_the_share_and_stop_the_test_recorded(canary: tuple[Settings, str]) -> None:
    settings, candidate = canary
    env = {"QE_DATA_DIR": settings.data_dir, "QE_REVIEWER": "ana"}
    listed = qe("models", env=env).stdout
    assert f"rollout: {candidate} at 20% of traffic against {BASE}" in listed
    refused = qe(
        "models", "rollout", "not-gated", "--share", "0.1", "--reason", "x", env=env, check=False
    )
    assert refused.returncode == 1 and "passed the evaluation gate" in refused.stderr
    assert refused.stderr.count("\n") == 1
    qe("models", "rollout", candidate, "--share", "0.5", "--reason", "looks fine", env=env)
    state = json.loads(Path(settings.data_dir, "rollout.json").read_text())
    assert (state["candidate"], state["share"], state["decided_by"]) == (candidate, 0.5, "ana")
    stopped = qe("models", "rollback", "--reason", "complaints", "--reviewer", "bo", env=env)
    assert f"{candidate} gets no traffic any more; {BASE} stays" in stopped.stdout
    state = json.loads(Path(settings.data_dir, "rollout.json").read_text())
    assert (state["candidate"], state["share"]) == (None, 0.0)
    with connect(settings.database, read_only=True) as conn:
        rows = conn.execute(
            "SELECT decision, decided_by, share, reason FROM ab_decisions ORDER BY decision_id"
        ).fetchall()
    assert rows[1:] == [
        ("set_share", "ana", 0.5, "looks fine"),
        ("rollback", "bo", 0.0, "complaints"),
    ]
    assert scalar(settings, "SELECT count(*) FROM promoted_models") == 0
    assert "the last test" in qe("models", "list", env=env).stdout


def test_counts_and_events_travel_through_kafka(settings: Settings, kafka_broker: Any) -> None:
    topic = kafka_broker.new_topic(partitions=3)
    on_kafka = settings.model_copy(
        update={"queue_url": kafka_broker.url(topic), "count_flush_seconds": 3600}
    )
    capture = QualityCapture(on_kafka)
    path = Path(settings.data_dir, "rollout.json")
    write_state(path, RolloutState("prod", "cand", 0.5))
    rates = {"prod": 0.2, "cand": 0.1}
    served = serve(capture, Router(path, default="x"), rates, 200, random.Random(3), "k")
    materialize(on_kafka, selection=["raw_events"])
    materialize(on_kafka, selection=["raw_events"])  # nothing read twice
    assert stored_counts(on_kafka) == {m: tuple(c) for m, c in served.items()}
    assert not FileInbox(settings.inbox_dir).ready_files()  # nothing had to be spooled


def test_the_rollout_bench_runs_on_a_small_scale() -> None:
    from qe_assets_bench.rollout import answers_to_decide, capture_overhead, false_promotions

    assert set(false_promotions(Policy(), 5)) == {"false_promotion_rate", "false_rollback_rate"}
    assert answers_to_decide(Policy(), 3, 0.5)["power"] == 1.0
    measured = capture_overhead(40, flush_seconds=0.05, rounds=1)
    assert [name for name, *_ in measured] == ["inbox", "redis"]
    assert all(side["p99_ms"] > 0 for _, *sides in measured for side in sides)


def test_a_look_without_new_counts_records_nothing(settings: Settings) -> None:
    with connect(settings.database) as conn:
        ensure_schema(conn)
        start_test(conn, "cand", "prod", 0.25, "gate", "passed")
        for flush in ("f1", "f1", "f2", "f2"):  # a new flush before every other look
            conn.execute(
                "INSERT INTO answer_counts VALUES (?, 'cand', 10, 1, 0.7, 'p', now()::TIMESTAMP, "
                "now()::TIMESTAMP + INTERVAL 1 HOUR, 's', now()::TIMESTAMP) "
                "ON CONFLICT DO NOTHING",
                [flush],
            )
            look_at_test(conn, settings, None)
        rows = conn.execute(
            "SELECT decision, answers_candidate FROM ab_decisions ORDER BY decision_id"
        ).fetchall()
    assert rows == [("start", 0), ("continue", 10), ("continue", 20)]


def test_direct_rollout_promotes_at_once_and_the_router_follows(
    eval_settings: Settings,  # noqa: F811
    openai_server: OpenAIServer,
) -> None:
    assert eval_settings.rollout_mode == "direct"  # the default
    result = release(eval_settings, openai_server, EvalModels({"ft:": 3, BASE: 1}))
    candidate = metadata(result, "model_evaluation")["candidate"]
    assert checks(result)["candidate_beats_production"].metadata["promoted"].value is True
    router = Router(Path(eval_settings.data_dir, "rollout.json"), default=BASE, check_seconds=0)
    assert router.state() == RolloutState(candidate, None, 0.0)
    assert {router.choose_model(f"r{i}") for i in range(100)} == {candidate}


def test_a_drifting_base_rate_during_the_ramp_does_not_decide_an_equal_candidate() -> None:
    """The ramp puts most candidate answers late; if the low-score rate rose meanwhile, pooled
    counts would roll an equal candidate back. Compared per period of constant share, equal
    arms show no difference at all."""
    policy = Policy(min_answers=200)
    early = (9500, 950, 500, 50)  # share 5 %: both arms 10 % low
    late = (5000, 1500, 5000, 1500)  # share 50 %, later traffic: both arms 30 % low
    pooled = Arms(*[a + b for a, b in zip(early, late, strict=True)])
    assert decide(pooled, 0.5, 0, policy).decision == ROLLBACK  # what pooling would do
    per_period = decide(Arms.of_periods([early, late]), 0.5, 0, policy)
    assert per_period.decision == CONTINUE and per_period.difference == 0.0
    assert Arms.of_periods([early, late]).answers_candidate == 5500
    # A real improvement inside each period is still found.
    better_late = (5000, 1500, 5000, 1250)  # 25 % vs 30 %
    assert decide(Arms.of_periods([early, better_late]), 0.5, 0, policy).decision == PROMOTE


def test_arm_counts_split_at_each_share_change(tmp_path: Path) -> None:
    from datetime import datetime

    from qe_assets.rollout.registry import ActiveTest, arm_counts

    settings = Settings(data_dir=str(tmp_path / "data"))
    settings.database.parent.mkdir(parents=True)
    start, change = datetime(2026, 1, 1, 9), datetime(2026, 1, 1, 11)
    rows = [  # flush id, model, answers, low, window end
        ("f0", "prod", 50, 5, datetime(2026, 1, 1, 8)),  # before the test: not counted
        ("f1", "prod", 950, 95, datetime(2026, 1, 1, 10)),
        ("f1", "cand", 50, 5, datetime(2026, 1, 1, 10)),
        ("f2", "prod", 500, 150, datetime(2026, 1, 1, 12)),
        ("f2", "cand", 500, 150, datetime(2026, 1, 1, 12)),
    ]
    with connect(settings.database) as conn:
        ensure_schema(conn)
        conn.executemany(
            "INSERT INTO answer_counts VALUES (?, ?, ?, ?, 0.7, 'h:1', ?, ?, 'test', now())",
            [(f, m, n, low, end, end) for f, m, n, low, end in rows],
        )
        test = ActiveTest("cand", "prod", 0.5, start, 50, (change,))
        arms = arm_counts(conn, test)
        unsplit = arm_counts(conn, ActiveTest("cand", "prod", 0.5, start, 50))
    assert arms.strata == ((950, 95, 50, 5), (500, 150, 500, 150))
    assert (arms.answers_production, arms.answers_candidate) == (1450, 550)
    assert unsplit.strata == ((1450, 245, 550, 155),)
