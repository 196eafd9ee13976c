"""DuckDB schema and the few read/write helpers every stage shares.

DuckDB allows one writing process per file, and while it holds the file no other process can open
it, not even read-only. Writers therefore open a connection per short transaction and close it
right after; readers (`qe sql`, the sensor) retry for a bounded, visible wait."""

from __future__ import annotations

from qe_assets.store.connection import (  # noqa: F401
    READ_SECONDS_MAX,
    WRITER_CONFIG,
    WRITER_WAIT_SECONDS,
    ConnectionFactory,
    DatabaseBusy,
    WriterSession,
    connect,
    holds_writer_lock,
    transaction,
    writer_connection,
    writer_lock,
)
from qe_assets.store.frames import owned_copy, register_frame, select_frame, sql_over_frames  # noqa: F401
from qe_assets.store.schema import SCHEMA, ensure_schema, set_watermark, table_counts, watermark  # noqa: F401
