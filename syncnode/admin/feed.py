"""A long-poll event feed: ids only grow; readers ask for everything after the id they saw.

Held in memory (a bounded ring): a reader that fell more than ``capacity`` events behind
gets ``reset: true`` and should re-read the full state. Serves the dashboard, the CLI and
scripts alike (``GET /api/v1/events?since=N&timeout=S``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from ..safetext import clean_tree


class EventFeed:
    """Create inside the event loop that serves readers; publish from any thread."""

    def __init__(self, capacity: int = 1000) -> None:
        self._items: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._next = 1
        self._loop = asyncio.get_running_loop()
        self._cond = asyncio.Condition()

    @property
    def last_id(self) -> int:
        return self._next - 1

    def publish(self, kind: str, **fields: Any) -> int:
        item = {"id": self._next, "time": time.time(), "type": kind, **clean_tree(fields)}
        self._next += 1
        self._items.append(item)
        self._loop.call_soon_threadsafe(self._notify)
        return item["id"]

    def _notify(self) -> None:
        async def notify() -> None:
            async with self._cond:
                self._cond.notify_all()

        self._loop.create_task(notify())

    def since(self, since: int) -> tuple[list[dict[str, Any]], bool]:
        items = [i for i in self._items if i["id"] > since]
        reset = bool(self._items) and since < self._items[0]["id"] - 1
        return items, reset

    async def wait(self, since: int, timeout: float) -> tuple[list[dict[str, Any]], bool]:
        items, reset = self.since(since)
        if items or timeout <= 0:
            return items, reset
        try:
            async with asyncio.timeout(timeout), self._cond:
                await self._cond.wait_for(lambda: self.last_id > since)
        except TimeoutError:
            return [], False
        return self.since(since)
