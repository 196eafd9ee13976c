"""Dagster resources, built from `Settings` when the definitions load."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource

from qe_assets.queues import EventQueue, FileInbox, open_queue
from qe_assets.settings import Settings
from qe_assets.store import ensure_schema

# Every asset that writes DuckDB runs in this pool; `dagster.yaml` limits it to one slot, so two
# runs launched together (sensor + UI) queue instead of failing on the file lock.
WRITER_POOL = "qe_duckdb_writer"


class PipelineSettings(dg.ConfigurableResource, Settings):
    """The pipeline's knobs (see `qe_assets.settings`), shown and overridable in the launchpad."""

    def queues(self) -> list[EventQueue]:
        """Where raw_events drains from: the configured queue, plus the inbox that producers
        spool to when Redis is down."""
        configured = open_queue(self)
        if isinstance(configured, FileInbox):
            return [configured]
        return [configured, FileInbox(self.inbox_dir)]


@contextmanager
def duckdb_writer(resource: DuckDBResource) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short-lived write connection with the schema in place; closed even when the body fails,
    so the file lock is never held past the transaction that needed it."""
    with resource.get_connection() as conn:
        try:
            ensure_schema(conn)
            yield conn
        finally:
            conn.close()


def build_resources(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    settings.database.parent.mkdir(parents=True, exist_ok=True)
    return {
        "duckdb": DuckDBResource(database=str(settings.database)),
        "settings": PipelineSettings(**settings.model_dump()),
    }
