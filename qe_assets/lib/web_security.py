"""Who may use the local web app, and which POSTs it trusts.

* Loopback without a token (the default): no login, but the Host header must name the loopback
  too, so a web page elsewhere cannot reach the app through DNS rebinding.
* With a token (required to bind anything but the loopback, see `require_safe_bind`): every
  request carries it, in `Authorization: Bearer …`, `X-QE-Token`, or the HttpOnly cookie that
  opening any page once with `?token=…` sets.
* Every POST, on top: its Origin (else Referer) is this app's own, and its `csrf` form field (or
  `X-CSRF-Token` header) equals the per-session `qe_csrf` cookie (double submit).
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl, urlencode, urlsplit

from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp

TOKEN_COOKIE, CSRF_COOKIE = "qe_token", "qe_csrf"
TOKEN_HEADER, CSRF_HEADER, CSRF_FIELD = "x-qe-token", "x-csrf-token", "csrf"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MAX_FORM_BYTES = 1 << 20

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
    """The POST's url-encoded form, after the double-submit CSRF check (PermissionError)."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise PermissionError("form too large")
    form = dict(parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True))
    sent = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
    if not _equal(sent, request.cookies.get(CSRF_COOKIE)):
        raise PermissionError(
            "the form's CSRF token does not match this session: reload the page and try again"
        )
    return form


class SecurityMiddleware(BaseHTTPMiddleware):
    def __init__(self, app: ASGIApp, token: str | None) -> None:
        super().__init__(app)
        self.token = token

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
                target = request.url.path + (f"?{urlencode(rest)}" if rest else "")
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
        if fresh:
            response.set_cookie(CSRF_COOKIE, request.state.csrf, httponly=True, samesite="strict")
        return response
