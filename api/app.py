"""The Starlette application: routes from the table in `api.routes`, the OpenAPI document,
offline API docs, the operators' dashboard, and errors that always answer JSON.

Readings POSTed to the ingestion routes (the hot path: firmware posting one reading at a
time) go straight to their handler, past Starlette's middleware stack and router; profiled
under load, that stack cost more CPU than the handler itself (BENCHMARKS.md). The answers are
the same either way: the same handlers, the same error bodies.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from api.auth import Handler
from api.database import ReadGate
from api.openapi import openapi_document
from api.responses import JSON, ApiError
from api.routes import ENDPOINTS
from api.runtime import Runtime

log = logging.getLogger(__name__)
HTTP = {"transport": "http"}  # what its log lines are about (LOG_FORMAT=json)

STATIC = Path(__file__).parent / "static"
DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Energy Ingestion Engine — API</title>
<link rel="stylesheet" href="/static/swagger-ui/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/static/swagger-ui/swagger-ui-bundle.js"></script>
<script src="/static/docs.js"></script></body></html>"""


DASHBOARD = (STATIC / "dashboard" / "index.html").read_bytes()
# The dashboard loads nothing but this daemon's own scripts, styles and JSON; device text is
# only ever put in as text, and the policy would stop a script that got in all the same.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def _api_error(request: Request, exc: Exception) -> JSON:
    assert isinstance(exc, ApiError)
    return JSON({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> JSON:
    assert isinstance(exc, HTTPException)
    return JSON({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _client_gone(request: Request, exc: Exception) -> Response:
    # A client that hangs up mid-body (or whose body never came in time) is a normal event:
    # nobody reads this answer, and there is nothing to log beyond a line.
    log.info("client went away during %s %s", request.method, request.url.path, extra=HTTP)
    return Response(status_code=400)


BUG_LOG_EVERY_S = 60.0
_bugs_logged: dict[tuple[type[BaseException], str], float] = {}


async def _unexpected(request: Request, exc: Exception) -> JSON:
    """An error of ours: 500 with no internals, counted, its traceback in the log the first
    time (per kind and route), then a line at most every minute: a bug that every request
    meets must not flood the log."""
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is not None:
        runtime.writer.metrics.internal_errors.labels("http").inc()
    key = (type(exc), request.url.path)
    now = time.monotonic()
    last = _bugs_logged.get(key)
    if last is None:
        log.error(
            "an error of ours on %s %s",
            request.method,
            request.url.path,
            exc_info=exc,
            extra=HTTP,
        )
        _bugs_logged[key] = now
    elif now - last >= BUG_LOG_EVERY_S:
        log.error(
            "again: %s on %s %s", type(exc).__name__, request.method, request.url.path, extra=HTTP
        )
        _bugs_logged[key] = now
    return JSON({"detail": "internal error; the daemon logged it"}, status_code=500)


class App:
    """The ASGI entry point: direct POST routes first, then the Starlette application."""

    def __init__(self, starlette: Starlette, direct: dict[str, Handler]) -> None:
        self.starlette = starlette
        self._direct = direct

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self._direct.get(scope["path"]) if scope["type"] == "http" else None
        if handler is None or scope["method"] != "POST":
            # An error of ours was answered 500 and logged by `_unexpected`; Starlette raises
            # it again after its handler, and uvicorn would log it a second time.
            with contextlib.suppress(Exception):
                await self.starlette(scope, receive, send)
            return
        scope["app"] = self.starlette
        request = Request(scope, receive)
        response: Response
        try:
            response = await handler(request)
        except ApiError as exc:
            response = await _api_error(request, exc)
        except ClientDisconnect as exc:
            response = await _client_gone(request, exc)
        except Exception as exc:
            response = await _unexpected(request, exc)
        await response(scope, receive, send)


def create_app(runtime: Runtime) -> App:
    document = openapi_document(secured=bool(runtime.settings.api_keys))

    async def openapi(request: Request) -> JSON:
        return JSON(document)

    async def docs(request: Request) -> HTMLResponse:
        return HTMLResponse(DOCS_PAGE)

    async def dashboard(request: Request) -> HTMLResponse:
        return HTMLResponse(DASHBOARD, headers=PAGE_HEADERS)

    routes: list[Route | Mount] = [Route(e.path, e.handler, methods=[e.method]) for e in ENDPOINTS]
    routes += [
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
        Route("/", dashboard, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            ClientDisconnect: _client_gone,
            Exception: _unexpected,
        },
    )
    app.state.runtime = runtime
    settings = runtime.settings
    app.state.reads = ReadGate(
        runtime.read_pool,
        analytics_max=settings.analytics_max_concurrent,
        queue_timeout_s=settings.read_queue_timeout_s,
        statement_timeout_s=settings.analytics_statement_timeout_s,
        metrics=runtime.writer.metrics,
    )
    direct = {e.path: e.handler for e in ENDPOINTS if e.method == "POST" and e.tag == "ingestion"}
    return App(app, direct)
