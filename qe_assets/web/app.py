"""The local web app of `qe serve`: the review page and the dashboards (at `/dashboards/`).

`create_app` builds a Starlette app; `extra_routes` are mounted before the app's own and share
its token and same-origin checks. Every database
read is one short read-only connection, every write one short transaction under the writer
lock, so the app never holds the DuckDB file between requests and never blocks a run for long.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from importlib.resources import files

from jinja2 import Environment, PackageLoader, StrictUndefined
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from qe_assets.lib.web_security import CSP, MAX_BODY_BYTES, BodyLimit, SecurityMiddleware
from qe_assets.review import pages as review_pages
from qe_assets.settings import Settings
from qe_assets.web.dashboards import dashboard_routes

# The dashboards: the same, except that plotly.js adds style rules of its own at run time (its
# hover labels, mode bar): inline styles only, scripts stay the app's own files.
DASHBOARDS_CSP = CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css"}
WRITE_WAIT_SECONDS = 5.0
READ_WAIT_SECONDS = 10.0


def templates() -> Environment:
    """Autoescaped: every value shown (questions, answers, notes, ids) is escaped."""
    return Environment(
        loader=PackageLoader("qe_assets.web", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _static(request: Request) -> Response:
    name = request.path_params["name"]
    suffix = name[name.rfind(".") :] if "." in name else ""
    if "/" in name or suffix not in STATIC_TYPES:
        return Response("not found", 404)
    path = files("qe_assets.web").joinpath("static", name)
    if not path.is_file():
        return Response("not found", 404)
    return Response(
        path.read_bytes(), media_type=STATIC_TYPES[suffix], headers={"Cache-Control": "no-cache"}
    )


def _home(request: Request) -> Response:
    return RedirectResponse("/review", 303)


def create_app(
    settings: Settings,
    *,
    extra_routes: Sequence[BaseRoute] = (),
    token: str | None = None,
    write_wait_seconds: float = WRITE_WAIT_SECONDS,
    read_wait_seconds: float = READ_WAIT_SECONDS,
) -> Starlette:
    """The app over `settings.database`. With `token`, every request must carry it (see
    `qe_assets.lib.web_security`); the caller refuses non-loopback binds without one."""
    # One DuckDB connection of this process at a time: a read-only and a write connection to
    # the same file cannot be open together in one process. Shared by the review pages and the
    # dashboards.
    db_lock = threading.Lock()
    routes: list[BaseRoute] = [
        *extra_routes,
        Route("/", _home),
        *review_pages.routes(),
        # The seed's charts over time, read-only and cached (qe_assets/web/dashboards.py).
        Mount("/dashboards", routes=dashboard_routes(settings, db_lock=db_lock)),
        Route("/static/{name}", _static),
    ]
    middleware = [
        # Outermost: no body is read before its size is known to be within bounds.
        Middleware(BodyLimit, max_bytes=MAX_BODY_BYTES),
        Middleware(
            SecurityMiddleware, token=token, csp=CSP, csp_under={"/dashboards": DASHBOARDS_CSP}
        ),
    ]
    app = Starlette(routes=routes, middleware=middleware)
    app.state.settings = settings
    app.state.templates = templates()
    app.state.write_wait = write_wait_seconds
    app.state.read_wait = read_wait_seconds
    app.state.db_lock = db_lock
    return app
