"""The running daemon, as a route sees it."""

from __future__ import annotations

from starlette.requests import Request

from daemon.runtime import Runtime


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime
