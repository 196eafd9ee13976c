"""Dagster resources, built from `Settings` when the definitions load."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource

# Lives beside its backends (qe_assets/finetune/); importable from here with the other resources.
from qe_assets.finetune.resource import FineTuneBackendResource
from qe_assets.queues import EventQueue, FileInbox, open_queue
from qe_assets.serving.resource import ModelServerResource
from qe_assets.settings import Settings
from qe_assets.store import (
    WRITER_CONFIG,
    WriterSession,
    connect,
    writer_connection,
    writer_lock,
)

if TYPE_CHECKING:  # imported when a client is made: start-up that naive runs need not pay
    import openai


def drained_queues(settings: Settings) -> list[EventQueue]:
    """Where raw_events drains from: the configured queue, plus the inbox that producers spool
    to when Redis or Kafka is down. Opens nothing until a queue is used."""
    configured = open_queue(settings)
    if isinstance(configured, FileInbox):
        return [configured]
    return [configured, FileInbox(settings.inbox_dir)]


class PipelineSettings(dg.ConfigurableResource, Settings):
    """The pipeline's knobs (see `qe_assets.settings`), shown and overridable in the launchpad;
    it opens nothing (the queue, the store, the LLM client and the fine-tune backend are
    resources of their own: override `finetune`, not the finetune_* fields here, to change how a
    run trains)."""


class QueueResource(dg.ConfigurableResource):
    """The event queue, one concern: where events wait (QE_QUEUE_URL, else the file inbox) and
    this ingester's name on it. The settings stay typed and validated in `Settings`; this
    resource carries only the fields the queue needs."""

    queue_url: str | None = None
    queue_consumer: str = "default"
    data_dir: str = "data"

    @classmethod
    def from_settings(cls, settings: Settings) -> QueueResource:
        return cls(
            queue_url=settings.queue_url,
            queue_consumer=settings.queue_consumer,
            data_dir=settings.data_dir,
        )

    def queues(self) -> list[EventQueue]:
        settings = Settings(
            queue_url=self.queue_url, queue_consumer=self.queue_consumer, data_dir=self.data_dir
        )
        return drained_queues(settings)


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


def build_resources(settings: Settings) -> dict[str, Any]:
    """The resources for `settings`, built without touching the disk: the database's directory
    is made by the first write connection (`store.writer_connection`), not here."""
    return {
        "duckdb": QeDuckDBResource(
            database=str(settings.database),
            connection_config={**WRITER_CONFIG, "memory_limit": settings.duckdb_memory_limit},
        ),
        "settings": PipelineSettings(**settings.model_dump()),
        "queue": QueueResource.from_settings(settings),
        "finetune": FineTuneBackendResource.from_settings(settings),
        "model_server": ModelServerResource.from_settings(settings),
        "openai": OpenAIResource(
            # Only a reference when the variable is set, so an offline setup loads without it.
            api_key=dg.EnvVar("OPENAI_API_KEY") if os.environ.get("OPENAI_API_KEY") else None,
            base_url=settings.openai_base_url,
            timeout_seconds=settings.llm_timeout_seconds,
            max_retries=settings.llm_max_retries,
        ),
    }
