"""A window of time as pieces the database can sum quickly: whole hours from the hourly
roll-ups, and the parts of hours at its edges from the raw readings.

An edge's part of an hour is read either directly (the readings from the edge to the hour's
end) or as the hour's roll-up minus the readings on the other side of the edge, whichever
reads fewer rows: at most half an hour of readings per edge and device. A window that ends
now has its end edge almost free (the hour's roll-up minus the readings after now: none but
a clock-skewed device's). TimescaleDB's real-time aggregates do the same: materialised buckets
plus the raw rows they do not cover.

The sum over the pieces, each with its sign, is exactly the sum over the readings in
[start, end): `tests/test_windows.py` checks that for any window and any readings.

Before the raw history kept (`raw_from`, a UTC midnight: RETENTION_DAYS), only the roll-ups
are left: a window starting there is read at hour resolution, rounded out to whole hours
(`rounded`): from the start of its first hour, and, when it ends before `raw_from` too,
through the end of its last; the part from `raw_from` on is read exactly, as any window.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

HOUR = timedelta(hours=1)
Kind = Literal["hourly", "raw"]
HOURLY: Kind = "hourly"
RAW: Kind = "raw"


@dataclass(frozen=True, slots=True)
class Piece:
    kind: Kind
    lo: datetime  # inclusive; for hourly pieces, an hour's start
    hi: datetime  # exclusive
    sign: int  # +1 or -1


def floor_hour(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def ceil_hour(t: datetime) -> datetime:
    floor = floor_hour(t)
    return floor if floor == t else floor + HOUR


def rounded(start: datetime, end: datetime, raw_from: datetime | None) -> tuple[datetime, datetime]:
    """The window as it can be read: itself, or, when it starts before the raw history kept,
    rounded out to whole hours in the part before it."""
    if raw_from is None or start >= raw_from:
        return start, end
    return floor_hour(start), end if end > raw_from else ceil_hour(end)


def pieces(
    start: datetime, end: datetime, *, now: datetime, raw_from: datetime | None = None
) -> list[Piece]:
    """Pieces whose signed sum is [start, end). Raw pieces past `now` cost nothing (no
    reading is there yet, but a few from clocks ahead), which decides a window ending now.
    With `raw_from` (an hour's start), nothing before it is read raw: the window is
    `rounded`, its part before `raw_from` one hourly piece."""
    if start >= end:
        return []
    if raw_from is not None and start < raw_from:
        start, end = rounded(start, end, raw_from)
        if end <= raw_from:
            return [Piece(HOURLY, start, end, 1)]
        return _merged([Piece(HOURLY, start, raw_from, 1), *pieces(raw_from, end, now=now)])
    start, end = start.astimezone(UTC), end.astimezone(UTC)
    first_full, last_full = ceil_hour(start), floor_hour(end)
    if first_full > last_full:  # both in one hour that neither touches at its start
        hour = floor_hour(start)
        return _cheaper(
            [Piece(RAW, start, end, 1)],
            [Piece(HOURLY, hour, hour + HOUR, 1), *_raw_pair(hour, start, end, hour + HOUR)],
            now,
        )
    out: list[Piece] = []
    if start < first_full:  # [start, first_full): the tail of the hour before
        hour = first_full - HOUR
        out += _cheaper(
            [Piece(RAW, start, first_full, 1)],
            [Piece(HOURLY, hour, first_full, 1), Piece(RAW, hour, start, -1)],
            now,
        )
    if first_full < last_full:
        out.append(Piece(HOURLY, first_full, last_full, 1))
    if last_full < end:  # [last_full, end): the head of the hour after
        out += _cheaper(
            [Piece(RAW, last_full, end, 1)],
            [Piece(HOURLY, last_full, last_full + HOUR, 1), Piece(RAW, end, last_full + HOUR, -1)],
            now,
        )
    return _merged(out)


def _raw_pair(hour: datetime, start: datetime, end: datetime, hour_end: datetime) -> list[Piece]:
    return [Piece(RAW, hour, start, -1), Piece(RAW, end, hour_end, -1)]


def _cost(piece: Piece, now: datetime) -> timedelta:
    """Raw readings are read one by one; a roll-up row is one row for an hour of them."""
    if piece.kind == HOURLY:
        return timedelta(0)
    return max(timedelta(0), min(piece.hi, now) - piece.lo)


def _cheaper(direct: list[Piece], complement: list[Piece], now: datetime) -> list[Piece]:
    cost_direct = sum((_cost(p, now) for p in direct), timedelta(0))
    cost_complement = sum((_cost(p, now) for p in complement), timedelta(0))
    return complement if cost_complement < cost_direct else direct


def _merged(out: list[Piece]) -> list[Piece]:
    """Contiguous hourly pieces become one range (one scan, not three); empty ones go."""
    hourly = sorted((p for p in out if p.kind == HOURLY and p.lo < p.hi), key=lambda p: p.lo)
    merged: list[Piece] = []
    for piece in hourly:
        last = merged[-1] if merged else None
        if last is not None and last.sign == piece.sign and last.hi == piece.lo:
            merged[-1] = Piece(HOURLY, last.lo, piece.hi, last.sign)
        else:
            merged.append(piece)
    return merged + [p for p in out if p.kind == RAW and p.lo < p.hi]


def columns(window: list[Piece]) -> tuple[list[str], list[datetime], list[datetime], list[int]]:
    """The pieces as four arrays, for a query's `unnest`."""
    return (
        [p.kind for p in window],
        [p.lo for p in window],
        [p.hi for p in window],
        [p.sign for p in window],
    )
