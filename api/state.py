"""The running daemon, as a route sees it: the runtime, and the gate of operators' reads."""

from __future__ import annotations

from starlette.requests import Request

from api.database import ReadGate
from api.runtime import Runtime


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def reads_of(request: Request) -> ReadGate:
    gate: ReadGate = request.app.state.reads
    return gate
