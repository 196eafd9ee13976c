"""The server plumbing of `qe serve` (issue 26, item 10), over real HTTP to a real `qe serve`.

* A 300 MB POST to /review/decide got its refusal only after the server had read it whole: the
  server's RSS went from 200 to 792 MB. Bodies are now capped by Content-Length before a byte is
  read, and as they stream when there is none; the server's peak RSS (VmHWM) is measured.
* /dashboards/ had no Content-Security-Policy, unlike the review pages.
* `?token=` on a path like `//host/…` redirected the browser to that other host.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest

from qe_assets.lib.web_security import MAX_BODY_BYTES
from qe_assets.ops.demo import generate_events, write_jsonl
from qe_assets.testing.browser import CHROMIUM, CHROMIUM_ARGS
from qe_assets.web.app import CSP, DASHBOARDS_CSP
from qe_assets_tests.conftest import free_port
from qe_assets_tests.test_ui_browser import _unavailable

TOKEN = "a-test-token-of-enough-length-26"
BIG = 300 * 1024 * 1024
CHUNK = b"completion=" + b"x" * (1024 * 1024 - 11)  # 1 MiB a piece
# What the server may grow by while a 300 MB body is refused (its own buffers, the 1 MiB cap).
GROWTH_ALLOWED = 40 * 1024 * 1024


@dataclass(frozen=True)
class Server:
    process: subprocess.Popen[bytes]
    port: int

    def peak_rss(self) -> int:
        """The server's peak resident set (VmHWM), in bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM in /proc status")

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("web_limits") / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QE_", "DAGSTER_HOME"))}
    env.update(QE_DATA_DIR=str(data), QE_SERVE_TOKEN=TOKEN)
    # A store with something to chart: demo events through one real `qe run`.
    write_jsonl(data / "inbox" / "events.jsonl", generate_events(300, seed=26))
    subprocess.run(
        [sys.executable, "-m", "qe_assets.cli", "run", "-q"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=True,
        timeout=240,
    )
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "qe_assets.cli", "serve", "--port", str(port)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    served = Server(process, port)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, "qe serve exited"
            try:
                conn = served.connection()
                conn.request("GET", "/static/review.css", headers={"X-QE-Token": TOKEN})
                assert conn.getresponse().status == 200
                conn.close()
                break
            except OSError:
                assert time.monotonic() < deadline, "qe serve did not start"
                time.sleep(0.1)
        yield served
    finally:
        process.terminate()
        process.wait(timeout=15)


def _same_origin_post(port: int) -> dict[str, str]:
    """Headers of a POST from the review page itself: token, origin, CSRF cookie."""
    return {
        "X-QE-Token": TOKEN,
        "Origin": f"http://127.0.0.1:{port}",
        "Cookie": "qe_csrf=abc",
        "X-CSRF-Token": "abc",
        "Content-Type": "application/x-www-form-urlencoded",
    }


def _post(
    server: Server, body: object, headers: dict[str, str], chunked: bool = False
) -> int | None:
    """POST `body` to /review/decide; the status, or None when the server hung up before
    answering (it closes the connection as soon as it has refused a body)."""
    conn = server.connection()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        conn.request("POST", "/review/decide", body=body, headers=headers, encode_chunked=chunked)
    try:
        response = conn.getresponse()
        response.read()
        return response.status
    except (ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError):
        return None
    finally:
        conn.close()


def _post_big(server: Server, headers: dict[str, str], *, chunked: bool) -> int | None:
    """POST BIG bytes, streamed from a generator (with Content-Length unless chunked)."""

    def body() -> Iterator[bytes]:
        for _ in range(BIG // len(CHUNK)):
            yield CHUNK

    if not chunked:
        headers = {**headers, "Content-Length": str(BIG)}
    return _post(server, body(), headers, chunked=chunked)


@pytest.mark.parametrize(
    "case", ["content-length", "chunked", "content-length, cross-origin"], ids=str
)
def test_a_300_mb_post_is_refused_without_being_read(server: Server, case: str) -> None:
    headers = _same_origin_post(server.port)
    if "cross-origin" in case:
        headers["Origin"] = "http://elsewhere.example"
    before = server.peak_rss()
    started = time.monotonic()
    status = _post_big(server, headers, chunked=case == "chunked")
    seconds = time.monotonic() - started
    grown = server.peak_rss() - before
    print(
        f"\n{case}: status {status}, {seconds:.2f}s, server peak RSS {before / 2**20:.0f} MB "
        f"-> {(before + grown) / 2**20:.0f} MB"
    )
    assert server.process.poll() is None
    assert status in (413, None), status
    assert grown < GROWTH_ALLOWED, f"the server grew by {grown / 2**20:.0f} MB"
    # Still serving, and a normal-sized form still gets through to the CSRF check and beyond.
    conn = server.connection()
    small = "action=accept&sample_id=nope&csrf=abc"
    conn.request("POST", "/review/decide", body=small, headers=_same_origin_post(server.port))
    response = conn.getresponse()
    assert response.status != 413 and response.status < 500, response.read()
    conn.close()


def test_a_body_just_over_the_cap_is_413_and_one_at_it_is_not(server: Server) -> None:
    headers = _same_origin_post(server.port)
    for size, refused in ((MAX_BODY_BYTES + 1, True), (MAX_BODY_BYTES, False)):
        body = b"csrf=abc&note=" + b"n" * (size - 14)
        for chunked in (False, True):
            status = _post(server, iter([body]) if chunked else body, headers, chunked=chunked)
            assert (status in (413, None)) is refused, (size, chunked, status)


@pytest.mark.parametrize(
    ("path", "policy"),
    [
        ("/dashboards/", DASHBOARDS_CSP),
        ("/dashboards/data.json", DASHBOARDS_CSP),
        ("/dashboards/vendor/plotly.min.js", DASHBOARDS_CSP),
        ("/review", CSP),
        ("/static/review.js", CSP),
        ("/", CSP),
    ],
)
def test_every_page_carries_the_csp(server: Server, path: str, policy: str) -> None:
    conn = server.connection()
    conn.request("GET", path, headers={"X-QE-Token": TOKEN})
    response = conn.getresponse()
    response.read()
    assert response.getheader("Content-Security-Policy") == policy, path
    # Scripts only from the app's own files, everywhere.
    assert "script-src 'self';" in policy and "unsafe-eval" not in policy
    conn.close()


@pytest.mark.parametrize(
    "path", ["//evil.example/review", "///evil.example/x", "/\\evil.example/x", "/\\/evil.example"]
)
def test_the_token_redirect_stays_on_this_server(server: Server, path: str) -> None:
    conn = server.connection()
    conn.request("GET", f"{path}?token={TOKEN}&bucket=day")
    response = conn.getresponse()
    response.read()
    location = response.getheader("Location") or ""
    assert response.status == 303
    # A path of this server: not `//host…`, nor `/\\host…` (browsers read both as a host).
    assert location.startswith("/") and location[1:2] not in ("/", "\\"), location
    own = f"127.0.0.1:{server.port}"
    assert urlsplit(urljoin(f"http://{own}/", location)).netloc == own, location
    assert location.endswith("?bucket=day") and TOKEN not in location
    conn.close()


@pytest.mark.browser
def test_the_dashboards_draw_under_their_csp(server: Server) -> None:
    """Chromium opens the dashboards with ?token= (the redirect sets the cookie), and plotly
    draws every chart that has data without a single Content-Security-Policy violation."""
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is missing (Debian package `chromium`)")
    from playwright.sync_api import sync_playwright

    origin = f"http://127.0.0.1:{server.port}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page()
        problems: list[str] = []
        page.on(
            "console",
            lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None,
        )
        page.on("pageerror", lambda exc: problems.append(str(exc)))
        try:
            page.goto(f"{origin}/dashboards/?token={TOKEN}&bucket=day")
            assert page.url == f"{origin}/dashboards/?bucket=day"
            page.wait_for_selector("body[data-charts-rendered]", timeout=30_000)
            rendered = page.locator("section[data-state=rendered]")
            assert rendered.count() >= 3
            assert rendered.locator("svg.main-svg").count() >= 3
        finally:
            browser.close()
    assert not problems, problems
