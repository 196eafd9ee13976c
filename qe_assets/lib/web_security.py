"""Who may use the local web app, and which POSTs it trusts.

* Loopback without a token (the default): no login, but the Host header must name the loopback
  too, so a web page elsewhere cannot reach the app through DNS rebinding.
* With a token (required to bind anything but the loopback, see `require_safe_bind`): every
  request carries it, in `Authorization: Bearer …`, `X-QE-Token`, or the HttpOnly cookie that
  opening any page once with `?token=…` sets.
* Every POST, on top: its Origin (else Referer) is this app's own, and its `csrf` form field (or
  `X-CSRF-Token` header) equals the per-session `qe_csrf` cookie (double submit).
* Every request body is at most MAX_BODY_BYTES: a larger Content-Length is refused before a byte
  of the body is read, and a body without one is cut off as it streams past the cap.
* Every response carries the app's Content-Security-Policy unless its page sets its own.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from collections.abc import Awaitable, Callable, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit

from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TOKEN_COOKIE, CSRF_COOKIE = "qe_token", "qe_csrf"
TOKEN_HEADER, CSRF_HEADER, CSRF_FIELD = "x-qe-token", "x-csrf-token", "csrf"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# The largest body any route takes: the review forms (an edited completion is the big field).
MAX_FORM_BYTES = 1 << 20
MAX_BODY_BYTES = MAX_FORM_BYTES

# What every page of the app allows the browser to load: only its own files, no inline script.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


class InsecureBind(ValueError):
    """`qe serve` asked to listen beyond the loopback without QE_SERVE_TOKEN."""


def is_loopback(host: str) -> bool:
    name = host.strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def require_safe_bind(host: str, token: str | None) -> None:
    if not is_loopback(host) and token is None:
        raise InsecureBind(
            f"refusing to serve on {host}: beyond 127.0.0.1 the review page needs a token; set "
            "QE_SERVE_TOKEN (16+ characters), then open the page once with ?token=…"
        )


def _host_name(host_header: str) -> str:
    """`127.0.0.1:8787` → `127.0.0.1`; `[::1]:8787` → `::1`."""
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def same_origin(request: Request) -> bool:
    """The POST came from a page of this app: Origin (else Referer) names its scheme and host."""
    own = f"{request.url.scheme}://{request.headers.get('host', '')}".lower()
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        referer = request.headers.get("referer")
        if not referer:
            return False
        parts = urlsplit(referer)
        origin = f"{parts.scheme}://{parts.netloc}"
    return hmac.compare_digest(origin.lower().encode(), own.encode())


def _equal(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a).encode(), str(b).encode())


def csrf_token(request: Request) -> str:
    """This session's CSRF token (made by the middleware when the cookie was missing)."""
    return str(request.state.csrf)


async def checked_form(request: Request) -> dict[str, str]:
    """The POST's url-encoded form, after the double-submit CSRF check (PermissionError).
    Read as it streams, never past MAX_FORM_BYTES (BodyLimit stops larger bodies first)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_FORM_BYTES:
            raise PermissionError("form too large")
        chunks.append(chunk)
    body = b"".join(chunks)
    form = dict(parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True))
    sent = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
    if not _equal(sent, request.cookies.get(CSRF_COOKIE)):
        raise PermissionError(
            "the form's CSRF token does not match this session: reload the page and try again"
        )
    return form


def same_origin_path(path: str) -> str:
    """`path` as a redirect target that stays on this server: `//host/…` (and `/\\host/…`,
    which browsers read the same way) would send the browser to another host."""
    return "/" + path.lstrip("/\\")


class _BodyTooLarge(Exception):
    pass


def _over_limit(exc: BaseException) -> bool:
    """Whether `exc` is BodyLimit's own stop, as raised or as a middleware's task group (or
    `raise … from`) passed it on."""
    while exc is not None:
        if isinstance(exc, _BodyTooLarge):
            return True
        if isinstance(exc, BaseExceptionGroup) and exc.subgroup(_BodyTooLarge) is not None:
            return True
        exc = exc.__cause__  # type: ignore[assignment]
    return False


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413 (and close the connection, so the server
    never reads the rest): by Content-Length before the app runs, else while the body streams.

    A 300 MB POST used to be read whole before the form's size check: the server grew by the
    body's size (issue 26). A pure ASGI middleware, outermost: nothing reads a body before it."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BaseException as exc:
            # Too late for a status once the response has begun: the connection just ends.
            if started or not _over_limit(exc):
                raise
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = PlainTextResponse(
            f"request body too large: at most {self.max_bytes} bytes",
            413,
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


class SecurityMiddleware(BaseHTTPMiddleware):
    def __init__(
        self,
        app: ASGIApp,
        token: str | None,
        csp: str | None = None,
        csp_under: Mapping[str, str] | None = None,
    ) -> None:
        """`csp`: the Content-Security-Policy of every response that sets none; `csp_under`:
        another one for the paths under a prefix (`/dashboards`)."""
        super().__init__(app)
        self.token = token
        self.csp = csp
        self.csp_under = dict(csp_under or {})

    def _csp_for(self, path: str) -> str | None:
        for prefix, policy in self.csp_under.items():
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return policy
        return self.csp

    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if self.token is None:
            if not is_loopback(_host_name(request.headers.get("host", ""))):
                return PlainTextResponse("this app answers on the loopback only", 403)
        else:
            offered = request.query_params.get("token")
            if request.method == "GET" and offered is not None and _equal(offered, self.token):
                # Into an HttpOnly cookie, and out of the address bar and the history.
                rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
                target = same_origin_path(request.url.path)
                target += f"?{urlencode(rest)}" if rest else ""
                response = RedirectResponse(target, 303)
                response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict")
                return response
            sent = (
                request.cookies.get(TOKEN_COOKIE)
                or request.headers.get(TOKEN_HEADER)
                or request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            )
            if not _equal(sent, self.token):
                return PlainTextResponse(
                    "token required: open this page once with ?token=<QE_SERVE_TOKEN>, or send "
                    "it in an Authorization: Bearer header",
                    401,
                )
        if request.method in UNSAFE_METHODS and not same_origin(request):
            return PlainTextResponse("cross-origin request refused", 403)
        csrf = request.cookies.get(CSRF_COOKIE)
        fresh = not csrf
        request.state.csrf = csrf or secrets.token_urlsafe(24)
        response = await call_next(request)
        policy = self._csp_for(request.url.path)
        if policy is not None and "content-security-policy" not in response.headers:
            # The dashboards and the static files set none of their own.
            response.headers["Content-Security-Policy"] = policy
        if fresh:
            response.set_cookie(CSRF_COOKIE, request.state.csrf, httponly=True, samesite="strict")
        return response
