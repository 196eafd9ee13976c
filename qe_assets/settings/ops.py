"""Orchestration: the sensors and their intervals."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from qe_assets.settings.parsing import _bool, _int

# field name → (environment variable, parser). Defaults live on the model below.
ENVIRONMENT: dict[str, tuple[str, Callable[[str], Any]]] = {
    "queue_sensor_running": ("QE_QUEUE_SENSOR_RUNNING", _bool("QE_QUEUE_SENSOR_RUNNING")),
    "sensor_interval_seconds": (
        "QE_SENSOR_INTERVAL_SECONDS",
        _int("QE_SENSOR_INTERVAL_SECONDS", 5),
    ),
}


class OpsSettings(BaseModel):
    """Orchestration: the sensors and their intervals."""

    model_config = ConfigDict(frozen=True)

    queue_sensor_running: bool = Field(
        True,
        description="Start the ingestion sensor "
        "(`queue_sensor`) running; the UI toggle overrides it.",
    )
    sensor_interval_seconds: int = Field(30, description="How often both sensors look, in seconds.")
