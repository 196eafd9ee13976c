"""The review page: the queue, one sample side by side, decisions and bulk decisions.

Decisions go through `qe_assets.review.decisions` (the code of `qe review`) in one short
transaction under
the writer lock. When a run holds the lock longer than `write_wait` seconds, the page says so
and sends the same decision again by itself a few seconds later: the decision lives in the page
until it is recorded, and the run is never held up by a reviewer.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlencode

import duckdb
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from qe_assets.lib.web_security import CSP, checked_form, csrf_token
from qe_assets.review import decisions as review
from qe_assets.review import queue as review_queue
from qe_assets.store import DatabaseBusy, connect, writer_connection

T = TypeVar("T")
PAGE_SIZE = 50
RETRY_SECONDS = 5
REVIEWER_COOKIE = "qe_reviewer"
REVIEWER_PATTERN = re.compile(r"[\w.@+ -]{1,64}")
FILTER_FIELDS = (
    "status",
    "reason",
    "label",
    "language",
    *review_queue.NUMBER_FILTERS,
    "reviewer_filter",
)
ACTIONS = ("accept", "edit", "reject")


class Refused(Exception):
    """A request the page answers with a message instead of a result (status code, text)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def render(request: Request, template: str, status: int = 200, **context: Any) -> Response:
    """A page of the app: autoescaped, with the session's CSRF token, the reviewer and the
    app's Content-Security-Policy (a `?reviewer=` choice is kept in a cookie)."""
    html = request.app.state.templates.get_template(template).render(
        request=request,
        csrf=csrf_token(request),
        reviewer=_reviewer(request),
        **context,
    )
    response = HTMLResponse(html, status, headers={"Content-Security-Policy": CSP})
    chosen = request.query_params.get("reviewer")
    if chosen is not None and REVIEWER_PATTERN.fullmatch(chosen.strip()):
        response.set_cookie(REVIEWER_COOKIE, chosen.strip(), samesite="strict", httponly=True)
    return response


def _reviewer(request: Request) -> str:
    """Who decides: ?reviewer= (kept in a cookie), the cookie, else $USER."""
    for candidate in (request.query_params.get("reviewer"), request.cookies.get(REVIEWER_COOKIE)):
        if candidate is not None and REVIEWER_PATTERN.fullmatch(candidate.strip()):
            return candidate.strip()
    return os.environ.get("QE_REVIEWER") or os.environ.get("USER") or "reviewer"


def _filter_params(values: dict[str, str]) -> dict[str, str]:
    return {k: values[k] for k in FILTER_FIELDS if values.get(k) not in (None, "")}


def _queue_filter(values: dict[str, str]) -> review_queue.QueueFilter:
    try:
        return review_queue.filter_from(values)
    except ValueError as exc:
        raise Refused(400, str(exc)) from None


def _url(path: str, params: dict[str, Any]) -> str:
    clean = {k: v for k, v in params.items() if v not in (None, "")}
    return path + (f"?{urlencode(clean)}" if clean else "")


async def _read(request: Request, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
    """`work` on one short read-only connection, in a worker thread."""
    state = request.app.state
    database = state.settings.database
    if not database.exists():
        raise Refused(404, f"no database at {database} yet: run `qe run` first")

    def run() -> T:
        with state.db_lock, connect(database, read_only=True, wait_seconds=state.read_wait) as c:
            return work(c)

    try:
        return await run_in_threadpool(run)
    except DatabaseBusy as exc:
        message = f"the database is busy with a writer; reload in a moment ({exc})"
        raise Refused(503, message) from exc


async def _write(request: Request, work: Callable[[duckdb.DuckDBPyConnection], None]) -> None:
    """`work` in one short transaction under the writer lock; DatabaseBusy after write_wait."""
    state = request.app.state

    def run() -> None:
        with (
            state.db_lock,
            writer_connection(state.settings.database, wait_seconds=state.write_wait) as conn,
        ):
            work(conn)

    await run_in_threadpool(run)


def _guarded(
    handler: Callable[[Request], Any],
) -> Callable[[Request], Any]:
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except Refused as exc:
            return render(
                request, "message.html", exc.status, title="Review", message=str(exc), nav="review"
            )
        except PermissionError as exc:
            return render(
                request, "message.html", 403, title="Refused", message=str(exc), nav="review"
            )

    return endpoint


async def queue_page(request: Request) -> Response:
    values = dict(request.query_params)
    queue_filter = _queue_filter(values)
    try:
        number = max(1, int(values.get("page") or 1))
    except ValueError:
        raise Refused(400, f"page must be a number, got {values.get('page')!r}") from None

    def load(conn: duckdb.DuckDBPyConnection) -> dict[str, Any]:
        return {
            "rows": review_queue.page(
                conn, queue_filter, limit=PAGE_SIZE, offset=(number - 1) * PAGE_SIZE
            ),
            "total": review_queue.count(conn, queue_filter),
            "pending": review_queue.count(conn, review_queue.QueueFilter()),
            "progress": review_queue.progress(conn),
            "choices": review_queue.choices(conn),
        }

    data = await _read(request, load)
    params = _filter_params(values)
    return render(
        request,
        "queue.html",
        nav="review",
        title="Review queue",
        filters=params,
        reasons=review_queue.REASONS,
        queue_filter=queue_filter,
        page=number,
        page_size=PAGE_SIZE,
        offset=(number - 1) * PAGE_SIZE,
        url=_url,
        done=values.get("done"),
        age=waited,
        now=datetime.now(UTC).replace(tzinfo=None),
        **data,
    )


def waited(since: datetime, now: datetime) -> str:
    """How long a sample has waited, as a reviewer reads it at a glance: `4 min`, `3 h`, `2 d`
    (both times naive UTC, as the store keeps them)."""
    minutes = max((now - since).total_seconds(), 0.0) / 60
    if minutes < 1:
        return "< 1 min"
    if minutes < 120:
        return f"{minutes:.0f} min"
    if minutes < 48 * 60:
        return f"{minutes / 60:.0f} h"
    return f"{minutes / 1440:.0f} d"


def _item_at(
    conn: duckdb.DuckDBPyConnection, queue_filter: review_queue.QueueFilter, pos: int
) -> tuple[review.ReviewItem | None, int]:
    total = review_queue.count(conn, queue_filter)
    rows = review_queue.page(conn, queue_filter, limit=1, offset=pos)
    return (review.show(conn, rows[0]["sample_id"]) if rows else None), total


async def _item_response(
    request: Request,
    values: dict[str, str],
    pos: int,
    *,
    status: int = 200,
    error: str | None = None,
    done: str | None = None,
) -> Response:
    queue_filter = _queue_filter(values)
    item, total = await _read(request, lambda conn: _item_at(conn, queue_filter, pos))
    params = _filter_params(values)
    return render(
        request,
        "item.html",
        status,
        nav="review",
        title="Review sample",
        item=item,
        pos=pos,
        total=total,
        filters=params,
        seen=review.token_text(item.token) if item else "",
        keeps_shown=item is not None and review.keeps_judged_text(item.completion),
        accepted_text=review.accepted_text(item) if item is not None else "",
        url=_url,
        error=error,
        done=done,
    )


def _position(value: str | None) -> int:
    try:
        return max(0, int(value or 0))
    except ValueError:
        raise Refused(400, f"pos must be a number, got {value!r}") from None


async def item_page(request: Request) -> Response:
    values = dict(request.query_params)
    return await _item_response(
        request, values, _position(values.get("pos")), done=values.get("done")
    )


def _describe(action: str, sample_id: str) -> str:
    return {"accept": "accepted", "edit": "edited", "reject": "rejected"}[action] + f" {sample_id}"


async def decide(request: Request) -> Response:
    form = await checked_form(request)
    action, sample_id = form.get("action", ""), form.get("sample_id", "")
    if action not in ACTIONS or not sample_id:
        raise Refused(400, "a decision needs an action (accept, edit, reject) and a sample_id")
    pos = _position(form.get("pos"))
    reviewer = _reviewer(request)
    note = form.get("note", "").strip() or None
    seen = form.get("seen", "")

    def apply(conn: duckdb.DuckDBPyConnection) -> None:
        if action == "edit":
            review.edit(conn, sample_id, form.get("completion", ""), reviewer, note, seen=seen)
        else:
            decision = review.accept if action == "accept" else review.reject
            decision(conn, sample_id, reviewer, note, seen={sample_id: seen})

    try:
        await _write(request, apply)
    except review.ReviewError as exc:
        return await _item_response(request, form, pos, status=409, error=str(exc))
    except DatabaseBusy:
        return _retry(request, form, f"{action} {sample_id}")
    queue_filter = _queue_filter(form)
    # A decided sample leaves a pending queue, so the next one moves up to the same position.
    following = pos if queue_filter.status == review_queue.PENDING else pos + 1
    target = {**_filter_params(form), "pos": following, "done": _describe(action, sample_id)}
    return RedirectResponse(_url("/review/item", target), 303)


def _retry(request: Request, form: dict[str, str], what: str) -> Response:
    fields = {k: v for k, v in form.items() if k != "csrf"}
    return render(
        request,
        "retry.html",
        503,
        nav="review",
        title="Waiting for a run",
        what=what,
        fields=fields,
        action=request.url.path,
        seconds=RETRY_SECONDS,
        wait=request.app.state.write_wait,
    )


def _digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


async def bulk(request: Request) -> Response:
    """Step 1 states how many pending samples the filters match; step 2 (confirmed with that
    count and a digest of the ids) decides exactly those, or asks again if they changed."""
    form = await checked_form(request)
    action = form.get("bulk_action", "")
    if action not in ("accept", "reject"):
        raise Refused(400, "a bulk action is accept or reject")
    values = {**form, "status": review_queue.PENDING}
    queue_filter = _queue_filter(values)
    ids = await _read(request, lambda conn: review_queue.matching_ids(conn, queue_filter))
    params = _filter_params(values)
    confirmed = form.get("confirm_digest")
    if not ids:
        raise Refused(409, f"no pending sample matches ({queue_filter.describe()}); nothing done")
    if confirmed != _digest(ids):
        return render(
            request,
            "confirm.html",
            nav="review",
            title="Confirm",
            action=action,
            count=len(ids),
            changed=confirmed is not None,
            description=queue_filter.describe(),
            digest=_digest(ids),
            note=form.get("note", ""),
            filters=params,
            url=_url,
        )
    reviewer = _reviewer(request)
    note = form.get("note", "").strip() or None
    decision = review.accept if action == "accept" else review.reject
    skipped: list[int] = []

    def apply(conn: duckdb.DuckDBPyConnection) -> None:
        # Only still-pending samples: another reviewer may have decided on some since step 1
        # (or while this waited for a run's lock); their decision stands.
        skipped.append(decision(conn, ids, reviewer, note, only_pending=True))

    try:
        await _write(request, apply)
    except review.ReviewError as exc:
        raise Refused(409, str(exc)) from None
    except DatabaseBusy:
        return _retry(request, form, f"{action} {len(ids)} samples")
    done = f"{action}ed {len(ids) - skipped[0]} samples ({queue_filter.describe()})".replace(
        "eed", "ed"
    ) + _skipped_text(skipped[0])
    return RedirectResponse(_url("/review", {**params, "done": done}), 303)


def _skipped_text(skipped: int) -> str:
    if not skipped:
        return ""
    return f"; {skipped} skipped: decided by another reviewer meanwhile, their decision stands"


def routes() -> list[BaseRoute]:
    return [
        Route("/review", _guarded(queue_page)),
        Route("/review/item", _guarded(item_page)),
        Route("/review/decide", _guarded(decide), methods=["POST"]),
        Route("/review/bulk", _guarded(bulk), methods=["POST"]),
    ]
