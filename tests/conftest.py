"""Fixtures shared by the tests that run nodes in-process (sync, wire compression)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from syncnode.local import LocalNode
from syncnode.node import RunningNode

StartNode = Callable[..., Awaitable[RunningNode]]


@pytest.fixture
async def running() -> AsyncIterator[StartNode]:
    """Start in-process nodes (``await running(node, **settings)``); every one is stopped
    at the end of the test."""
    from syncsupport import start_node

    started: list[RunningNode] = []

    async def start(node: LocalNode, **kw: Any) -> RunningNode:
        r = await start_node(node, **kw)
        started.append(r)
        return r

    yield start
    for r in reversed(started):
        await r.stop()


@pytest.fixture
def new_node(tmp_path: Path) -> Iterator[Callable[[str], LocalNode]]:
    """Initialise nodes in the test's folder (``new_node("a")``); closed at the end."""
    opened: list[LocalNode] = []

    def make(name: str) -> LocalNode:
        node = LocalNode.init(tmp_path / name)
        opened.append(node)
        return node

    yield make
    for n in opened:
        n.close()
