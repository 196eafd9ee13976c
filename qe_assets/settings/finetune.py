"""Fine-tuning: the backend and its knobs."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from qe_assets.settings.parsing import (
    DEFAULT_BASE_MODEL,
    FINETUNE_BACKENDS,
    FINETUNE_METHODS,
    MODEL_SERVERS,
    _bool,
    _choice,
    _float,
    _json_object,
    _text,
)

# field name → (environment variable, parser). Defaults live on the model below.
ENVIRONMENT: dict[str, tuple[str, Callable[[str], Any]]] = {
    "finetune_backend": (
        "QE_FINETUNE_BACKEND",
        _choice("QE_FINETUNE_BACKEND", FINETUNE_BACKENDS),
    ),
    "finetune_base_model": ("QE_FINETUNE_BASE_MODEL", _text),
    "finetune_suffix": ("QE_FINETUNE_SUFFIX", _text),
    "finetune_allow_naive": ("QE_FINETUNE_ALLOW_NAIVE", _bool("QE_FINETUNE_ALLOW_NAIVE")),
    "finetune_hyperparameters": (
        "QE_FINETUNE_HYPERPARAMETERS",
        _json_object("QE_FINETUNE_HYPERPARAMETERS"),
    ),
    "finetune_command": ("QE_FINETUNE_COMMAND", _text),
    "finetune_k8s": ("QE_FINETUNE_K8S", _json_object("QE_FINETUNE_K8S")),
    "train_max_dropped_share": (
        "QE_TRAIN_MAX_DROPPED_SHARE",
        _float("QE_TRAIN_MAX_DROPPED_SHARE", 0.0, 1.0),
    ),
    "finetune_method": ("QE_FINETUNE_METHOD", _choice("QE_FINETUNE_METHOD", FINETUNE_METHODS)),
    "finetune_poll_seconds": (
        "QE_FINETUNE_POLL_SECONDS",
        _float("QE_FINETUNE_POLL_SECONDS", 0.0, None),
    ),
    "finetune_deadline_seconds": (
        "QE_FINETUNE_DEADLINE_SECONDS",
        _float("QE_FINETUNE_DEADLINE_SECONDS", 0.0, None),
    ),
    "model_server": ("QE_MODEL_SERVER", _choice("QE_MODEL_SERVER", MODEL_SERVERS)),
    "model_server_url": ("QE_MODEL_SERVER_URL", _text),
}


class FinetuneSettings(BaseModel):
    """Fine-tuning: the backend and its knobs."""

    model_config = ConfigDict(frozen=True)

    finetune_backend: str = Field(
        "none",
        description="`none` (write the recipe only), `openai` "
        "(a fine-tuning job) or `command` (`QE_FINETUNE_COMMAND` through Dagster Pipes).",
    )
    finetune_base_model: str = Field(
        DEFAULT_BASE_MODEL,
        description="Base model of "
        "fine-tuning jobs; a round continues from the newest model of the same backend.",
    )
    finetune_suffix: str = Field("qe", description="Suffix of `openai` fine-tuning jobs.")
    finetune_allow_naive: bool = Field(
        False,
        description="Let `openai` / `command` train on a "
        "version whose completions are mostly `naive`.",
    )
    finetune_hyperparameters: dict[str, Any] = Field(
        {}, description="Hyperparameters of `openai` fine-tuning jobs."
    )
    finetune_command: str | None = Field(
        None,
        description="The training command of the "
        "`command` backend, e.g. `python examples/finetune_trl_lora.py`; a leading bare "
        "`python` is the interpreter running Dagster, not PATH's.",
    )
    finetune_k8s: dict[str, Any] = Field(
        {},
        description="Set: the `command` backend runs its command as a Kubernetes pod through "
        "Dagster Pipes (`image` required; docs/scaling-out.md). Unset: a local subprocess.",
    )
    train_max_dropped_share: float = Field(
        0.01,
        description="A local training run (`command`) is refused when a larger share of its "
        "samples would not fit `max_length` even without their context documents.",
    )
    finetune_method: str = Field(
        "sft",
        description="`sft` (chat/record files) or `dpo` (the "
        "preference pairs; `openai` sends `method: dpo`).",
    )
    finetune_poll_seconds: float = Field(30.0, description="Polling interval of an `openai` job.")
    finetune_deadline_seconds: float = Field(
        4 * 3600.0,
        description="How long one run follows "
        "an `openai` job; past it the asset fails and a re-run resumes the same job.",
    )
    model_server: str = Field(
        "none",
        description="What serves locally trained adapters (docs/serving.md): `none`; `external` "
        "(your vLLM / SGLang / Ollama / llama.cpp server at `QE_MODEL_SERVER_URL`); "
        "`transformers` (`transformers serve`, started here, CPU or one GPU); `vllm` (`vllm serve "
        "BASE --enable-lora`, started here; needs vLLM and a GPU, checked at load).",
    )
    model_server_url: str | None = Field(
        None,
        description="The `external` model server's OpenAI-compatible URL, e.g. "
        "`http://127.0.0.1:8000/v1`; with `transformers`, where you serve `<data>/served` for "
        "the RAG service. Written into `rollout.json` for the served models.",
    )


def vllm_unavailable(env: Mapping[str, str]) -> str | None:
    """Why QE_MODEL_SERVER=vllm cannot start vLLM on this machine (no `vllm` on PATH, or no GPU:
    `nvidia-smi -L` lists none), in one line saying what to set instead; None when it can."""
    path = env.get("PATH")
    missing = None
    if shutil.which("vllm", path=path) is None:
        missing = "vLLM is not installed (no `vllm` on PATH)"
    else:
        smi = shutil.which("nvidia-smi", path=path)
        try:
            listed = smi is not None and subprocess.run(
                [smi, "-L"], capture_output=True, text=True, timeout=20, check=False
            ).stdout.lstrip().startswith("GPU")
        except (OSError, subprocess.SubprocessError):
            listed = False
        if not listed:
            missing = "no GPU here (`nvidia-smi -L` lists none)"
    if missing is None:
        return None
    return (
        f"QE_MODEL_SERVER=vllm starts vLLM on this machine, but {missing}: set "
        "QE_MODEL_SERVER=external with QE_MODEL_SERVER_URL (a vLLM server elsewhere) or "
        "QE_MODEL_SERVER=transformers (CPU or one GPU)"
    )
