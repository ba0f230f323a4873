"""Answers with many rows, written a piece at a time: each piece is a few hundred rows
turned into bytes, and the event loop gets a turn between pieces, so that no answer, however
long, holds it (the MQTT intake, the flushes and their acknowledgements share it).
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import orjson

T = TypeVar("T")

ROWS_PER_PIECE = 200
_OPTIONS = orjson.OPT_NON_STR_KEYS


async def json_object(
    fields: dict[str, Any], key: str, rows: Sequence[T], render: Callable[[T], Any]
) -> AsyncIterator[bytes]:
    """`fields` as a JSON object with one more member, `key`: the rows, rendered."""
    head = orjson.dumps(fields, option=_OPTIONS)
    yield head[:-1] + (b"," if fields else b"") + orjson.dumps(key) + b":["
    for start in range(0, len(rows), ROWS_PER_PIECE):
        await asyncio.sleep(0)
        piece = orjson.dumps([render(r) for r in rows[start : start + ROWS_PER_PIECE]])
        yield (b"," if start else b"") + piece[1:-1]
    yield b"]}"


async def csv_rows(
    header: Sequence[str], rows: Sequence[T], render: Callable[[T], Sequence[Any]]
) -> AsyncIterator[bytes]:
    """A header line, then the rows rendered (RFC 4180: CRLF, quoted where needed)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(header)
    for start in range(0, len(rows), ROWS_PER_PIECE):
        writer.writerows(render(r) for r in rows[start : start + ROWS_PER_PIECE])
        yield out.getvalue().encode()
        out.seek(0)
        out.truncate()
        await asyncio.sleep(0)
    if not rows:
        yield out.getvalue().encode()
