"""A small OpenAI-compatible HTTP server for tests and the benchmark.

Real sockets on 127.0.0.1, answered by `ThreadingHTTPServer`, so the real `openai` client (its
retries, timeouts, Retry-After handling, response parsing) is what gets exercised. Implements
`POST /v1/chat/completions` with programmable faults, and enough of the files and fine-tuning
API (`/v1/files`, `/v1/fine_tuning/jobs…`) for the fine-tune backend tests.

Behaviour of a chat request, first match wins:
1. the next reply queued with `plan(...)`;
2. `responder(request)`, when set and it returns a `Reply`;
3. the default: a deterministic answer derived from the prompt.
`EvalModels` is a responder that serves several models of known quality and a pairwise judge.
Every chat reply waits `latency` seconds first (plus the reply's own `delay`).
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import hashlib
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

CHAT_PATH = "/v1/chat/completions"


def prompt_hash(prompt: str) -> str:
    """How the server counts requests per prompt: sha256 of the last user message."""
    return hashlib.sha256(prompt.encode()).hexdigest()


def word_count(text: str) -> int:
    # Deterministic stand-in for a tokenizer: tests compute expected usage the same way.
    return len(text.split())


@dataclass(frozen=True)
class ChatRequest:
    """What a responder sees of one chat completion request."""

    body: dict[str, Any]
    headers: dict[str, str]
    prompt: str  # content of the last user message
    prompt_hash: str
    seen: int  # how many times this prompt has been asked, this request included

    @property
    def model(self) -> str:
        return str(self.body.get("model", ""))

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages", []))


@dataclass(frozen=True)
class Reply:
    """One programmed answer. Build with the class methods."""

    status: int = 200
    content: str | None = None  # None: the default answer for the prompt
    finish_reason: str = "stop"
    refusal: str | None = None
    delay: float = 0.0
    retry_after: float | None = None
    raw: bytes | None = None  # sent verbatim as a 200 application/json body
    hang: float | None = None  # sleep this long, then drop the connection unanswered
    usage: tuple[int, int] | None = None  # (prompt, completion) tokens; None: word counts

    @classmethod
    def ok(cls, content: str | None = None, *, delay: float = 0.0) -> Reply:
        return cls(content=content, delay=delay)

    @classmethod
    def rate_limited(cls, retry_after: float = 0.1) -> Reply:
        return cls(status=429, retry_after=retry_after)

    @classmethod
    def server_error(cls, status: int = 500) -> Reply:
        return cls(status=status)

    @classmethod
    def status_error(cls, status: int) -> Reply:
        return cls(status=status)

    @classmethod
    def hanging(cls, seconds: float) -> Reply:
        return cls(hang=seconds)

    @classmethod
    def malformed(cls) -> Reply:
        return cls(raw=b'{"id": "chatcmpl-broken", "choices": [')

    @classmethod
    def empty(cls) -> Reply:
        return cls(content="")

    @classmethod
    def truncated(cls) -> Reply:
        return cls(content="The answer stops mid", finish_reason="length")

    @classmethod
    def refused(cls) -> Reply:
        return cls(refusal="I can't help with that.")


Responder = Callable[[ChatRequest], Reply | None]


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when the request arrived

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class FineTuneJob:
    body: dict[str, Any]
    script: list[str]
    created_at: int
    step: int = 0
    cancelled: bool = False
    events: list[dict[str, Any]] = field(default_factory=list)


def default_answer(request: ChatRequest) -> str:
    return f"Regenerated answer {request.prompt_hash[:12]} for: {request.prompt[-60:]}"


ANSWER_BLOCK = re.compile(r"<<<BEGIN ANSWER ([12])>>>\n(.*?)\n<<<END ANSWER \1>>>", re.DOTALL)
QUALITY = re.compile(r"quality (\d+)")
JUDGE_GARBAGE = "I think the first one is better."  # not JSON: breaks the judge contract
EMPTY_ANSWERS = -1  # an EvalModels quality: the model answers with an empty string


@dataclass
class EvalModels:
    """A responder serving several models and a pairwise judge, for the evaluation gate.

    `quality` maps model-name prefixes (longest match wins) to a quality; a model answers
    `Answer of quality Q: <prompt hash>`, so two models of equal quality give identical answers.
    A prefix mapped to None is a failing model (HTTP 500 on every call), one mapped to
    EMPTY_ANSWERS answers with nothing. The judge (any model
    whose name starts with `judge_model`) follows the pairwise contract: it reads the two
    answers between the `<<<BEGIN ANSWER n>>>` markers and names the one of higher quality,
    "tie" when equal.
    `garbage_every` > 0 makes the judge's first `garbage_times` replies to every such-th
    prompt (by hash) unparseable.
    """

    quality: dict[str, int | None]
    judge_model: str = "judge"
    garbage_every: int = 0
    garbage_times: int = 0
    judge_down: bool = False  # the judge answers HTTP 500
    icl_bonus: int = 0  # quality added when the request carries example turns (an ICL prompt)

    def quality_of(self, model: str) -> int | None:
        matches = [p for p in self.quality if model.startswith(p)]
        if not matches:
            raise KeyError(f"no quality for model {model!r}")
        return self.quality[max(matches, key=len)]

    def __call__(self, request: ChatRequest) -> Reply:
        if request.model.startswith(self.judge_model):
            return self.judge(request)
        quality = self.quality_of(request.model)
        if quality is None:
            return Reply.server_error(500)
        if quality == EMPTY_ANSWERS:
            return Reply.empty()
        if len(request.messages) > 2:
            quality += self.icl_bonus
        return Reply.ok(f"Answer of quality {quality}: {request.prompt_hash[:12]}")

    def garbled(self, request: ChatRequest) -> bool:
        return (
            self.garbage_every > 0
            and int(request.prompt_hash[:8], 16) % self.garbage_every == 0
            and request.seen <= self.garbage_times
        )

    def judge(self, request: ChatRequest) -> Reply:
        if self.judge_down:
            return Reply.server_error(500)
        if self.garbled(request):
            return Reply.ok(JUDGE_GARBAGE)
        answers = dict(ANSWER_BLOCK.findall(request.prompt))
        scores = {n: int(m.group(1)) if (m := QUALITY.search(a)) else 0 for n, a in answers.items()}
        if len(scores) != 2:
            return Reply.ok(json.dumps({"winner": "tie", "reason": "answers not found"}))
        one, two = scores["1"], scores["2"]
        winner = "tie" if one == two else ("1" if one > two else "2")
        return Reply.ok(json.dumps({"winner": winner, "reason": f"quality {one} vs {two}"}))


class OpenAIServer:
    """Start with `start()` (or the `running` context manager); point the client at `base_url`."""

    def __init__(self, *, latency: float = 0.0, port: int = 0) -> None:
        self.latency = latency
        self.requested_port = port
        # What GET /v1/models lists besides the loaded adapters (a server's base model).
        self.served_models: list[str] = []
        self.responder: Responder | None = None
        # Statuses a fine-tuning job walks through, one step per retrieve.
        self.job_script: list[str] = ["validating_files", "running", "succeeded"]
        self.job_error: dict[str, Any] = {
            "code": "invalid_training_file",
            "message": "The training file has an invalid format.",
            "param": "training_file",
        }
        # Re-entrant: job helpers that hold it also mint ids.
        self._lock = threading.RLock()
        self._planned: deque[Reply] = deque()
        self._requests: list[Recorded] = []
        self._prompts: Counter[str] = Counter()
        self._files: dict[str, dict[str, Any]] = {}
        self._file_bytes: dict[str, bytes] = {}
        self._jobs: dict[str, FineTuneJob] = {}
        # vLLM's runtime LoRA loading (POST /v1/load_lora_adapter): name → path of the adapters
        # registered; False answers 404, as a server without the route does.
        self.lora_loading = True
        self.lora_adapters: dict[str, str] = {}
        self._ids = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----- lifecycle -------------------------------------------------------------------------

    def start(self) -> OpenAIServer:
        server = self

        class Handler(_Handler):
            owner = server

        self._httpd = _Server(("127.0.0.1", self.requested_port), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # ----- programming and inspection ----------------------------------------------------------

    def plan(self, *replies: Reply) -> None:
        """Queue replies for the next chat requests, in order (before `responder`)."""
        with self._lock:
            self._planned.extend(replies)

    def reset(self) -> None:
        """Forget recorded requests, counts and queued replies (files and jobs stay)."""
        with self._lock:
            self._planned.clear()
            self._requests.clear()
            self._prompts.clear()

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    def chat_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.path == CHAT_PATH]

    @property
    def chat_count(self) -> int:
        with self._lock:
            return sum(self._prompts.values())

    def prompt_counts(self) -> Counter[str]:
        """Chat requests per prompt hash (see `prompt_hash`)."""
        with self._lock:
            return Counter(self._prompts)

    def file_content(self, file_id: str) -> bytes:
        with self._lock:
            return self._file_bytes[file_id]

    # ----- request handling (called from handler threads) --------------------------------------

    def _record(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        with self._lock:
            self._requests.append(Recorded(method, path, headers, body, time.monotonic()))

    def _next_id(self, prefix: str) -> str:
        with self._lock:
            self._ids += 1
            return f"{prefix}-{self._ids:06d}"

    def _chat(self, body: dict[str, Any], headers: dict[str, str]) -> tuple[ChatRequest, Reply]:
        users = [m for m in body.get("messages", []) if m.get("role") == "user"]
        prompt = str(users[-1].get("content", "")) if users else ""
        key = prompt_hash(prompt)
        with self._lock:
            self._prompts[key] += 1
            seen = self._prompts[key]
            planned = self._planned.popleft() if self._planned else None
        request = ChatRequest(body, headers, prompt, key, seen)
        reply = planned
        if reply is None and self.responder is not None:
            reply = self.responder(request)
        return request, reply or Reply.ok()

    def chat_payload(self, request: ChatRequest, reply: Reply) -> dict[str, Any]:
        content = reply.content
        if content is None and reply.refusal is None:
            content = default_answer(request)
        if reply.usage is not None:
            prompt_tokens, completion_tokens = reply.usage
        else:
            prompt_tokens = sum(word_count(str(m.get("content", ""))) for m in request.messages)
            completion_tokens = word_count(content or reply.refusal or "")
        return {
            "id": self._next_id("chatcmpl"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": None if reply.refusal is not None else content,
                        "refusal": reply.refusal,
                    },
                    "finish_reason": reply.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def _upload(self, headers: dict[str, str], body: bytes) -> dict[str, Any]:
        content_type = headers.get("content-type", "")
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + body
        )
        fields: dict[str, str] = {}
        data = b""
        filename = "upload"
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name == "file":
                filename = part.get_filename() or filename
                data = part.get_payload(decode=True) or b""
            elif name:
                fields[str(name)] = part.get_content().strip()
        file_id = self._next_id("file")
        record = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": fields.get("purpose", "fine-tune"),
            "status": "processed",
        }
        with self._lock:
            self._files[file_id] = record
            self._file_bytes[file_id] = data
        return record

    def _job_object(self, job_id: str, job: FineTuneJob) -> dict[str, Any]:
        status = "cancelled" if job.cancelled else job.script[min(job.step, len(job.script) - 1)]
        body = job.body
        suffix = body.get("suffix") or "ft"
        hyper = body.get("hyperparameters") or (
            (body.get("method") or {}).get("supervised", {}).get("hyperparameters") or {}
        )
        done = status in ("succeeded", "failed", "cancelled")
        return {
            "id": job_id,
            "object": "fine_tuning.job",
            "created_at": job.created_at,
            "error": self.job_error if status == "failed" else None,
            "fine_tuned_model": (
                f"ft:{body['model']}:{suffix}:{job_id}" if status == "succeeded" else None
            ),
            "finished_at": job.created_at + 60 if done else None,
            "hyperparameters": {
                "batch_size": hyper.get("batch_size", "auto"),
                "learning_rate_multiplier": hyper.get("learning_rate_multiplier", "auto"),
                "n_epochs": hyper.get("n_epochs", "auto"),
            },
            "model": body["model"],
            "organization_id": "org-test",
            "result_files": ["file-results"] if status == "succeeded" else [],
            "seed": int(body.get("seed") or 42),
            "status": status,
            "trained_tokens": 1234 if status == "succeeded" else None,
            "training_file": body["training_file"],
            "validation_file": body.get("validation_file"),
            "estimated_finish": None,
            "integrations": None,
            "metadata": body.get("metadata"),
            "method": body.get("method")
            or {"type": "supervised", "supervised": {"hyperparameters": hyper}},
        }

    def _job_event(self, job: FineTuneJob, message: str, level: str = "info") -> None:
        job.events.append(
            {
                "object": "fine_tuning.job.event",
                "id": self._next_id("ftevent"),
                "created_at": int(time.time()),
                "level": level,
                "message": message,
                "type": "message",
                "data": {},
            }
        )

    def _create_job(self, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            known = body.get("training_file") in self._files
        if not known:
            raise _HTTPError(400, "invalid_request_error", "training_file does not exist")
        method = (body.get("method") or {}).get("type", "supervised")
        for key in ("training_file", "validation_file"):
            if body.get(key) and (problem := self._file_shape_problem(body[key], method)):
                raise _HTTPError(400, "invalid_request_error", f"{key}: {problem}")
        job_id = self._next_id("ftjob")
        job = FineTuneJob(body=body, script=list(self.job_script), created_at=int(time.time()))
        self._job_event(job, f"Created fine-tuning job: {job_id}")
        with self._lock:
            self._jobs[job_id] = job
        return self._job_object(job_id, job)

    # The keys every line must have, per fine-tuning method (OpenAI's documented file formats),
    # so a job on the wrong file is refused as the real API refuses it.
    LINE_KEYS: ClassVar[dict[str, set[str]]] = {
        "supervised": {"messages"},
        "dpo": {"input", "preferred_output", "non_preferred_output"},
    }

    def _file_shape_problem(self, file_id: str, method: str) -> str | None:
        with self._lock:
            data = self._file_bytes.get(file_id, b"")
        expected = self.LINE_KEYS.get(method)
        if expected is None:
            return f"unknown method {method}"
        for number, raw in enumerate(data.splitlines(), start=1):
            line = json.loads(raw)
            if set(line) - {"metadata"} != expected:
                return f"line {number} is not a {method} example (keys {sorted(line)})"
            if method == "dpo" and not line["input"].get("messages"):
                return f"line {number}: input.messages is empty"
        return None

    def _job(self, job_id: str) -> FineTuneJob:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise _HTTPError(404, "not_found", f"no fine-tuning job {job_id}")
        return job

    def _retrieve_job(self, job_id: str) -> dict[str, Any]:
        job = self._job(job_id)
        with self._lock:
            if not job.cancelled and job.step < len(job.script) - 1:
                job.step += 1
                status = job.script[job.step]
                level = "error" if status == "failed" else "info"
                self._job_event(job, f"Job status: {status}", level)
        return self._job_object(job_id, job)

    def _cancel_job(self, job_id: str) -> dict[str, Any]:
        job = self._job(job_id)
        with self._lock:
            job.cancelled = True
            self._job_event(job, "Job cancelled")
        return self._job_object(job_id, job)

    def _job_events(self, job_id: str, query: dict[str, str]) -> dict[str, Any]:
        job = self._job(job_id)
        limit = int(query.get("limit", "20"))
        with self._lock:
            newest_first = list(reversed(job.events))
        after = query.get("after")
        if after:
            ids = [e["id"] for e in newest_first]
            newest_first = newest_first[ids.index(after) + 1 :] if after in ids else []
        page = newest_first[:limit]
        return {"object": "list", "data": page, "has_more": len(newest_first) > limit}

    def _list_jobs(self) -> dict[str, Any]:
        with self._lock:
            jobs = list(self._jobs.items())
        data = [self._job_object(job_id, job) for job_id, job in reversed(jobs)]
        return {"object": "list", "data": data, "has_more": False}

    def route(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: bytes
    ) -> dict[str, Any]:
        """Everything but chat completions (which need the handler for faults)."""
        parts = path.strip("/").split("/")
        if path == "/_test/stats":
            return {"chat_requests": self.chat_count, "requests": len(self.requests)}
        if method == "POST" and path == "/_test/reset":
            self.reset()
            return {}
        if method == "POST" and path == "/_test/latency":
            self.latency = float(json.loads(body)["latency"])
            return {"latency": self.latency}
        if method == "POST" and path == "/v1/files":
            return self._upload(headers, body)
        if method == "GET" and path == "/v1/models":
            # As vLLM lists them: the served models, then every adapter loaded at run time.
            with self._lock:
                loaded = [(n, p) for n, p in self.lora_adapters.items()]
            models = [{"id": m, "object": "model", "root": m} for m in self.served_models]
            models += [{"id": n, "object": "model", "root": p} for n, p in loaded]
            return {"object": "list", "data": models}
        if method == "POST" and path == "/v1/load_lora_adapter" and self.lora_loading:
            request = json.loads(body or b"{}")
            with self._lock:
                self.lora_adapters[str(request["lora_name"])] = str(request["lora_path"])
            return {"loaded": request["lora_name"]}
        if method == "GET" and len(parts) == 3 and parts[:2] == ["v1", "files"]:
            with self._lock:
                record = self._files.get(parts[2])
            if record is None:
                raise _HTTPError(404, "not_found", f"no file {parts[2]}")
            return record
        if parts[:3] == ["v1", "fine_tuning", "jobs"]:
            if method == "POST" and len(parts) == 3:
                return self._create_job(json.loads(body or b"{}"))
            if method == "GET" and len(parts) == 3:
                return self._list_jobs()
            if method == "GET" and len(parts) == 4:
                return self._retrieve_job(parts[3])
            if method == "GET" and len(parts) == 5 and parts[4] == "events":
                return self._job_events(parts[3], query)
            if method == "POST" and len(parts) == 5 and parts[4] == "cancel":
                return self._cancel_job(parts[3])
        raise _HTTPError(404, "not_found", f"{method} {path} is not implemented here")


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hanging reply must not hold up shutdown
    # The default backlog of 5 drops connections when a client opens dozens at once; the retried
    # SYN then adds a second or more to those calls.
    request_queue_size = 256


class _HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class _Handler(BaseHTTPRequestHandler):
    owner: OpenAIServer
    # Keep-alive, as the openai client's connection pool expects.
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle on, the client's delayed ACK adds
    # ~40 ms to every response, which would swamp the latencies under test.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        # Silence: the default writes every request to stderr.
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, status: int, code: str, message: str, **headers: str) -> None:
        self._send_json(
            status,
            {"error": {"message": message, "type": code, "param": None, "code": code}},
            headers,
        )

    def _handle(self, method: str) -> None:
        path, _, query_string = self.path.partition("?")
        query = dict(p.split("=", 1) for p in query_string.split("&") if "=" in p)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.owner._record(method, path, headers, body)
        try:
            if method == "POST" and path == CHAT_PATH:
                self._chat(json.loads(body or b"{}"), headers)
            else:
                self._send_json(200, self.owner.route(method, path, query, headers, body))
        except _HTTPError as exc:
            self._error(exc.status, exc.code, exc.message)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (its timeout): nothing to answer.
            self.close_connection = True

    def _chat(self, body: dict[str, Any], headers: dict[str, str]) -> None:
        owner = self.owner
        request, reply = owner._chat(body, headers)
        wait = owner.latency + reply.delay
        if wait:
            time.sleep(wait)
        if reply.hang is not None:
            time.sleep(reply.hang)
            self.close_connection = True
            return
        if reply.status == 429:
            retry = {} if reply.retry_after is None else {"Retry-After": str(reply.retry_after)}
            self._error(429, "rate_limit_exceeded", "Rate limit reached", **retry)
            return
        if reply.status >= 400:
            phrase = HTTPStatus(reply.status).phrase
            # `content` doubles as the error message, e.g. to echo what a real endpoint echoes.
            self._error(reply.status, "server_error", reply.content or f"{phrase} (injected)")
            return
        if reply.raw is not None:
            self._send(200, reply.raw)
            return
        self._send_json(200, owner.chat_payload(request, reply))

    def do_POST(self) -> None:
        self._handle("POST")

    def do_GET(self) -> None:
        self._handle("GET")


@contextmanager
def running(*, latency: float = 0.0) -> Iterator[OpenAIServer]:
    server = OpenAIServer(latency=latency).start()
    try:
        yield server
    finally:
        server.stop()


class RemoteServer:
    """Handle on a server running in its own process (`spawned`), through its /_test routes."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}/v1"

    def _call(self, method: str, route: str, payload: dict[str, Any] | None = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/_test/{route}", data=data, method=method
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    @property
    def chat_count(self) -> int:
        return int(self._call("GET", "stats")["chat_requests"])

    def reset(self) -> None:
        self._call("POST", "reset", {})

    def set_latency(self, seconds: float) -> None:
        self._call("POST", "latency", {"latency": seconds})


@contextmanager
def spawned(
    *, latency: float = 0.0, eval_models: dict[str, int | None] | None = None
) -> Iterator[RemoteServer]:
    """The server in a child process: its request handling then does not compete with the
    client under test for one interpreter's GIL (what a benchmark needs)."""
    extra = ["--eval-models", json.dumps(eval_models)] if eval_models else []
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qe_assets.testing.openai_server",
            "--latency",
            str(latency),
            *extra,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        yield RemoteServer(port)
    finally:
        process.terminate()
        process.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the fake OpenAI API until killed.")
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--port", type=int, default=0, help="0: a free one (printed)")
    parser.add_argument("--served-model", action="append", default=[], help="listed in /v1/models")
    parser.add_argument(
        "--eval-models",
        help='serve EvalModels with this quality map, e.g. {"ft:": 3, "": 1}',
    )
    args = parser.parse_args()
    server = OpenAIServer(latency=args.latency, port=args.port)
    server.served_models = list(args.served_model)
    server.start()
    if args.eval_models:
        server.responder = EvalModels(json.loads(args.eval_models))
    print(server.port, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
