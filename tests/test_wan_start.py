"""The start of a transfer over a long path, between in-process nodes over real mutual
TLS on 127.0.0.1, through ``tools/faultproxy.py`` (delays, a dead link).

What an operator of a WAN link relies on: a pull does not wait a round trip more than it
must (the chunk list of a large blob and its bytes are asked for at once), a peer that
refuses connections is not hammered (one connection per round after the first), and a
peer that comes up while we back off from it is reached as soon as it dials us, not when
the backoff ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from syncsupport import (
    add_peer,
    assert_blobs_intact,
    import_files,
    load_faultproxy,
    make_dicom,
    pin,
    pull_from,
    root,
    uid,
    url_of,
    wait_for,
)

from syncnode import sync
from syncnode.blobstore import CHUNK_SIZE
from syncnode.local import LocalNode
from syncnode.node import RunningNode
from syncnode.sync import PeerClient

fp = load_faultproxy()
StartNode = Callable[..., Awaitable[RunningNode]]
ONE_WAY = 0.25  # seconds of delay each way through the proxy: a 500 ms round trip


async def test_a_fresh_large_blob_costs_one_round_trip_before_its_bytes(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    a, b = new_node("a"), new_node("b")
    path = make_dicom(tmp_path / "big.dcm", sop=uid(1, 1), study=uid(1), series=uid(1, 2),
                      pixel_bytes=3 * CHUNK_SIZE)
    import_files(a, path)
    (blob,) = a.store.iter_hashes()
    put = a.catalog.put_for_blob(blob)
    assert put is not None
    assert put.size > 2 * CHUNK_SIZE  # a ranged, chunk-verified pull, not a pack
    ra = await running(a)
    pin(a, b)
    pin(b, a)
    config = fp.FaultConfig(latency_ms=ONE_WAY * 1000)
    async with fp.FaultProxy(("127.0.0.1", ra.ports["peer"]), config=config) as proxy:
        client = PeerClient(b, a.node_id, f"https://127.0.0.1:{proxy.port}")
        try:
            # two connections open (their TLS handshakes are not what is measured)
            await asyncio.gather(client.hello(), client.hello())
            start = time.monotonic()
            staged, resumed = await client.fetch_staged(b.store, put.blob, put.size,
                                                        put.chunks)
            took = time.monotonic() - start
            b.store.install_staged([staged])
        finally:
            await client.close()
    assert resumed == 0 and b.store.has(put.blob)
    assert_blobs_intact(b)
    # the chunk list then the bytes would take two round trips (1.0 s) at least
    assert took < 4 * ONE_WAY - 0.05, took


async def test_a_dead_peer_gets_one_connection_a_round_and_is_reached_once_it_dials(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    a, b = new_node("a"), new_node("b")
    path = make_dicom(tmp_path / "one.dcm", sop=uid(2, 1), study=uid(2), series=uid(2, 2))
    import_files(a, path)
    ra = await running(a)
    async with fp.FaultProxy(("127.0.0.1", ra.ports["peer"])) as proxy:
        proxy.pause("drop")  # A's link is down: every connection is reset at once
        add_peer(b, a, f"https://127.0.0.1:{proxy.port}", push="never")
        rb = await running(b)
        ps = rb.engine.peers[a.node_id.compact]
        await wait_for(lambda: ps.rounds >= 3, 20, "B's third attempt to reach A")
        # the first round opened its window's connections alongside hello; later ones one
        warm = min(ps.pull_gate.window.limit, ps.client.connections) - 1
        assert ps.rounds <= proxy.stats.connections_accepted <= warm + ps.rounds, (
            proxy.stats.connections_accepted, ps.rounds)
        assert ps.state.state == "unreachable"
        ps.backoff.failures = 8  # its next attempt would be 30-60 s away
        await wait_for(lambda: ps.rounds >= 4, 20, "B's fourth attempt")
        tried = ps.rounds
        proxy.resume()
        # A comes back and dials B: B looks at once instead of sleeping out its backoff
        add_peer(a, b, url_of(rb), push="never")
        ra.peers_changed()
        waited = await wait_for(lambda: root(b) == root(a), 15, "B to pull from A")
        assert ps.rounds > tried and waited < 15
    assert_blobs_intact(b)



async def test_the_next_batch_of_events_comes_while_the_last_one_is_pulled(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The pulls of one round run as one stream: the events of the next batch are fetched
    while the blobs of the last are still arriving, so the window does not drain (and
    wait a round trip) at every batch boundary."""
    monkeypatch.setattr(sync, "EVENT_BATCH", 2)  # 8 instances: 4 batches
    a, b = new_node("a"), new_node("b")
    files = [make_dicom(tmp_path / f"{i}.dcm", sop=uid(3, 1, i), study=uid(3),
                        series=uid(3, 2), pixel_bytes=CHUNK_SIZE + 4096, seed=i)
             for i in range(8)]
    import_files(a, *files)
    ra = await running(a)
    config = fp.FaultConfig(shared_rate_down=4_000_000)  # ~2.2 s for the 8.5 MB
    async with fp.FaultProxy(("127.0.0.1", ra.ports["peer"]), config=config) as proxy:
        add_peer(b, a, f"https://127.0.0.1:{proxy.port}", push="never")
        pin(a, b)
        rb = await running(b)
        ps = rb.engine.peers[a.node_id.compact]
        most = 0

        def done() -> bool:
            nonlocal most
            most = max(most, ps.state.blobs_needed)
            return root(b) == root(a)
        await wait_for(done, 30, "B to pull from A", step=0.02)
    assert most > sync.EVENT_BATCH, most  # blobs of two batches or more at once
    assert_blobs_intact(b)


async def test_a_pack_frees_its_window_slot_once_its_bytes_are_in(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    """The group commit that installs a pack's blobs may wait for other pulls (up to
    APPLY_DELAY): the pack's place in the window is free as soon as its bytes are in, so
    the next transfer starts meanwhile instead of the window running a slot short."""
    a, b = new_node("a"), new_node("b")
    files = [make_dicom(tmp_path / f"{i}.dcm", sop=uid(4, 1, i), study=uid(4),
                        series=uid(4, 2), seed=i) for i in range(3)]
    import_files(a, *files)
    ra, rb = await running(a), await running(b)
    installer = rb.engine.installer
    entered, release = asyncio.Event(), asyncio.Event()
    install = installer._install

    async def held_install(batch: list[object]) -> None:
        entered.set()
        await release.wait()
        await install(batch)  # type: ignore[arg-type]

    installer._install = held_install  # type: ignore[method-assign]
    pull_from(b, rb, a, url_of(ra))
    await asyncio.wait_for(entered.wait(), 20)
    ps = rb.engine.peers[a.node_id.compact]
    try:
        assert ps.packs  # the blobs came in a pack
        assert ps.pull_gate.window.inflight == 0  # its install waits; its slot does not
    finally:
        release.set()
    await wait_for(lambda: root(b) == root(a), 20, "B to install what it pulled")
    assert_blobs_intact(b)
