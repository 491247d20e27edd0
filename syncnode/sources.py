"""Which peer serves which blob, when several trusted peers hold it.

Vocabulary. Every peer loop of a node pulls the blobs its peer announced; when two
peers hold the same blob, their loops compete for it. A *claim* says that one peer's
loop is pulling a blob now; a loop never starts a blob another loop claimed, so the
same bytes are never pulled twice at once, and the loops share the work. A loop whose
peer is faster finishes its blobs sooner and so claims more of them: pulls spread over
the peers in proportion to their speed, with no central plan.

A blob stuck with a slow or failing peer must not hold the rest back: a loop that has
room for another transfer and nothing unclaimed left may *steal* a claim older than
``steal_after(size, rate)`` (a base time plus a few times what the blob would take at the
stealer's measured rate) whose own progress is below half the stealer's per-transfer
rate. The slow transfer is cancelled (its verified prefix stays in the part file) and the
stealer resumes from there. A blob stolen from a peer is never stolen back by it.

Invariants: at most one live claim per blob; a claim is released only by its holder;
every release wakes the other loops (they may now take the blob, already installed or
free again). The decisions (:func:`choose`) are pure; :class:`Sources` keeps the claims
on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

STEAL_BASE = 2.0  # seconds any transfer may take before another peer may take it over
STEAL_FACTOR = 4.0  # ... plus this many times what it would take at the stealer's rate
MIN_RATE = 64 * 1024  # bytes/s assumed for a stealer that has measured nothing yet


@dataclass
class Claim:
    """One peer's loop pulling one blob now."""

    blob: str
    peer: str
    size: int
    started: float
    got: int = 0  # bytes received so far by this claim's transfer
    fetch: asyncio.Future[object] | None = None  # the transfer, cancelled by a steal
    stolen_by: str | None = None
    stolen_from: frozenset[str] = field(default_factory=frozenset)

    def rate(self, now: float) -> float:
        age = now - self.started
        return self.got / age if age > 0 else 0.0


def steal_after(size: int, rate: float) -> float:
    """Seconds a transfer of ``size`` bytes may run before a peer pulling at ``rate``
    bytes/s may take it over."""
    return STEAL_BASE + STEAL_FACTOR * size / max(rate, MIN_RATE)


def choose(peer: str, todo: Iterable[tuple[str, int]], claims: dict[str, Claim],
           now: float, rate: float, per_transfer: float) -> tuple[str, int, bool] | None:
    """The blob ``peer`` should pull next from ``todo`` ((blob, size) in order), and
    its size and whether it is a steal; None when every blob is claimed by others and none may be
    stolen yet. ``rate``: the peer's measured throughput; ``per_transfer``: its rate per
    running transfer."""
    steal: tuple[float, str, int] | None = None
    for blob, size in todo:
        claim = claims.get(blob)
        if claim is None:
            return blob, size, False
        if claim.peer == peer or claim.stolen_by is not None or peer in claim.stolen_from:
            continue
        age = now - claim.started
        if age < steal_after(size, rate):
            continue
        if per_transfer > 0 and claim.rate(now) >= per_transfer / 2:
            continue  # slow to start but moving well: leave it
        if steal is None or claim.started < steal[0]:
            steal = (claim.started, blob, size)
    return (steal[1], steal[2], True) if steal is not None else None


class Sources:
    """The claims of all peer loops of one node (on its event loop)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.claims: dict[str, Claim] = {}
        self._wakes: set[asyncio.Event] = set()
        self.steals = 0

    def subscribe(self, wake: asyncio.Event) -> None:
        self._wakes.add(wake)

    def unsubscribe(self, wake: asyncio.Event) -> None:
        self._wakes.discard(wake)

    def pick(self, peer: str, todo: Iterable[tuple[str, int]], rate: float,
             per_transfer: float) -> Claim | None:
        """Claim the next blob for ``peer`` (see :func:`choose`); a steal cancels the
        holder's transfer."""
        now = self.clock()
        chosen = choose(peer, todo, self.claims, now, rate, per_transfer)
        if chosen is None:
            return None
        blob, size, stolen = chosen
        old = self.claims.get(blob)
        taken_from: frozenset[str] = frozenset()
        if stolen and old is not None:
            old.stolen_by = peer
            if old.fetch is not None and not old.fetch.done():
                old.fetch.cancel()
            taken_from = old.stolen_from | {old.peer}
            self.steals += 1
        claim = Claim(blob, peer, size, now, stolen_from=taken_from)
        self.claims[blob] = claim
        return claim

    def release(self, claim: Claim) -> None:
        """The holder is done with the blob (installed, failed or stolen)."""
        if self.claims.get(claim.blob) is claim:
            del self.claims[claim.blob]
        for wake in self._wakes:
            wake.set()
