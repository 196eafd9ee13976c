"""The dashboards page of `qe serve`: the seed's charts over time, drawn in the browser.

`dashboard_routes(settings)` is mounted by the review app at `/dashboards` (see
qe_assets/lib/links.py). The page carries its figures as Plotly JSON and draws them with the
plotly.js bundle that ships inside the `plotly` Python package, served from here: nothing is
fetched from the internet, so the page works on an offline machine.

Reads: one short read-only connection per refresh (qe_assets/web/series.py), cached for a few
seconds, so a page left open or reloaded often never keeps a run's writer waiting for long.
"""

from __future__ import annotations

import html
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import polars as pl
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from qe_assets.rollout import timeline
from qe_assets.rollout.sequential import policy_of
from qe_assets.settings import Settings
from qe_assets.store import DatabaseBusy, connect
from qe_assets.web.series import STEPS, Series, read_series

WEB_DIR = Path(__file__).parent
DEFAULT_BUCKETS = {"hour": 72, "day": 60}
MAX_BUCKETS = 1_000
CACHE_SECONDS = 5.0
READ_WAIT_SECONDS = 5.0
Figure = dict[str, Any]


class BadQuery(ValueError):
    """A query parameter out of range; the message names it."""


def plotly_js_path() -> Path:
    """plotly.min.js as the plotly package ships it (the browser gets it from us, not a CDN)."""
    return Path(str(resources.files("plotly") / "package_data" / "plotly.min.js"))


# ----- figures: Plotly JSON built from the series ----------------------------------------------


def _iso(values: pl.Series) -> list[str]:
    return [value.isoformat() for value in values.to_list()]


def _traces(frame: pl.DataFrame, kind: str, **style: Any) -> list[Figure]:
    """One trace per series of a (bucket, series, value) frame."""
    traces = []
    for (name,), part in frame.group_by("series", maintain_order=True):
        traces.append(
            {"type": kind, "name": name, "x": _iso(part["bucket"]), "y": part["value"].to_list()}
            | style
        )
    return traces


def _layout(y_title: str, **extra: Any) -> Figure:
    """A figure's layout (no title: the section's heading says what the chart is)."""
    return {
        "xaxis": {"type": "date"},
        "yaxis": {"title": {"text": y_title}, "rangemode": "tozero"},
        "legend": {"orientation": "h", "y": -0.2},
        "margin": {"l": 60, "r": 20, "t": 10, "b": 40},
        "height": 320,
        **extra,
    }


def _has_data(frame: pl.DataFrame, column: str = "value") -> bool:
    return frame.height > 0 and bool((frame[column] != 0).any())


def samples_figure(series: Series) -> Figure:
    return {
        "data": _traces(series.samples, "bar"),
        "layout": _layout("samples", barmode="group"),
    }


def labels_figure(series: Series) -> Figure:
    # Shares in DuckDB's counts, per bucket; an empty bucket stays empty (no 0/0).
    shares = series.labels.with_columns(
        share=(pl.col("value") / pl.col("value").sum().over("bucket") * 100).fill_nan(None)
    )
    traces = []
    for (name,), part in shares.group_by("series", maintain_order=True):
        traces.append(
            {
                "type": "bar",
                "name": name,
                "x": _iso(part["bucket"]),
                "y": part["share"].to_list(),
                "customdata": part["value"].to_list(),
                "hovertemplate": "%{y:.1f}% (%{customdata} samples)",
            }
        )
    layout = _layout("share of samples", barmode="stack")
    layout["yaxis"] |= {"range": [0, 100], "ticksuffix": "%"}
    return {"data": traces, "layout": layout}


def rejects_figure(series: Series) -> Figure:
    return {
        "data": _traces(series.rejects, "bar"),
        "layout": _layout("rejected", barmode="stack"),
    }


def backlog_figure(series: Series) -> Figure:
    return {
        "data": _traces(series.backlog, "scatter", mode="lines", stackgroup="backlog"),
        "layout": _layout("pending"),
    }


def modes_figure(series: Series) -> Figure:
    return {
        "data": _traces(series.modes, "bar"),
        "layout": _layout("completions", barmode="stack"),
    }


def agreement_figure(series: Series, min_agreement: float) -> Figure:
    frame = series.agreement
    layout = _layout("agreement")
    layout["yaxis"] |= {"range": [0, 1.05], "tickformat": ".0%"}
    layout["shapes"] = [_hline(min_agreement, f"QE_JUDGE_MIN_AGREEMENT {min_agreement:.0%}")]
    trace = {
        "type": "scatter",
        "mode": "lines+markers",
        "name": "agreement",
        "x": _iso(frame["bucket"]),
        "y": frame["agreement"].to_list(),
        "customdata": frame["decisions"].to_list(),
        "hovertemplate": "%{y:.0%} of %{customdata} decisions",
    }
    return {"data": [trace], "layout": layout}


def _hline(y: float, name: str, yref: str = "y") -> Figure:
    """A dashed reference line, labelled on the chart (not only on hover)."""
    return {
        "type": "line",
        "xref": "paper",
        "yref": yref,
        "x0": 0,
        "x1": 1,
        "y0": y,
        "y1": y,
        "name": name,
        "line": {"dash": "dash", "width": 1, "color": "#888"},
        "label": {
            "text": name,
            "textposition": "end",
            "yanchor": "bottom",
            "font": {"size": 11, "color": "#555"},
        },
    }


def _vline(at: str, name: str) -> Figure:
    """A dotted mark of an event (a share change, a decision) across the chart, labelled."""
    return {
        "type": "line",
        "xref": "x",
        "yref": "paper",
        "x0": at,
        "x1": at,
        "y0": 0,
        "y1": 1,
        "name": name,
        "line": {"dash": "dot", "width": 1, "color": "#b45309"},
        "label": {
            "text": name,
            "textposition": "end",
            "textangle": 0,
            "xanchor": "left",
            "font": {"size": 11, "color": "#b45309"},
        },
    }


def _short(model: str, limit: int = 28) -> str:
    """A model name short enough to print beside its point (the hover has it whole)."""
    return model if len(model) <= limit else "…" + model[-(limit - 1) :]


def evaluations_figure(series: Series) -> Figure:
    traces = []
    frame = series.evaluations
    for (comparison,), part in frame.group_by("comparison", maintain_order=True):
        rows = list(part.select("candidate", "baseline", "decision", "n").iter_rows())
        text = [f"{c} vs {b}: {_verdict(d)} (n={n})" for c, b, d, n in rows]
        traces.append(
            {
                "type": "scatter",
                "mode": "lines+markers+text",
                "name": f"win rate vs {comparison}",
                "x": _iso(part["created_at"]),
                "y": part["win_rate"].to_list(),
                # The model and the verdict beside each point, without hovering.
                "text": [f"{_short(c)}: {_verdict(d)}" for c, _, d, _ in rows],
                "textposition": "bottom center",
                "customdata": text,
                "error_y": {
                    "type": "data",
                    "symmetric": False,
                    "array": [0] * part.height,
                    "arrayminus": (part["win_rate"] - part["ci_low"]).to_list(),
                },
                "hovertemplate": "%{y:.0%}: %{customdata}",
            }
        )
    layout = _layout("win rate")
    layout["yaxis"] |= {"range": [0, 1.05], "tickformat": ".0%"}
    layout["shapes"] = [_hline(0.5, "50 %: as good as production")]
    return {"data": traces, "layout": layout}


def _verdict(decision: str) -> str:
    """The gate's stored `promote` means it passed (a canary may follow, not a promotion)."""
    return "passed the gate" if decision == "promote" else decision


def ab_figure(series: Series, threshold: float) -> Figure:
    """Both arms' low-score rates per look, Λ against its threshold on a second axis, and the
    rollout's events (share changes, the decision) marked across the chart."""
    frame = series.ab if series.ab is not None else pl.DataFrame()
    traces = []
    for (candidate, production), part in frame.group_by(
        "candidate", "production", maintain_order=True
    ):
        for arm, model in (("production", production), ("candidate", candidate)):
            traces.append(
                {
                    "type": "scatter",
                    "mode": "lines+markers",
                    "name": f"{arm}: {model}",
                    "x": _iso(part["decided_at"]),
                    "y": part[f"rate_{arm}"].to_list(),
                    "customdata": list(
                        zip(
                            part[f"low_{arm}"].to_list(),
                            part[f"answers_{arm}"].to_list(),
                            part["decision"].to_list(),
                            strict=True,
                        )
                    ),
                    "hovertemplate": "%{y:.1%} low-score answers (%{customdata[0]} of "
                    "%{customdata[1]}; %{customdata[2]})",
                    "connectgaps": True,
                }
            )
        traces.append(
            {
                "type": "scatter",
                "mode": "lines+markers",
                "name": f"Λ {_short(candidate)} (decides at {threshold:g})",
                "x": _iso(part["decided_at"]),
                "y": part["statistic"].to_list(),
                "yaxis": "y2",
                "line": {"dash": "dot", "width": 1},
                "hovertemplate": f"Λ %{{y:.1f}} of {threshold:g}",
                "connectgaps": True,
            }
        )
    layout = _layout("low-score rate")
    layout["yaxis"] |= {"tickformat": ".0%"}
    layout["yaxis2"] = {
        "title": {"text": "Λ (log)"},
        "type": "log",
        "overlaying": "y",
        "side": "right",
        "showgrid": False,
        "range": [-1, math.log10(threshold) + 0.5],
        "tickvals": [0.1, 1, 10, threshold],
        "ticktext": ["0.1", "1", "10", f"{threshold:g}"],
    }
    # Room above the plot for the event marks' labels, and right of it for Λ's axis.
    layout["margin"] = layout["margin"] | {"r": 60, "t": 30}
    shapes = [_hline(threshold, f"decision at Λ {threshold:g}", "y2")]
    for mark in timeline.events(series.release):
        shapes.append(_vline(mark["at"].isoformat(), mark["label"]))
    layout["shapes"] = shapes
    return {"data": traces, "layout": layout}


def timeline_table(series: Series) -> dict[str, Any]:
    steps = timeline.release_timeline(series.release, series.ab_progress)
    return timeline.table(steps)


def _one_point_range(figure: Figure, pad: timedelta) -> Figure:
    """A chart whose points share one time gets a range of ± `pad` around it: otherwise
    Plotly zooms into it and labels sub-millisecond ticks."""
    times = {x for trace in figure["data"] for x in trace.get("x", [])}
    if len(times) != 1:
        return figure
    (at,) = times
    middle = datetime.fromisoformat(at)
    layout = figure["layout"]
    layout["xaxis"] = layout.get("xaxis", {}) | {
        "range": [(middle - pad).isoformat(), (middle + pad).isoformat()]
    }
    # Plotly sizes a lone bar by the (missing) gap to its neighbour: give it most of its bucket.
    # Grouped bars then need their own offsets, side by side (milliseconds on a date axis).
    bars = [trace for trace in figure["data"] if trace.get("type") == "bar"]
    step = pad.total_seconds() * 1000
    grouped = layout.get("barmode") == "group" and len(bars) > 1
    width = 0.8 * step / (len(bars) if grouped else 1)
    for i, trace in enumerate(bars):
        trace["width"] = width
        if grouped:
            trace["offset"] = -0.4 * step + i * width
    return figure


@dataclass(frozen=True)
class Chart:
    """One section of the page: its anchor, heading, figure, and what to say without data."""

    id: str
    heading: str
    build: Callable[[Series], Figure]
    has_data: Callable[[Series], bool]
    empty: str
    note: Callable[[Series], str | None] = lambda s: None  # a line above the chart
    kind: str = "figure"  # figure | table


def charts(settings: Settings) -> list[Chart]:
    return [
        Chart(
            "samples",
            "Training samples produced per {unit}",
            samples_figure,
            lambda s: _has_data(s.samples),
            "No training samples in this window yet.",
        ),
        Chart(
            "labels",
            "Label share per {unit} (stacked, one axis)",
            labels_figure,
            lambda s: _has_data(s.labels),
            "No annotated samples in this window yet.",
        ),
        Chart(
            "rejects",
            "Rejects per {unit}",
            rejects_figure,
            lambda s: _has_data(s.rejects),
            "Nothing rejected in this window.",
        ),
        Chart(
            "backlog",
            "Review backlog at the end of each {unit}, by reason",
            backlog_figure,
            lambda s: _has_data(s.backlog),
            "Nothing has waited for review in this window.",
        ),
        Chart(
            "completions",
            "Completions kept per {unit}, by mode",
            modes_figure,
            lambda s: _has_data(s.modes),
            "No completions in this window yet.",
        ),
        Chart(
            "judge",
            "Judge agreement with reviewers per {unit}",
            lambda s: agreement_figure(s, settings.judge_min_agreement),
            lambda s: s.agreement.height > 0,
            "No reviewer decision on a judged completion in this window.",
        ),
        Chart(
            "evaluations",
            "Model win rates (error bar down to the 95 % lower bound)",
            evaluations_figure,
            lambda s: s.evaluations.height > 0,
            "No model evaluation yet.",
        ),
        Chart(
            "ab",
            "A/B test: low-score rate per arm, Λ against its threshold, rollout events",
            lambda s: ab_figure(s, 1.0 / settings.ab_alpha),
            _ab_has_rates,
            "No A/B test yet.",
            note=lambda s: s.ab_running,
        ),
        Chart(
            "timeline",
            "Release timeline: cut → checks → fine-tune → gate → canary → A/B decision → "
            "production",
            timeline_table,
            lambda s: s.release.version is not None,
            "No release yet: the first dataset version is cut at QE_FINETUNE_THRESHOLD.",
            kind="table",
        ),
    ]


def _ab_has_rates(series: Series) -> bool:
    frame = series.ab
    if frame is None or frame.height == 0:
        return False
    return bool(frame["rate_production"].is_not_null().any())


# ----- reading, with a short cache ------------------------------------------------------------


class Dashboards:
    """The page's state: settings, and the last figures per (bucket, buckets) for a few seconds."""

    def __init__(
        self,
        settings: Settings,
        cache_seconds: float = CACHE_SECONDS,
        db_lock: threading.Lock | None = None,
    ) -> None:
        self.settings = settings
        self.cache_seconds = cache_seconds
        self.charts = charts(settings)
        self._cache: dict[tuple[str, int], tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        # The app's lock on its DuckDB connections: a read-only and a write connection to the
        # same file cannot be open together in one process, so a reviewer's decision would fail
        # while the charts read.
        self.db_lock = db_lock if db_lock is not None else threading.Lock()

    def _read(self, unit: str, buckets: int) -> Series:
        """One read-only connection, closed at once, under the app's connection lock."""
        with (
            self.db_lock,
            connect(self.settings.database, read_only=True, wait_seconds=READ_WAIT_SECONDS) as conn,
        ):
            return read_series(
                conn,
                unit,
                buckets,
                judge_margin=self.settings.llm_judge_margin,
                policy=policy_of(self.settings),
            )

    def figures(self, unit: str, buckets: int) -> dict[str, Any]:
        key = (unit, buckets)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and time.monotonic() - cached[0] < self.cache_seconds:
                return cached[1]
        series = self._read(unit, buckets)
        payload = {
            "bucket": unit,
            "buckets": buckets,
            "start": series.window.start.isoformat(),
            "stop": series.window.stop.isoformat(),
            "generated_at": datetime.now().isoformat(timespec="seconds"),
            "charts": [self._chart(chart, series, unit) for chart in self.charts],
        }
        with self._lock:
            self._cache[key] = (time.monotonic(), payload)
        return payload

    @staticmethod
    def _chart(chart: Chart, series: Series, unit: str) -> dict[str, Any]:
        shown = chart.has_data(series)
        built = chart.build(series) if shown else None
        empty = (series.ab_problem if chart.id == "ab" else None) or chart.empty
        if chart.id == "ab" and not shown and series.ab_running:
            empty = series.ab_running  # which test runs and what it waits for
        return {
            "id": chart.id,
            "heading": chart.heading.format(unit=unit),
            "figure": _one_point_range(built, STEPS[unit])
            if chart.kind == "figure" and built
            else None,
            "table": built if chart.kind == "table" else None,
            "note": chart.note(series) if shown else None,
            "empty": empty,
        }


def parse_query(request: Request) -> tuple[str, int]:
    unit = request.query_params.get("bucket", "hour")
    if unit not in STEPS:
        raise BadQuery(f"bucket must be one of {', '.join(STEPS)}, got {unit!r}")
    raw = request.query_params.get("buckets")
    if raw is None:
        return unit, DEFAULT_BUCKETS[unit]
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_BUCKETS:
        raise BadQuery(f"buckets must be an integer from 1 to {MAX_BUCKETS}, got {raw!r}")
    return unit, int(raw)


# ----- routes ---------------------------------------------------------------------------------


def _script_json(payload: dict[str, Any]) -> str:
    """JSON safe inside a <script> element: no '<' that could close it."""
    return json.dumps(payload).replace("<", "\\u003c")


def _bucket_links(unit: str) -> str:
    links = []
    for name in STEPS:
        current = ' aria-current="page"' if name == unit else ""
        links.append(f'<a href="?bucket={name}"{current}>per {name}</a>')
    return " · ".join(links)


def dashboard_routes(
    settings: Settings,
    *,
    cache_seconds: float = CACHE_SECONDS,
    db_lock: threading.Lock | None = None,
) -> list[BaseRoute]:
    """The dashboards, for the review app to mount at /dashboards (any prefix works: the page
    finds its data and scripts relative to where it is mounted). Figures are reused for
    `cache_seconds` (0: read on every request). `db_lock`: the mounting app's lock on its DuckDB
    connections (`app.state.db_lock`); standalone, the routes have one of their own."""
    board = Dashboards(settings, cache_seconds, db_lock)
    page = Template((WEB_DIR / "templates" / "dashboards.html").read_text("utf-8"))

    def load(request: Request) -> tuple[dict[str, Any] | None, Response | None]:
        try:
            unit, buckets = parse_query(request)
        except BadQuery as exc:
            return None, JSONResponse({"error": str(exc)}, status_code=400)
        if not settings.database.exists():
            message = f"no store at {settings.database} yet: run `qe run` first"
            return None, JSONResponse({"error": message}, status_code=404)
        try:
            return board.figures(unit, buckets), None
        except DatabaseBusy as exc:
            return None, JSONResponse({"error": f"{exc}; reload to retry"}, status_code=503)

    def show(request: Request) -> Response:
        payload, problem = load(request)
        base = request.scope.get("root_path", "").rstrip("/")
        notice = "" if problem is None else html.escape(json.loads(problem.body)["error"])
        body = page.substitute(
            base=html.escape(base, quote=True),
            bucket_links=_bucket_links(payload["bucket"] if payload else "hour"),
            window=html.escape(
                f"{payload['start']} to {payload['stop']}, read {payload['generated_at']}"
                if payload
                else ""
            ),
            notice=notice,
            figures=_script_json(payload or {"charts": []}),
        )
        status = 200 if problem is None else problem.status_code
        return HTMLResponse(body, status_code=status)

    def data(request: Request) -> Response:
        payload, problem = load(request)
        return problem if problem is not None else JSONResponse(payload)

    def plotly_js(request: Request) -> Response:
        return FileResponse(
            plotly_js_path(),
            media_type="text/javascript",
            headers={"Cache-Control": "public, max-age=86400"},
        )

    return [
        Route("/", show, methods=["GET"], name="dashboards"),
        Route("/data.json", data, methods=["GET"], name="dashboards_data"),
        Route("/vendor/plotly.min.js", plotly_js, methods=["GET"], name="dashboards_plotly"),
        Mount("/static", app=StaticFiles(directory=WEB_DIR / "static"), name="dashboards_static"),
    ]
