"""What the importers share around the mapping: the HTTP client, the cursor store, and the writer
that puts events on the queue before the cursor moves.

The order is the crash guarantee: events first (the inbox writes a temporary file and renames it
into place; Redis and Kafka accept the batch), then the cursor file (also written atomically). A
crash in between replays the same page next time, with byte-identical events, which the
ingester's idempotency on `request_id` turns into duplicates, not new rows."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qe_assets.imports.mapping import event_line
from qe_assets.ingest.queues import QueueUnavailable, open_queue, write_atomically
from qe_assets.settings import Settings

# The keys: read from the environment when a client connects, never settings (which reach the
# launchpad and manifests), never in an error, a log line, a file or metadata.
PHOENIX_API_KEY = "QE_PHOENIX_API_KEY"
LANGFUSE_PUBLIC_KEY = "QE_LANGFUSE_PUBLIC_KEY"
LANGFUSE_SECRET_KEY = "QE_LANGFUSE_SECRET_KEY"


class ImportFailed(RuntimeError):
    """A problem the user fixes in a setting; one line naming it. Nothing was committed."""


class ImportNotConfigured(ImportFailed):
    """A setting the importer needs is not set: a usage error (`qe` exits 2), not a failure."""


def secret(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    value = env.get(name, "").strip()
    return value or None


@dataclass
class JsonClient:
    """GET/POST JSON over the standard library. Errors name the setting to fix, never a key."""

    base_url: str
    url_setting: str  # e.g. QE_PHOENIX_URL
    auth_setting: str  # the variable(s) holding the key, for a refused request
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    timeout: float = 30.0

    @classmethod
    def basic(cls, base_url: str, url_setting: str, user: str, password: str) -> JsonClient:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return cls(
            base_url,
            url_setting,
            f"{LANGFUSE_PUBLIC_KEY} / {LANGFUSE_SECRET_KEY}",
            {"Authorization": f"Basic {token}"},
        )

    def get(self, path: str, params: Sequence[tuple[str, Any]] = ()) -> Any:
        query = urllib.parse.urlencode([(k, v) for k, v in params if v is not None])
        return self._call(urllib.request.Request(f"{self.base_url}{path}?{query}"), path)

    def post(self, path: str, body: Any) -> Any:
        request = urllib.request.Request(
            f"{self.base_url}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        return self._call(request, path)

    def _call(self, request: urllib.request.Request, path: str) -> Any:
        for name, value in self.headers.items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise ImportFailed(
                    f"{self.base_url} refused the credentials (HTTP {exc.code}): check "
                    f"{self.auth_setting}"
                ) from None
            raise _http_failure(exc, self.base_url, path) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ImportFailed(
                f"cannot reach {self.base_url} ({reason}): check {self.url_setting}"
            ) from None
        except ValueError:
            raise ImportFailed(
                f"{self.base_url}{path} did not answer JSON: is {self.url_setting} the right "
                "server?"
            ) from None


class NotFound(ImportFailed):
    """HTTP 404: the source module says which setting names the missing thing."""


def _http_failure(exc: urllib.error.HTTPError, base_url: str, path: str) -> ImportFailed:
    try:
        detail = exc.read().decode("utf-8", "replace")[:200]
    except OSError:
        detail = ""
    detail = re.sub(r"\s+", " ", detail).strip()
    kind = NotFound if exc.code == 404 else ImportFailed
    return kind(f"{base_url}{path} answered HTTP {exc.code}: {detail}")


def state_path(settings: Settings, system: str, project: str) -> Path:
    """Where a source's cursor lives: one file per system and project, under the data dir."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", project)[:40]
    digest = hashlib.sha256(project.encode()).hexdigest()[:8]
    return Path(settings.data_dir) / "imports" / f"{system}-{slug}-{digest}.json"


def load_state(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise ImportFailed(
            f"{path}: the import cursor is not JSON; remove it to import from the start"
        ) from None
    return value if isinstance(value, dict) else {}


@dataclass
class Outcome:
    """What one import did, for the CLI's summary line and the sensor's metadata."""

    emitted: int = 0
    skipped: int = 0
    pending: int = 0
    gave_up: int = 0
    read: int = 0
    pages: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self, system: str) -> str:
        return (
            f"{system}: {self.read} traces read, {self.emitted} events enqueued, "
            f"{self.skipped} judged at or above the threshold, {self.pending} pending "
            f"judgement, {self.gave_up} given up unjudged; {len(self.problems)} with problems"
        )


class Writer:
    """Puts a page's events on the configured queue (as `qe enqueue` does), then commits the
    cursor. `after_write` runs between the two: a test's way to crash right there."""

    def __init__(
        self,
        settings: Settings,
        path: Path,
        after_write: Callable[[], None] | None = None,
    ) -> None:
        self.queue = open_queue(settings)
        self.path = path
        self.after_write = after_write

    def commit(self, events: Sequence[Mapping[str, Any]], state: Mapping[str, Any]) -> None:
        if events:
            try:
                self.queue.put([event_line(e) for e in events])
            except QueueUnavailable as exc:
                raise ImportFailed(f"{exc}: check QE_QUEUE_URL") from None
            if self.after_write is not None:
                self.after_write()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps(state, sort_keys=True, ensure_ascii=False, indent=1)
        write_atomically(self.path, body.encode("utf-8"))
