"""The Dagster instance on PostgreSQL: `qe run` records its runs and events there.

A throwaway PostgreSQL server (Debian's `postgresql` package, which `make test` installs) is
started with initdb into a temp dir, listening on a free 127.0.0.1 port with its unix socket in
that dir. PostgreSQL refuses to run as root, so as root the server runs as `nobody`. The pipeline
itself runs unchanged (`qe run --cut-version` in a subprocess); only `$DAGSTER_HOME/dagster.yaml`
differs: it is examples/scaling/dagster-postgres.yaml, copied as it is documented in
docs/scaling-out.md. DuckDB stays the data store.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from qe_assets.ingest.queues import FileInbox
from qe_assets.ops.demo import generate_events
from qe_assets.ops.runner import DAGSTER_YAML
from qe_assets_tests.conftest import free_port

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "scaling" / "dagster-postgres.yaml"

PG_USER = "qe"
PG_PASSWORD = "qe-test-password"
PG_DATABASE = "dagster"
START_TIMEOUT = 30.0
EVENTS = 300


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin/initdb: the newest major version first.
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.parent.name))


def find_postgres_bin() -> Path | None:
    """The directory holding `initdb` and `postgres`: on PATH, else Debian's versioned dirs."""
    candidates = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve())
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=_version_key, reverse=True
    )
    for initdb in candidates:
        if os.access(initdb, os.X_OK) and os.access(initdb.parent / "postgres", os.X_OK):
            return initdb.parent
    return None


@dataclass
class PostgresServer:
    """initdb + postgres as an unprivileged user; `stop` is safe to call in any state."""

    bindir: Path
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="qe-pg-")))
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        # As root, drop to `nobody` (Popen's user/group: setuid in the child, no su/sudo); the
        # temp dir, not pytest's (its root is 0700 root), must then belong to that user.
        self.owner: tuple[int, int] | None = None
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            self.owner = (nobody.pw_uid, nobody.pw_gid)
            os.chown(self.root, *self.owner)
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"

    def _popen_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"cwd": self.root, "env": {**os.environ, "LC_ALL": "C.UTF-8"}}
        if self.owner is not None:
            kwargs.update(user=self.owner[0], group=self.owner[1], extra_groups=[])
        return kwargs

    def start(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(PG_PASSWORD + "\n")
        if self.owner is not None:
            os.chown(pwfile, *self.owner)
        # Password auth over TCP, as a deployment would have; trust only on the private socket.
        initdb = [str(self.bindir / "initdb"), "--pgdata", str(self.data), "--username", PG_USER]
        initdb += ["--pwfile", str(pwfile), "--auth-host=scram-sha-256", "--auth-local=trust"]
        initdb += ["--encoding=UTF8", "--locale=C", "--no-sync"]
        done = subprocess.run(
            initdb, capture_output=True, text=True, timeout=60, **self._popen_kwargs()
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}): {done.stderr}")
        # 127.0.0.1 only; the unix socket in the temp dir, not /var/run/postgresql. No
        # durability needed for a throwaway server.
        server = [str(self.bindir / "postgres"), "-D", str(self.data), "-k", str(self.root)]
        server += ["-h", "127.0.0.1", "-p", str(self.port)]
        for setting in ("fsync=off", "synchronous_commit=off", "full_page_writes=off"):
            server += ["-c", setting]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                server, stdout=log, stderr=subprocess.STDOUT, **self._popen_kwargs()
            )
        self._wait_ready()
        with closing(self.connect("postgres")) as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE {PG_DATABASE}")

    def connect(self, db_name: str = PG_DATABASE):  # -> psycopg2 connection
        import psycopg2

        return psycopg2.connect(
            host="127.0.0.1",
            port=self.port,
            user=PG_USER,
            password=PG_PASSWORD,
            dbname=db_name,
            connect_timeout=2,
        )

    def _wait_ready(self) -> None:
        import psycopg2

        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self.process is not None
            try:
                self.connect("postgres").close()
                return
            except psycopg2.OperationalError as exc:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"postgres did not start ({exc}); log:\n{self.log_tail()}"
                    ) from None
                time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # "fast" shutdown: ends sessions, no wait
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()  # postmaster gone → its backends exit on their own
                self.process.wait(timeout=10)
        self.process = None
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    bindir = find_postgres_bin()
    if bindir is None:
        pytest.skip(
            "no PostgreSQL initdb found (PATH or /usr/lib/postgresql/*/bin): "
            "`make test` installs Debian's postgresql package"
        )
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def instance_env(server: PostgresServer) -> dict[str, str]:
    """What examples/scaling/dagster-postgres.yaml reads from the environment."""
    return {
        "DAGSTER_PG_HOST": "127.0.0.1",
        "DAGSTER_PG_PORT": str(server.port),
        "DAGSTER_PG_USERNAME": PG_USER,
        "DAGSTER_PG_PASSWORD": PG_PASSWORD,
        "DAGSTER_PG_DB": PG_DATABASE,
    }


def test_example_keeps_the_blocks_qe_run_writes() -> None:
    """The documented file differs from the default dagster.yaml by its storage block only."""
    example = yaml.safe_load(EXAMPLE.read_text())
    default = yaml.safe_load(DAGSTER_YAML)
    assert set(example) - set(default) == {"storage"}
    assert {key: example[key] for key in default} == default


@pytest.mark.postgres
def test_qe_run_records_runs_and_materializations_in_postgres(
    postgres: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dagster as dg
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

    data, home = tmp_path / "data", tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(EXAMPLE, home / "dagster.yaml")  # the documented file, unchanged
    FileInbox(data / "inbox").put(generate_events(EVENTS, seed=11, bad_share=0.02))

    # The user's QE_* settings (a Redis queue, an LLM) must not leak into this run.
    env = {k: v for k, v in os.environ.items() if not k.startswith("QE_")}
    env.update(QE_DATA_DIR=str(data), DAGSTER_HOME=str(home), **instance_env(postgres))
    run = subprocess.run(
        [sys.executable, "-m", "qe_assets.cli", "run", "--cut-version"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\npostgres log:\n{postgres.log_tail()}"
    assert "tuning_dataset: " in run.stdout and "version=v001" in run.stdout, run.stdout
    # Nothing fell back to the default SQLite storage under DAGSTER_HOME.
    assert not list(home.rglob("*.db")), list(home.rglob("*.db"))

    for name, value in instance_env(postgres).items():
        monkeypatch.setenv(name, value)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)

        runs = instance.get_runs()
        assert sorted(r.job_name for r in runs) == ["qe_pipeline", "qe_release"]
        assert {r.status for r in runs} == {dg.DagsterRunStatus.SUCCESS}

        for asset in ("raw_events", "annotated_samples", "completions", "tuning_dataset"):
            event = instance.get_latest_materialization_event(dg.AssetKey(asset))
            assert event is not None, f"no materialization of {asset} in the instance"
        latest = instance.get_latest_materialization_event(dg.AssetKey("tuning_dataset"))
        assert latest is not None and latest.asset_materialization is not None
        assert latest.asset_materialization.metadata["version"].value == "v001"

    # And the rows really are in PostgreSQL, in the tables Dagster's schema defines.
    with closing(postgres.connect()) as conn, conn.cursor() as cur:
        cur.execute("SELECT status, count(*) FROM runs GROUP BY status")
        assert dict(cur.fetchall()) == {"SUCCESS": 2}
        cur.execute(
            "SELECT count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'"
        )
        assert cur.fetchone()[0] >= 4
