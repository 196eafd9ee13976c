"""Dashboards benchmark: `python -m qe_assets_bench.dashboards [--samples 100000,1000000]`.

Fills a fresh store (`qe_assets.store.SCHEMA`) with N annotated samples spread over 30 days by
DuckDB SQL alone (short texts: the charts read labels, routes and times, never the prompts), a
completion for every train sample, the review queue (a fifth of the samples, half of them still
pending, and judged spot checks with decisions), rejected events and a few evaluations. Then
measures, per size:

* `figures`: one refresh of the page's data (the read-only connection, every query, the Plotly
  JSON), per hour (72 buckets) and per day (60), best of 5, the cache off;
* `page`: GET /dashboards/?bucket=day from uvicorn on a loopback port, as a browser would ask it;
* `agreement`: the judge calibration query of the completion stage.

It reports; it always exits 0.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount

from qe_assets.review.calibration import calibrate
from qe_assets.settings import Settings
from qe_assets.store import connect, ensure_schema
from qe_assets.web.dashboards import Dashboards, dashboard_routes

FILL = """
INSERT INTO annotated_samples
SELECT 'r' || i || '#' || label, 'r' || i, i, label, [label], 'en', 'q', 'a', [], 'i', 'p', 0.5,
       conf, CASE WHEN conf < 0.6 THEN 'review' ELSE 'train' END, NULL, md5(i::VARCHAR), 'd' || i,
       NULL, made_at, i
FROM (
    SELECT i, (['factuality_error', 'incomplete_answer', 'low_relevance', 'overconfidence',
                'unspecified'])[1 + i % 5] AS label,
           (i % 100) / 100.0 AS conf,
           now()::TIMESTAMP - INTERVAL 30 DAY + INTERVAL 1 SECOND * (i * 2592000 // $n) AS made_at
    FROM range($n) t(i)
);
INSERT INTO completions (sample_id, completion, mode, status, model, error, attempts, created_at,
                         updated_at, seq, judge_model, judge_original_score,
                         judge_completion_score)
SELECT sample_id, 'c', CASE WHEN seq % 3 = 0 THEN 'llm' ELSE 'naive' END, 'ok', NULL, NULL, 0,
       annotated_at, annotated_at, seq, 'judge', 3, 3 + seq % 5
FROM annotated_samples WHERE route = 'train';
INSERT INTO review_queue
SELECT sample_id, CASE WHEN route = 'review' THEN 'low_confidence' ELSE 'spot_check' END,
       CASE WHEN seq % 2 = 0 THEN 'pending' WHEN seq % 3 = 0 THEN 'rejected' ELSE 'accepted' END,
       CASE WHEN seq % 2 = 0 THEN NULL ELSE 'ann' END, NULL, annotated_at,
       CASE WHEN seq % 2 = 0 THEN NULL ELSE annotated_at + INTERVAL 2 HOUR END
FROM annotated_samples WHERE seq % 5 = 0;
INSERT INTO rejected_events
SELECT 'x' || i, 'inbox', '{', 'score', 'bad', NULL,
       now()::TIMESTAMP - INTERVAL 1 SECOND * (i * 2592000 // ($n // 100 + 1))
FROM range($n // 100) t(i);
"""


def build(database: Path, n: int) -> float:
    started = time.perf_counter()
    with connect(database) as conn:
        ensure_schema(conn)
        for statement in filter(str.strip, FILL.split(";")):
            params = {"n": n} if "$n" in statement else None
            conn.execute(statement, params)
    return time.perf_counter() - started


def best(seconds: list[float]) -> str:
    return f"{min(seconds) * 1000:.0f} ms (median {sorted(seconds)[len(seconds) // 2] * 1000:.0f})"


def measure(n: int) -> None:
    with tempfile.TemporaryDirectory(prefix="qe-bench-dash-") as tmp:
        settings = Settings(data_dir=tmp)
        built = build(settings.database, n)
        board = Dashboards(settings, cache_seconds=0)
        print(f"\n{n:,} samples (store built in {built:.1f} s)")
        for unit in ("hour", "day"):
            runs = []
            for _ in range(5):
                started = time.perf_counter()
                board.figures(unit, 72 if unit == "hour" else 60)
                runs.append(time.perf_counter() - started)
            print(f"  figures per {unit}: {best(runs)}")
        runs = []
        with connect(settings.database, read_only=True) as conn:
            for _ in range(5):
                started = time.perf_counter()
                calibration, _ = calibrate(conn, settings)
                runs.append(time.perf_counter() - started)
        decisions = calibration.overall.decisions
        print(f"  agreement ({decisions} decisions in the window): {best(runs)}")
        print(f"  page GET /dashboards/?bucket=day: {page_load(settings)}")


def page_load(settings: Settings) -> str:
    routes = dashboard_routes(settings, cache_seconds=0)
    app = Starlette(routes=[Mount("/dashboards", routes=routes)])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/dashboards/?bucket=day"
    runs, size = [], 0
    try:
        for _ in range(5):
            started = time.perf_counter()
            with urllib.request.urlopen(url, timeout=60) as response:
                size = len(response.read())
            runs.append(time.perf_counter() - started)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
    return f"{best(runs)}, {size / 1024:.0f} KB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", default="100000,1000000")
    args = parser.parse_args()
    for n in (int(x) for x in args.samples.split(",")):
        measure(n)


if __name__ == "__main__":
    main()
