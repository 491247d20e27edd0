"""The periodic background verify (scrub) of a running node, and the record of the last
verify, whoever ran it.

Every ``verify_interval`` seconds (setting; ``7d``, ``12h``, ``30m`` or seconds; 0 = off)
``syncnode run`` re-hashes every blob and checks that every blob the catalog names is
present, as ``syncnode verify`` does, at most ``verify_rate`` MB/s (0 = unlimited) so that
disks and CPU stay available to sync, DICOM and imports. The pass runs in a thread of its
own, never on the event loop nor in the worker threads the other services share.

It reports and does not mend: damage is logged (hashes only), counted in ``/metrics``,
shown in the status and on the dashboard; ``syncnode verify --repair`` mends it from
peers. The result of the last pass (background or ``syncnode verify``) is kept in
``<data>/verify.json`` (written atomically), so ``syncnode status`` shows it with or
without a running node.

Scheduling: the next pass is due one interval after the last recorded one; a node that
never recorded one runs its first pass after ``min(interval, FIRST_PASS_DELAY)``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .durable import atomic_write
from .local import LocalNode, offload_to

log = logging.getLogger("syncnode.scrub")
RESULT_FILE = "verify.json"
FIRST_PASS_DELAY = 600.0  # seconds after start for a node that never verified
PROBLEMS_KEPT = 50  # damaged/missing blobs named in the record
@dataclass
class VerifyResult:
    """One verify pass: when, how much, what was wrong (hashes only)."""

    started: float
    finished: float = 0.0
    source: str = "background"  # background or cli
    blobs_checked: int = 0
    bytes_checked: int = 0
    damaged: list[dict[str, str]] = field(default_factory=list)  # blob, reason
    missing: list[str] = field(default_factory=list)
    problems: int = 0
    complete: bool = True  # False: stopped before the end (node stopping)

    @property
    def ok(self) -> bool:
        return self.problems == 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def record(data: Path, result: VerifyResult) -> None:
    atomic_write(Path(data) / RESULT_FILE,
                 json.dumps(result.to_dict(), sort_keys=True).encode(), 0o600)


def last_result(data: Path) -> dict[str, Any] | None:
    """The last recorded verify, or None (never verified, or the record is unreadable)."""
    try:
        value = json.loads((Path(data) / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def scrub(node: LocalNode, rate: float, stop: threading.Event | None = None,
          clock: Callable[[], float] = time.monotonic) -> VerifyResult:
    """One pass over the blob store at most ``rate`` bytes/s (0: unlimited). Blocking:
    call it from a thread of its own. Stops early (``complete=False``) when ``stop`` is
    set."""
    result = VerifyResult(started=time.time())
    t0 = clock()
    referenced = node.catalog.referenced_blobs()
    for h, damage in node.store.verify_all():
        if stop is not None and stop.is_set():
            result.complete = False
            break
        result.blobs_checked += 1
        if damage is None:
            try:
                result.bytes_checked += node.store.path(h).stat().st_size
            except OSError:
                pass  # removed by gc meanwhile
        else:
            result.problems += 1
            if len(result.damaged) < PROBLEMS_KEPT:
                result.damaged.append({"blob": damage.hash, "reason": damage.reason})
            log.warning("verify: blob %s is damaged: %s", damage.hash, damage.reason)
        if rate > 0:  # stay under the rate: sleep until the bytes read so far are due
            ahead = result.bytes_checked / rate - (clock() - t0)
            if ahead > 0 and (stop.wait(ahead) if stop is not None else time.sleep(ahead)):
                result.complete = False
                break
    if result.complete:
        present = set(node.store.iter_hashes())
        missing = sorted(referenced - present)
        # a blob referenced when the pass began and deleted since is not missing
        still = node.catalog.referenced_blobs()
        missing = [h for h in missing if h in still]
        result.problems += len(missing)
        result.missing = missing[:PROBLEMS_KEPT]
        for h in missing[:PROBLEMS_KEPT]:
            log.warning("verify: blob %s is referenced by the catalog but missing", h)
    result.finished = time.time()
    return result


class BackgroundVerify:
    """The scrub as a service of ``syncnode run`` (see the module doc)."""

    def __init__(self, node: LocalNode, interval: float, rate_mb: float) -> None:
        self.node = node
        self.interval = interval
        self.rate_mb = rate_mb
        self.running = False
        self.passes = 0
        self.next_due = 0.0
        self._stop = threading.Event()
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="verify")

    def configure(self, interval: float, rate_mb: float) -> None:
        """New settings take effect at once (the next pass is rescheduled)."""
        self.interval, self.rate_mb = interval, rate_mb
        self._wake.set()

    def _due(self) -> float:
        last = last_result(self.node.data)
        if last and last.get("finished"):
            return float(last["finished"]) + self.interval
        return self._started + min(self.interval, FIRST_PASS_DELAY)

    async def _run(self) -> None:
        self._started = time.time()
        while not self._stop.is_set():
            self._wake.clear()
            if self.interval <= 0:
                self.next_due = 0.0
                await self._wake.wait()
                continue
            self.next_due = await offload_to(self._pool, self._due)
            delay = self.next_due - time.time()
            if delay > 0:
                try:
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                    continue  # settings changed, or stopping: schedule again
                except TimeoutError:
                    pass
            self.running = True
            try:
                result = await offload_to(self._pool, scrub, self.node,
                                          self.rate_mb * 1e6, self._stop)
                if result.complete:
                    await offload_to(self._pool, record, self.node.data, result)
                    self.passes += 1
                    log.info("background verify: %d blobs (%d MB) checked in %.0f s, %d "
                             "problems", result.blobs_checked, result.bytes_checked // 10**6,
                             result.finished - result.started, result.problems)
            except Exception as exc:  # e.g. a disk error: say so, try at the next interval
                log.error("background verify failed: %s: %s", type(exc).__name__, exc)
                await offload_to(self._pool, record, self.node.data, VerifyResult(
                    started=time.time(), finished=time.time(), problems=1, complete=False,
                    damaged=[{"blob": "", "reason": f"verify failed: {exc}"[:300]}]))
            finally:
                self.running = False

    def status(self) -> dict[str, Any]:
        return {"interval": self.interval, "rate_mb": self.rate_mb, "running": self.running,
                "next_due": self.next_due, "passes": self.passes}

    async def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.to_thread(self._pool.shutdown, True)
