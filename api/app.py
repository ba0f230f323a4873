"""The Starlette application: routes, and errors that always answer JSON."""

from __future__ import annotations

import logging

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Route

from api import operators
from api.responses import JSON, ApiError
from daemon.runtime import Runtime

log = logging.getLogger(__name__)


async def _api_error(request: Request, exc: Exception) -> JSON:
    assert isinstance(exc, ApiError)
    return JSON({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> JSON:
    assert isinstance(exc, HTTPException)
    return JSON({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> JSON:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return JSON({"detail": "internal error; the daemon logged it"}, status_code=500)


def create_app(runtime: Runtime) -> Starlette:
    routes = [
        Route("/health", operators.health, methods=["GET"]),
        Route("/v1/status/meter/{device_id:str}", operators.meter_status, methods=["GET"]),
        Route("/v1/status/vehicle/{device_id:str}", operators.vehicle_status, methods=["GET"]),
        Route("/v1/rejections", operators.rejections, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
    )
    app.state.runtime = runtime
    return app
