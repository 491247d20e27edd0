"""A peer's sync state that cannot be written (the disk is full) must not end its sync loop.

Found by the fault matrix (tests/e2e/test_fault_matrix.py, disk-full phase): on a full disk
the failed install was reported through ``PeerSync.error``, whose SQLite write failed too;
that exception left ``PeerSync.run`` and the node never synced with the peer again, even
after space came back. Peer states are now written by ``sync.StateWriter``, which logs a
failed write instead of raising it.

An idle node in sync writes each peer's state once per round (at the round's end, with its
``last_success`` and next attempt), not twice.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from syncsupport import (
    converged,
    describe_nodes,
    import_files,
    make_dicom,
    pull_from,
    uid,
    url_of,
    wait_for,
)

from syncnode.blobstore import StoreFull
from syncnode.local import LocalNode
from syncnode.node import RunningNode

StartNode = Callable[..., Awaitable[RunningNode]]


@pytest.mark.timeout(60)
async def test_a_full_disk_that_also_fails_the_state_write_does_not_end_the_loop(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    a, b = new_node("a"), new_node("b")
    files = [make_dicom(tmp_path / f"f{i}.dcm", sop=uid(12, i), study=uid(12),
                        series=uid(12, 0), pixel_bytes=50_000, seed=i) for i in range(3)]
    import_files(b, *files)
    full = True
    attempts: list[str] = []
    real_install, real_state = a.store.install_staged, a.catalog.set_peer_state

    def install(staged: list[Any]) -> Any:
        attempts.append("install")
        if full:
            raise StoreFull("no space left for the blob store")
        return real_install(staged)

    def set_peer_state(node_id: str, state: dict[str, Any]) -> None:
        if full:
            raise sqlite3.OperationalError("database or disk is full")
        real_state(node_id, state)

    a.store.install_staged = install  # type: ignore[method-assign]
    a.catalog.set_peer_state = set_peer_state  # type: ignore[method-assign]
    ra, rb = await running(a), await running(b)
    pull_from(a, ra, b, url_of(rb))
    await wait_for(lambda: len(attempts) >= 2, 20, "two install attempts on the full disk")
    assert a.catalog.counts()["instances"] == 0
    full = False  # space is back; the same loop must finish without a restart
    await wait_for(lambda: converged([a, b]), 30, "A to install the blobs once space is back",
                   describe=lambda: describe_nodes([a, b]))
    assert len(list(a.catalog.instances())) == 3


@pytest.mark.timeout(90)
async def test_an_idle_node_in_sync_writes_its_peer_state_once_a_round(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    a, b = new_node("a"), new_node("b")
    import_files(a, make_dicom(tmp_path / "1.dcm", sop=uid(12, 1, 1), study=uid(12),
                               series=uid(12, 1), pixel_bytes=1000))
    ra = await running(a, interval=0.1)
    rb = await running(b, interval=0.1)
    pull_from(b, rb, a, url_of(ra))
    await wait_for(lambda: converged([a, b]), 30, "b to hold a's instance")
    await wait_for(lambda: b.catalog.peer_states().get(a.node_id.compact, {}).get("in_sync"),
                   30, "b's state of a to say in sync")
    engine = rb.engine
    assert engine is not None
    before, rounds = engine.states.writes, engine.peers[a.node_id.compact].rounds
    await asyncio.sleep(3)  # ~30 idle rounds at 0.1 s
    idle_rounds = engine.peers[a.node_id.compact].rounds - rounds
    assert idle_rounds >= 10, idle_rounds
    writes = engine.states.writes - before
    assert writes <= idle_rounds + 1, (writes, idle_rounds)  # twice a round before
    state = b.catalog.peer_states()[a.node_id.compact]
    assert state["state"] == "in_sync" and state["in_sync"]
