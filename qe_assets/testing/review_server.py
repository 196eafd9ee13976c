"""A real `qe serve` process on a free loopback port, and plain-HTTP helpers (urllib: no client
library of ours in between): for the review page tests and the review page benchmark."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from qe_assets.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ReviewServer:
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def _wait_serving(server: ReviewServer, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{server.url}/static/review.css", timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answers (401 with a token): serving
        except OSError:
            if server.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qe serve did not start: {server.log.read_text()}") from None
            time.sleep(0.05)


@contextmanager
def serving(
    settings: Settings,
    tmp_path: Path,
    *,
    extra_env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
) -> Iterator[ReviewServer]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QE_", "OPENAI_"))}
    env.update(QE_DATA_DIR=settings.data_dir, USER="tester", **(extra_env or {}))
    port = free_port()
    log = tmp_path / f"qe-serve-{port}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "qe_assets.cli", "serve", "--port", str(port), *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = ReviewServer(process, port, log)
    try:
        _wait_serving(server)
        yield server
    finally:
        process.terminate()
        process.wait(timeout=15)


@dataclass
class Client:
    """A browser-like HTTP client: cookies kept, forms posted url-encoded, redirects followed."""

    base: str
    jar: CookieJar = field(default_factory=CookieJar)

    def __post_init__(self) -> None:
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def request(
        self,
        path: str,
        form: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, str]:
        data = urlencode(form).encode() if form is not None else None
        req = urllib.request.Request(self.base + path, data=data, headers=headers or {})
        try:
            with self.opener.open(req, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def post(
        self, path: str, form: dict[str, str], headers: dict[str, str] | None = None
    ) -> tuple[int, str]:
        return self.request(path, form, {"Origin": self.base, **(headers or {})})

    def cookie(self, name: str) -> str | None:
        return next((c.value for c in self.jar if c.name == name), None)


def hidden(html: str, name: str) -> str:
    match = re.search(rf'name="{re.escape(name)}" value="([^"]*)"', html)
    assert match is not None, f"no hidden field {name}"
    import html as html_module

    return html_module.unescape(match.group(1))


@contextmanager
def in_thread(app: Any) -> Iterator[str]:
    """`app` served by uvicorn on a free loopback port in a thread of the test process (so the
    test can reach `app.state`); yields its URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
