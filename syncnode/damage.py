"""Damage reports: a peer says a blob we served did not match its hash; we check it here.

The peer server hands blob bytes to peers without re-hashing them (:meth:`BlobStore.
read_range`): the receiver verifies every chunk against the digests its signed put event
binds, before it keeps a byte, so a second hash on the sending side only burns CPU. The
cost of that choice is that a blob damaged on our disk is found by the receiver, not by
us. So a receiver that finds a chunk or a whole blob that does not match tells the sender
(``POST /peer/v1/blobs/H/damaged``), and the sender re-hashes that blob itself.

Rules (the trust model: a peer's word is a hint, never a verdict):

- A report only makes this node *verify* the blob; it is quarantined (moved aside, then
  fetched again from the peers: ``syncnode verify --repair``'s path) only when our own
  re-hash finds it damaged. A false report costs one re-hash and changes nothing.
- Every peer's reports are bounded: a per-peer budget in bytes to re-hash (a burst, then a
  steady rate); a report beyond it is refused (429) and not queued. A blob checked within
  ``RECHECK_AFTER`` seconds is not checked again on anyone's word. At most ``MAX_PENDING``
  checks wait; they run one at a time on a thread of their own, never on the event loop
  nor in the pools that serve peers.
- This node's own evidence (a push the receiving peer refused as not matching) enters the
  same queue, without a budget.

:class:`ReportGate` is the decision (pure: a clock is passed in); :class:`DamageChecks`
runs the checks and calls back with what was found damaged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .blobstore import CHUNK_SIZE, BlobDamage, BlobMissing, BlobStore
from .local import offload_to

log = logging.getLogger("syncnode.damage")
BUDGET_BYTES = 256 << 20  # bytes a peer's reports may make us re-hash at once (burst)
BUDGET_RATE = 16 << 20  # bytes/s that budget refills
MIN_COST = CHUNK_SIZE  # what one report costs at least (a small blob still costs a look)
RECHECK_AFTER = 600.0  # seconds a checked blob is not checked again on a peer's word
MAX_PENDING = 64  # checks waiting, from all peers together
MAX_PEERS = 1024  # peers whose budgets are remembered (the oldest forgotten first)


@dataclass
class _Budget:
    tokens: float
    at: float


@dataclass
class ReportGate:
    """Which reports are checked: per-peer byte budgets, recent checks, a bounded queue."""

    budget: float = BUDGET_BYTES
    rate: float = BUDGET_RATE
    recheck_after: float = RECHECK_AFTER
    max_pending: int = MAX_PENDING
    _budgets: dict[str, _Budget] = field(default_factory=dict)
    _checked: dict[str, float] = field(default_factory=dict)  # blob -> when checked
    pending: set[str] = field(default_factory=set)

    def admit(self, peer: str | None, blob: str, size: int, now: float) -> str:
        """``queue`` (check it), ``recent`` (checked or queued already: nothing to do),
        ``limited`` (the peer's budget is spent) or ``full`` (too many checks waiting).
        ``peer`` None: this node's own evidence (no budget)."""
        if blob in self.pending:
            return "recent"
        when = self._checked.get(blob)
        if when is not None and now - when < self.recheck_after and peer is not None:
            return "recent"
        if len(self.pending) >= self.max_pending:
            return "full"
        if peer is not None:
            b = self._budgets.pop(peer, None) or _Budget(self.budget, now)
            self._budgets[peer] = b  # most recent last: the oldest is forgotten first
            while len(self._budgets) > MAX_PEERS:
                self._budgets.pop(next(iter(self._budgets)))
            b.tokens = min(self.budget, b.tokens + (now - b.at) * self.rate)
            b.at = now
            if b.tokens <= 0:
                return "limited"
            b.tokens -= max(size, MIN_COST)  # a large blob may overdraw: then it waits
        self.pending.add(blob)
        return "queue"

    def done(self, blob: str, now: float) -> None:
        self.pending.discard(blob)
        self._checked[blob] = now
        cutoff = now - self.recheck_after
        if len(self._checked) > 4 * self.max_pending:
            for b in [b for b, t in self._checked.items() if t < cutoff]:
                del self._checked[b]


class DamageChecks:
    """Re-hashes reported blobs, one at a time on its own thread, and hands every blob
    found damaged to ``on_damaged`` (the node quarantines and repairs it)."""

    def __init__(self, store: BlobStore,
                 on_damaged: Callable[[BlobDamage], Awaitable[None]] | None = None,
                 gate: ReportGate | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.on_damaged = on_damaged
        self.gate = gate or ReportGate()
        self.clock = clock
        self.stats = {"reports": 0, "refused": 0, "checked": 0, "damaged": 0}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="damage-check")
        self._tasks: set[asyncio.Task[None]] = set()

    def report(self, peer: str | None, blob: str, size: int) -> str:
        """A report (``peer`` None: our own evidence); see :meth:`ReportGate.admit`. A
        check admitted runs in the background."""
        self.stats["reports"] += 1
        verdict = self.gate.admit(peer, blob, size, self.clock())
        if verdict in ("limited", "full"):
            self.stats["refused"] += 1
            return verdict
        if verdict == "queue":
            task = asyncio.get_running_loop().create_task(self._check(blob, peer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return verdict

    async def _check(self, blob: str, peer: str | None) -> None:
        who = f"peer {peer[:7]}" if peer is not None else "a refused push"
        try:
            damage = await offload_to(self._pool, self.store.verify, blob)
        except Exception:
            log.exception("checking blob %s (reported by %s) failed", blob, who)
            return
        finally:
            self.gate.done(blob, self.clock())
        self.stats["checked"] += 1
        if damage is None:
            log.info("blob %s reported damaged by %s: intact here (re-hashed)", blob, who)
            return
        if damage.reason == "missing":
            return  # gone meanwhile (deleted, or quarantined already)
        self.stats["damaged"] += 1
        log.error("blob %s reported damaged by %s: damaged here too (%s)", blob, who,
                  damage.reason)
        if self.on_damaged is not None:
            try:
                await self.on_damaged(damage)
            except Exception:
                log.exception("quarantining damaged blob %s failed", blob)

    def size_of(self, blob: str) -> int:
        """The blob's size here; BlobMissing if we do not hold it. Blocking (a stat)."""
        return self.store.size(blob)

    async def drain(self) -> None:
        """Wait for the checks queued so far (tests; stop)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self._pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["BlobMissing", "DamageChecks", "ReportGate"]
