"""A real Arize Phoenix server for the importer's tests and benchmark, from the venv `make phoenix`
builds (`.venv-phoenix`; its dependencies conflict with Dagster's, hence a venv of its own).

`QE_TEST_PHOENIX` names that venv's `phoenix` executable; its python runs `phoenix_launch.py`
(Phoenix on 127.0.0.1 only, telemetry off, no external resources, its own working directory)
and `phoenix_sender.py` (traces over OTLP, judgements over the REST API)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

PHOENIX_VARIABLE = "QE_TEST_PHOENIX"
_HERE = Path(__file__).parent


def phoenix_executable() -> Path | None:
    """The `phoenix` of QE_TEST_PHOENIX, or None when the variable is unset."""
    raw = os.environ.get(PHOENIX_VARIABLE, "").strip()
    return Path(raw) if raw else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PhoenixServer:
    """`api_key` set: Phoenix with authentication, that key its admin secret (a bearer token
    for the REST API and OTLP); unset: no authentication."""

    def __init__(self, executable: Path, workdir: Path, api_key: str | None = None) -> None:
        self.python = executable.with_name("python")
        if not self.python.exists():
            raise RuntimeError(f"{PHOENIX_VARIABLE}={executable}: no python beside it")
        self.workdir = workdir
        self.port = _free_port()
        self.grpc_port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.api_key = api_key

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self, timeout: float = 90.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "PHOENIX_WORKING_DIR": str(self.workdir),
            "PHOENIX_TELEMETRY_ENABLED": "false",
            "PHOENIX_ALLOW_EXTERNAL_RESOURCES": "false",
            "PHOENIX_HOST": "127.0.0.1",
            "PHOENIX_PORT": str(self.port),
            "PHOENIX_GRPC_PORT": str(self.grpc_port),
        }
        if self.api_key:
            # JWT signing secret: 32+ characters with a digit and a lowercase letter.
            env["PHOENIX_ENABLE_AUTH"] = "true"
            env["PHOENIX_SECRET"] = f"s3cret{uuid.uuid4().hex}"
            env["PHOENIX_ADMIN_SECRET"] = self.api_key
        log = open(self.workdir / "phoenix.log", "wb")  # noqa: SIM115 (the child writes it)
        self.process = subprocess.Popen(
            [str(self.python), str(_HERE / "phoenix_launch.py")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = (self.workdir / "phoenix.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"phoenix did not start on {self.url}:\n{tail}")
            time.sleep(0.25)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def _sender(self, project: str, spec: dict[str, Any]) -> list[dict[str, str]]:
        result = subprocess.run(
            [str(self.python), str(_HERE / "phoenix_sender.py"), self.url, project],
            input=json.dumps(spec, ensure_ascii=False).encode(),
            env={**os.environ, "PHOENIX_SENDER_TOKEN": self.api_key or ""},
            capture_output=True,
            timeout=900,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(result.stderr.decode(errors="replace")[-3000:])
        return json.loads(result.stdout)

    def send(
        self,
        project: str,
        traces: list[dict[str, Any]],
        annotations: list[dict[str, Any]] = (),  # type: ignore[assignment]
    ) -> list[dict[str, str]]:
        """Export `traces` (phoenix_sender.py's spec) and judge them; their ids, in order."""
        return self._sender(project, {"traces": traces, "annotations": list(annotations)})

    def annotate(
        self, project: str, ids: list[dict[str, str]], annotations: list[dict[str, Any]]
    ) -> None:
        self._sender(project, {"ids": ids, "annotations": annotations})

    def root_count(self, project: str) -> int:
        """Root spans stored so far (Phoenix inserts exported spans asynchronously)."""
        count, cursor = 0, None
        while True:
            query = f"parent_id=null&limit=1000{f'&cursor={cursor}' if cursor else ''}"
            try:
                request = urllib.request.Request(
                    f"{self.url}/v1/projects/{project}/spans?{query}", headers=self._headers()
                )
                with urllib.request.urlopen(request, timeout=30) as response:
                    body = json.loads(response.read())
            except urllib.error.HTTPError:
                return 0
            count += len(body["data"])
            cursor = body.get("next_cursor")
            if not cursor:
                return count
