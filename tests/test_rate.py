"""The dashboard's "readings per second now": whole seconds of the last ten, nothing older."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ingest.metrics import RecentRate


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@given(st.lists(st.tuples(st.floats(0, 3), st.integers(0, 1000)), max_size=60), st.floats(0, 3))
def test_the_rate_is_what_came_in_the_last_whole_seconds(
    events: list[tuple[float, int]], wait: float
) -> None:
    clock = Clock()
    rate = RecentRate(span_s=10, clock=clock)
    seen: list[tuple[float, int]] = []
    for step, n in events:
        clock.now += step
        rate.add(n)
        seen.append((clock.now, n))
    clock.now += wait
    now = int(clock.now)
    expected = sum(n for at, n in seen if now - 10 <= int(at) < now) / 10
    assert rate.per_second() == expected


def test_a_quiet_daemon_has_a_rate_of_nought() -> None:
    clock = Clock()
    rate = RecentRate(span_s=10, clock=clock)
    rate.add(500)
    assert rate.per_second() == 0  # its second is not over yet
    clock.now += 1
    assert rate.per_second() == 50
    clock.now += 11
    assert rate.per_second() == 0
