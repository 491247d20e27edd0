"""Any sequence of transfer reports keeps the adaptive window (syncnode.flow) within its
bounds, its counters non-negative, and an error never lets it grow."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from syncnode.flow import Window

steps = st.lists(st.tuples(st.sampled_from(["start", "bytes", "done", "error", "rtt"]),
                           st.integers(0, 64 << 20), st.floats(0.0, 2.0)), max_size=300)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 8), st.integers(0, 64), st.integers(0, 64), steps)
def test_window_within_bounds(low: int, start: int, extra: int,
                              ops: list[tuple[str, int, float]]) -> None:
    w = Window(start=start, low=low, high=low + extra)
    now = 0.0
    for op, n, dt in ops:
        now += dt
        before = w.limit
        if op == "start":
            w.started(n, now)
        elif op == "bytes":
            w.delivered(n, now)
        elif op == "done":
            w.finished(n, now)
        elif op == "error":
            w.finished(n, now, error=True)
            assert w.limit <= before
            assert w.limit < before or w.limit == w.low
        else:
            w.first_byte(dt)
        assert w.low <= w.limit <= w.high
        assert w.inflight >= 0 and w.outstanding >= 0
        assert w.byte_limit() > 0
