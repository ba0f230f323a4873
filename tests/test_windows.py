"""A window as hourly and raw pieces (db/windows.py): for any window and any readings, the
pieces' signed sum is exactly what lies in the window."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from db.windows import HOUR, HOURLY, RAW, Piece, ceil_hour, floor_hour, pieces, rounded

BASE = datetime(2026, 11, 25, tzinfo=UTC)
moments = st.integers(min_value=0, max_value=3 * 24 * 3600 * 1000).map(
    lambda ms: BASE + timedelta(milliseconds=ms)
)


def in_pieces(ts: datetime, window: list[Piece]) -> int:
    total = 0
    for piece in window:
        point = floor_hour(ts) if piece.kind == HOURLY else ts
        if piece.lo <= point < piece.hi:
            total += piece.sign
    return total


@settings(max_examples=500, deadline=None)
@given(
    start=moments,
    length=st.integers(0, 40 * 3600 * 1000),
    now=moments,
    readings=st.lists(moments, max_size=60),
)
def test_the_signed_pieces_hold_exactly_the_readings_of_the_window(
    start: datetime, length: int, now: datetime, readings: list[datetime]
) -> None:
    end = start + timedelta(milliseconds=length)
    window = pieces(start, end, now=now)
    for ts in [*readings, start, end, start - timedelta(microseconds=1), floor_hour(start)]:
        assert in_pieces(ts, window) == (1 if start <= ts < end else 0), (ts, window)
    for piece in window:
        if piece.kind == HOURLY:
            assert piece.lo == floor_hour(piece.lo) and piece.hi == floor_hour(piece.hi)


@settings(max_examples=300, deadline=None)
@given(start=moments, length=st.integers(1, 40 * 3600 * 1000))
def test_no_edge_reads_more_than_half_an_hour_of_readings(start: datetime, length: int) -> None:
    end = start + timedelta(milliseconds=length)
    raw = [p for p in pieces(start, end, now=end + HOUR) if p.kind == RAW]
    assert sum((p.hi - p.lo for p in raw), timedelta(0)) <= HOUR


def test_a_window_ending_now_reads_its_last_hour_from_the_roll_up() -> None:
    now = datetime(2026, 11, 25, 12, 50, tzinfo=UTC)
    window = pieces(now - timedelta(hours=24), now, now=now)
    raw_past_now = [p for p in window if p.kind == RAW and p.lo >= now]
    assert raw_past_now and all(p.sign == -1 for p in raw_past_now)
    assert [p for p in window if p.kind == RAW and p.hi <= now] == [
        p for p in window if p.kind == RAW and p.lo < now and p.hi <= now
    ]
    read = sum(
        (min(p.hi, now) - p.lo for p in window if p.kind == RAW and p.lo < now), timedelta(0)
    )
    assert read == timedelta(minutes=10)  # 12:50 yesterday to 13:00: the start edge only


@settings(max_examples=300, deadline=None)
@given(
    start=moments,
    length=st.integers(1, 40 * 3600 * 1000),
    days=st.integers(0, 3),
    readings=st.lists(moments, max_size=60),
)
def test_before_the_raw_history_a_window_is_read_in_whole_hours_rounded_out(
    start: datetime, length: int, days: int, readings: list[datetime]
) -> None:
    """Nothing before `raw_from` is read raw; the pieces hold exactly the readings of the
    window rounded out to whole hours before `raw_from`, and exactly those of the window
    from it on."""
    end = start + timedelta(milliseconds=length)
    raw_from = BASE + timedelta(days=days)
    window = pieces(start, end, now=end + HOUR, raw_from=raw_from)
    lo, hi = rounded(start, end, raw_from)
    if start >= raw_from:
        assert (lo, hi) == (start, end)
    else:
        assert lo == floor_hour(start) and hi == (end if end > raw_from else ceil_hour(end))
    assert all(p.lo >= raw_from for p in window if p.kind == RAW)
    for ts in [*readings, start, end, lo, hi - timedelta(microseconds=1)]:
        assert in_pieces(ts, window) == (1 if lo <= ts < hi else 0), (ts, window)
