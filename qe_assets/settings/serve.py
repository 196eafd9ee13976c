"""`qe serve`: the local review pages and dashboards."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from qe_assets.settings.parsing import _serve_url

# field name → (environment variable, parser). Defaults live on the model below.
ENVIRONMENT: dict[str, tuple[str, Callable[[str], Any]]] = {
    "serve_url": ("QE_SERVE_URL", _serve_url),
}


class ServeSettings(BaseModel):
    """`qe serve`: the local review pages and dashboards."""

    model_config = ConfigDict(frozen=True)

    serve_url: str = Field(
        "http://127.0.0.1:8787",
        description="Where `qe serve` answers: the dashboards linked from the assets' metadata.",
    )
