"""Redis faults: the server restarted, killed or hung in the middle of an ingest, and producers
calling the capture API while Redis is down or hung.

The shared `redis_server` fixture runs without persistence, so a restart would empty the queue
(what any Redis without persistence does: run it with AOF in production). These tests start their
own server from the same binary with `--appendonly yes --appendfsync always`, so every
acknowledged write survives a restart and even a SIGKILL, and what is left to prove is ours:
nothing lost, nothing doubled, once the ingest is retried.

Faults are injected two ways, with a seeded random generator: at a fixed point (between claiming
a batch and committing it, from the DuckDB connection factory that `ingest_pending` calls there),
and from a background thread at random moments, so a fault also lands inside the claim script,
the read of the processing list or the ack. Each fault is a graceful restart, a SIGKILL plus
restart, or a SIGSTOP pause longer than the client's socket timeout. The ingest is retried until
it completes, as the next scheduled run would.

The CI run does one round (400 events, ~5 s); with QE_SLOW_TRIALS=N the slow variant does N/10
rounds on one database (each round's ids are new, so the checks accumulate).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from random import Random
from typing import Any

import dagster as dg
import pytest
import redis
from pydantic import ValidationError

from qe_assets.ingest.assets import ingest_pending
from qe_assets.ingest.events import validate_event
from qe_assets.ingest.queues import QueueUnavailable, RedisQueue
from qe_assets.ops.demo import generate_events
from qe_assets.service.capture import CaptureStatus, QualityCapture
from qe_assets.settings import REDIS_LIST, Settings
from qe_assets.store import connect
from qe_assets_tests.conftest import RedisServer
from qe_assets_tests.factories import make_event
from qe_assets_tests.runs import materialize, metadata

PROCESSING = f"{REDIS_LIST}:processing:default"
# The slow variant shares QE_SLOW_TRIALS with test_crash.py: one fault round per ten trials.
SLOW_ROUNDS = int(os.environ.get("QE_SLOW_TRIALS") or 0) // 10


class DurableRedis(RedisServer):
    """A redis-server that fsyncs its append-only file on every write, so data survives a
    restart and a SIGKILL; it can also be paused (SIGSTOP) to look hung."""

    persistence = ("--save", "", "--appendonly", "yes", "--appendfsync", "always")

    def crash(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)
        self.process = None

    def pause(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[DurableRedis]:
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = DurableRedis(workdir)
    server.start()
    yield server
    if server.process is not None:
        server.resume()
        server.stop()


class FaultInjector:
    """Restarts, kills or pauses the server; one fault at a time, counted by kind."""

    def __init__(self, server: DurableRedis, seed: int, pause_seconds: float) -> None:
        self.server = server
        self.rng = Random(seed)
        self.pause_seconds = pause_seconds
        self.lock = threading.Lock()
        self.injected: Counter[str] = Counter()

    def inject(self) -> None:
        with self.lock:
            kind = self.rng.choice(["restart", "sigkill", "pause"])
            if kind == "restart":
                self.server.stop()
                self.server.start()
            elif kind == "sigkill":
                self.server.crash()
                self.server.start()
            else:
                self.server.pause()
                time.sleep(self.pause_seconds)
                self.server.resume()
            self.injected[kind] += 1

    def background(self, stop: threading.Event, low: float, high: float) -> threading.Thread:
        delays = Random(self.rng.random())

        def loop() -> None:
            while not stop.wait(delays.uniform(low, high)):
                self.inject()

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        return thread


def expected_outcome(lines: list[str]) -> tuple[set[str], set[str]]:
    """(distinct valid request_ids, distinct malformed payloads: Redis has no line identity)."""
    ids: set[str] = set()
    bad: set[str] = set()
    for text in lines:
        try:
            ids.add(validate_event(text).request_id)
        except ValidationError:
            bad.add(text)
    return ids, bad


def fault_round(
    database: Path, server: DurableRedis, *, seed: int, events: int
) -> tuple[Counter[str], Counter[str]]:
    """Enqueue events, ingest them under random faults until done, check the tables; returns
    (faults injected by kind, failed ingest runs by error)."""
    lines = generate_events(events, seed=seed, bad_share=0.05)
    ids, bad = expected_outcome(lines)
    server.client().flushdb()
    RedisQueue(server.url).put(lines)
    # The ingester's socket timeout is shortened so a pause turns into timeouts quickly.
    timeout = 0.2
    faults = FaultInjector(server, seed=seed, pause_seconds=1.5 * timeout)

    def connection() -> Any:
        # Called after a batch is claimed and before it is committed: a fault right there.
        if faults.rng.random() < 0.25:
            faults.inject()
        return connect(database)

    stop = threading.Event()
    thread = faults.background(stop, 0.05, 0.3)
    failures: Counter[str] = Counter()
    try:
        for _ in range(200):
            try:
                ingest_pending(
                    RedisQueue(server.url, socket_timeout=timeout), connection, batch_size=40
                )
                if server.client().llen(REDIS_LIST) == 0:
                    break
            except (QueueUnavailable, redis.RedisError) as exc:
                failures[type(exc).__name__] += 1  # the run fails; the next one retries
                with faults.lock:
                    server.wait_ready()
    finally:
        stop.set()
        thread.join(timeout=30)
    # One clean run, as the next scheduled run would do, drains anything a fault left claimed.
    ingest_pending(RedisQueue(server.url), lambda: connect(database), batch_size=40)

    with connect(database, read_only=True) as conn:
        raw = [r[0] for r in conn.execute("SELECT request_id FROM raw_events").fetchall()]
        rejected = [r[0] for r in conn.execute("SELECT payload FROM rejected_events").fetchall()]
    assert len(raw) == len(set(raw))
    assert ids <= set(raw), f"lost {len(ids - set(raw))} events"
    assert bad <= set(rejected), f"lost {len(bad - set(rejected))} rejections"
    client = server.client()
    assert client.llen(REDIS_LIST) == client.llen(PROCESSING) == 0
    return faults.injected, failures


def report(
    name: str, rounds: int, events: int, faults: Counter[str], failures: Counter[str]
) -> None:
    print(
        f"\n{name}: {rounds} rounds, {events} events, {sum(faults.values())} faults "
        f"{dict(faults)}, ingest runs failed {sum(failures.values())} {dict(failures)}; "
        "losses 0, duplicates 0"
    )


def test_redis_restarted_killed_or_hung_mid_ingest_loses_and_doubles_nothing(
    tmp_path: Path, durable_redis: DurableRedis
) -> None:
    database = tmp_path / "qe.duckdb"
    faults, failures = fault_round(database, durable_redis, seed=31, events=400)
    with connect(database, read_only=True) as conn:
        ((raw,), (rejected,)) = conn.execute(
            "SELECT count(*) FROM raw_events UNION ALL SELECT count(*) FROM rejected_events"
        ).fetchall()
    ids, bad = expected_outcome(generate_events(400, seed=31, bad_share=0.05))
    assert (raw, rejected) == (len(ids), len(bad))  # exactly, not just a superset
    report("redis faults", 1, 400, faults, failures)
    assert sum(faults.values()) >= 3


@pytest.mark.slow
@pytest.mark.skipif(not SLOW_ROUNDS, reason="opt-in: set QE_SLOW_TRIALS=N (N/10 fault rounds)")
@pytest.mark.timeout(0)
def test_redis_faults_many_rounds(tmp_path: Path, durable_redis: DurableRedis) -> None:
    database = tmp_path / "qe.duckdb"
    faults: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    for round_ in range(SLOW_ROUNDS):
        injected, failed = fault_round(database, durable_redis, seed=100 + round_, events=400)
        faults.update(injected)
        failures.update(failed)
    report("slow redis faults", SLOW_ROUNDS, 400 * SLOW_ROUNDS, faults, failures)


def capture_kwargs(request_id: str) -> dict[str, Any]:
    event = make_event(request_id)
    return {k: event[k] for k in ("request_id", "question", "docs", "answer", "evaluation")}


def test_producer_while_redis_is_down_or_hung_spools_fast_and_the_next_run_ingests(
    tmp_path: Path, durable_redis: DurableRedis
) -> None:
    settings = Settings(
        data_dir=str(tmp_path / "data"), queue_url=durable_redis.url, spot_check_share=0.0
    )
    capture = QualityCapture(settings)
    assert capture(**capture_kwargs("while-up")).status == CaptureStatus.ENQUEUED

    outcomes: dict[str, tuple[CaptureStatus, float]] = {}
    durable_redis.stop()  # down: connections are refused
    started = time.monotonic()
    outcomes["while-down"] = (capture(**capture_kwargs("while-down")).status, 0.0)
    outcomes["while-down"] = (outcomes["while-down"][0], time.monotonic() - started)
    durable_redis.start()
    durable_redis.pause()  # hung: connections are accepted by the kernel, nothing answers
    try:
        started = time.monotonic()
        status = capture(**capture_kwargs("while-hung")).status
        outcomes["while-hung"] = (status, time.monotonic() - started)
    finally:
        durable_redis.resume()
    for request_id, (status, seconds) in outcomes.items():
        assert status == CaptureStatus.SPOOLED, request_id
        assert seconds < 2.0, f"{request_id}: capture took {seconds:.2f}s"
    spooled = [
        json.loads(line)["request_id"]
        for path in settings.inbox_dir.glob("*.jsonl")
        for line in path.read_text().splitlines()
    ]
    assert sorted(spooled) == ["while-down", "while-hung"]

    # The next run drains Redis and the spool: every event once. The hung RPUSH may also have
    # reached Redis after the pause; then it is a duplicate, not a second row.
    result = materialize(settings, selection=dg.AssetSelection.assets("raw_events"))
    assert result.success
    with connect(settings.database, read_only=True) as conn:
        raw = sorted(r[0] for r in conn.execute("SELECT request_id FROM raw_events").fetchall())
    assert raw == ["while-down", "while-hung", "while-up"]
    meta = metadata(result, "raw_events")
    assert meta["queue_depth_left"] == 0 and meta["rejected"] == 0
    assert not list(settings.inbox_dir.glob("*.jsonl"))
    print(
        "\ncapture while redis down/hung: "
        + ", ".join(f"{k} {s.value} in {t:.2f}s" for k, (s, t) in outcomes.items())
    )


# --- persistence: what a restart keeps ----------------------------------------------------------

VOLATILE = RedisServer.persistence  # the shared fixture's: no RDB, no AOF
PERSISTENCE = {
    "volatile": VOLATILE,
    "durable": DurableRedis.persistence,
    "aof_fsync_no": ("--save", "", "--appendonly", "yes", "--appendfsync", "no"),
    # Managed services often rename or disable CONFIG: INFO persistence still tells.
    "volatile_config_disabled": (*VOLATILE, "--rename-command", "CONFIG", ""),
    "durable_config_disabled": (*DurableRedis.persistence, "--rename-command", "CONFIG", ""),
}


def server_with(tmp_path: Path, persistence: tuple[str, ...]) -> DurableRedis:
    workdir = tmp_path / "redis"
    workdir.mkdir(exist_ok=True)
    server = DurableRedis(workdir)
    server.persistence = persistence
    server.start()
    return server


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("volatile", "no append-only file (appendonly no)"),
        ("durable", None),
        ("aof_fsync_no", "appendfsync no"),
        ("volatile_config_disabled", "no append-only file (appendonly no)"),
        ("durable_config_disabled", None),
    ],
)
def test_durability_warning_reads_the_servers_persistence(
    tmp_path: Path, kind: str, expected: str | None
) -> None:
    server = server_with(tmp_path, PERSISTENCE[kind])
    try:
        warning = RedisQueue(server.url).durability_warning()
    finally:
        server.stop()
    if expected is None:
        assert warning is None
    else:
        assert warning is not None and expected in warning and "--appendonly yes" in warning


def test_status_and_the_ingest_warn_about_a_volatile_redis(
    tmp_path: Path, redis_server: RedisServer, redis_url: str, durable_redis: DurableRedis
) -> None:
    from qe_assets_tests.test_cli import qe

    data = str(tmp_path / "data")
    volatile = qe("status", env={"QE_DATA_DIR": data, "QE_QUEUE_URL": redis_url}).stdout
    assert "WARNING: redis queue 'quality_events': the server has no append-only file" in volatile
    durable = qe("status", env={"QE_DATA_DIR": data, "QE_QUEUE_URL": durable_redis.url}).stdout
    assert "WARNING" not in durable and "queue (redis): 0 pending" in durable

    # The asset's metadata and log carry it too, so the UI shows it on every run.
    settings = Settings(data_dir=data, queue_url=redis_url)
    with dg.instance_for_test() as instance:
        result = materialize(
            settings, selection=dg.AssetSelection.assets("raw_events"), instance=instance
        )
        logged = [(e.level, e.user_message) for e in instance.all_logs(result.run_id)]
    assert "no append-only file" in metadata(result, "raw_events")["queue_durability"]
    assert any(lvl == logging.WARNING and "no append-only file" in m for lvl, m in logged)


@pytest.mark.parametrize("kind", ["durable", "volatile"])
def test_redis_sigkilled_mid_ingest_and_restarted_on_its_directory(
    tmp_path: Path, kind: str
) -> None:
    """The server dies (SIGKILL) between a claim and its commit and restarts on the same
    directory. With an append-only file fsynced on every write, every event is stored once;
    without one, the queue and the claimed batch vanish with the server, which is why the
    README requires a durable Redis and `qe status` warns about a volatile one."""
    server = server_with(tmp_path, PERSISTENCE[kind])
    database = tmp_path / "qe.duckdb"
    lines = generate_events(1000, seed=7)
    ids, _ = expected_outcome(lines)
    RedisQueue(server.url).put(lines)
    opened = 0

    def connection() -> Any:
        nonlocal opened
        opened += 1
        if opened == 4:  # the third batch is claimed, not committed
            server.crash()
            server.start()
        return connect(database)

    try:
        for _ in range(5):  # as the next scheduled runs would
            try:
                ingest_pending(RedisQueue(server.url), connection, batch_size=100)
                break
            except QueueUnavailable:
                continue
        with connect(database, read_only=True) as conn:
            raw = [r[0] for r in conn.execute("SELECT request_id FROM raw_events").fetchall()]
        assert len(raw) == len(set(raw)), "doubled"
        client = server.client()
        assert client.llen(REDIS_LIST) == client.llen(PROCESSING) == 0
        if kind == "durable":
            assert set(raw) == ids, f"lost {len(ids - set(raw))}"
            assert RedisQueue(server.url).durability_warning() is None
        else:
            # Only the three batches read before the kill are stored; the rest vanished.
            assert len(raw) <= 300 and len(ids - set(raw)) > 600
            assert RedisQueue(server.url).durability_warning() is not None
        print(f"\nredis {kind}, SIGKILL mid-ingest: {len(ids - set(raw))} of {len(ids)} lost")
    finally:
        server.stop()
