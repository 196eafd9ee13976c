"""The model server as a resource of its own (key `model_server`, QE_MODEL_SERVER): where a
locally trained adapter is served under its stable name, so the gate, `qe models` and the RAG
service all ask for `model_rag_qa_vNNN`.

* `none`: nothing is served here; map names yourself (QE_EVAL_MODEL_MAP).
* `external`: your server at QE_MODEL_SERVER_URL. A new adapter is registered there by name
  through vLLM's runtime LoRA loading (`POST /v1/load_lora_adapter`, vLLM started with
  `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True --enable-lora`); a server without that route is told
  nothing, and the run's metadata says what to run (docs/serving.md).
* `transformers`: served folders in `<data>/served/` for `transformers serve`
  (transformers_engine.py), which this project starts.
* `vllm`: `vllm serve BASE --enable-lora` (vllm_engine.py), which this project starts when vLLM
  and a GPU are here (checked when the settings load), each adapter loaded by its served name
  through `/v1/load_lora_adapter`. The adapters to load are kept in `<data>/served/vllm.json`.

Every registration is also written to `<data>/served/names.json` (model id → served name),
which the gate reads to ask a model under its served name.
"""

from __future__ import annotations

import json
import os
import urllib.error
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from qe_assets.finetune.serving.folders import (
    BASE_NAME,
    ServingError,
    is_adapter,
    load_lora_adapter,
    serve_adapter,
    serve_base,
    served_name,
)
from qe_assets.finetune.serving.transformers_engine import TransformersServer
from qe_assets.finetune.serving.vllm_engine import VllmServer
from qe_assets.settings import Settings

NAMES_FILE = "names.json"
VLLM_FILE = "vllm.json"  # the `vllm` kind's base and adapters: what `vllm serve` loads


@dataclass(frozen=True)
class Registration:
    """How a trained adapter is served: its name, its base's name, and whether the server was
    told (False: `note` says what to run)."""

    name: str
    base_name: str
    loaded: bool
    note: str | None = None

    def metadata(self) -> dict[str, Any]:
        out: dict[str, Any] = {"served_as": self.name, "base_served_as": self.base_name}
        if self.note:
            out["serving_note"] = self.note
        return out


def served_names(data_dir: str | Path) -> dict[str, str]:
    """model id (or base model) → the name it is served under; {} when nothing was registered."""
    path = Path(data_dir) / "served" / NAMES_FILE
    try:
        return dict(json.loads(path.read_text("utf-8")))
    except (OSError, ValueError):
        return {}


def _record_names(served_dir: Path, names: dict[str, str]) -> None:
    """Merge into names.json, written whole and renamed into place."""
    current = served_names(served_dir.parent)
    if all(current.get(k) == v for k, v in names.items()):
        return
    served_dir.mkdir(parents=True, exist_ok=True)
    temp = served_dir / f".{NAMES_FILE}.{os.getpid()}.tmp"
    temp.write_text(json.dumps({**current, **names}, indent=1, sort_keys=True), "utf-8")
    os.replace(temp, served_dir / NAMES_FILE)


def vllm_state(served_dir: Path) -> tuple[str | None, dict[str, str]]:
    """(base, {served name: adapter folder}) for `vllm serve`: the newest registration's base and
    every adapter trained on it (one server serves one base)."""
    try:
        state = json.loads((served_dir / VLLM_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        return None, {}
    base = state.get("base")
    adapters = state.get("adapters", {})
    return base, {n: a["path"] for n, a in sorted(adapters.items()) if a["base"] == base}


def _record_vllm(served_dir: Path, name: str, path: str, base: str) -> None:
    """Merge into vllm.json, written whole and renamed into place."""
    try:
        state = json.loads((served_dir / VLLM_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        state = {}
    adapters = {**state.get("adapters", {}), name: {"path": path, "base": base}}
    served_dir.mkdir(parents=True, exist_ok=True)
    temp = served_dir / f".{VLLM_FILE}.{os.getpid()}.tmp"
    temp.write_text(
        json.dumps({"base": base, "adapters": adapters}, indent=1, sort_keys=True), "utf-8"
    )
    os.replace(temp, served_dir / VLLM_FILE)


class ModelServerResource(dg.ConfigurableResource):
    """What serves locally trained adapters (QE_MODEL_SERVER, QE_MODEL_SERVER_URL)."""

    kind: str = Field("none", description=Settings.model_fields["model_server"].description)
    url: str | None = Field(None, description=Settings.model_fields["model_server_url"].description)
    data_dir: str = Field("data", description="Where `served/` is kept (QE_DATA_DIR).")

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelServerResource:
        return cls(
            kind=settings.model_server, url=settings.model_server_url, data_dir=settings.data_dir
        )

    @property
    def served_dir(self) -> Path:
        return Path(self.data_dir) / "served"

    @property
    def configured(self) -> bool:
        return self.kind != "none"

    @property
    def route_url(self) -> str | None:
        """The base URL the RAG service calls the served models at, written into rollout.json
        (`qe_assets.service.choose`): the `external` server's URL; for `transformers`,
        QE_MODEL_SERVER_URL when set (where you run the engine on `<data>/served` for traffic,
        docs/serving.md: the server the gate starts lives for the evaluation only)."""
        return self.url if self.configured else None

    @contextmanager
    def serving(self) -> Iterator[str | None]:
        """The base URL that serves the registered models for the duration of the block: the
        `transformers` server started here (and stopped after), the external server's URL, or
        None (`none`: the evaluation's own endpoint settings apply)."""
        if self.kind == "transformers":
            with TransformersServer(self.served_dir) as server:
                yield server.base_url
        elif self.kind == "vllm":
            base, adapters = vllm_state(self.served_dir)
            if base is None:
                raise ServingError(
                    "QE_MODEL_SERVER=vllm: no adapter registered yet, nothing to serve"
                )
            with VllmServer(base, adapters, self.served_dir) as server:
                yield server.base_url
        else:
            yield self.url if self.kind == "external" else None

    def register(self, model_id: str, version: str, base_model: str) -> Registration | None:
        """Serve the adapter `model_id` (a folder) trained on `base_model` as
        `model_rag_qa_<version>`; None when no server is configured."""
        if not self.configured:
            return None
        name = served_name(version)
        if self.kind == "transformers":
            serve_adapter(self.served_dir, name, model_id, base_model)
            base_name = base_model
            if Path(base_model).is_dir():
                serve_base(self.served_dir, base_model)
                base_name = BASE_NAME
            registration = Registration(name, base_name, loaded=True)
        elif self.kind == "vllm":
            registration = self._register_vllm(name, model_id, base_model)
        else:
            registration = self._load_external(name, model_id, base_model)
        _record_names(
            self.served_dir,
            {model_id: registration.name, base_model: registration.base_name},
        )
        return registration

    def _register_vllm(self, name: str, model_id: str, base_model: str) -> Registration:
        """Recorded for `vllm serve` to load by name when it starts (`serving`)."""
        path = str(Path(model_id).resolve())
        if not is_adapter(path):
            raise ServingError(f"{path} holds no adapter_config.json: not a PEFT adapter")
        base = str(Path(base_model).resolve()) if Path(base_model).exists() else base_model
        _record_vllm(self.served_dir, name, path, base)
        return Registration(name, BASE_NAME, loaded=True)

    def _load_external(self, name: str, model_id: str, base_model: str) -> Registration:
        assert self.url, "QE_MODEL_SERVER_URL is checked when the settings load"
        path = str(Path(model_id).resolve()) if Path(model_id).exists() else model_id
        if Path(path).exists() and not is_adapter(path):
            raise ServingError(f"{path} holds no adapter_config.json: not a PEFT adapter")
        try:
            load_lora_adapter(self.url, name, path, timeout=120)
        except urllib.error.HTTPError as exc:
            if exc.code not in (404, 405):
                detail = exc.read().decode("utf-8", "replace")[:300]
                message = f"{self.url} refused adapter {name}: HTTP {exc.code} {detail}"
                raise ServingError(message) from exc
            # No runtime LoRA loading there (Ollama, llama.cpp, vLLM without the flag).
            note = (
                f"{self.url} cannot load adapters at run time: serve {path} as {name} yourself, "
                f"e.g. `vllm serve {base_model} --enable-lora --lora-modules {name}={path}`"
            )
            return Registration(name, base_model, loaded=False, note=note)
        except (urllib.error.URLError, OSError) as exc:
            raise ServingError(f"the model server {self.url} is unreachable: {exc}") from exc
        return Registration(name, base_model, loaded=True)
