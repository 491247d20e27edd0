"""Bandwidth caps: token buckets whose rate follows a time-of-day schedule.

Vocabulary. A *scope* names what a cap applies to: ``in`` or ``out`` (all peers together,
blob bytes received or sent) or ``NODEID:in`` / ``NODEID:out`` (one peer). A *schedule*
is a list of rules tried in order; the first whose days and hours contain the local time
gives the rate, and none matching means unlimited::

    2MB/s 07:00-19:00 Mon-Fri, unlimited otherwise
    500KB/s 08:00-18:00 Mon-Fri, 4MB/s Sat-Sun, 10MB/s
    20Mbit/s

A rule is a rate (``unlimited``, or a number with ``B``, ``KB``, ``MB``, ``GB`` (powers of
1000), ``KiB``, ``MiB``, ``GiB``, or ``kbit``, ``Mbit``, ``Gbit``, each optionally
followed by ``/s``), then optionally hours ``HH:MM-HH:MM`` (the end excluded; an end
before the start runs over midnight, e.g. ``19:00-07:00``) and days (``Mon-Fri``, ``Sat``,
``Sat-Sun``, a list such as ``Mon,Wed,Fri``); the word ``otherwise`` may close the last
rule. Rules are separated by commas.

Enforcement: every byte of a blob crossing a link is taken from the bucket of its peer's
scope and from the overall one, on the sending side (the peer server serving pulls, the
engine pushing) and on the receiving side (the engine pulling, the peer server taking
pushes). A bucket holds at most ``BURST`` seconds of its rate; a taker may run it into
debt and then waits its turn (takers go in order, each when its own bytes are paid), in
slices of at most ``MAX_SLEEP`` so that a rate changed meanwhile (a schedule boundary, a
new cap through the API) applies within that time. The clock and
the local time are injectable, for tests.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .nodeid import InvalidNodeId, NodeId

BURST = 0.25  # seconds of the rate a bucket may hold
MAX_SLEEP = 0.25  # seconds a taker sleeps before looking at the rate again
SCHEDULE_EVERY = 1.0  # seconds between two evaluations of the schedules
DIRECTIONS = ("in", "out")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1 << 10, "mib": 1 << 20,
          "gib": 1 << 30, "kbit": 125, "mbit": 125_000, "gbit": 125_000_000}
_RATE = re.compile(r"^(\d+(?:\.\d+)?)\s*([a-z]+)(?:/s|ps)?$")
_HOURS = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")


class ScheduleError(ValueError):
    """A cap or schedule that cannot be read; the message says which part and why."""


def parse_rate(text: str) -> float | None:
    """Bytes per second, or None for ``unlimited``."""
    t = text.strip().lower().replace(" ", "")
    if t in ("unlimited", "none", "off", "0"):
        return None
    m = _RATE.match(t)
    if m is None or m.group(2) not in _UNITS:
        raise ScheduleError(f"{text!r} is not a rate: write e.g. 2MB/s, 500KB/s, 20Mbit/s "
                            "or unlimited")
    rate = float(m.group(1)) * _UNITS[m.group(2)]
    if rate < 1024:
        raise ScheduleError(f"{text!r}: a cap below 1 KiB/s would stall transfers; use a "
                            "larger rate")
    return rate


def _day(name: str) -> int:
    try:
        return DAYS.index(name[:3].lower())
    except ValueError:
        raise ScheduleError(f"{name!r} is not a day: use Mon, Tue, ... Sun") from None


def _days(token: str) -> frozenset[int]:
    out: set[int] = set()
    for part in token.split(","):
        if "-" in part:
            a, b = (_day(x) for x in part.split("-", 1))
            d = a
            out.add(d)
            while d != b:
                d = (d + 1) % 7
                out.add(d)
        elif part:
            out.add(_day(part))
    return frozenset(out)


def _is_days(token: str) -> bool:
    return all(p[:3].lower() in DAYS and len(p) <= 9 for p in re.split(r"[,-]", token) if p)


@dataclass(frozen=True)
class Rule:
    rate: float | None  # bytes/s; None: unlimited
    start: int = 0  # minutes after midnight
    end: int = 24 * 60
    days: frozenset[int] = frozenset(range(7))

    def matches(self, when: dt.datetime) -> bool:
        minute = when.hour * 60 + when.minute
        if self.start <= self.end:
            in_hours = self.start <= minute < self.end
        else:  # over midnight
            in_hours = minute >= self.start or minute < self.end
        return in_hours and when.weekday() in self.days


@dataclass(frozen=True)
class Schedule:
    """Rules tried in order (see the module doc)."""

    rules: tuple[Rule, ...]
    text: str

    @classmethod
    def parse(cls, text: str) -> Schedule:
        text = " ".join(str(text).split())
        if not text:
            raise ScheduleError("empty schedule: give a rate such as 2MB/s, or unlimited")
        rules: list[Rule] = []
        pieces = [p.strip() for p in text.split(",")]
        for i, piece in enumerate(pieces):
            if not piece:
                raise ScheduleError(f"{text!r}: empty rule between commas")
            if rules and _is_days(piece) and not parse_rate_maybe(piece):
                # "Mon,Wed" split by the rule separator: more days for the last rule
                last = rules[-1]
                rules[-1] = Rule(last.rate, last.start, last.end, last.days | _days(piece))
                continue
            words = piece.split(" ")
            if words[-1].lower() == "otherwise":
                if i != len(pieces) - 1:
                    raise ScheduleError(f"{text!r}: 'otherwise' ends the last rule only")
                words = words[:-1]
            rate = parse_rate(words[0])
            start, end, days = 0, 24 * 60, frozenset(range(7))
            for w in words[1:]:
                m = _HOURS.match(w)
                if m:
                    h1, m1, h2, m2 = (int(x) for x in m.groups())
                    if h1 > 24 or h2 > 24 or m1 > 59 or m2 > 59:
                        raise ScheduleError(f"{w!r} is not a time range HH:MM-HH:MM")
                    start, end = h1 * 60 + m1, h2 * 60 + m2
                elif _is_days(w):
                    days = _days(w)
                else:
                    raise ScheduleError(f"{w!r} in {piece!r}: expected hours HH:MM-HH:MM "
                                        "or days such as Mon-Fri")
            rules.append(Rule(rate, start, end, days))
        return cls(tuple(rules), text)

    def rate_at(self, when: dt.datetime) -> float | None:
        for rule in self.rules:
            if rule.matches(when):
                return rule.rate
        return None

    def __str__(self) -> str:
        return self.text


def parse_rate_maybe(text: str) -> bool:
    try:
        parse_rate(text.split(" ")[0])
    except ScheduleError:
        return False
    return True


def check_scope(scope: str) -> tuple[str, str]:
    """(peer's compact node id or "", direction) of a scope ``in``, ``out``,
    ``NODEID:in``, ``NODEID:out`` (the node id in any form :meth:`NodeId.parse` reads)."""
    peer, _, direction = str(scope).strip().rpartition(":")
    if direction not in DIRECTIONS:
        raise ScheduleError(f"scope {str(scope)[:80]!r}: write in, out, NODEID:in or "
                            "NODEID:out")
    if peer:
        try:
            peer = NodeId.parse(peer).compact
        except InvalidNodeId as exc:
            raise ScheduleError(f"scope {str(scope)[:80]!r}: {exc}") from None
    return peer, direction


def scope_name(peer: str, direction: str) -> str:
    return f"{peer}:{direction}" if peer else direction


def check_caps(caps: Mapping[str, str]) -> dict[str, str]:
    """The caps setting validated: every scope and schedule readable (ScheduleError)."""
    out = {}
    for scope, text in caps.items():
        name = scope_name(*check_scope(scope))
        try:
            out[name] = Schedule.parse(text).text
        except ScheduleError as exc:
            raise ScheduleError(f"cap {scope!r}: {exc}") from None
    return out


def format_rate(rate: float | None) -> str:
    if rate is None:
        return "unlimited"
    for unit, size in (("GB/s", 1e9), ("MB/s", 1e6), ("KB/s", 1e3)):
        if rate >= size:
            return f"{rate / size:g}{unit}"
    return f"{rate:g}B/s"


class TokenBucket:
    """Bytes at a rate that may change at any time (None: unlimited).

    Kept as two running totals: bytes ``taken`` and bytes ``paid`` (what the rate has
    allowed so far; at most ``BURST`` seconds of it ahead of what was taken). A taker
    may go past what was paid, and waits until its own bytes are paid: takers are let go
    one after another, in the order they came, at the rate in force while they wait.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.rate: float | None = None
        self.taken = 0.0
        self.paid = 0.0
        self.stamp = clock()

    def set_rate(self, rate: float | None) -> None:
        self._refill()
        if rate != self.rate:
            self.rate = rate
            if rate is None:
                self.paid = self.taken
            else:  # debt is kept (bytes already taken), a credit above the new burst not
                self.paid = min(self.paid, self.taken + rate * BURST)

    def _refill(self) -> None:
        now = self.clock()
        if self.rate is None:
            self.paid = self.taken
        else:
            self.paid = min(self.taken + self.rate * BURST,
                            self.paid + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, n: int) -> float:
        """Take ``n`` bytes now; returns the mark :meth:`wait_time` needs."""
        self._refill()
        self.taken += n
        if self.rate is None:
            self.paid = self.taken
        return self.taken

    def wait_time(self, mark: float) -> float:
        """Seconds until the bytes up to ``mark`` are paid at the current rate (0: now)."""
        self._refill()
        if self.rate is None or self.paid >= mark:
            return 0.0
        return (mark - self.paid) / self.rate


class Limiter:
    """The caps of one node: schedules per scope, one bucket per scope in use."""

    def __init__(self, caps: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 local_time: Callable[[], dt.datetime] = dt.datetime.now) -> None:
        self.clock, self.local_time = clock, local_time
        self.schedules: dict[tuple[str, str], Schedule] = {}
        self.buckets: dict[tuple[str, str], TokenBucket] = {}
        self._evaluated = -SCHEDULE_EVERY
        self.configure(caps or {})

    def configure(self, caps: Mapping[str, str]) -> None:
        """New caps (scope -> schedule), in force at once."""
        schedules = {}
        for scope, text in check_caps(caps).items():
            schedules[check_scope(scope)] = Schedule.parse(text)
        self.schedules = schedules
        self._evaluated = -SCHEDULE_EVERY - 1
        self._evaluate(force=True)

    def _evaluate(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._evaluated < SCHEDULE_EVERY:
            return
        self._evaluated = now
        when = self.local_time()
        for key, bucket in self.buckets.items():
            schedule = self.schedules.get(key)
            bucket.set_rate(schedule.rate_at(when) if schedule else None)

    def _bucket(self, key: tuple[str, str]) -> TokenBucket:
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = TokenBucket(self.clock)
            schedule = self.schedules.get(key)
            bucket.set_rate(schedule.rate_at(self.local_time()) if schedule else None)
        return bucket

    @property
    def active(self) -> bool:
        return bool(self.schedules)

    async def consume(self, peer: str, direction: str, n: int) -> None:
        """Account ``n`` bytes moved with ``peer`` in ``direction``; returns once both the
        peer's and the overall cap allow them."""
        if not self.schedules:
            return
        self._evaluate()
        buckets = [self._bucket(("", direction))]
        if (peer, direction) in self.schedules:
            buckets.append(self._bucket((peer, direction)))
        marks = [(b, b.take(n)) for b in buckets]
        while (wait := max(b.wait_time(m) for b, m in marks)) > 0:
            await asyncio.sleep(min(wait, MAX_SLEEP))
            self._evaluate()

    def in_force(self, peers: Sequence[str] = ()) -> dict[str, str]:
        """scope -> the rate in force now (``unlimited`` where no cap applies), for the
        overall scopes, each peer given and each peer with a cap."""
        when = self.local_time()
        scopes = [("", d) for d in DIRECTIONS]
        for p in [*peers, *(p for p, _ in self.schedules if p)]:
            for d in DIRECTIONS:
                if (p, d) not in scopes:
                    scopes.append((p, d))
        out = {}
        for key in scopes:
            schedule = self.schedules.get(key)
            out[scope_name(*key)] = format_rate(
                schedule.rate_at(when) if schedule else None)
        return out


def in_force(caps: Mapping[str, str], peers: Sequence[str] = (),
             when: dt.datetime | None = None) -> dict[str, str]:
    """The caps in force at ``when`` (now) for a caps setting, without buckets: what
    ``status`` shows for a node that is not running."""
    limiter = Limiter(caps, local_time=(lambda: when) if when else dt.datetime.now)
    return limiter.in_force(peers)
