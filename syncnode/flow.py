"""How many blob transfers to keep in flight with one peer: an adaptive window.

Vocabulary. A *transfer* is one blob pulled from (or pushed to) a peer. The *window* is
how many transfers may run at once with that peer; ``outstanding`` bytes are the bytes
of running transfers not delivered yet. An *epoch* is a stretch of time (at least
``MIN_EPOCH``, and a few round trips) over which delivered bytes are summed into one
throughput sample.

The rule (hill climbing on measured throughput, in the spirit of BBR's probing and
AIMD's reaction to loss):

- while probing, the window grows each epoch: it doubles at the start (a slow start, as
  TCP's), grows by half when climbing back after errors, by a quarter when probing again
  later; a probe ends when throughput has
  not risen by more than ``RISE`` over the best seen for ``STALLS`` epochs in a row
  (BBR's "full pipe" test): the window then settles on the smallest window whose
  throughput was within ``RISE / 2`` of the best, and holds;
- every ``PROBE_EVERY`` settled epochs it probes again (growing by a quarter), after
  letting the best decay a little, so a path that got faster (or slower) is followed;
- an error (a dropped connection, a timeout, a refused or overloaded answer, a transfer
  taken over by a faster peer) shrinks it multiplicatively (``DECREASE``) at once, and a
  new probe starts from there (AIMD's saw-tooth, with BBR's probe for the climb);
- an epoch in which the window was not full most of the time (not enough blobs to
  pull) says nothing about the path: the window is left as it is;
- the window stays within ``[low, high]`` at every instant; ``start`` is where it begins
  (the ``max_pulls`` setting), ``high`` the ``max_window`` setting.

Bytes in flight are bounded as well: beyond ``low`` transfers, a new one starts only if
the outstanding bytes plus its size stay under ``byte_limit()``: a few times the path's
bandwidth-delay product (best throughput times the smallest round trip seen), never under
``MIN_INFLIGHT_BYTES``.

:class:`Window` is pure (sans-IO: every call takes ``now``); :class:`FlowGate` is the
thin asyncio adapter the sync engine uses. The same code runs on loopback and over a
300 ms link: only the measurements differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

MIN_EPOCH = 0.5  # seconds: the shortest stretch one throughput sample covers
EPOCH_RTTS = 4  # an epoch also covers at least this many smallest round trips
RISE = 0.10  # a sample this much above the best counts as "throughput still rises"
DECREASE = 0.6  # the window is multiplied by this on an error
PROBE_EVERY = 8  # settled epochs between two probes upward
STALLS = 3  # epochs without a rise that end a probe (the pipe is full)
DECAY = 0.95  # the best throughput decays by this at each probe (the path may change)
BUSY_SHARE = 0.5  # share of an epoch the window must be full for its sample to count
MIN_INFLIGHT_BYTES = 16 << 20  # never fewer outstanding bytes allowed than this
BDP_FACTOR = 4  # outstanding bytes allowed, in bandwidth-delay products


@dataclass
class Window:
    """The window controller of one peer and direction (pure; see the module doc)."""

    start: int = 8
    low: int = 1
    high: int = 32
    limit: int = field(init=False)
    inflight: int = 0  # transfers running
    outstanding: int = 0  # their bytes not delivered yet
    best_rate: float = 0.0  # bytes/s, the best epoch sample (decaying)
    min_rtt: float = math.inf  # seconds, the smallest time to a first byte seen
    epochs: int = 0
    _epoch_start: float | None = None
    _epoch_bytes: int = 0
    _busy: float = 0.0  # seconds of this epoch with the window full
    _last: float | None = None  # time of the last call (for _busy)
    _errors: int = 0
    growing: bool = True  # probing upward (at the start, and every PROBE_EVERY epochs)
    _step: int = 1  # while probing, the window grows by limit // _step per epoch
    _stalls: int = 0  # epochs in a row without a rise while growing
    _flat: int = 0  # epochs in a row at a settled window
    _samples: dict[int, float] = field(default_factory=dict)  # window -> its last rate
    _active: float = 0.0  # seconds with at least one transfer running
    _total: int = 0  # bytes delivered in all

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise ValueError(f"window bounds must satisfy 1 <= low <= high, not "
                             f"{self.low}..{self.high}")
        self.limit = min(max(self.start, self.low), self.high)

    # -- what the scheduler asks -------------------------------------------------------
    def byte_limit(self) -> int:
        """Outstanding bytes allowed beyond the first ``low`` transfers."""
        if self.best_rate <= 0 or math.isinf(self.min_rtt):
            return MIN_INFLIGHT_BYTES
        return max(MIN_INFLIGHT_BYTES, int(BDP_FACTOR * self.best_rate * self.min_rtt))

    def share(self) -> int:
        """Bytes each transfer of a full window may carry for the window to use its whole
        byte budget (:meth:`byte_limit`)."""
        return self.byte_limit() // max(1, self.limit)

    def rate(self) -> float:
        """Bytes/s this peer delivers: the best epoch, or before one was measured the
        average over the time anything was in flight (0: nothing measured yet)."""
        average = self._total / self._active if self._active > 0.01 else 0.0
        return max(self.best_rate, average)

    def may_start(self, size: int) -> bool:
        """Whether a transfer of ``size`` bytes may start now."""
        if self.inflight >= self.limit:
            return False
        if self.inflight < self.low:
            return True
        return self.outstanding + size <= self.byte_limit()

    # -- what the transfers report ------------------------------------------------------
    def started(self, size: int, now: float) -> None:
        self._tick(now)
        self.inflight += 1
        self.outstanding += size

    def first_byte(self, seconds: float) -> None:
        """A transfer's first byte came ``seconds`` after it started (an RTT sample)."""
        if seconds > 0:
            self.min_rtt = min(self.min_rtt, seconds)

    def delivered(self, n: int, now: float) -> None:
        self._tick(now)
        self._epoch_bytes += n
        self._total += n
        self.outstanding = max(0, self.outstanding - n)
        self._maybe_decide(now)

    def finished(self, undelivered: int, now: float, *, error: bool = False) -> None:
        """A transfer ended; ``undelivered``: its bytes that never came (given up)."""
        self._tick(now)
        self.inflight = max(0, self.inflight - 1)
        self.outstanding = max(0, self.outstanding - undelivered)
        if error:
            self._errors += 1
            # react at once: waiting for the epoch's end would start more doomed transfers
            self.limit = max(self.low, min(self.limit - 1, int(self.limit * DECREASE)))
        self._maybe_decide(now)

    # -- the rule ----------------------------------------------------------------------
    def _tick(self, now: float) -> None:
        if self._epoch_start is None:
            self._epoch_start = now
        if self._last is not None and now > self._last:
            if self.inflight >= self.limit:
                self._busy += now - self._last
            if self.inflight > 0:
                self._active += now - self._last
        self._last = now

    def epoch_length(self) -> float:
        rtt = 0.0 if math.isinf(self.min_rtt) else self.min_rtt
        return max(MIN_EPOCH, EPOCH_RTTS * rtt)

    def _maybe_decide(self, now: float) -> None:
        assert self._epoch_start is not None
        span = now - self._epoch_start
        if span < self.epoch_length():
            return
        rate = self._epoch_bytes / span
        full = self._busy >= BUSY_SHARE * span
        errors = self._errors
        self._epoch_start, self._epoch_bytes, self._busy, self._errors = now, 0, 0.0, 0
        self.epochs += 1
        if errors:
            # the limit shrank when they happened; what was measured before is stale
            self.best_rate *= DECAY
            self._samples.clear()
            self.growing, self._stalls, self._flat = True, 0, 0  # climb back from there
            self._step = 2
            return
        if not full:  # not enough to transfer: a sample, but no verdict on the window
            self.best_rate = max(self.best_rate, rate)
            return
        self._samples[self.limit] = rate
        if rate > self.best_rate * (1 + RISE):
            self.best_rate, self._stalls = rate, 0
            if self.growing:
                self._grow(self._step)
            return
        self.best_rate = max(self.best_rate, rate)
        if self.growing:
            self._stalls += 1
            if self._stalls < STALLS and self.limit < self.high:
                self._grow(self._step)
                return
            # the pipe is full: the smallest window that gave (nearly) the best
            self.growing, self._flat = False, 0
            good = [n for n, r in self._samples.items() if r >= self.best_rate * (1 - RISE / 2)]
            self.limit = max(self.low, min(good, default=self.limit))
            return
        self._flat += 1
        if self._flat >= PROBE_EVERY:  # probe again: the path may have changed
            self._flat, self._stalls = 0, 0
            self.best_rate *= DECAY
            self._samples.clear()
            self.growing, self._step = True, 4
            self._grow(self._step)

    def _grow(self, divisor: int) -> None:
        self.limit = min(self.high, self.limit + max(1, self.limit // divisor))


class FlowGate:
    """A :class:`Window` on the event loop: transfers take a :meth:`ticket` and report
    through it; ``wake`` is set whenever room may have appeared."""

    def __init__(self, start: int, high: int, low: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window = Window(start=start, low=low, high=max(high, low))
        self.clock = clock
        self.wake = asyncio.Event()

    def configure(self, start: int, high: int) -> None:
        """New bounds from the settings (the current window is clamped into them)."""
        w = self.window
        w.high = max(high, w.low)
        w.start = start
        w.limit = min(max(w.limit, w.low), w.high)
        self.wake.set()

    def has_room(self, size: int) -> bool:
        return self.window.may_start(size)

    def ticket(self, size: int) -> Ticket:
        """Count a transfer of ``size`` bytes as started now (the caller checked room)."""
        self.window.started(size, self.clock())
        return Ticket(self, size, self.clock())

    async def wait_room(self, size: int) -> None:
        """Until a transfer of ``size`` bytes may start."""
        while not self.has_room(size):
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await self.wake.wait()

    @contextlib.asynccontextmanager
    async def slot(self, size: int) -> AsyncIterator[Ticket]:
        """Wait for room, then run one transfer; an exception counts as an error."""
        await self.wait_room(size)
        ticket = self.ticket(size)
        try:
            yield ticket
        except BaseException:
            ticket.finish(error=not ticket.error_exempt)
            raise
        ticket.finish()


class Ticket:
    """One running transfer's reports to its gate."""

    def __init__(self, gate: FlowGate, size: int, started: float) -> None:
        self.gate, self.size, self.started = gate, size, started
        self.got = 0
        self.done = False
        self.error_exempt = False  # set when a failure says nothing about the path
        # False when the first byte's delay is not a round trip (bytes already under way)
        self.rtt_sample = True

    def progress(self, n: int) -> None:
        now = self.gate.clock()
        if self.got == 0 and n and self.rtt_sample:
            self.gate.window.first_byte(now - self.started)
        n = min(n, max(0, self.size - self.got))
        self.got += n
        self.gate.window.delivered(n, now)

    def finish(self, *, error: bool = False) -> None:
        if self.done:
            return
        self.done = True
        self.gate.window.finished(max(0, self.size - self.got), self.gate.clock(),
                                  error=error)
        self.gate.wake.set()
