"""Which model answers a request: the routing helper for the RAG service (docs/rollout.md).

```python
from openai import OpenAI
from qe_assets.service import capture, choose

route = choose(request_id)       # production, or the candidate for its share of ids
client = OpenAI(base_url=route.base_url)                # the server that serves route.model
answer = client.chat.completions.create(model=route.model, messages=messages)
capture(request_id=request_id, ..., model=route.model)
```

`choose` returns a `Route`: the model name and the OpenAI-compatible base URL that serves it.
For a model of the project's model server (QE_MODEL_SERVER) the file names it by its served
name (`model_rag_qa_v001`) and carries the server's URL (`base_urls`); for any other model the
URL is QE_ROUTE_BASE_URL, else None (the openai client's own default, OPENAI_BASE_URL).
`choose_model(request_id)` is `choose(request_id).model`, as before.

The graph (`ab_test`, the evaluation gate with `QE_ROLLOUT=canary`, `qe models`) writes the state
to `$QE_DATA_DIR/rollout.json` atomically (temporary file, fsync, rename). The router looks at
the file's inode, size and modification time at most once per `check_seconds` (one `stat`) and
re-reads it only when they change: no database and no parsing on the request path.

A request goes to the candidate when `bucket(candidate, request_id) < share`: the first 8 bytes
of sha256(candidate NUL request_id) as a number in [0, 1). The same id always gets the same
model while the share holds; raising the share keeps every id that already had the candidate
(ramp 5 % → 25 % → 50 % only adds ids); a new candidate draws a fresh split.

A missing or unreadable file routes everything to production (the last production the file
named, else `default`, else `QE_FINETUNE_BASE_MODEL`) and says so in one log line per problem.
Only a regular file (or a symlink to one) of at most `MAX_STATE_BYTES` is read, without blocking
(a FIFO is refused, not waited on) and with a nesting bound checked before parsing; whatever
goes wrong, `choose_model` answers production and never raises.

Light on purpose: standard library only, like the rest of `qe_assets.service`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from qe_assets.service.config import ServiceSettings
from qe_assets.service.producers import write_atomically

log = logging.getLogger("qe_assets.service.rollout")

STATE_FILE = "rollout.json"
STATE_VERSION = 1
_SCALE = float(2**64)
# The state is a few hundred bytes and three levels deep at most; anything far beyond is not ours.
MAX_STATE_BYTES = 64 * 1024
MAX_STATE_DEPTH = 16


def bucket(candidate: str, request_id: str) -> float:
    """Where a request id falls in [0, 1) for this candidate: uniform, stable, independent of
    the share (so a larger share keeps every id a smaller one had)."""
    digest = hashlib.sha256(f"{candidate}\0{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


class Route(NamedTuple):
    """What answers a request: the model name to send, and the OpenAI-compatible base URL of
    the server that serves it (None: the openai client's own default, OPENAI_BASE_URL)."""

    model: str
    base_url: str | None = None


def is_base_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://")) and " " not in value


@dataclass(frozen=True)
class RolloutState:
    """What rollout.json holds: the production model and, during a test, the candidate's share;
    `base_urls`: served model name → the base URL of the server that serves it."""

    production: str | None
    candidate: str | None = None
    share: float = 0.0
    decision: str | None = None  # the last decision that set this state
    decided_by: str | None = None
    updated_at: str | None = None
    version: int = STATE_VERSION
    base_urls: dict[str, str] = field(default_factory=dict)

    def model_for(self, request_id: str, production: str) -> str:
        if self.candidate and self.share > 0.0 and bucket(self.candidate, request_id) < self.share:
            return self.candidate
        return production

    def to_json(self) -> str:
        data = asdict(self)
        if not self.base_urls:  # a file without served models reads as before the extension
            del data["base_urls"]
        return json.dumps(data, ensure_ascii=False, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> RolloutState:
        """Parse and check the file; ValueError names what is wrong."""
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
        depth = _nesting(text)
        if depth > MAX_STATE_DEPTH:
            raise ValueError(f"nested {depth} levels deep, more than {MAX_STATE_DEPTH}")
        try:
            data: Any = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        production, candidate, share = (
            data.get("production"),
            data.get("candidate"),
            data.get("share", 0.0),
        )
        for name, value in (("production", production), ("candidate", candidate)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name}: expected a model name or null, got {value!r}")
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
            raise ValueError(f"share: expected a number in [0, 1], got {share!r}")
        if candidate is not None and share > 0 and production is None:
            raise ValueError("production: a candidate with traffic needs a production model")
        base_urls = data.get("base_urls", {})
        if not isinstance(base_urls, dict) or not all(
            isinstance(k, str) and is_base_url(v) for k, v in base_urls.items()
        ):
            raise ValueError(f"base_urls: expected model name → http(s) URL, got {base_urls!r}")
        known = {k: data[k] for k in ("decision", "decided_by", "updated_at") if k in data}
        return cls(production, candidate, float(share), **known, base_urls=base_urls)


def _nesting(text: str) -> int:
    """How deep JSON arrays and objects nest in `text` (brackets inside strings do not count):
    checked before `json.loads`, whose recursion a deeply nested file would exhaust."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def state_path(settings: Any) -> Path:
    """`$QE_DATA_DIR/rollout.json` of any settings object with a `data_dir`."""
    return Path(settings.data_dir) / STATE_FILE


def read_bounded(path: Path, limit: int = MAX_STATE_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; OSError naming the problem for a
    FIFO, device, directory or socket (opened without blocking, never read) or a bigger file.
    A symlink to a regular file is followed: configuration mounts are made of them."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"not a regular file (mode {stat.filemode(mode)})")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise OSError(f"larger than {limit} bytes")
    return b"".join(chunks)


def read_state(path: Path) -> RolloutState | None:
    """The state in `path`, None when there is no file; ValueError or OSError when it is
    unreadable."""
    try:
        return RolloutState.from_json(read_bounded(path))
    except FileNotFoundError:
        return None


def write_state(path: Path, state: RolloutState) -> bool:
    """Write the state atomically; False (nothing written) when the file already says it."""
    body = state.to_json().encode()
    try:
        if path.read_bytes() == body:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, body)
    return True


class Router:
    """Routes request ids by the rollout file; one per process, safe to share between threads."""

    def __init__(
        self,
        path: Path | str | None = None,
        *,
        default: str | None = None,
        check_seconds: float = 1.0,
        settings: Any = None,
        base_url: str | None = None,
    ) -> None:
        """`settings`: a `ServiceSettings` or the pipeline's `Settings`; read from the
        environment (the service's variables only, never raising) when needed and not given.
        `base_url`: where a model the file gives no URL for is called (QE_ROUTE_BASE_URL)."""
        if settings is None and (path is None or default is None):
            settings = ServiceSettings.from_env()
        self.path = Path(path) if path is not None else state_path(settings)
        # Production while no file names one: what the gate compares against then too.
        self.default = default or (settings.finetune_base_model if settings else "")
        self.base_url = base_url or getattr(settings, "route_base_url", None)
        self.check_seconds = check_seconds
        self._state = RolloutState(production=None)
        self._production = self.default
        # The URL the last good file gave production: kept, like production, when it goes bad.
        self._production_url: str | None = None
        self._seen: tuple[int, int, int] | None = None
        self._checked_at = float("-inf")
        self._problem: str | None = None
        self._refreshing = threading.Lock()

    def state(self) -> RolloutState:
        self._refresh()
        return self._state

    def production(self) -> str:
        self._refresh()
        return self._production

    def choose_model(self, request_id: str) -> str:
        """The model that answers this request: production or, for its share, the candidate.
        Never raises: whatever goes wrong answers production."""
        return self.choose(request_id).model

    def choose(self, request_id: str) -> Route:
        """The model that answers this request and the base URL that serves it. Never raises:
        whatever goes wrong answers production."""
        try:
            self._refresh()
            state, production = self._state, self._production
            model = state.model_for(request_id, production)
            url = state.base_urls.get(model)
            if url is None and model == production:
                url = self._production_url
            return Route(model, url or self.base_url)
        except Exception as exc:
            self._fall_back(None, f"routing failed ({type(exc).__name__}: {exc})", warn=True)
            return Route(self._production, self._production_url or self.base_url)

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < self.check_seconds:
            return
        # One thread looks; the others route with the state they have meanwhile.
        if not self._refreshing.acquire(blocking=False):
            return
        try:
            self._checked_at = now
            self._look()
        finally:
            self._refreshing.release()

    def _look(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._fall_back(None, f"{self.path} does not exist")
            return
        except OSError as exc:
            self._fall_back(None, f"{self.path} cannot be read: {exc}")
            return
        seen = (st.st_ino, st.st_size, st.st_mtime_ns)
        if seen == self._seen:
            return
        self._seen = seen
        try:
            state = read_state(self.path)
        except Exception as exc:  # whatever the file holds, the request path gets production
            self._fall_back(seen, f"{self.path} is unreadable ({exc})")
            return
        if state is None:
            self._fall_back(None, f"{self.path} does not exist")
            return
        self._state = state
        self._production = state.production or self.default
        self._production_url = state.base_urls.get(self._production)
        if self._problem is not None:
            log.warning("rollout state readable again: %s", self._describe(state))
        self._problem = None

    def _fall_back(
        self, seen: tuple[int, int, int] | None, problem: str, *, warn: bool = False
    ) -> None:
        self._seen = seen
        self._state = RolloutState(production=None)
        # The last production a good file named stays production: only candidate traffic stops.
        if problem != self._problem:
            # No file is the normal state before any promotion: worth a line, not a warning.
            level = logging.INFO if seen is None and not warn else logging.WARNING
            log.log(level, "%s: every request goes to production, %s", problem, self._production)
        self._problem = problem

    @staticmethod
    def _describe(state: RolloutState) -> str:
        if state.candidate and state.share > 0:
            return f"{state.candidate} at {state.share:.0%} against {state.production}"
        return f"production {state.production}, no candidate"


_router: Router | None = None
_router_lock = threading.Lock()


def default_router() -> Router:
    """The process-wide router, configured from the environment at first use."""
    global _router
    if _router is None:
        with _router_lock:
            if _router is None:
                _router = Router()
    return _router


def choose_model(request_id: str) -> str:
    """`Router.choose_model` of the process-wide router; never raises."""
    return default_router().choose_model(request_id)


def choose(request_id: str) -> Route:
    """`Router.choose` of the process-wide router: (model, base_url); never raises."""
    return default_router().choose(request_id)
