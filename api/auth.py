"""API keys (SPEC §4): bearer keys with the `ingest` or `operator` role.

With no keys configured the API is open; the daemon says so in its log and on /health.
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from api.responses import ApiError

Handler = Callable[[Request], Awaitable[Response]]
OPEN_NOTICE = "open: no API keys configured (set INGEST_API_KEYS / OPERATOR_API_KEYS)"


def require(role: str) -> Callable[[Handler], Handler]:
    """Wrap a route handler so that it needs a bearer key with `role` (when keys exist)."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def checked(request: Request) -> Response:
            keys: dict[str, frozenset[str]] = request.app.state.runtime.settings.api_keys
            if keys:
                _check(request, keys, role)
            return await handler(request)

        checked.required_role = role  # type: ignore[attr-defined]
        return checked

    return wrap


def _check(request: Request, keys: dict[str, frozenset[str]], role: str) -> None:
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    challenge = {"WWW-Authenticate": 'Bearer realm="energy-ingest"'}
    if scheme.lower() != "bearer" or not presented:
        raise ApiError(401, "an API key is needed: Authorization: Bearer <key>", challenge)
    # Compared as bytes, in constant time: header values are any bytes (latin-1 as text), and
    # hmac compares text only when it is ASCII.
    offered = presented.encode("latin-1", errors="replace")
    roles = next((r for key, r in keys.items() if hmac.compare_digest(key.encode(), offered)), None)
    if roles is None:
        raise ApiError(401, "unknown API key", challenge)
    if role not in roles:
        raise ApiError(403, f"this API key lacks the {role!r} role")
