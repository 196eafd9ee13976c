"""The review app's guards over real HTTP: a real `qe serve` process on a free loopback port,
urllib as the client, the real DuckDB file and writer lock."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qe_assets.settings import Settings
from qe_assets.store import connect, writer_lock
from qe_assets_tests.factories import line, make_event
from qe_assets_tests.review_server import Client, hidden, in_thread, review_store, serving
from qe_assets_tests.runs import scalar

TOKEN = "a-token-of-enough-length-42"
XSS = "<script>alert('x')</script> & <b>bold</b>"


@pytest.fixture
def store(settings: Settings) -> Settings:
    hostile = line(
        make_event(
            "evil",
            question=XSS,
            answer="An answer <img src=x onerror=alert(1)>.",
            evaluation={"score": 0.1, "labels": ["factuality_error"]},
        )
    ).decode()
    return review_store(settings, low=3, extra=[hostile])


def statuses(settings: Settings) -> dict[str, tuple[str, str | None, str | None]]:
    from qe_assets.store import connect

    with connect(settings.database, read_only=True) as conn:
        rows = conn.execute("SELECT sample_id, status, reviewer, note FROM review_queue").fetchall()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def test_posts_need_the_session_token_and_this_origin(store: Settings, tmp_path: Path) -> None:
    before = statuses(store)
    with serving(store, tmp_path) as server:
        client = Client(server.url)
        status, page = client.request("/review/item?pos=0")
        assert status == 200
        csrf, sample = hidden(page, "csrf"), hidden(page, "sample_id")
        assert client.cookie("qe_csrf") == csrf
        form = {"sample_id": sample, "seen": hidden(page, "seen"), "pos": "0"}
        accept = {**form, "action": "accept", "note": "ok"}
        # No token, a wrong one, a foreign origin, no origin at all: refused, nothing written.
        assert client.post("/review/decide", accept)[0] == 403
        assert client.post("/review/decide", {**accept, "csrf": "forged"})[0] == 403
        evil = {"Origin": "http://evil.example"}
        assert client.post("/review/decide", {**accept, "csrf": csrf}, evil)[0] == 403
        no_origin = client.request("/review/decide", {**accept, "csrf": csrf})
        assert no_origin[0] == 403
        # Another site's page cannot reach the app by pointing its own name at 127.0.0.1.
        rebound = client.request("/review", headers={"Host": f"evil.example:{server.port}"})
        assert rebound[0] == 403
        assert statuses(store) == before
        # The real thing: recorded with reviewer ($USER of the server) and note.
        status, page = client.post("/review/decide", {**accept, "csrf": csrf})
        assert status == 200 and f"accepted {sample}" in page.replace("&#39;", "'")
    assert statuses(store)[sample] == ("accepted", "tester", "ok")


def test_everything_shown_is_escaped(store: Settings, tmp_path: Path) -> None:
    with serving(store, tmp_path) as server:
        client = Client(server.url)
        status, queue = client.request("/review?label=factuality_error")
        assert status == 200
        assert "<script>alert" not in queue and "&lt;script&gt;alert(" in queue
        # The hostile sample ranks first (lowest confidence among equal labels).
        status, item = client.request("/review/item?pos=0&label=factuality_error")
        assert hidden(item, "sample_id") == "evil#factuality_error"
        assert "<img src=x" not in item and "&lt;img src=x onerror=alert(1)&gt;" in item
        assert "Content-Security-Policy" not in item  # a header, not markup
        csrf = hidden(item, "csrf")
        note = "<i>no</i>"
        form = {
            "csrf": csrf,
            "sample_id": "evil#factuality_error",
            "seen": hidden(item, "seen"),
            "pos": "0",
            "action": "reject",
            "note": note,
            "status": "all",
        }
        status, _ = client.post("/review/decide", form)
        assert status == 200
        status, shown = client.request("/review/item?pos=0&status=rejected")
        assert "&lt;i&gt;no&lt;/i&gt;" in shown and "<i>no</i>" not in shown


def qe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qe_assets.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_no_public_address_without_a_token(store: Settings, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QE_")}
    env["QE_DATA_DIR"] = store.data_dir
    refused = qe(env, "serve", "--host", "0.0.0.0", "--port", "1")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "qe: refusing to serve on 0.0.0.0: beyond 127.0.0.1 the review page needs a token; "
        "set QE_SERVE_TOKEN (16+ characters), then open the page once with ?token=…"
    ]
    short = qe({**env, "QE_SERVE_TOKEN": "short"}, "serve", "--host", "0.0.0.0")
    assert short.returncode == 2 and "QE_SERVE_TOKEN must be at least 16" in short.stderr
    assert "short" not in short.stderr.replace("shorter", "")  # the secret is never echoed


def test_a_configured_token_is_required_everywhere(store: Settings, tmp_path: Path) -> None:
    with serving(store, tmp_path, extra_env={"QE_SERVE_TOKEN": TOKEN}) as server:
        anonymous = Client(server.url)
        for path in ("/review", "/review/item?pos=0", "/dashboards", "/static/review.js"):
            assert anonymous.request(path)[0] == 401, path
        assert anonymous.request("/review?token=wrong-token-of-some-length")[0] == 401
        assert anonymous.post("/review/decide", {"action": "accept"})[0] == 401
        bearer = Client(server.url)
        assert bearer.request("/review", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
        browser = Client(server.url)
        status, page = browser.request(f"/review?token={TOKEN}&label=factuality_error")
        assert status == 200 and "Review queue" in page  # redirected, token now in a cookie
        assert browser.cookie("qe_token") == TOKEN
        status, item = browser.request("/review/item?pos=0")
        assert status == 200 and TOKEN not in item
        # The token is no CSRF token: a POST still needs the session's.
        form = {"sample_id": hidden(item, "sample_id"), "action": "accept", "pos": "0"}
        assert browser.post("/review/decide", form)[0] == 403
    assert "Traceback" not in server.log.read_text()


def test_a_decision_waits_for_a_run_then_is_retried(store: Settings, tmp_path: Path) -> None:
    """A run holding the writer lock: the page waits briefly, says it will retry, records
    nothing; the retry form it renders (what the page re-sends by itself) then goes through."""
    with serving(store, tmp_path, args=("--write-wait", "0.5")) as server:
        client = Client(server.url)
        _, item = client.request("/review/item?pos=0")
        sample = hidden(item, "sample_id")
        form = {
            "csrf": hidden(item, "csrf"),
            "sample_id": sample,
            "seen": hidden(item, "seen"),
            "pos": "0",
            "action": "reject",
            "note": "while a run wrote",
        }
        with writer_lock(store.database):  # what a stage holds for its whole run
            status, page = client.post("/review/decide", form)
            assert status == 503
            assert "will be sent again automatically" in page and "nothing is lost" in page
            assert statuses(store)[sample][0] == "pending"
        retry = {
            name: hidden(page, name)
            for name in ("csrf", "sample_id", "seen", "pos", "action", "note")
        }
        assert retry == form
        status, page = client.post("/review/decide", retry)
        assert status == 200
    assert statuses(store)[sample] == ("rejected", "tester", "while a run wrote")
    assert scalar(store, "SELECT status FROM completions WHERE sample_id = ?", [sample]) == (
        "rejected"
    )


def test_a_bulk_decision_applies_to_exactly_the_confirmed_samples(
    store: Settings, tmp_path: Path
) -> None:
    from qe_assets.review import decisions as review
    from qe_assets.store import writer_connection

    with serving(store, tmp_path) as server:
        client = Client(server.url)
        _, queue = client.request("/review?label=factuality_error")
        ask = {
            "csrf": hidden(queue, "csrf"),
            "label": "factuality_error",
            "bulk_action": "reject",
            "note": "bulk",
        }
        status, confirm = client.post("/review/bulk", ask)
        assert status == 200
        assert "Reject 2 pending samples matching status=pending, label=factuality_error" in (
            confirm
        )
        digest = hidden(confirm, "confirm_digest")
        # Someone decides one of them before the confirmation arrives: asked again, with 1.
        with writer_connection(store.database) as conn:
            review.accept(conn, "low-0#factuality_error", "bo")
        status, again = client.post("/review/bulk", {**ask, "confirm_digest": digest})
        assert status == 200 and "The matching samples changed" in again
        assert "Reject 1 pending sample matching" in again
        assert statuses(store)["evil#factuality_error"][0] == "pending"
        status, done = client.post(
            "/review/bulk", {**ask, "confirm_digest": hidden(again, "confirm_digest")}
        )
        assert status == 200 and "rejected 1 samples" in done
    decided = statuses(store)
    assert decided["evil#factuality_error"] == ("rejected", "tester", "bulk")
    assert decided["low-0#factuality_error"] == ("accepted", "bo", None)


def test_extra_routes_mount_behind_the_same_checks(store: Settings, tmp_path: Path) -> None:
    """How the dashboards join the app: `create_app(extra_routes=…)` serves them (before the
    placeholder) behind the token check; served here by uvicorn in a thread, over real HTTP."""

    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from qe_assets.web.app import create_app

    def charts(request: object) -> PlainTextResponse:
        return PlainTextResponse("charts")

    app = create_app(store, extra_routes=[Route("/dashboards", charts)], token=TOKEN)
    with in_thread(app) as url:
        client = Client(url)
        assert client.request("/dashboards")[0] == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert client.request("/dashboards", headers=auth) == (200, "charts")
        status, page = client.request("/review", headers=auth)
        assert status == 200 and '<a href="/dashboards"' in page
    # `qe serve` itself serves the dashboards behind the nav link: the page (after the
    # trailing-slash redirect), its data from the tables and the vendored plotly.js.
    with serving(store, tmp_path) as served:
        client = Client(served.url)
        status, page = client.request("/dashboards")
        assert status == 200 and "qe_assets dashboards" in page
        status, data = client.request("/dashboards/data.json?bucket=day")
        assert status == 200 and json.loads(data)
        status, script = client.request("/dashboards/vendor/plotly.min.js")
        assert status == 200 and len(script) > 1_000_000


def test_decisions_land_while_the_dashboards_read(store: Settings) -> None:
    """The dashboards read under the app's connection lock: a read-only connection beside the
    review page's write connection in one process made DuckDB refuse the write (a 500, the
    decision lost)."""
    from qe_assets.web.app import create_app

    app = create_app(store)
    with in_thread(app) as url:
        client = Client(url)
        # A dashboard read waits for the lock the review page's writes take.
        answers: list[int] = []
        reader = threading.Thread(
            target=lambda: answers.append(client.request("/dashboards/data.json?buckets=7")[0])
        )
        with app.state.db_lock:
            reader.start()
            reader.join(timeout=0.5)
            assert reader.is_alive() and not answers
        reader.join(timeout=10)
        assert answers == [200]
        # Decisions posted while the dashboards read over and over (no cache: a new window each
        # time) all land.
        stop = threading.Event()
        reads: list[int] = []

        def read_dashboards() -> None:
            buckets = 1
            while not stop.is_set():
                reads.append(Client(url).request(f"/dashboards/data.json?buckets={buckets}")[0])
                buckets = buckets % 200 + 1

        readers = [threading.Thread(target=read_dashboards) for _ in range(2)]
        for thread in readers:
            thread.start()
        decided = []
        try:
            for _ in range(4):
                status, page = client.request("/review/item?pos=0")
                assert status == 200
                form = {
                    "csrf": hidden(page, "csrf"),
                    "sample_id": hidden(page, "sample_id"),
                    "seen": hidden(page, "seen"),
                    "pos": "0",
                    "action": "accept",
                }
                status, _ = client.post("/review/decide", form)
                assert status == 200
                decided.append(form["sample_id"])
        finally:
            stop.set()
            for thread in readers:
                thread.join(timeout=10)
    assert reads and set(reads) == {200}
    assert all(statuses(store)[sample][0] == "accepted" for sample in decided)


def test_a_bulk_decision_skips_what_another_reviewer_decided(
    store: Settings, tmp_path: Path
) -> None:
    """The confirmed bulk accept waits for a run's writer lock; meanwhile another reviewer
    rejects one of its samples: that decision stands and the page says 1 was skipped."""
    from qe_assets.review import decisions as review
    from qe_assets.store import connect

    with serving(store, tmp_path) as server:
        client = Client(server.url)
        _, queue = client.request("/review?label=factuality_error")
        ask = {"csrf": hidden(queue, "csrf"), "label": "factuality_error", "bulk_action": "accept"}
        status, confirm = client.post("/review/bulk", ask)
        assert status == 200 and "Accept 2 pending samples" in confirm
        confirmed = {**ask, "confirm_digest": hidden(confirm, "confirm_digest")}
        answers: list[tuple[int, str]] = []
        poster = threading.Thread(
            target=lambda: answers.append(client.post("/review/bulk", confirmed))
        )
        with writer_lock(store.database):  # a run writing: the bulk decision waits for it
            poster.start()
            time.sleep(1.0)  # the page has listed the ids again and waits for the lock
            with connect(store.database) as conn:
                review.reject(conn, "evil#factuality_error", "bo", "no")
        poster.join(timeout=30)
    ((status, page),) = answers
    assert status == 200
    assert "accepted 1 samples" in page and "1 skipped: decided by another reviewer" in page
    decided = statuses(store)
    assert decided["evil#factuality_error"] == ("rejected", "bo", "no")
    assert decided["low-0#factuality_error"][:2] == ("accepted", "tester")


def _textarea(page: str) -> str:
    match = re.search(
        r'<textarea name="completion" id="completion"[^>]*>(.*?)</textarea>', page, re.S
    )
    assert match is not None, "no completion box"
    return html.unescape(match.group(1))


def test_the_edit_box_shows_exactly_what_accepting_exports(store: Settings, tmp_path: Path) -> None:
    # Offline, a low-confidence sample has no completion yet; accepting it exports the naive one
    # (the original answer behind the label's prefix). The box must show that text, not the
    # bare original answer, and the page must say it is no real correction.
    with serving(store, tmp_path) as server:
        client = Client(server.url)
        status, page = client.request("/review/item?pos=0&label=low_relevance")
        assert status == 200
        sample = hidden(page, "sample_id")
        original = scalar(
            store, "SELECT original_answer FROM annotated_samples WHERE sample_id = ?", [sample]
        )
        shown = _textarea(page)
        assert shown != original and shown.endswith(original)
        assert "no real correction" in page
        form = {
            "csrf": hidden(page, "csrf"),
            "sample_id": sample,
            "seen": hidden(page, "seen"),
            "pos": "0",
            "action": "accept",
            "label": "low_relevance",
        }
        assert client.post("/review/decide", form)[0] == 200
    exported = scalar(store, "SELECT completion FROM completions WHERE sample_id = ?", [sample])
    assert exported == shown


def test_the_queue_shows_how_long_each_sample_waited(store: Settings, tmp_path: Path) -> None:
    with writer_lock(store.database), connect(store.database) as conn:
        conn.execute(
            "UPDATE review_queue SET queued_at = now()::TIMESTAMP - INTERVAL 3 HOUR "
            "WHERE sample_id = (SELECT min(sample_id) FROM review_queue)"
        )
    with serving(store, tmp_path) as server:
        status, page = Client(server.url).request("/review?status=all")
    assert status == 200
    ages = [html.unescape(a) for a in re.findall(r'<td class="age"[^>]*>([^<]*)</td>', page)]
    assert ages and "3 h" in ages, ages
    assert all(re.fullmatch(r"< 1 min|\d+ (min|h|d)", age) for age in ages), ages
