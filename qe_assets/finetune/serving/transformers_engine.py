"""The `transformers` model server: `transformers serve` (transformers' own OpenAI-compatible
server) as a managed subprocess, for CPU or one GPU, evaluation and small models.

Why this engine: it is the reference implementation of the models it serves (the same
`generate` and chat template the training used, so a served adapter answers exactly what
`PeftModel.generate` answers: checked by test_serving.py), it runs offline on a CPU, it needs
two small packages beyond the `train` extra (fastapi, uvicorn), and it loads each model by name
on demand. It has no adapter flag: it serves the served folders (folders.py) that make a PEFT
adapter look like a model. vLLM is the engine for throughput on a GPU.

The server runs in `<data>/served/`, so a model name in a request (`model_rag_qa_v001`) is the
folder it loads; it binds 127.0.0.1 on a free port, never reaches a model hub
(HF_HUB_OFFLINE=1), and runs in a process group of its own that `stop` ends with its engines.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from qe_assets.finetune.serving.folders import ServingError

READY_SECONDS = 120.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def transformers_cli() -> list[str]:
    """`transformers` of this environment, by module so no PATH lookup can find another one."""
    return [sys.executable, "-m", "transformers.cli.transformers"]


class ServerProcess:
    """What every engine this resource starts shares: its process group (started with
    `start_new_session`), stopped as a whole, and its OpenAI-compatible `/models` as health."""

    process: subprocess.Popen[bytes] | None
    # A large model takes a while to release its memory before it exits.
    stop_grace_seconds: float = 10.0

    @property
    def base_url(self) -> str:
        raise NotImplementedError

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=self.stop_grace_seconds)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class TransformersServer(ServerProcess):
    served_dir: Path
    device: str = "cpu"
    port: int = 0
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, ready_seconds: float = READY_SECONDS) -> TransformersServer:
        """Start the server and wait until it answers; raises ServingError with the last lines
        of its log when it dies or does not answer in time."""
        self.served_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        log_path = self.log_path or self.served_dir / "server.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        command = [
            *transformers_cli(),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--device",
            self.device,
        ]
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=self.served_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its engines are its children: stopped with it
            )
        deadline = time.monotonic() + ready_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServingError(f"transformers serve exited: {_tail(log_path)}")
            if self.healthy():
                return self
            time.sleep(0.25)
        self.stop()
        raise ServingError(
            f"transformers serve did not answer in {ready_seconds:.0f} s: {_tail(log_path)}"
        )

    def __enter__(self) -> TransformersServer:
        return self.start() if self.process is None else self


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text("utf-8", "replace").splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(line.strip() for line in text[-lines:] if line.strip())[-1500:]
