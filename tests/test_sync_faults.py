"""Bounded resources against a broken or hostile trusted peer; every failure backs off.

The peer is :class:`fakepeer.FakePeer`: the real protocol over real mutual TLS with a real
trusted key, with some answers replaced. Receivers are in-process nodes (as in
tests/test_sync.py) or ``syncnode run`` processes where their memory is measured. Disks
that fill up are small tmpfs mounts the tests make (root only) and unmount.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from fakepeer import FakePeer, small_disk
from syncsupport import (
    NodeProcess,
    add_instances,
    add_peer,
    assert_blobs_intact,
    converged,
    describe_nodes,
    fill_disk,
    import_files,
    live_view,
    load_faultproxy,
    make_dicom,
    node_processes,
    peer_state,
    pin,
    pull_from,
    start_node,
    uid,
    url_of,
    wait_for,
)

from syncnode.blobstore import CHUNK_SIZE, BlobInfo
from syncnode.local import LocalNode
from syncnode.node import RunningNode

StartNode = Callable[..., Awaitable[RunningNode]]
fp = load_faultproxy()
MiB = 1 << 20
needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None,
                                reason="mounting a tmpfs needs root")


def transfer_files(node: LocalNode) -> list[str]:
    return sorted(p.name for p in node.store.tmp_dir.iterdir()
                  if p.suffix in (".part", ".offer"))


# ----------------------------------------------------------------------------------------
# Withheld and invalid events: backoff, no tight loop, never "in sync"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fault", ["withheld", "invalid"])
async def test_a_peer_withholding_or_garbling_events_is_backed_off(
        new_node: Callable[[str], LocalNode], running: StartNode, fault: str) -> None:
    a, f = new_node("a"), new_node("f")
    add_instances(f, [uid(20, i) for i in range(50)], study=uid(20))

    async def events(request: web.Request) -> web.Response:
        ids = (await request.json())["ids"]
        if fault == "withheld":  # listed in the Merkle tree, never served
            return web.json_response({"events": []})
        found = await asyncio.to_thread(f.catalog.get_events, ids)
        # one character changed: the body no longer hashes to its id
        return web.json_response({"events": [
            {"id": i, "body": b.decode().replace('"', "'", 1)} for i, b in found]})

    fake = await FakePeer(f, events=events).start()
    try:
        ra = await running(a)
        pull_from(a, ra, f, fake.url)
        await wait_for(lambda: peer_state(a, f).get("state") == "error", 20,
                       "A to record the fault", describe=lambda: peer_state(a, f))
        calls, hellos = fake.calls["events"], fake.calls["hello"]
        cpu, start = time.process_time(), time.monotonic()
        await asyncio.sleep(5)
        cpu = (time.process_time() - cpu) / (time.monotonic() - start)
        calls, hellos = fake.calls["events"] - calls, fake.calls["hello"] - hellos
        state = peer_state(a, f)
    finally:
        await fake.stop()
    print(f"\n{fault}: {calls} event requests, {hellos} rounds in 5 s, CPU {cpu:.1%}, "
          f"last error: {state['last_error'][:80]}")
    assert state["state"] == "error" and not state["in_sync"], state
    assert state["error_kind"] == "peer"
    assert ("did not serve" if fault == "withheld" else "invalid") in state["last_error"]
    # backoff 1, 2, 4 s (half of each as jitter): a handful of rounds, not ~130 a second
    assert 1 <= hellos <= 6 and calls <= 6, (hellos, calls)
    assert cpu < 0.10, f"{cpu:.1%} CPU while failing"
    assert live_view(a) == [] and state["events_received"] == 0
    if fault == "invalid":
        assert state["integrity_errors"] >= 50


# ----------------------------------------------------------------------------------------
# Unbounded answers


@pytest.mark.timeout(120)
async def test_a_1_gib_hello_answer_keeps_the_receiver_under_300_mb(
        tmp_path: Path) -> None:
    a, f = LocalNode.init(tmp_path / "a"), LocalNode.init(tmp_path / "f")
    written: list[int] = []

    async def hello(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()  # chunked: no length announced, only the bytes say it
        await resp.prepare(request)
        piece, sent = b"x" * MiB, 0
        written.append(0)
        while sent < 1 << 30:
            await resp.write(piece)  # raises (or is cancelled) once the receiver hangs up
            sent += len(piece)
            written[-1] = sent
        await resp.write_eof()
        return resp

    fake = await FakePeer(f, hello=hello).start()
    add_peer(a, f, fake.url, push="never")
    pin(f, a)
    a.close()
    try:
        with node_processes() as procs:
            proc = NodeProcess(a.data, tmp_path / "a.log")
            procs.append(proc)
            await asyncio.to_thread(proc.wait_ready)
            await wait_for(lambda: len(written) >= 3, 40, "three rounds of 1 GiB hellos",
                           step=0.2)
            status = Path(f"/proc/{proc.proc.pid}/status").read_text()
            peak_kb = int(next(line.split()[1] for line in status.splitlines()
                               if line.startswith("VmHWM:")))
            io = Path(f"/proc/{proc.proc.pid}/io").read_text()
            read = int(next(line.split()[1] for line in io.splitlines()
                            if line.startswith("rchar:")))
            proc.stop()
        state = LocalNode(a.data).catalog.peer_states()[f.node_id.compact]
    finally:
        await fake.stop()
    print(f"\n1 GiB hello: {len(written)} rounds; receiver peak RSS {peak_kb / 1024:.0f} MB, "
          f"{read // MiB} MiB read by it in all (files and sockets)")
    assert peak_kb < 300 * 1024, f"peak RSS {peak_kb / 1024:.0f} MB"
    # it hung up early every time (what the peer's writes "sent" after that went nowhere)
    assert read < 256 * MiB, f"the receiver read {read // MiB} MiB"
    assert state["state"] == "error" and "longer than" in state["last_error"], state


# ----------------------------------------------------------------------------------------
# Announced sizes: a per-blob maximum and the free space, before anything is written


def _announce(node: LocalNode, sop: str, size: int) -> str:
    """A put event for a blob of ``size`` bytes that nobody has (a hash nobody computed)."""
    info = BlobInfo(secrets.token_hex(32), size,
                    tuple(secrets.token_hex(32) for _ in range(3)), True)
    attrs = {"sop_instance_uid": sop, "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
             "study_instance_uid": uid(30), "series_instance_uid": uid(30, 1)}
    node.catalog.add_local_puts([(attrs, info)], blob_present=lambda _h: True)
    return info.hash


async def _endless(request: web.Request) -> web.StreamResponse:
    """A blob answer that never ends (random bytes, 1 MiB at a time)."""
    resp = web.StreamResponse()
    await resp.prepare(request)
    while True:
        await resp.write(os.urandom(MiB))


@needs_root
@pytest.mark.timeout(90)
async def test_a_100_gb_announcement_on_a_small_disk_is_refused_before_writing(
        tmp_path: Path, new_node: Callable[[str], LocalNode]) -> None:
    with small_disk(tmp_path / "disk", "64m") as disk:
        a = LocalNode.init(disk / "a")
        try:
            f = new_node("f")
            huge = _announce(f, uid(30, 1, 1), 100 * 10**9)  # over max_blob_size
            big = _announce(f, uid(30, 1, 2), 200 * MiB)  # allowed, but does not fit

            async def chunks(request: web.Request) -> web.Response:
                size = 100 * 10**9 if request.match_info["hash"] == huge else 200 * MiB
                n = -(-size // CHUNK_SIZE)
                return web.json_response({"size": size, "chunks": "00" * 32 * n})

            fake = await FakePeer(f, blob=_endless, chunks=chunks).start()
            ra = await start_node(a)
            try:
                pull_from(a, ra, f, fake.url)
                await wait_for(lambda: "StoreFull" in peer_state(a, f).get("last_error", "")
                               or "BlobTooLarge" in peer_state(a, f).get("last_error", ""),
                               20, "A to refuse the announcements",
                               describe=lambda: peer_state(a, f))
                await asyncio.sleep(3)  # a few more rounds: nothing may accumulate
                state = peer_state(a, f)
                used = shutil.disk_usage(disk).used
                files = transfer_files(a)
                gets = fake.calls["blob"]
            finally:
                await ra.stop()
                await fake.stop()
            a.gc()
            assert transfer_files(a) == []
            live = json.dumps(live_view(a))
        finally:
            a.close()
    print(f"\n100 GB announced: state {state['state']}, {state['last_error'][:100]}; "
          f"disk used {used // MiB} MiB; blob GETs {gets}")
    assert not state["in_sync"] and state["state"] in ("error", "store_full")
    assert gets == 0 and files == [], (gets, files)  # refused before any byte was asked for
    assert used < 16 * MiB
    assert huge not in live and big not in live


# ----------------------------------------------------------------------------------------
# A slow peer holding a blob does not keep an honest one from delivering it


@pytest.mark.timeout(90)
async def test_a_slow_peer_holding_a_blob_lets_an_honest_peer_deliver_it(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    a, h, s = new_node("a"), new_node("h"), new_node("s")
    dcm = make_dicom(tmp_path / "x.dcm", sop=uid(31, 1), study=uid(31), series=uid(31, 0),
                     pixel_bytes=3 * MiB, seed=31)
    import_files(h, dcm)
    # the slow peer holds the same events (not the blob: it trickles H's bytes)
    ids = h.catalog.all_event_ids()
    s.catalog.offer_certificates(h.catalog.certificates_for(ids))  # as the protocol does
    assert not s.catalog.apply(h.catalog.get_events(ids), blob_present=lambda _h: True).rejected
    (blob,) = list(h.store.iter_hashes())
    data, digests = h.store.path(blob).read_bytes(), h.store.chunk_digests(blob)
    trickled: list[int] = []

    async def chunks(request: web.Request) -> web.Response:
        return web.json_response({"size": len(data), "chunks": digests.hex()})

    async def trickle(request: web.Request) -> web.StreamResponse:
        start = int(request.headers.get("Range", "bytes=0-").split("=")[1].split("-")[0])
        resp = web.StreamResponse(status=206 if start else 200, headers={
            "Content-Length": str(len(data) - start), "Accept-Ranges": "bytes"})
        await resp.prepare(request)
        trickled.append(0)
        for i in range(start, len(data)):  # one byte every 2 s
            await resp.write(data[i:i + 1])
            trickled[-1] += 1
            await asyncio.sleep(2)
        return resp

    fake = await FakePeer(s, chunks=chunks, blob=trickle).start()
    try:
        # pulls must average 1 MB/s: a 3 MiB blob gets 3 s plus a base of 3 s
        ra = await running(a, min_pull_rate=1_000_000)
        assert ra.engine is not None
        ra.engine.pull_base_deadline = 3.0
        rh = await running(h)
        pull_from(a, ra, s, fake.url)
        await wait_for(lambda: bool(trickled), 20, "A to start pulling from the slow peer")
        started = time.monotonic()
        pull_from(a, ra, h, url_of(rh))
        waited = await wait_for(lambda: converged([a, h]), 30,
                                "A to get the blob from the honest peer",
                                describe=lambda: describe_nodes([a, h]))
        slow = peer_state(a, s)
    finally:
        await fake.stop()
    print(f"\nslow peer: {sum(trickled)} bytes trickled; the honest peer delivered "
          f"{time.monotonic() - started:.1f} s after it was added; slow peer's state: "
          f"{slow.get('last_error', '')[:90]}")
    assert waited < 6.0 + 10.0  # the slow pull's deadline, then a normal pull
    assert "PullTooSlow" in slow.get("last_error", "") or slow.get("in_sync"), slow
    assert sum(trickled) < CHUNK_SIZE


# ----------------------------------------------------------------------------------------
# A full disk pauses pulls (store_full) and they resume by themselves


@needs_root
@pytest.mark.timeout(120)
async def test_a_full_disk_pauses_pulls_and_they_resume_once_space_returns(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    b = new_node("b")
    files = [make_dicom(tmp_path / f"d{i}.dcm", sop=uid(32, i), study=uid(32),
                        series=uid(32, 0), pixel_bytes=(2 * MiB if i < 6 else 100_000),
                        seed=i) for i in range(12)]
    import_files(b, *files)
    with small_disk(tmp_path / "disk", "64m") as disk:
        a = LocalNode.init(disk / "a")
        try:
            async with contextlib.AsyncExitStack() as stack:
                filler = disk / "filler"
                free = shutil.disk_usage(disk).free
                with open(filler, "wb") as f:  # leave about 6 MiB: less than B's 14 MB
                    f.write(b"\0" * (free - 6 * MiB))
                rb = await running(b)
                ra = await start_node(a)
                stack.push_async_callback(ra.stop)
                pull_from(a, ra, b, url_of(rb))
                await wait_for(lambda: peer_state(a, b).get("state") == "store_full", 40,
                               "A to pause with store_full", describe=lambda: peer_state(a, b))
                state = peer_state(a, b)
                assert state["error_kind"] == "local" and not state["in_sync"], state
                assert ra.engine is not None
                task = ra.engine.tasks[b.node_id.compact]
                filler.unlink()
                freed = time.monotonic()
                await wait_for(lambda: converged([a, b]), 40, "A to resume once space returned",
                               describe=lambda: describe_nodes([a, b]))
                resumed = time.monotonic() - freed
                assert not task.done()  # the same loop, no restart
                assert len(live_view(a)) == 12
                report = a.verify()
                assert report.ok, report
                assert a.store.promised_bytes == 0  # refused and finished pulls gave it back
        finally:
            a.close()
    print(f"\nfull disk: paused as {state['state']} ({state['last_error'][:70]}); "
          f"in sync {resumed:.1f} s after space returned")
    assert resumed < 10.0 + 15.0  # one store_full retry period, then the pulls


@needs_root
@pytest.mark.timeout(120)
async def test_a_catalog_that_fills_up_mid_sync_loses_nothing(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode,
        caplog: pytest.LogCaptureFixture) -> None:
    """The rarer full disk: the blobs fit but the catalog's commit that makes them live does
    not (its disk fills as the write-ahead log grows). Space returns while a large blob is
    still arriving; its commit is then the first to succeed. Nothing of the failed commits
    may show, not even in memory, or that commit writes a Merkle root counting events never
    stored: B would reach A's root while missing them, and never pull them again."""
    a = new_node("a")
    sops = [uid(34, i) for i in range(96)]
    add_instances(a, sops, study=uid(34))
    large = make_dicom(tmp_path / "large.dcm", sop=uid(34, 999), study=uid(34),
                       series=uid(34, 0), pixel_bytes=1_200_000, seed=34)
    import_files(a, large)
    b_data = tmp_path / "b"
    LocalNode.init(b_data).close()
    with small_disk(tmp_path / "catalog-disk", "4m") as disk:
        # B's catalog alone on the small disk; its blobs have room
        shutil.move(b_data / "catalog.db", disk / "catalog.db")
        (b_data / "catalog.db").symlink_to(disk / "catalog.db")
        b = LocalNode(b_data)
        try:
            ra, rb = await running(a), await running(b)
            # the large blob takes ~2.5 s, the small ones (in packs) a fraction of that
            config = fp.FaultConfig(rate_down=500_000)
            async with fp.FaultProxy(("127.0.0.1", ra.ports["peer"]), config=config) as proxy:
                add_peer(b, a, f"https://127.0.0.1:{proxy.port}", push="never")
                pin(a, b)
                filler = fill_disk(disk)
                rb.peers_changed()

                def commit_failed() -> bool:
                    return any("pulled blobs failed" in r.getMessage()
                               and "catalog" in r.getMessage()
                               for r in caplog.records)

                await wait_for(commit_failed, 30, "a commit of pulled blobs to fail",
                               step=0.02, describe=b.catalog.counts)
                filler.unlink()
                assert rb.engine is not None
                peer = a.node_id.compact
                task = rb.engine.tasks[peer]
                wanted = {i["sop_instance_uid"]: i["blob"] for i in live_view(a)}
                a_root = a.catalog.merkle_root()

                def b_reached_a() -> bool:
                    return b.catalog.merkle_root() == a_root

                await wait_for(b_reached_a, 40, "B to reach A's root once space returned",
                               describe=lambda: (rb.engine.peers[peer].state,
                                                 b.catalog.counts()))
            held = {i["sop_instance_uid"]: i["blob"] for i in live_view(b)}
            lost = set(wanted) - set(held)
            assert not lost, f"B reached A's root with {len(lost)} instances lost"
            assert held == wanted
            assert not task.done() and rb.engine.tasks[peer] is task  # the same loop
            assert b.catalog.check_derived() == []
            assert_blobs_intact(b)
            assert b.store.promised_bytes == 0  # every pull gave back the room it was promised
        finally:
            b.close()


# ----------------------------------------------------------------------------------------
# Pushed offers: quotas and free space


@needs_root
@pytest.mark.timeout(60)
async def test_offers_beyond_the_free_space_or_the_quota_write_nothing(
        tmp_path: Path, new_node: Callable[[str], LocalNode]) -> None:
    import aiohttp

    from syncnode import protocol
    from syncnode.tls.contexts import client_ssl_context

    with small_disk(tmp_path / "disk", "32m") as disk:
        a = LocalNode.init(disk / "a")
        try:
            b = new_node("b")
            pin(a, b)
            pin(b, a)
            ra = await start_node(a)
            assert ra.peer_server is not None
            ra.peer_server.max_pending_offers = 5
            ctx = client_ssl_context(b.identity, b.trust, expected=a.node_id)
            base = f"{url_of(ra)}{protocol.PREFIX}/push/offer"

            def offer(n: int, size: int) -> dict[str, Any]:
                chunks = "00" * 32 * -(-size // CHUNK_SIZE)
                return {"blobs": [{"hash": secrets.token_hex(32), "size": size,
                                   "chunks": chunks} for _ in range(n)]}

            async with aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=ctx)) as session:
                async def post(body: dict[str, Any]) -> tuple[int, Any]:
                    async with session.post(base, json=body) as r:
                        return r.status, await r.json()

                try:
                    too_big = await post(offer(1, 100 * MiB))
                    files_after_refusal = transfer_files(a)
                    ok = await post(offer(4, 2 * MiB))
                    over_quota = await post(offer(2, 2 * MiB))
                finally:
                    await ra.stop()
            report = a.verify()  # counts the unfinished transfers: the 4 offers
            a.gc()  # no `run` holds the folder: every transfer file goes
            left = transfer_files(a)
        finally:
            a.close()
    assert files_after_refusal == []
    assert report.transfer_files == 4 and report.ok, report
    assert left == []
    assert too_big[0] == 507, too_big
    assert ok[0] == 200 and len(ok[1]["want"]) == 4, ok
    assert over_quota[0] == 429, over_quota


# ----------------------------------------------------------------------------------------
# Abandoned transfer files


@pytest.mark.timeout(60)
async def test_start_up_removes_abandoned_transfer_files_and_keeps_recent_ones(
        new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    a = new_node("a")
    tmp = a.store.tmp_dir
    old = [tmp / f"{secrets.token_hex(32)}{suffix}" for suffix in (".part", ".offer")]
    recent = tmp / f"{secrets.token_hex(32)}.part"
    for p in [*old, recent]:
        p.write_bytes(b"x" * 1000)
    day_ago = time.time() - 86400
    for p in old:
        os.utime(p, (day_ago, day_ago))
    assert a.verify().transfer_files == 3
    await running(a)
    assert transfer_files(a) == [recent.name]  # a recent one is resumed, not re-fetched
