"""The `vllm` model server: `vllm serve BASE --enable-lora` as a managed subprocess, for a
machine with vLLM and a GPU; each adapter is then loaded by its served name through vLLM's
runtime LoRA loading (`POST /v1/load_lora_adapter {"lora_name", "lora_path"}`).

The same lifecycle as the `transformers` engine (transformers_engine.py): binds 127.0.0.1 on a
free port, waits until `/v1/models` answers (else fails with the last lines of its log), runs in
a process group of its own that `stop` ends, and never reaches a model hub (HF_HUB_OFFLINE=1).

Flags, from vLLM's documentation (LoRA adapters, engine arguments):
* `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` in its environment: without it `/v1/load_lora_adapter`
  does not exist.
* `--enable-lora`, and `--max-lora-rank`: vLLM allocates LoRA buffers for that rank and refuses
  an adapter of a higher one. It must be one of vLLM's choices (1, 8, 16, 32, 64, 128, 256, 320,
  512): the adapters' largest `r`, rounded up to the next choice.
* `--max-loras 2`: LoRAs in one batch; the gate asks the candidate and production (an earlier
  adapter) side by side.
* `--served-model-name model_rag_qa_base`: the base answers under its served name, like the
  `transformers` engine's.

Not run on this machine (no GPU, no vLLM): the tests start a stand-in `vllm` executable that
takes these arguments and serves the project's OpenAI-compatible test server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path

from qe_assets.finetune.serving.folders import BASE_NAME, ServingError, load_lora_adapter
from qe_assets.finetune.serving.transformers_engine import (
    READY_SECONDS,
    ServerProcess,
    free_port,
)
from qe_assets.finetune.serving.transformers_engine import _tail as log_tail

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MAX_LORAS = 2
# Loading a large base on a GPU takes minutes (weights, CUDA graphs).
VLLM_READY_SECONDS = max(READY_SECONDS, 900.0)


def max_lora_rank(adapters: list[str | Path]) -> int:
    """The `--max-lora-rank` that fits every adapter: their largest `r` (adapter_config.json),
    rounded up to one of vLLM's choices."""
    ranks = [
        int(json.loads((Path(a) / "adapter_config.json").read_text("utf-8"))["r"]) for a in adapters
    ]
    needed = max(ranks, default=MAX_LORA_RANKS[2])
    for choice in MAX_LORA_RANKS:
        if choice >= needed:
            return choice
    raise ServingError(f"LoRA rank {needed} is above vLLM's largest, {MAX_LORA_RANKS[-1]}")


@dataclass
class VllmServer(ServerProcess):
    """`vllm serve base` with the adapters {served name: folder} loaded by name once it answers."""

    base: str
    adapters: dict[str, str]
    log_dir: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    stop_grace_seconds = 30.0  # a GPU engine frees its memory before it exits

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        executable = shutil.which("vllm")
        if executable is None:
            raise ServingError("QE_MODEL_SERVER=vllm: no `vllm` executable on PATH")
        return [
            executable,
            "serve",
            self.base,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--served-model-name",
            BASE_NAME,
            "--enable-lora",
            "--max-lora-rank",
            str(max_lora_rank(list(self.adapters.values()))),
            "--max-loras",
            str(MAX_LORAS),
        ]

    def start(self, ready_seconds: float = VLLM_READY_SECONDS) -> VllmServer:
        """Start the server, wait until it answers, load every adapter by name; raises
        ServingError with the last lines of its log when it dies, does not answer in time, or
        refuses an adapter (and stops it then)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        log_path = self.log_dir / "vllm.log"
        env = {
            **os.environ,
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its engine workers are its children: stopped with it
            )
        deadline = time.monotonic() + ready_seconds
        while not self.healthy():
            if self.process.poll() is not None:
                raise ServingError(f"vllm serve exited: {log_tail(log_path)}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServingError(
                    f"vllm serve did not answer in {ready_seconds:.0f} s: {log_tail(log_path)}"
                )
            time.sleep(0.25)
        try:
            for name, path in self.adapters.items():
                self.load(name, path)
        except ServingError:
            self.stop()
            raise
        return self

    def load(self, name: str, path: str) -> None:
        try:
            load_lora_adapter(self.base_url, name, path, timeout=300)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:300]
            raise ServingError(
                f"vllm serve refused adapter {name}: HTTP {exc.code} {detail}"
            ) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise ServingError(f"vllm serve did not load adapter {name}: {exc}") from exc

    def __enter__(self) -> VllmServer:
        return self.start() if self.process is None else self
