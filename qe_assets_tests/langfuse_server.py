"""A local HTTP server that answers like Langfuse's public API, from recorded records.

A Langfuse server needs Postgres, ClickHouse, Redis and S3, so the importer is tested against
this: the JSON shapes of Langfuse's API reference (fern definitions `scores-v3.yml`,
`observations-v2.yml`) and its server's paging:

* `GET /api/public/v3/scores`: `{data: [ScoreV3], meta: {limit, cursor?}}`, newest first
  (`ORDER BY timestamp DESC, id DESC`); the cursor is base64url JSON `{lastTimestamp, lastId}`
  and pages strictly after it; `limit` at most 100 (else HTTP 400); `fields` groups `details`
  (comment, configId, metadata) and `subject` (`{kind: trace, id}` or `{kind: observation, id,
  traceId}`); filter `traceId`.
* `GET /api/public/v2/observations?traceId=…`: `{data: [observation], meta: {cursor?}}`, the
  field groups `core`, `basic`, `io` (input/output as raw strings), `metadata`, `model`.
* `GET /api/public/traces/{traceId}`: TraceWithFullDetails (input, output and metadata as
  JSON, its observations and scores).
* Basic auth (public key : secret key); anything else is HTTP 401.
"""

from __future__ import annotations

import base64
import json
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PUBLIC, SECRET = "pk-lf-3f1e-test", "sk-lf-9a2c-never-shown"
PROJECT = "cm-project-7"

_CORE = ("id", "traceId", "startTime", "endTime", "projectId", "parentObservationId", "type")
_GROUPS = {
    "basic": (
        "name",
        "level",
        "statusMessage",
        "version",
        "environment",
        "bookmarked",
        "public",
        "userId",
        "sessionId",
    ),
    "io": ("input", "output"),
    "metadata": ("metadata",),
    "model": ("providedModelName", "internalModelId", "modelParameters"),
}


def score(
    score_id: str,
    trace_id: str,
    name: str,
    value: Any,
    timestamp: str,
    *,
    data_type: str = "NUMERIC",
    comment: str | None = None,
    observation: str | None = None,
) -> dict[str, Any]:
    """A ScoreV3 with every field group (the server drops what `fields` does not ask for)."""
    subject: dict[str, Any] = (
        {"kind": "observation", "id": observation, "traceId": trace_id}
        if observation
        else {"kind": "trace", "id": trace_id}
    )
    return {
        "id": score_id,
        "projectId": PROJECT,
        "name": name,
        "dataType": data_type,
        "value": value,
        "source": "EVAL",
        "timestamp": timestamp,
        "environment": "default",
        "createdAt": timestamp,
        "updatedAt": timestamp,
        "comment": comment,
        "configId": None,
        "metadata": {},
        "subject": subject,
    }


def trace_record(
    trace_id: str,
    timestamp: str,
    *,
    input: Any = None,
    output: Any = None,
    metadata: dict | None = None,
) -> dict[str, Any]:
    """A TraceWithFullDetails without its `observations` and `scores` (the server adds them):
    input, output and metadata as JSON values."""
    return {
        "id": trace_id,
        "timestamp": timestamp,
        "name": "rag",
        "input": input,
        "output": output,
        "sessionId": None,
        "release": None,
        "version": None,
        "userId": None,
        "metadata": metadata or {},
        "tags": [],
        "public": False,
        "environment": "default",
        "htmlPath": f"/project/{PROJECT}/traces/{trace_id}",
        "latency": 1.2,
        "totalCost": 0.0,
    }


def observation(
    obs_id: str,
    trace_id: str,
    kind: str,
    start: str,
    *,
    parent: str | None = None,
    name: str = "",
    input: Any = None,
    output: Any = None,
    metadata: dict | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """A v2 observation with every field group; input/output as the raw strings the API sends."""

    def raw(value: Any) -> str | None:
        return None if value is None else json.dumps(value, ensure_ascii=False)

    return {
        "id": obs_id,
        "traceId": trace_id,
        "startTime": start,
        "endTime": start,
        "projectId": PROJECT,
        "parentObservationId": parent,
        "type": kind,
        "name": name or kind,
        "level": "DEFAULT",
        "statusMessage": None,
        "version": None,
        "environment": "default",
        "bookmarked": False,
        "public": False,
        "userId": None,
        "sessionId": None,
        "input": raw(input),
        "output": raw(output),
        "metadata": metadata or {},
        "providedModelName": model,
        "internalModelId": None,
        "modelParameters": None,
    }


class Recorded:
    def __init__(self) -> None:
        self.scores: list[dict[str, Any]] = []
        self.observations: list[dict[str, Any]] = []
        self.requests: list[str] = []
        self.traces: dict[str, dict[str, Any]] = {}
        self.v3 = True  # False: answers 404 like a Langfuse without the v3 scores API


def _trace_of(item: dict[str, Any]) -> str:
    subject = item["subject"]
    return str(subject.get("traceId", subject["id"]))


def _cursor(item: dict[str, Any]) -> str:
    text = json.dumps({"lastTimestamp": item["timestamp"], "lastId": item["id"]})
    return base64.urlsafe_b64encode(text.encode()).decode()


def _handler(recorded: Recorded) -> type[BaseHTTPRequestHandler]:
    expected = "Basic " + base64.b64encode(f"{PUBLIC}:{SECRET}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, body: Any) -> None:
            data = json.dumps(body, ensure_ascii=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            recorded.requests.append(self.path)
            if self.headers.get("Authorization") != expected:
                self._send(401, {"message": "Invalid credentials"})
                return
            one = {k: v[0] for k, v in query.items()}
            if url.path == "/api/public/v3/scores" and recorded.v3:
                self._scores(one)
            elif url.path == "/api/public/v2/observations":
                self._observations(one)
            elif url.path.startswith("/api/public/traces/"):
                self._trace(urllib.parse.unquote(url.path.rsplit("/", 1)[1]))
            else:
                self._send(404, {"message": "Not Found"})

        def _scores(self, query: dict[str, str]) -> None:
            limit = int(query.get("limit", 50))
            if limit > 100:
                self._send(400, {"message": "limit must be at most 100"})
                return
            fields = set(query.get("fields", "").split(","))
            items = sorted(recorded.scores, key=lambda s: (s["timestamp"], s["id"]), reverse=True)
            if "traceId" in query:
                wanted = query["traceId"]
                items = [
                    s for s in items if s["subject"].get("traceId", s["subject"]["id"]) == wanted
                ]
            if "cursor" in query:
                last = json.loads(base64.urlsafe_b64decode(query["cursor"]))
                bound = (last["lastTimestamp"], last["lastId"])
                items = [s for s in items if (s["timestamp"], s["id"]) < bound]
            page, more = items[:limit], len(items) > limit
            shaped = []
            for item in page:
                out = {
                    k: v
                    for k, v in item.items()
                    if k not in ("comment", "configId", "metadata", "subject")
                }
                if "details" in fields:
                    out.update(
                        comment=item["comment"],
                        configId=item["configId"],
                        metadata=item["metadata"],
                    )
                if "subject" in fields:
                    out["subject"] = item["subject"]
                shaped.append(out)
            meta: dict[str, Any] = {"limit": limit}
            if more:
                meta["cursor"] = _cursor(page[-1])
            self._send(200, {"data": shaped, "meta": meta})

        def _trace(self, trace_id: str) -> None:
            found = recorded.traces.get(trace_id)
            if found is None:
                self._send(404, {"message": "Trace not found within authorized project"})
                return
            views = [o for o in recorded.observations if o["traceId"] == trace_id]
            scores = [s for s in recorded.scores if _trace_of(s) == trace_id]
            self._send(200, {**found, "observations": views, "scores": scores})

        def _observations(self, query: dict[str, str]) -> None:
            limit = min(int(query.get("limit", 50)), 1000)
            groups = set((query.get("fields") or "core,basic").split(","))
            keep = set(_CORE).union(*(_GROUPS[g] for g in groups if g in _GROUPS))
            items = [o for o in recorded.observations if o["traceId"] == query.get("traceId")]
            start = int(base64.urlsafe_b64decode(query["cursor"])) if "cursor" in query else 0
            page = items[start : start + limit]
            meta: dict[str, Any] = {}
            if start + limit < len(items):
                meta["cursor"] = base64.urlsafe_b64encode(str(start + limit).encode()).decode()
            self._send(200, {"data": [{k: o[k] for k in keep} for o in page], "meta": meta})

    return Handler


@contextmanager
def serving(recorded: Recorded) -> Iterator[str]:
    """The server on a free loopback port, in a thread; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(recorded))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
