"""A sender that serves blobs without re-hashing them still never spreads damage.

The peer server hands out blob bytes as stored; the receiver verifies every chunk and
reports a mismatch (``POST /peer/v1/blobs/H/damaged``); the sender re-hashes that blob
itself and quarantines and repairs it only when its own hash says so. Checked with real
nodes over real mutual TLS: a byte flipped in A's copy of a packed blob and of a two-chunk
blob never reaches B, A learns of both from B, moves them aside and fetches them again
from C, and B then gets the good bytes; a hostile peer's false reports cost A a bounded
number of re-hashes and never a good blob.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from fakepeer import FakePeer
from syncsupport import (
    add_peer,
    assert_blobs_intact,
    blob_set,
    describe_nodes,
    import_files,
    make_dicom,
    peer_state,
    pin,
    pull_from,
    uid,
    url_of,
    wait_for,
)

from syncnode.damage import MIN_COST, ReportGate
from syncnode.local import LocalNode
from syncnode.node import RunningNode
from syncnode.sync import PeerClient

StartNode = Callable[..., Awaitable[RunningNode]]
MiB = 1 << 20


def test_the_gate_bounds_what_a_peer_can_make_us_rehash() -> None:
    gate = ReportGate(budget=3 * MiB, rate=MiB, recheck_after=60, max_pending=4)
    assert gate.admit("p", "b1", 10, now=0) == "queue"
    assert gate.admit("p", "b1", 10, now=0) == "recent"  # queued already
    gate.done("b1", now=1)
    assert gate.admit("p", "b1", 10, now=2) == "recent"  # checked a second ago
    assert gate.admit(None, "b1", 10, now=2) == "queue"  # our own evidence: checked again
    gate.done("b1", now=2)
    assert gate.admit("p", "b2", 3 * MiB, now=2) == "queue"  # refilled to 3 MiB: spends it
    assert gate.admit("p", "b3", 10, now=2) == "limited"  # spent: refused, not queued
    assert gate.admit("q", "b3", 10, now=2) == "queue"  # another peer has its own budget
    assert gate.admit("p", "b4", 10, now=4) == "queue"  # refilled at 1 MiB/s
    assert gate.admit("q", "b5", 10, now=4) == "queue"
    assert gate.admit("q", "b6", 10, now=4) == "full"  # four checks wait
    assert gate.pending == {"b2", "b3", "b4", "b5"}
    assert MiB == MIN_COST


def flip(path: Path, at: int) -> bytes:
    """Flip one bit of a stored (read-only) blob; returns the original bytes."""
    original = path.read_bytes()
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(bytes([original[at] ^ 0x10]))
    os.chmod(path, 0o444)
    return original


async def test_a_damaged_blob_is_reported_rehashed_quarantined_and_repaired(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    a, b, c = new_node("a"), new_node("b"), new_node("c")
    files = [make_dicom(tmp_path / f"d{i}.dcm", sop=uid(70, i), study=uid(70),
                        series=uid(70, 0), pixel_bytes=(1_500_000 if i == 0 else 20_000),
                        seed=700 + i) for i in range(6)]
    import_files(a, *files)
    import_files(c, *files)  # C holds the same bytes: A's source of repair
    by_size = sorted(a.store.iter_hashes(), key=a.store.size)
    large, small, good = by_size[-1], by_size[0], by_size[1]
    assert a.store.size(large) > MiB > a.store.size(small)  # ranged pull, and a pack
    originals = {large: flip(a.store.path(large), MiB + 100),
                 small: flip(a.store.path(small), 500)}
    fake_c = await FakePeer(c).start()
    try:
        ra = await running(a)
        add_peer(a, c, fake_c.url, push="never")
        pin(c, a)
        rb = await running(b)
        pull_from(b, rb, a, url_of(ra))
        ra.peers_changed()
        assert ra.damage is not None

        def repaired() -> bool:
            return all(a.store.has(h) and a.store.verify(h) is None for h in originals) \
                and blob_set(b) == blob_set(a)

        await wait_for(repaired, 40, "A to repair both blobs and B to get them",
                       describe=lambda: (describe_nodes([a, b]), ra.damage and ra.damage.stats))
        for h, good_bytes in originals.items():
            aside = a.data / "damaged" / h
            assert aside.exists() and aside.read_bytes() != good_bytes  # kept for inspection
            assert a.store.path(h).read_bytes() == good_bytes == b.store.path(h).read_bytes()
        assert ra.damage.stats["damaged"] == 2
        assert_blobs_intact(b)  # B never installed the bad bytes
        assert peer_state(b, a)["integrity_errors"] >= 2

        # A hostile peer (B, trusted) reports good blobs: each is re-hashed once, within
        # B's budget, and stays; past the budget reports are refused (429), not queued.
        await ra.damage.drain()
        checked = ra.damage.stats["checked"]
        ra.damage.gate.budget, ra.damage.gate.rate = 3 * MiB, 0
        client = PeerClient(b, a.node_id, url_of(ra))
        try:
            answers = [await client.report_damage(h) for h in [good] * 3 + by_size[2:5]]
        finally:
            await client.close()
        await ra.damage.drain()
        assert answers[:2] == [True, True] and False in answers[3:], answers
        assert ra.damage.stats["checked"] - checked <= 3  # good once, then the budget
        assert ra.damage.stats["damaged"] == 2  # nothing new found damaged
        assert set(by_size) <= blob_set(a)  # no good blob dropped
        assert not any(p.name == good for p in (a.data / "damaged").iterdir())
    finally:
        await fake_c.stop()
