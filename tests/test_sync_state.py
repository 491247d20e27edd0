"""A peer's sync state that cannot be written (the disk is full) must not end its sync loop.

Found by the fault matrix (tests/e2e/test_fault_matrix.py, disk-full phase): on a full disk
the failed install was reported through ``PeerSync.error``, whose SQLite write failed too;
that exception left ``PeerSync.run`` and the node never synced with the peer again, even
after space came back. Peer states are now written by ``sync.StateWriter``, which logs a
failed write instead of raising it.
"""

from __future__ import annotations

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
