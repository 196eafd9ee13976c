"""Links from asset metadata to the dashboards `qe serve` shows (no web framework imported: the
assets load this with the definitions)."""

from __future__ import annotations

from qe_assets.settings import Settings

# Where `qe serve` mounts qe_assets.web.dashboards.
DASHBOARDS_PATH = "/dashboards"


def dashboard_url(settings: Settings, chart: str | None = None) -> str:
    """The dashboards page under QE_SERVE_URL, scrolled to one chart's section when named."""
    url = f"{settings.serve_url.rstrip('/')}{DASHBOARDS_PATH}/"
    return f"{url}#{chart}" if chart else url
