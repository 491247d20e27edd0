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
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from fakepeer import FakePeer
from syncsupport import (
    add_peer,
    assert_blobs_intact,
    import_files,
    live_view,
    load_faultproxy,
    make_dicom,
    pin,
    pull_from,
    root,
    uid,
    url_of,
    wait_for,
)

from syncnode import protocol, sync
from syncnode.blobstore import CHUNK_SIZE
from syncnode.local import LocalNode
from syncnode.node import RunningNode
from syncnode.peer_server import PeerServer
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
        # (its state reads "connecting" while an attempt is under way)
        await wait_for(lambda: ps.rounds >= 3 and ps.state.state == "unreachable", 20,
                       "B's third attempt to reach A")
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


# -- the events come with hello ----------------------------------------------------------

def _record_requests(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``METHOD route`` of every hello, events, pack and blob request the peer servers
    started from now on serve, in order."""
    served: list[str] = []
    for name in ("hello", "events", "pack", "blob"):
        real = getattr(PeerServer, name)

        async def recorded(self: PeerServer, request: web.Request,
                           _real: Any = real, _name: str = name) -> web.StreamResponse:
            served.append(f"{request.method} {_name}")
            return await _real(self, request)
        monkeypatch.setattr(PeerServer, name, recorded)
    return served


async def test_the_events_and_a_first_pack_come_with_hello(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A round that finds the roots differ gets the events it lacks in hello's answer, and
    the small blobs of those events right after it (the first pack, asked for with
    hello): no /events request, no pack request for them; the one blob over a chunk is the
    first request after hello. Before, the first blob byte waited for hello, then
    /events, then the first pulls: two round trips more."""
    served = _record_requests(monkeypatch)
    a, b = new_node("a"), new_node("b")
    files = [make_dicom(tmp_path / f"{i}.dcm", sop=uid(5, 1, i), study=uid(5),
                        series=uid(5, 2), seed=i) for i in range(6)]
    files.append(make_dicom(tmp_path / "big.dcm", sop=uid(5, 1, 9), study=uid(5),
                            series=uid(5, 2), pixel_bytes=CHUNK_SIZE + 4096))
    import_files(a, *files)
    ra = await running(a)
    config = fp.FaultConfig(latency_ms=50)
    async with fp.FaultProxy(("127.0.0.1", ra.ports["peer"]), config=config) as proxy:
        add_peer(b, a, f"https://127.0.0.1:{proxy.port}", push="never")
        pin(a, b)
        rb = await running(b)
        ps = rb.engine.peers[a.node_id.compact]
        await wait_for(lambda: root(b) == root(a) and ps.state.in_sync, 30, "B to pull")
        first_round = list(served)
        # the rounds after it (roots equal, no pack follows) keep their connection
        rounds, dialled = ps.rounds, proxy.stats.connections_accepted
        await wait_for(lambda: ps.rounds >= rounds + 2, 10, "two more rounds")
        assert proxy.stats.connections_accepted == dialled
    assert ps.client.hello_events is True
    assert first_round[:2] == ["POST hello", "GET blob"], first_round
    assert not any(s.endswith((" events", " pack")) for s in first_round), first_round
    assert ps.state.events_received == len(files)
    assert_blobs_intact(b)


async def test_an_older_peer_syncs_both_ways(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Hello with events is a feature: a peer that answers POST /hello with 405 (an older
    one) is asked by GET and /events, once and from then on; an older asker's GET hello
    gets no events and asks /events as before."""
    a, b, c = new_node("a"), new_node("b"), new_node("c")
    files = [make_dicom(tmp_path / f"{i}.dcm", sop=uid(6, 1, i), study=uid(6),
                        series=uid(6, 2), seed=i) for i in range(3)]
    import_files(a, *files)
    older_server = await FakePeer(a).start()  # hello by GET only, as before
    try:
        rb = await running(b)
        pull_from(b, rb, a, older_server.url)
        await wait_for(lambda: root(b) == root(a), 20, "B to pull from the older A")
        ps = rb.engine.peers[a.node_id.compact]
        await wait_for(lambda: ps.rounds >= 2, 10, "B's next round")
        assert ps.client.hello_events is False  # asked by POST once, then by GET
        assert older_server.calls["events"] >= 1 and older_server.calls["hello"] >= 2
    finally:
        await older_server.stop()
    assert_blobs_intact(b)

    served = _record_requests(monkeypatch)
    real_hello = PeerClient.hello

    async def older_hello(self: PeerClient, mine: Any = None, pack: Any = None) -> Any:
        return await real_hello(self)  # an older asker sends no root: GET
    monkeypatch.setattr(PeerClient, "hello", older_hello)
    ra = await running(a)
    rc = await running(c)
    pull_from(c, rc, a, url_of(ra))
    await wait_for(lambda: root(c) == root(a), 20, "the older C to pull from A")
    assert served[0] == "GET hello" and "POST events" in served, served
    assert_blobs_intact(c)


@pytest.mark.parametrize("fault", ["forged", "too many", "too large", "malformed",
                                   "foreign pack", "bytes after"])
async def test_a_hostile_hello_answer_is_refused_and_nothing_applied(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode,
        fault: str) -> None:
    """The events a hello answer carries are hostile input like any other: a body that does
    not hash to its id, more than MAX_HELLO_EVENTS, more than HELLO_EVENT_BYTES, not a
    list of events, or a first pack listing a blob that none of them names fails the round
    cleanly (a peer error, backed off) with nothing applied and no blob pulled; so do bytes
    after an answer that lists no pack."""
    a, b = new_node("a"), new_node("b")
    files = [make_dicom(tmp_path / f"{i}.dcm", sop=uid(7, 1, i), study=uid(7),
                        series=uid(7, 2), seed=i) for i in range(3)]
    import_files(a, *files)

    def answer() -> dict[str, Any]:  # what the real server answers, as JSON
        node = protocol.read_merkle(a.catalog, "")
        root_answer = protocol.merkle_response("", node)
        found = a.catalog.get_events(a.catalog.ids_under(""))
        return {"node_id": str(a.node_id), "version": protocol.VERSION,
                "root": root_answer["digest"], "count": root_answer["count"],
                "merkle": root_answer, "features": list(protocol.FEATURES),
                **protocol.events_response(
                    found, a.catalog.certificates_for([e for e, _ in found]))}

    async def hello_post(request: web.Request) -> web.StreamResponse:
        await request.read()
        obj = await asyncio.to_thread(answer)
        assert len(obj["events"]) == len(files)
        if fault == "forged":  # one character changed: it no longer hashes to its id
            obj["events"][1]["body"] = obj["events"][1]["body"].replace('"', "'", 1)
        elif fault == "too many":
            obj["events"] += [{"id": secrets.token_hex(32), "body": "{}"}
                              for _ in range(protocol.MAX_HELLO_EVENTS)]
        elif fault == "too large":
            obj["events"][0]["body"] += " " * protocol.HELLO_EVENT_BYTES
        elif fault == "malformed":
            obj["events"] = {"not": "a list"}
        else:
            if fault == "foreign pack":  # a blob none of its events names: no frame read
                obj["pack"] = [[secrets.token_hex(32), 1000]]
            # else it lists no pack, yet bytes follow the answer: refused, not ignored
            body = json.dumps(obj).encode()
            resp = web.StreamResponse(headers={"Content-Type": protocol.HELLO_CONTENT_TYPE})
            await resp.prepare(request)
            await resp.write(protocol.HELLO_LENGTH.pack(len(body)) + body + b"\0" * 2000)
            await resp.write_eof()
            return resp
        return web.json_response(obj)

    fake = await FakePeer(a, hello_post=hello_post).start()
    try:
        rb = await running(b)
        pull_from(b, rb, a, fake.url)
        key = a.node_id.compact
        await wait_for(lambda: key in rb.engine.peers
                       and rb.engine.peers[key].state.state == "error", 20,
                       "B to refuse the hello")
        ps = rb.engine.peers[key]
        assert fake.calls["hello_post"] >= 1
        assert fake.calls["pack"] == fake.calls["blob"] == fake.calls["events"] == 0
    finally:
        await fake.stop()
    assert ps.state.error_kind == "peer", ps.state.last_error
    assert "hello" in ps.state.last_error, ps.state.last_error
    assert live_view(b) == [] and not list(b.store.iter_hashes())
    assert ps.state.events_received == 0
    if fault == "forged":
        assert ps.state.integrity_errors >= 1
