"""Request bodies: bounded before they are read whole, then decoded as JSON.

`Content-Encoding: gzip` is accepted (gateways compress their backlogs): the body is
decompressed as it arrives, and MAX_BODY_BYTES bounds what it decompresses to, not only what
came over the wire (a small bomb never grows past it). Any other encoding is 415.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request

from api.responses import ApiError


def problem(field: str, message: str) -> dict[str, str]:
    return {"field": field, "message": message}


def int_param(raw: str | None, name: str, *, maximum: int) -> int | None:
    """An integer from 1 to `maximum` from the query string (None when absent), else 400.
    Digits only, no longer than `maximum` is written: the cost of a hostile value is bounded."""
    if raw is None:
        return None
    if (
        not raw.isascii()
        or not raw.isdigit()
        or len(raw) > len(str(maximum))
        or not 1 <= int(raw) <= maximum
    ):
        raise ApiError(400, [problem(name, f"must be an integer from 1 to {maximum}")])
    return int(raw)


def limit_param(raw: str | None, *, default: int, maximum: int, name: str = "limit") -> int:
    """A page size from the query string: an integer from 1 to `maximum`, else 400."""
    value = int_param(raw, name, maximum=maximum)
    return default if value is None else value


@dataclass(frozen=True, slots=True)
class JsonBody:
    raw: bytes  # as received: what a rejection record keeps
    data: Any


async def read_json(request: Request, *, max_bytes: int) -> JsonBody:
    """The JSON body; 413 past `max_bytes` (declared, streamed or decompressed), 415 for an
    encoding other than gzip, 400 if malformed."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, [problem("", "Content-Length is not a number")])
        if int(declared) > max_bytes:
            raise _too_large(max_bytes)
    # (Two Content-Encoding headers are one list: "gzip" twice is "gzip, gzip", refused.)
    encoding = ", ".join(request.headers.getlist("content-encoding")).strip().lower()
    encoding = encoding or "identity"
    if encoding == "gzip":
        body = await _gunzipped(request, max_bytes)
    elif encoding == "identity":
        body = await _read(request, max_bytes)
    else:
        raise ApiError(
            415, [problem("", f"Content-Encoding {encoding!r}: only gzip (or none) is accepted")]
        )
    if not body:
        raise ApiError(400, [problem("", "empty body: expected JSON")])
    try:
        return JsonBody(body, orjson.loads(body))
    except orjson.JSONDecodeError as error:
        raise ApiError(400, [problem("", f"malformed JSON: {error}")]) from None


async def _read(request: Request, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


# Each member costs a decompressor and a copy of what follows it in the chunk: 4 MiB of
# empty members once took 0.74 s of the event loop. Tools write one (or one a file joined).
GZIP_MAX_MEMBERS = 64


def _member() -> Any:
    return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # a gzip header and trailer


async def _gunzipped(request: Request, max_bytes: int) -> bytes:
    """Decompressed as it arrives, never past `max_bytes` of output. Members one after the
    other (RFC 1952, as `gzip -c a b` writes them) are one body, as `gunzip` reads them;
    anything after a member that is not another is 400, and so is a body of more than
    GZIP_MAX_MEMBERS members."""
    inflater = _member()
    chunks: list[bytes] = []
    size = received = members = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise _too_large(max_bytes)
            data = chunk
            while data:
                if inflater.eof:  # a member ended: what follows is the next one
                    members += 1
                    if members >= GZIP_MAX_MEMBERS:
                        raise ApiError(
                            400, [problem("", f"more than {GZIP_MAX_MEMBERS} gzip members")]
                        )
                    inflater = _member()
                out = inflater.decompress(data, max_bytes + 1 - size)
                size += len(out)
                if size > max_bytes:
                    raise _too_large(max_bytes, decompressed=True)
                chunks.append(out)
                data = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
        chunks.append(inflater.flush())
    except zlib.error as error:
        raise ApiError(400, [problem("", f"the body is not valid gzip: {error}")]) from None
    if not inflater.eof and received:
        raise ApiError(400, [problem("", "the gzip body ends before its end")])
    return b"".join(chunks)


def _too_large(max_bytes: int, *, decompressed: bool = False) -> ApiError:
    what = "body, decompressed," if decompressed else "body"
    return ApiError(413, [problem("", f"{what} larger than {max_bytes} bytes (MAX_BODY_BYTES)")])
