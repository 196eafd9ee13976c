"""The dashboards page (qe_assets/web/dashboards.py) over a real store, served by a real uvicorn
on a loopback port and drawn by real Chromium through Playwright, with no internet: every request
the page makes goes to the test's server.

The store is filled by real materializations: naive completions, LLM completions judged through
the local OpenAI-compatible server, reviewer decisions through `qe_assets.review.decisions`, a
dataset cut.
Days of history cannot be waited for, so afterwards each sample's times are moved back by 1-3
days and a few hours, as if the runs had happened then, and each decision a day later than its
sample was queued (so the backlog rises and falls). Model evaluations
and A/B decisions are other stages' rows: inserted as those stages write them.
"""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.routing import Mount

from qe_assets.ingest.queues import FileInbox
from qe_assets.lib.links import DASHBOARDS_PATH
from qe_assets.review import decisions as review
from qe_assets.settings import Settings
from qe_assets.store import connect, writer_connection
from qe_assets.web.dashboards import Dashboards, dashboard_routes
from qe_assets_bench.dashboards import build
from qe_assets_tests.openai_server import running
from qe_assets_tests.runs import materialize, metadata
from qe_assets_tests.test_calibration import approving_judge
from qe_assets_tests.test_llm import UP_TO_COMPLETIONS, llm, put
from qe_assets_tests.test_pipeline import batch
from qe_assets_tests.test_ui_browser import CHROMIUM, CHROMIUM_ARGS, _unavailable

LINKED = ("rejected_events", "annotated_samples", "review_queue", "completions", "tuning_dataset")
linked_urls: dict[str, str | None] = {}  # asset → its metadata's dashboards URL, from the first run
DOCS_SCREENSHOT = Path(__file__).parents[1] / "docs" / "img" / "dashboards.png"
CHARTS = ("samples", "labels", "rejects", "backlog", "completions", "judge", "evaluations")
# Per sample: when a person decided on it (0-2 days and 0-4 hours back), and when it was made
# (a day before that).
SHIFT = "(INTERVAL 1 DAY * (hash(sample_id) % 3) + INTERVAL 1 HOUR * (hash(sample_id) % 5))"
BACK = f"({SHIFT} + INTERVAL 1 DAY)"
AB_SCHEMA = """
CREATE TABLE IF NOT EXISTS ab_decisions (
    decision_id BIGINT, candidate VARCHAR NOT NULL, production VARCHAR NOT NULL,
    share DOUBLE NOT NULL, answers_production BIGINT NOT NULL, low_production BIGINT NOT NULL,
    answers_candidate BIGINT NOT NULL, low_candidate BIGINT NOT NULL, rate_production DOUBLE,
    rate_candidate DOUBLE, statistic DOUBLE, decision VARCHAR NOT NULL, reason VARCHAR NOT NULL,
    decided_by VARCHAR NOT NULL, test_started_at TIMESTAMP NOT NULL, per_label JSON,
    dagster_run_id VARCHAR, decided_at TIMESTAMP NOT NULL
)
"""


def _decide(settings: Settings) -> None:
    with writer_connection(settings.database) as conn:
        judged = [f"req-j{i}#factuality_error" for i in range(12)]
        review.accept(conn, judged[:6], "ann")
        review.reject(conn, judged[6:10], "bo", note="not grounded")  # 10, 11 stay pending
        review.accept(conn, ["low-0#factuality_error", "low-1#incomplete_answer"], "ann")
        review.edit(conn, "low-2#low_relevance", "A careful answer by a person.", "bo")
        review.reject(conn, "low-3#overconfidence", "ann")


def _spread_over_three_days(settings: Settings) -> None:
    with writer_connection(settings.database) as conn:
        conn.execute(f"UPDATE annotated_samples SET annotated_at = annotated_at - {BACK}")
        conn.execute(
            f"""
            UPDATE completions SET created_at = created_at - {BACK},
                updated_at = updated_at - CASE WHEN sample_id IN (
                    SELECT sample_id FROM review_queue WHERE reviewed_at IS NOT NULL
                ) THEN {SHIFT} ELSE {BACK} END
            """
        )
        conn.execute(
            f"UPDATE review_queue SET queued_at = queued_at - {BACK}, "
            f"reviewed_at = reviewed_at - {SHIFT}"
        )
        conn.execute("UPDATE rejected_events SET rejected_at = rejected_at - INTERVAL 30 HOUR")
        for days, (candidate, win_rate, decision) in enumerate(
            [("ft:m1", 0.42, "block"), ("ft:m2", 0.58, "block"), ("ft:m3", 0.71, "promote")]
        ):
            conn.execute(
                """
                INSERT INTO model_evaluations VALUES (?, ?, 'base', 'v001', 60, 0, 0, 0, 0, ?,
                    ? - 0.12, ?, 'test', 'judge', '{}', 0, 0, 0.0, NULL, 'production',
                    now()::TIMESTAMP - INTERVAL 1 DAY * ?, false, 1)
                """,
                [f"eval-{candidate}", candidate, win_rate, win_rate, decision, 2 - days],
            )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    settings = Settings(
        data_dir=str(tmp_path_factory.mktemp("dashboards") / "data"),
        spot_check_share=0.0,
        min_dataset_examples=1,
    )
    FileInbox(settings.inbox_dir).put(batch("a", 24) + batch("low", 4, score=0.2) + ["{nope"])
    first = materialize(settings)  # the whole graph, as `qe run --cut-version`
    linked_urls.update({asset: metadata(first, asset).get("dashboards") for asset in LINKED})
    with running() as server, pytest.MonkeyPatch.context() as env:
        env.setenv("OPENAI_API_KEY", "sk-test-dashboards")
        server.responder = approving_judge
        judged = llm(
            settings, server, llm_judge=True, llm_judge_model="judge", spot_check_share=1.0
        )
        put(judged, [f"j{i}" for i in range(12)])
        materialize(judged, selection=UP_TO_COMPLETIONS)
    _decide(settings)
    materialize(settings, selection=["tuning_dataset", "fine_tuned_model"])
    _spread_over_three_days(settings)
    yield settings


@dataclass
class Served:
    url: str  # the dashboards page, with its trailing slash


@contextmanager
def served_dashboards(settings: Settings) -> Iterator[str]:
    """The routes mounted at /dashboards in a minimal Starlette app, as the review app mounts
    them; uvicorn on an ephemeral loopback port, in a thread of the test process. Yields the
    page's URL (with its trailing slash)."""
    app = Starlette(
        routes=[Mount(DASHBOARDS_PATH, routes=dashboard_routes(settings, cache_seconds=0))]
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}{DASHBOARDS_PATH}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def served(store: Settings) -> Iterator[Served]:
    with served_dashboards(store) as url:
        yield Served(url)


def test_assets_link_their_charts(store: Settings) -> None:
    base = "http://127.0.0.1:8787/dashboards/#"
    expected = {
        "rejected_events": base + "rejects",
        "annotated_samples": base + "labels",
        "review_queue": base + "backlog",
        "completions": base + "completions",
        "tuning_dataset": base + "samples",
    }
    assert linked_urls == expected


def get_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def figure(payload: dict[str, Any], chart: str) -> dict[str, Any]:
    (found,) = [c for c in payload["charts"] if c["id"] == chart]
    assert found["figure"] is not None, f"{chart}: {found['empty']}"
    return found["figure"]


def totals(fig: dict[str, Any]) -> dict[str, float]:
    return {trace["name"]: sum(v or 0 for v in trace["y"]) for trace in fig["data"]}


def test_the_numbers_are_the_tables_bucketed(store: Settings, served: Served) -> None:
    status, payload = get_json(served.url + "data.json?bucket=day")
    assert status == 200 and payload["buckets"] == 60
    with connect(store.database, read_only=True) as conn:
        train, days, pending, rejects, modes = conn.execute(
            """
            SELECT (SELECT count(*) FROM annotated_samples
                    WHERE route = 'train' AND duplicate_of IS NULL),
                   (SELECT count(DISTINCT date_trunc('day', annotated_at)) FROM annotated_samples
                    WHERE route = 'train' AND duplicate_of IS NULL),
                   (SELECT count(*) FROM review_queue WHERE status = 'pending'),
                   (SELECT count(*) FROM rejected_events),
                   (SELECT map(list(mode), list(n)) FROM (
                       SELECT mode, count(*) AS n FROM completions WHERE status = 'ok' GROUP BY 1
                   ))
            """
        ).fetchall()[0]
    samples = figure(payload, "samples")
    assert totals(samples)["annotated for training"] == train == 36
    # Days of history: a bar for each day with samples.
    (annotated,) = [t for t in samples["data"] if t["name"] == "annotated for training"]
    assert sum(1 for v in annotated["y"] if v) == days >= 3
    # Label shares: every non-empty bucket adds up to 100 %, on one y axis.
    labels = figure(payload, "labels")
    assert labels["layout"]["barmode"] == "stack" and "yaxis2" not in labels["layout"]
    for column in zip(*(trace["y"] for trace in labels["data"]), strict=True):
        if any(v is not None for v in column):
            assert sum(v or 0 for v in column) == pytest.approx(100)
    assert totals(figure(payload, "rejects")) == {
        "invalid events": rejects,
        "rejected by a reviewer": 5,  # four of the judged, one low-confidence
    }
    # The backlog at the end of the last bucket is what waits now.
    backlog = figure(payload, "backlog")
    assert sum(trace["y"][-1] for trace in backlog["data"]) == pending == 2
    assert max(sum(column) for column in zip(*(t["y"] for t in backlog["data"]), strict=True)) > 2
    assert totals(figure(payload, "completions")) == dict(modes)
    assert set(dict(modes)) == {"naive", "llm", "human"}
    judge = figure(payload, "judge")
    assert sum(judge["data"][0]["customdata"]) == 10  # decisions on judged completions
    assert figure(payload, "evaluations")["data"][0]["y"] == [0.42, 0.58, 0.71]
    (ab,) = [c for c in payload["charts"] if c["id"] == "ab"]
    assert ab["figure"] is None and ab["empty"] == "No A/B test yet."
    # Per hour over 100 hours (the history spans 1-3 days and 4 hours): the same samples.
    _, hourly = get_json(served.url + "data.json?bucket=hour&buckets=100")
    assert totals(figure(hourly, "samples"))["annotated for training"] == 36
    # The window starts at its first bucket with data, not 100 empty hours before now.
    hours = figure(hourly, "samples")["data"][0]["x"]
    assert hours[0] == hourly["start"] and 24 < len(hours) < 100
    # Bad parameters: a 400 naming the parameter.
    assert get_json(served.url + "data.json?bucket=week") == (
        400,
        {"error": "bucket must be one of hour, day, got 'week'"},
    )


def _non_blank(png: bytes) -> tuple[int, int]:
    """(colours, share of non-white pixels in thousandths) of a screenshot."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    pixels = list(image.getdata())
    coloured = sum(1 for p in pixels if p != (255, 255, 255))
    return len(set(pixels)), 1000 * coloured // len(pixels)


@pytest.mark.browser
def test_the_charts_render_in_chromium_offline(store: Settings, served: Served) -> None:
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is missing (Debian package `chromium`)")
    try:
        from playwright.sync_api import Route, sync_playwright
    except ImportError:
        _unavailable("the playwright Python package is missing (pip install -e '.[test]')")
    origin = served.url.split(DASHBOARDS_PATH)[0]
    elsewhere: list[str] = []

    def only_our_server(route: Route) -> None:
        if route.request.url.startswith(origin):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.route("**/*", only_our_server)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        try:
            page.goto(served.url + "?bucket=day")
            page.wait_for_selector("body[data-charts-rendered]", timeout=30_000)
            for chart in CHARTS:
                section = page.locator(f"section#{chart}")
                assert section.get_attribute("data-state") == "rendered", chart
                # Plotly draws SVG: a plot area with at least one drawn trace.
                assert section.locator("svg.main-svg").count() >= 1, chart
                assert section.locator("g.trace").count() >= 1, chart
                colours, inked = _non_blank(section.locator(".chart").screenshot())
                assert colours > 20 and inked > 20, (chart, colours, inked)
            assert page.locator("section#ab").inner_text().endswith("No A/B test yet.")
            bars = page.locator("section#labels g.trace.bars path")
            assert bars.count() >= 3 * 5  # three days × five labels
            shot = page.screenshot(full_page=True)
            assert _non_blank(shot)[0] > 100
            if os.environ.get("QE_UPDATE_SCREENSHOTS"):
                DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                DOCS_SCREENSHOT.write_bytes(page.screenshot(full_page=True))

            # An A/B test starts: its arms show up on the next load.
            with writer_connection(store.database) as conn:
                conn.execute(AB_SCHEMA)
                for hours, (low_p, low_c) in enumerate([(12, 9), (25, 17), (37, 22)]):
                    answers = 100 * (hours + 1)  # per arm, so far
                    conn.execute(
                        """
                        INSERT INTO ab_decisions VALUES (?, 'ft:m3', 'base', 0.1, ?, ?, ?, ?, ?, ?,
                            1.5, 'continue', 'test', 'ab_test',
                            now()::TIMESTAMP - INTERVAL 3 HOUR, NULL, NULL,
                            now()::TIMESTAMP - INTERVAL 1 HOUR * ?)
                        """,
                        [
                            *(hours, answers, low_p, answers, low_c),
                            *(low_p / answers, low_c / answers, 3 - hours),
                        ],
                    )
            page.get_by_role("link", name="per hour").click()
            page.wait_for_url("**/?bucket=hour")
            page.wait_for_selector("body[data-charts-rendered]", timeout=30_000)
            ab = page.locator("section#ab")
            assert ab.get_attribute("data-state") == "rendered"
            assert ab.locator("g.trace").count() == 3  # the two arms and Λ
            assert _non_blank(ab.locator(".chart").screenshot())[0] > 20
        finally:
            page.screenshot(path=str(Path(store.data_dir) / "dashboards-last.png"), full_page=True)
            browser.close()
    assert not errors, errors
    assert not elsewhere, f"the page asked for something off its server: {elsewhere}"


def test_a_refresh_waits_out_a_write_connection_of_its_own_process(store: Settings) -> None:
    """The review app writes from the process that serves the dashboards; DuckDB refuses a
    read-only connection beside a write one there, so the refresh waits for it (briefly)."""
    board = Dashboards(store, cache_seconds=0)
    results: list[Any] = []
    with writer_connection(store.database):
        reader = threading.Thread(target=lambda: results.append(board.figures("day", 60)))
        reader.start()
        time.sleep(0.3)
        assert not results  # still waiting: the write connection is open
    reader.join(timeout=10)
    assert results and results[0]["charts"][0]["figure"] is not None


def test_the_bench_store_charts(tmp_path: Path) -> None:
    """The dashboards benchmark's synthetic store has what every bucketed chart reads."""
    settings = Settings(data_dir=str(tmp_path))
    build(settings.database, 2_000)
    payload = Dashboards(settings, cache_seconds=0).figures("day", 60)
    drawn = {chart["id"] for chart in payload["charts"] if chart["figure"] is not None}
    assert {"samples", "labels", "rejects", "backlog", "completions", "judge"} <= drawn
