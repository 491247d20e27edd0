"""The adaptive window (syncnode.flow) and the claims between peers (syncnode.sources),
driven without a network: a simulated path (round trip, capacity shared by the running
transfers) feeds the controller the reports a real pull would, on a simulated clock."""

from __future__ import annotations

import asyncio

import pytest

from syncnode.flow import MIN_INFLIGHT_BYTES, FlowGate, Window
from syncnode.sources import STEAL_BASE, Claim, Sources, choose, steal_after

MB = 1_000_000


def simulate(window: Window, *, rtt: float, capacity: float, size: int, seconds: float,
             dt: float = 0.005, errors_at: tuple[float, ...] = (), t0: float = 0.0,
             limits: list[int] | None = None) -> list[float]:
    """Run transfers of ``size`` bytes through a path: each one's first byte comes one
    round trip after it starts, then the running transfers share ``capacity`` bytes/s.
    Returns the throughput of every simulated second."""
    now = t0
    running: list[list[float]] = []  # [started, bytes left]
    per_second: list[float] = []
    second_bytes = 0.0
    pending_errors = sorted(errors_at)
    while now < t0 + seconds:
        while window.may_start(size):
            window.started(size, now)
            running.append([now, float(size)])
        if pending_errors and now >= pending_errors[0]:
            pending_errors.pop(0)
            if running:  # one transfer drops: its bytes never come
                _started, left = running.pop(0)
                window.finished(int(left), now, error=True)
        moving = [t for t in running if now - t[0] >= rtt]
        if moving:
            share = capacity * dt / len(moving)
            for t in moving:
                n = min(share, t[1])
                if t[1] == size:
                    window.first_byte(now - t[0])
                t[1] -= n
                second_bytes += n
                window.delivered(int(n), now)
        for t in [t for t in running if t[1] <= 0]:
            running.remove(t)
            window.finished(0, now)
        now += dt
        if int(now - t0) > len(per_second):
            if limits is not None:
                limits.append(window.limit)
            per_second.append(second_bytes)
            second_bytes = 0.0
    return per_second


def test_window_grows_to_fill_a_long_fat_path() -> None:
    # 40 ms each way, 50 MB/s, 0.5 MB instances: a fixed 4 at a time gets ~17 MB/s
    fixed = Window(start=4, low=4, high=4)
    rates_fixed = simulate(fixed, rtt=0.08, capacity=50 * MB, size=MB // 2, seconds=20)
    adaptive = Window(start=4, high=32)
    rates = simulate(adaptive, rtt=0.08, capacity=50 * MB, size=MB // 2, seconds=20)
    assert max(rates_fixed[5:]) < 20 * MB
    late = rates[10:]
    assert min(late) > 0.9 * 50 * MB, [round(r / MB, 1) for r in rates]
    assert adaptive.limit <= 32


def test_window_stays_small_where_more_does_not_help() -> None:
    # loopback-like: the round trip is nothing, more transfers add no throughput
    w = Window(start=8, high=64)
    limits: list[int] = []
    simulate(w, rtt=0.0002, capacity=400 * MB, size=MB // 2, seconds=12, dt=0.0002,
             limits=limits)
    assert sorted(limits)[len(limits) // 2] <= 16, limits  # probes aside, it stays small


def test_window_shrinks_on_errors_and_recovers() -> None:
    w = Window(start=16, high=32)
    limits: list[int] = []
    rates = simulate(w, rtt=0.08, capacity=50 * MB, size=MB // 2, seconds=20,
                     errors_at=(6.0, 6.05, 6.1), limits=limits)
    assert min(limits[6:8]) < min(limits[3:6]), limits  # dropped transfers shrink it
    assert min(rates[14:]) > 0.85 * 50 * MB, [round(r / MB, 1) for r in rates]


def test_window_bounds_and_byte_limit() -> None:
    with pytest.raises(ValueError):
        Window(start=4, low=5, high=4)
    w = Window(start=100, low=2, high=10)
    assert w.limit == 10
    assert w.byte_limit() == MIN_INFLIGHT_BYTES
    for _ in range(2):  # the first `low` transfers always start, whatever their size
        assert w.may_start(10 * MIN_INFLIGHT_BYTES)
        w.started(10 * MIN_INFLIGHT_BYTES, 0.0)
    assert not w.may_start(1)  # beyond them, outstanding bytes count


def test_steal_deadline_and_choice() -> None:
    claims = {"b1": Claim("b1", "slow", MB, started=0.0, got=0),
              "b2": Claim("b2", "fast", MB, started=0.0)}
    todo = [("b1", MB), ("b2", MB)]
    # too early: nothing to take
    assert choose("fast", todo, claims, 1.0, 10 * MB, MB) is None
    late = STEAL_BASE + 1
    assert late > steal_after(MB, 10 * MB)
    assert choose("fast", todo, claims, late, 10 * MB, MB) == ("b1", MB, True)
    # a claim that moves well is left alone
    claims["b1"].got = MB // 2
    assert choose("fast", todo, claims, late, 10 * MB, 0.2 * MB) is None
    # a free blob comes first
    assert choose("fast", [*todo, ("b3", 5)], claims, late, 10 * MB, MB) == ("b3", 5, False)


async def test_sources_steal_cancels_the_slow_transfer_and_never_back() -> None:
    t = [0.0]
    sources = Sources(clock=lambda: t[0])
    slow = sources.pick("slow", [("b", MB)], 0.0, 0.0)
    assert slow is not None and slow.peer == "slow"
    slow.fetch = asyncio.ensure_future(asyncio.sleep(3600))
    assert sources.pick("fast", [("b", MB)], 10 * MB, MB) is None
    t[0] = 100.0
    taken = sources.pick("fast", [("b", MB)], 10 * MB, MB)
    assert taken is not None and taken.peer == "fast" and slow.stolen_by == "fast"
    await asyncio.sleep(0)
    assert slow.fetch.cancelled()
    sources.release(slow)  # the loser's release leaves the new claim alone
    assert sources.claims["b"] is taken
    t[0] = 10_000.0
    assert sources.pick("slow", [("b", MB)], 10 * MB, MB) is None  # never stolen back
    sources.release(taken)
    assert sources.claims == {}


async def test_gate_slot_counts_an_exception_as_an_error() -> None:
    gate = FlowGate(start=8, high=8)
    with pytest.raises(OSError):
        async with gate.slot(100) as ticket:
            ticket.progress(50)
            raise OSError("link dropped")
    assert gate.window.limit < 8 and gate.window.inflight == 0
    assert gate.window.outstanding == 0
