"""Request bodies: bounded before they are read whole, then decoded as JSON."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request

from api.responses import ApiError


def problem(field: str, message: str) -> dict[str, str]:
    return {"field": field, "message": message}


def limit_param(raw: str | None, *, default: int, maximum: int, name: str = "limit") -> int:
    """A page size from the query string: an integer from 1 to `maximum`, else 400."""
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 9 or not 1 <= int(raw) <= maximum:
        raise ApiError(400, [problem(name, f"must be an integer from 1 to {maximum}")])
    return int(raw)


@dataclass(frozen=True, slots=True)
class JsonBody:
    raw: bytes  # as received: what a rejection record keeps
    data: Any


async def read_json(request: Request, *, max_bytes: int) -> JsonBody:
    """The JSON body; 413 past `max_bytes` (declared or streamed), 400 if malformed."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, [problem("", "Content-Length is not a number")])
        if int(declared) > max_bytes:
            raise _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise ApiError(400, [problem("", "empty body: expected JSON")])
    try:
        return JsonBody(body, orjson.loads(body))
    except orjson.JSONDecodeError as error:
        raise ApiError(400, [problem("", f"malformed JSON: {error}")]) from None


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, [problem("", f"body larger than {max_bytes} bytes (MAX_BODY_BYTES)")])
