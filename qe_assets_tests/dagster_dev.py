"""A real `dagster dev` (webserver + daemon + code server) on a free loopback port, for tests.

It runs in its own session so teardown can kill the whole process group: `dagster dev` spawns
the webserver, the daemon and a code server, and terminating only the parent can leave them
behind holding the port and the DAGSTER_HOME.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from qe_assets_tests.conftest import free_port

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class DagsterDev:
    def __init__(self, dagster_home: Path, env: dict[str, str], log_path: Path) -> None:
        self.dagster_home = dagster_home
        self.env = {**env, "DAGSTER_HOME": str(dagster_home)}
        self.log_path = log_path
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def start(
        self, timeout: float = 90.0, command: list[str] | None = None, cwd: Path = PROJECT_ROOT
    ) -> None:
        """Start `command` (default: the venv's `dagster dev` on `self.port`) and wait until the
        webserver serves the loaded code location."""
        if command is None:
            dagster = Path(sys.executable).with_name("dagster")
            command = [str(dagster), "dev", "-h", "127.0.0.1", "-p", str(self.port)]
            command += ["-w", "workspace.yaml"]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"dagster dev exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            if self._code_location_loaded():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"dagster dev not ready on {self.url} within {timeout:.0f}s:\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def _code_location_loaded(self) -> bool:
        """The webserver answers GraphQL and the `qe_assets` location has loaded its assets."""
        try:
            entries = self.location_entries(timeout=5)
        except (OSError, ValueError):
            return False
        return any(
            e["loadStatus"] == "LOADED"
            and e["locationOrLoadError"]["__typename"] == "RepositoryLocation"
            for e in entries
        )

    def location_entries(self, timeout: float = 10) -> list[dict[str, Any]]:
        """The workspace's code locations: name, load status, location or its load error."""
        data = self.graphql(
            """
            query {
              workspaceOrError {
                ... on Workspace {
                  locationEntries {
                    name
                    loadStatus
                    locationOrLoadError { __typename }
                  }
                }
              }
            }
            """,
            timeout=timeout,
        )
        return data.get("workspaceOrError", {}).get("locationEntries") or []

    def graphql(
        self, query: str, variables: dict[str, Any] | None = None, timeout: float = 10
    ) -> dict[str, Any]:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(
            f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
        if payload.get("errors"):
            raise ValueError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]

    def runs(self) -> list[dict[str, Any]]:
        """Every run of the instance, newest first: id, job name, status."""
        data = self.graphql(
            "query { runsOrError { ... on Runs { results { runId jobName status } } } }"
        )
        return data["runsOrError"]["results"]

    def wait_for_run(self, job_name: str, known: set[str], timeout: float) -> dict[str, Any]:
        """The first run of `job_name` not in `known`, once it has finished (any outcome)."""
        deadline = time.monotonic() + timeout
        run: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            fresh = [r for r in self.runs() if r["jobName"] == job_name and r["runId"] not in known]
            if fresh:
                run = fresh[-1]
                if run["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
                    return run
            time.sleep(0.5)
        raise AssertionError(
            f"no finished {job_name} run within {timeout:.0f}s (last seen: {run}):\n"
            f"{self.log_tail()}"
        )

    def stop(self) -> None:
        """SIGTERM the whole process group, then SIGKILL whatever is left after 45 s (`qe ui`
        gives dagster dev 30 s before it kills the process groups of its children)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=45)
        # Children may outlive the parent that handled SIGTERM: sweep the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        self.process = None
