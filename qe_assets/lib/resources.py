"""Resources every part of the loop shares: the settings, the DuckDB store and the LLM client.

The queue (`qe_assets.ingest.resource`) and the fine-tune backend (`qe_assets.finetune.resource`)
live with their parts; `qe_assets.ops.definitions.build_resources` puts them all together."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource
from pydantic import Field, model_validator

from qe_assets.settings import (
    FinetuneBackend,
    FinetuneMethod,
    Settings,
    finetune_backend_problem,
    parse_target,
)
from qe_assets.store import (
    WriterSession,
    connect,
    writer_connection,
    writer_lock,
)

if TYPE_CHECKING:  # imported when a client is made: start-up that naive runs need not pay
    import openai


class PipelineSettings(dg.ConfigurableResource, Settings):
    """The pipeline's knobs (see `qe_assets.settings`), shown and overridable in the launchpad;
    it opens nothing (the queue, the store, the LLM client and the fine-tune backend are
    resources of their own: override `finetune`, not the finetune_* fields here, to change how a
    run trains)."""


class QeDuckDBResource(DuckDBResource):
    """`DuckDBResource` whose connections wait like every other writer of the project.

    dagster_duckdb's own `get_connection` retries `duckdb.connect` ten times over ~100 s without
    the writer lock, so a run failed with "Could not set lock" whenever reviewers held the file.
    Here each connection is a `writer_connection`: the writer lock (already held inside a stage),
    then a bounded wait for short readers."""

    @contextmanager
    def get_connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with writer_connection(self.database, config=self.connection_config) as conn:
            yield conn


@contextmanager
def duckdb_writer(resource: DuckDBResource) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short-lived write connection with the schema in place, under the writer lock (see
    `writer_connection`); closed even when the body fails, so the file lock is never held past
    the transaction that needed it. Any `DuckDBResource` gets the project's waiting, not
    dagster_duckdb's retries."""
    with writer_connection(resource.database, config=resource.connection_config) as conn:
        yield conn


@contextmanager
def duckdb_reader(resource: DuckDBResource) -> Iterator[duckdb.DuckDBPyConnection | None]:
    """A short read-only connection (None while the database does not exist yet): no writer
    lock, so a reader waits only for a writer's current transaction, never for a whole stage."""
    if not Path(resource.database).exists():
        yield None
        return
    memory = {k: v for k, v in resource.connection_config.items() if k == "memory_limit"}
    with connect(resource.database, read_only=True, config=memory) as conn:
        yield conn


def writer_session(resource: DuckDBResource) -> WriterSession:
    """Per-batch write connections for a long stage, closed (checkpointed) behind it; see
    `WriterSession`. Use it inside `exclusive_stage`."""
    return WriterSession(resource.database, config=resource.connection_config)


# Run-log messages around the writer lock: operators see who waited, and tests can check that
# no two holds overlapped.
WAITING_FOR_LOCK = "waiting for the DuckDB writer lock"
TOOK_LOCK = "took the DuckDB writer lock"
RELEASED_LOCK = "released the DuckDB writer lock"


@contextmanager
def exclusive_stage(context: dg.AssetExecutionContext, settings: Settings) -> Iterator[None]:
    """Hold the database's writer lock for a whole stage, saying in the run's log when it waits.

    Two runs launched together (a sensor's and one from the UI) then take turns stage by stage
    instead of failing on DuckDB's file lock or interleaving their queue claims.
    """

    def waiting(holder: str) -> None:
        context.log.info(f"{WAITING_FOR_LOCK}, held by {holder}")

    with writer_lock(settings.database, on_wait=waiting):
        context.log.debug(TOOK_LOCK)
        try:
            yield
        finally:
            context.log.debug(RELEASED_LOCK)


class OpenAIResource(dg.ConfigurableResource):
    """Any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp server, ...).

    The key is an `EnvVar` reference: Dagster resolves it at run time and shows only the variable
    name in the UI; nothing here logs or stores its value.
    """

    api_key: str | None = None
    base_url: str | None = None
    timeout_seconds: float = 60.0
    max_retries: int = 4

    @property
    def configured(self) -> bool:
        return bool(self.api_key)

    def _options(self) -> dict[str, Any]:
        if not self.api_key:
            raise dg.Failure(
                "OPENAI_API_KEY is not set: export it (and OPENAI_BASE_URL for a "
                "non-OpenAI endpoint) to use the LLM or the openai fine-tune backend"
            )
        return {
            "api_key": self.api_key,
            "base_url": self.base_url,
            "timeout": self.timeout_seconds,
            "max_retries": self.max_retries,
        }

    def client(self) -> openai.OpenAI:
        import openai

        return openai.OpenAI(**self._options())

    def async_client(self) -> openai.AsyncOpenAI:
        import openai

        return openai.AsyncOpenAI(**self._options())


# resource field → the `Settings` field it is built from (and takes its default and help from).
SETTINGS_FIELDS = {
    "backend": "finetune_backend",
    "command": "finetune_command",
    "base_model": "finetune_base_model",
    "suffix": "finetune_suffix",
    "method": "finetune_method",
    "hyperparameters": "finetune_hyperparameters",
    "poll_seconds": "finetune_poll_seconds",
    "deadline_seconds": "finetune_deadline_seconds",
    "allow_naive": "finetune_allow_naive",
    "k8s": "finetune_k8s",
}


def _like(name: str) -> Any:
    """A field with the default and description of the `Settings` field it mirrors."""
    source = Settings.model_fields[SETTINGS_FIELDS[name]]
    return Field(source.get_default(call_default_factory=True), description=source.description)


class FineTuneBackendConfig(dg.ConfigurableResource):
    """Which backend trains and how (QE_FINETUNE_BACKEND, _COMMAND, _BASE_MODEL, _SUFFIX,
    _METHOD, _HYPERPARAMETERS, _POLL_SECONDS, _DEADLINE_SECONDS, _ALLOW_NAIVE). A `command`
    backend without a command fails when the resource is built: at load time from the settings,
    at the run's start for a launchpad override.

    The configuration alone, so the parts that only ask which backend is in use (the release's
    checks and readiness) need not import the backends; `FineTuneBackendResource` adds the
    training itself."""

    backend: FinetuneBackend = _like("backend")
    command: str | None = _like("command")
    base_model: str = _like("base_model")
    suffix: str = _like("suffix")
    method: FinetuneMethod = _like("method")
    hyperparameters: dict[str, Any] = _like("hyperparameters")
    poll_seconds: float = _like("poll_seconds")
    deadline_seconds: float = _like("deadline_seconds")
    allow_naive: bool = _like("allow_naive")
    k8s: dict[str, Any] = _like("k8s")

    @model_validator(mode="after")
    def _usable(self) -> FineTuneBackendConfig:
        problem = finetune_backend_problem(self.backend, self.command)
        if problem:
            raise ValueError(problem)
        parse_target(self.k8s)  # a bad pod target fails when the resource is built
        return self

    @classmethod
    def from_settings(cls, settings: Settings) -> FineTuneBackendConfig:
        return cls(**{name: getattr(settings, source) for name, source in SETTINGS_FIELDS.items()})

    @property
    def name(self) -> str:
        """The backend's name, as `fine_tune_runs.backend` records it."""
        return self.backend

    @property
    def configured(self) -> bool:
        """Whether a run trains a model (`none` only writes the recipe)."""
        return self.backend != "none"
