"""Packs of small blobs (``POST /peer/v1/blobs/pack``): many blobs per round trip, each
verified on its own.

The decoder is driven without a network; the endpoint is the real peer server over real
mutual TLS (:class:`fakepeer.FakePeer`), and hostile answers are written frame by frame
with raw aiohttp. Checked: a damaged or short blob is refused alone and fetched singly, the
blobs that arrived before a break are kept (and not asked for again), an answer that breaks
the framing (unknown blob, oversized payload, extra bytes) is refused, and both ends cap a
pack (64 blobs, 4 MiB).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from fakepeer import FakePeer
from syncsupport import (
    add_peer,
    converged,
    describe_nodes,
    import_files,
    make_dicom,
    peer_state,
    pin,
    pull_from,
    resident_bytes,
    skip_without_page_cache,
    uid,
    url_of,
    wait_for,
)

from syncnode import protocol, wire
from syncnode.blobstore import CHUNK_SIZE, StagedBlob, chunks_root, implied_chunk_list
from syncnode.flow import MIN_INFLIGHT_BYTES, Window
from syncnode.ids import InvalidHash
from syncnode.local import LocalNode
from syncnode.node import RunningNode
from syncnode.protocol import PackReader, ProtocolError
from syncnode.sync import MIN_PACK, PeerClient, pack_target

StartNode = Callable[..., Awaitable[RunningNode]]


def frame(blob: str, data: bytes, status: int = protocol.RAW, size: int | None = None) -> bytes:
    size = len(data) if size is None else size
    return protocol.pack_frame_header(blob, status, size, len(data)) + data


def h(n: int) -> str:
    return format(n, "064x")


# -- the decoder, sans-IO ----------------------------------------------------------------


def read_all(reader: PackReader, body: bytes) -> list[protocol.PackFrame]:
    frames, pos = [], 0
    while n := reader.need():
        got = reader.feed(body[pos:pos + n])
        pos += n
        if got is not None:
            frames.append(got)
    assert pos == len(body)
    return frames


def test_reader_decodes_frames_in_order_and_flags_a_short_blob_alone() -> None:
    z = wire.compress_chunk(b"a" * 1000)
    body = (frame(h(1), b"x" * 10) + frame(h(2), z, protocol.ZSTD, size=1000)
            + frame(h(3), b"", protocol.ABSENT, size=0) + frame(h(4), b"y" * 5, size=6)
            + frame(h(5), b"", protocol.NOT_PACKED, size=2 * CHUNK_SIZE))
    reader = PackReader([(h(1), 10), (h(2), 1000), (h(3), 7), (h(4), 6),
                         (h(5), 2 * CHUNK_SIZE)])
    frames = read_all(reader, body)
    assert [(f.blob, f.status) for f in frames] == [
        (h(1), protocol.RAW), (h(2), protocol.ZSTD), (h(3), protocol.ABSENT),
        (h(4), protocol.RAW), (h(5), protocol.NOT_PACKED)]
    assert frames[0].payload == b"x" * 10 and not frames[0].problem
    assert frames[3].problem == "5 bytes sent for a blob of 6"  # refused alone
    assert reader.done and reader.missing() == []


@pytest.mark.parametrize("header, why", [
    (protocol.pack_frame_header(h(9), protocol.RAW, 10, 10), "is for blob"),  # unknown id
    (protocol.pack_frame_header(h(1), protocol.RAW, 11, 11), "put event says 10"),
    (protocol.pack_frame_header(h(1), protocol.RAW, 10, 2**32 - 1), "at most"),  # oversized
    (protocol.pack_frame_header(h(1), protocol.ABSENT, 10, 5), "at most 0"),
    (protocol.pack_frame_header(h(1), 7, 10, 10), "unknown status"),
], ids=["unknown-blob", "wrong-size", "oversized-payload", "payload-when-absent",
        "unknown-status"])
def test_reader_refuses_a_header_that_breaks_the_framing(header: bytes, why: str) -> None:
    reader = PackReader([(h(1), 10), (h(2), 10)])
    with pytest.raises(ProtocolError, match=why):
        reader.feed(header)
    assert reader.missing() == [h(1), h(2)]


@pytest.mark.parametrize("header, seen, total, why", [
    (protocol.pack_frame_header(h(1), protocol.ABSENT, 10, 0), 0, 0, "RAW or ZSTD only"),
    (protocol.pack_frame_header(h(1), protocol.RAW, 10, 10), 1, 0, "sent twice"),
    (protocol.pack_frame_header(h(9), protocol.RAW, 10, 10), protocol.PACK_MAX_BLOBS, 0,
     "more than"),
    (protocol.pack_frame_header(h(1), protocol.RAW, CHUNK_SIZE + 1, CHUNK_SIZE + 1), 0, 0,
     "over one chunk"),
    (protocol.pack_frame_header(h(1), protocol.RAW, 10, 10), 0,
     protocol.PACK_MAX_BYTES - 9, "past the"),
    (protocol.pack_frame_header(h(1), protocol.RAW, 10, 11), 0, 0, "payload of 11"),
    (protocol.pack_frame_header(h(1), protocol.ZSTD, 10, 2**32 - 1), 0, 0, "payload of"),
], ids=["status", "twice", "too-many", "over-a-chunk", "past-the-pack", "raw-length",
        "oversized-zstd"])
def test_a_pushed_frame_header_past_the_caps_is_refused_before_its_payload(
        header: bytes, seen: int, total: int, why: str) -> None:
    """What a hostile pusher can put in a frame header: every cap is checked from the
    header alone, before a byte of its payload is read."""
    already = {h(1)} if seen == 1 else {h(100 + i) for i in range(seen)}
    with pytest.raises(protocol.BadRequest, match=why):
        protocol.parse_push_frame_header(header, already, total)
    assert protocol.parse_push_frame_header(
        protocol.pack_frame_header(h(2), protocol.RAW, 10, 10), {h(1)}, 10) == (
        h(2), protocol.RAW, 10, 10)


def test_request_shapes_and_caps() -> None:
    items = [protocol.PackItem(h(i), i % 2 == 0) for i in range(protocol.PACK_MAX_BLOBS)]
    assert protocol.parse_pack_request(protocol.pack_request(items)) == items
    too_many = {"blobs": [{"hash": h(i)} for i in range(protocol.PACK_MAX_BLOBS + 1)]}
    for bad in (too_many, {"blobs": []}, {"blobs": [{"hash": h(1)}, {"hash": h(1)}]},
                {"blobs": [{"hash": "../etc"}]}, {"blobs": [{"hash": h(1), "zstd": 1}]}):
        with pytest.raises((protocol.BadRequest, InvalidHash)):  # both answered 400
            protocol.parse_pack_request(bad)


def test_a_pack_holds_a_fraction_of_a_second_of_the_peer_within_the_caps() -> None:
    assert pack_target(0.0) == MIN_PACK  # nothing measured yet: a few small blobs
    assert pack_target(2e6) == 500_000  # a slow peer claims little at a time
    assert pack_target(10e6) == 2_500_000
    assert pack_target(1e9) == protocol.PACK_MAX_BYTES  # never more than the cap


def test_a_lone_first_wave_of_packs_fills_the_window_byte_budget() -> None:
    """Before anything is measured, a loop with no other peer to share with sizes its
    first packs so that a full window carries the byte budget (one round trip fills a long
    path); the floor never lifts a pack past the cap."""
    w = Window(start=8, high=32)
    assert w.share() == MIN_INFLIGHT_BYTES // 8
    assert pack_target(0.0, w.share()) == MIN_INFLIGHT_BYTES // 8 > MIN_PACK
    assert pack_target(0.0, 1 << 30) == protocol.PACK_MAX_BYTES
    assert pack_target(10e6, MIN_PACK) == 2_500_000  # a measured rate decides above it


# -- the endpoint and the client over real mutual TLS ------------------------------------


class Pair:
    """A serving node ``f`` (behind a FakePeer) and a receiving node ``a`` with a client."""

    def __init__(self, a: LocalNode, f: LocalNode, fake: FakePeer) -> None:
        self.a, self.f, self.fake = a, f, fake
        self.client = PeerClient(a, f.node_id, fake.url)

    def blob(self, size: int, seed: int) -> tuple[str, int, str, bool]:
        """A blob of random bytes in ``f``'s store: (hash, size, chunks root, zstd)."""
        info = self.f.store.put_bytes(os.urandom(size) if seed < 0 else
                                      bytes([seed % 251]) * size)
        return info.hash, size, chunks_root(implied_chunk_list(info.hash, size)), False

    async def fetch(self, blobs: list[tuple[str, int, str, bool]]
                    ) -> tuple[dict[str, StagedBlob], list[str], list[str]]:
        staged: dict[str, StagedBlob] = {}
        refused: list[str] = []
        singly = await self.client.fetch_pack(
            self.a.store, blobs, staged.__setitem__,
            on_refused=lambda b, _exc, _n: refused.append(b))
        return staged, singly, refused


@pytest.fixture
async def pair(new_node: Callable[[str], LocalNode]) -> AsyncIterator[Callable[..., Any]]:
    made: list[Pair] = []

    async def make(**overrides: Any) -> Pair:
        a, f = new_node(f"a{len(made)}"), new_node(f"f{len(made)}")
        pin(a, f)
        pin(f, a)
        fake = await FakePeer(f, **overrides).start()
        p = Pair(a, f, fake)
        made.append(p)
        return p

    yield make
    for p in made:
        await p.client.close()
        await p.fake.stop()


async def test_a_pack_brings_small_blobs_verified_and_leaves_the_rest_to_single_pulls(
        pair: Callable[..., Awaitable[Pair]]) -> None:
    p = await pair()
    small = [p.blob(200_000 + i, seed=i) for i in range(3)]
    small[1] = (*small[1][:3], True)  # zstd asked: 200 kB of one byte value shrinks
    large = p.blob(CHUNK_SIZE + 1, seed=-1)
    unknown = (h(77), 100, chunks_root(implied_chunk_list(h(77), 100)), False)
    wire_bytes: list[int] = []
    staged: dict[str, StagedBlob] = {}
    with pytest.raises(ValueError):  # the client never asks for a blob over one chunk
        await p.client.fetch_pack(p.a.store, [large], staged.__setitem__)
    singly = await p.client.fetch_pack(p.a.store, [*small, unknown], staged.__setitem__,
                                       on_wire=wire_bytes.append)
    assert singly == [unknown[0]]  # absent there: asked alone, answered 404 as before
    assert sorted(staged) == sorted(b for b, *_ in small)
    p.a.store.install_staged(list(staged.values()))
    for b, *_ in small:
        assert p.a.store.path(b).read_bytes() == p.f.store.path(b).read_bytes()
    assert sum(wire_bytes) < 2 * 200_000 + 20_000, "the zstd-asked blob was not compressed"
    assert p.fake.calls["pack"] == 1 and p.fake.calls["blob"] == 0

    # the sender's caps: a blob over one chunk and bytes past PACK_MAX_BYTES are not packed
    url = f"{p.client.base}/blobs/pack"
    five = [p.blob(900_000, seed=10 + i) for i in range(5)]  # 4.5 MB > 4 MiB
    async with p.client.session().post(url, json=protocol.pack_request(
            [protocol.PackItem(b) for b, *_ in [*five, large]])) as resp:
        body = await resp.read()
    reader = PackReader([(b, n) for b, n, *_ in [*five, large]])
    statuses = [f.status for f in read_all(reader, body)]
    assert statuses == [protocol.RAW] * 4 + [protocol.NOT_PACKED] * 2
    for bad in ({"blobs": [{"hash": h(i)} for i in range(protocol.PACK_MAX_BLOBS + 1)]},
                {"blobs": [{"hash": h(1)}, {"hash": h(1)}]}):
        async with p.client.session().post(url, json=bad) as resp:
            assert resp.status == 400, await resp.text()


def _pack_answer(node: LocalNode, mangle: Callable[[int, bytes], bytes],
                 tail: bytes = b"", cut_after: int | None = None
                 ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A hostile pack answer from ``node``'s real blobs: ``mangle(i, frame)`` rewrites
    frame i; ``tail`` follows the last frame; ``cut_after``: abort after that many."""
    async def answer(request: web.Request) -> web.StreamResponse:
        items = protocol.parse_pack_request(await request.json())
        resp = web.StreamResponse(headers={"Content-Type": protocol.PACK_CONTENT_TYPE})
        await resp.prepare(request)
        for i, item in enumerate(items):
            if cut_after is not None and i == cut_after:
                assert request.transport is not None
                await asyncio.sleep(0.2)  # let what was written leave before the break
                request.transport.close()
                return resp
            data = node.store.path(item.hash).read_bytes()
            await resp.write(mangle(i, frame(item.hash, data)))
        await resp.write(tail)
        return resp

    return answer


def _flip(i: int, target: int) -> Callable[[int, bytes], bytes]:
    def mangle(n: int, f: bytes) -> bytes:
        if n != target:
            return f
        b = bytearray(f)
        b[-1] ^= 1
        return bytes(b)
    return mangle


@pytest.mark.parametrize("fault", ["damaged", "extra", "unknown", "oversized", "cut"])
async def test_a_hostile_pack_keeps_what_verified_and_refuses_the_rest(
        pair: Callable[..., Awaitable[Pair]], fault: str) -> None:
    holder: list[Pair] = []

    async def pack(request: web.Request) -> web.StreamResponse:
        f = holder[0].f
        if fault == "damaged":
            return await _pack_answer(f, _flip(0, 1))(request)
        if fault == "extra":
            return await _pack_answer(f, lambda i, x: x, tail=b"\0" * 100)(request)
        if fault == "cut":
            return await _pack_answer(f, lambda i, x: x, cut_after=2)(request)

        def mangle(i: int, x: bytes) -> bytes:
            if i != 1:
                return x
            if fault == "unknown":
                return frame(h(5), x[protocol.PACK_HEADER_SIZE:])
            # "oversized": a header announcing a 4 GiB payload, then silence
            raw = bytearray(x[:protocol.PACK_HEADER_SIZE])
            raw[-4:] = (2**32 - 1).to_bytes(4, "big")
            return bytes(raw)

        if fault == "oversized":
            answer = _pack_answer(f, mangle, tail=b"")
            resp = await answer(request)
            await asyncio.sleep(30)  # never sends the payload: must not be waited for
            return resp
        return await _pack_answer(f, mangle)(request)

    p = await pair(pack=pack)
    holder.append(p)
    blobs = [p.blob(100_000, seed=i) for i in range(4)]
    refused: list[str] = []
    staged: dict[str, StagedBlob] = {}

    async def fetch() -> list[str]:
        return await asyncio.wait_for(p.client.fetch_pack(
            p.a.store, blobs, staged.__setitem__,
            on_refused=lambda b, _e, _n: refused.append(b)), 20)

    if fault == "damaged":
        assert await fetch() == [blobs[1][0]] == refused  # fetched alone next
        assert sorted(staged) == sorted(b[0] for i, b in enumerate(blobs) if i != 1)
    else:
        kind = (aiohttp.ClientError, ProtocolError) if fault == "cut" else ProtocolError
        with pytest.raises(kind) as err:
            await fetch()
        kept = {"extra": 4, "unknown": 1, "oversized": 1, "cut": 2}[fault]
        assert sorted(staged) == sorted(b[0] for b in blobs[:kept]), err.value
        assert refused == []
    p.a.store.install_staged(list(staged.values()))
    for b in staged:
        assert p.a.store.verify(b) is None


# -- end to end: a node pulling through packs --------------------------------------------


def _instances(tmp: Path, tag: int, sizes: list[int]) -> list[Path]:
    """One study's instances, one per size (bytes of pixel data), in files under ``tmp``."""
    return [make_dicom(tmp / f"p{tag}-{i}.dcm", sop=uid(50, tag, i), study=uid(50, tag),
                       series=uid(50, tag, 0), pixel_bytes=n, seed=500 * tag + i)
            for i, n in enumerate(sizes)]


def _small_study(tmp: Path, node: LocalNode, tag: int, n: int) -> None:
    import_files(node, *_instances(tmp, tag, [15_000] * n))


@pytest.mark.timeout(60)
async def test_a_sync_pulls_small_blobs_in_packs_and_mends_a_damaged_one_alone(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    """A peer whose packs carry one damaged blob, and whose first pack breaks off after
    three blobs: the receiver keeps those that arrived whole (never asks for them again),
    refuses the damaged one alone, fetches it singly, and ends with every blob intact."""
    a, f = new_node("a"), new_node("f")
    _small_study(tmp_path, f, 1, 12)
    asked: list[list[str]] = []

    async def pack(request: web.Request) -> web.StreamResponse:
        items = protocol.parse_pack_request(json.loads(await request.read()))
        asked.append([i.hash for i in items])
        if len(asked) == 1:
            return await _pack_answer(f, lambda i, x: x, cut_after=3)(request)
        return await _pack_answer(f, _flip(0, 0))(request)

    fake = await FakePeer(f, pack=pack).start()
    try:
        ra = await running(a, max_pulls=1, max_window=1)  # one pack at a time
        pull_from(a, ra, f, fake.url)
        await wait_for(lambda: converged([a, f]), 40, "A to hold F's study",
                       describe=lambda: describe_nodes([a, f]))
        state = peer_state(a, f)
        blob_calls = fake.calls["blob"]
    finally:
        await fake.stop()
    assert len(asked[0]) == 12 and len(asked) >= 2
    # the first two surely arrived whole before the break (the third may be cut short)
    kept = set(asked[0][:2])
    assert not kept & {b for req in asked[1:] for b in req}, "a kept blob was asked again"
    assert len(asked[1]) <= 10
    assert blob_calls == 1  # only the damaged blob, singly
    assert state["integrity_errors"] >= 1
    for b in a.store.iter_hashes():
        assert a.store.verify(b) is None


@pytest.mark.timeout(60)
async def test_pulled_blobs_leave_the_page_cache_and_the_senders_imports_stay(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    """What B pulls (instances of 120 kB in packs, one of 3 MiB alone) is on B's disk and
    entirely out of B's page cache once its puts are applied and its headers indexed for
    C-FIND (both read from memory first, not back from disk); what A imported stays cached
    on A (every peer is about to pull it). A sync of gigabytes does not evict the receiving
    host's working set."""
    skip_without_page_cache(tmp_path)
    a, b = new_node("a"), new_node("b")
    sizes = [120_000] * 6 + [3 * CHUNK_SIZE]
    import_files(a, *_instances(tmp_path, 51, sizes))
    ra, rb = await running(a), await running(b)
    pull_from(b, rb, a, url_of(ra))
    await wait_for(lambda: converged([a, b]), 40, "B to hold A's study",
                   describe=lambda: describe_nodes([a, b]))
    blobs = sorted(b.store.iter_hashes())
    assert len(blobs) == len(sizes)
    await settled(b, blobs)
    on_a = {x: resident_bytes(a.store.path(x)) for x in blobs}
    assert all(on_a[x] >= a.store.size(x) for x in blobs), on_a
    for x in blobs:
        assert b.store.verify(x) is None


async def settled(node: LocalNode, blobs: list[str]) -> None:
    """Wait until these blobs a peer sent are out of the node's page cache (moments after
    the apply that made them live), then check each was indexed for C-FIND first (from
    memory: nothing has read them back since)."""

    def cached() -> dict[str, int]:
        return {x: resident_bytes(node.store.path(x)) for x in blobs}

    await wait_for(lambda: not any(cached().values()), 10, "the blobs out of the cache",
                   describe=cached)
    with contextlib.closing(sqlite3.connect(node.catalog.path)) as db:
        indexed = dict(db.execute("SELECT blob, readable FROM find_attrs").fetchall())
    assert indexed == dict.fromkeys(blobs, 1)
    assert not any(cached().values())


# -- pushes go in packs too ----------------------------------------------------------------


async def _pushing(a: LocalNode, f: LocalNode, fake: FakePeer, running: StartNode
                   ) -> RunningNode:
    """Run A, pushing to F (behind ``fake``), which trusts it and never dials it."""
    ra = await running(a)
    add_peer(a, f, fake.url, push="always")
    pin(f, a)
    ra.peers_changed()
    return ra


@pytest.mark.timeout(60)
async def test_a_push_of_small_instances_goes_in_packs_and_a_damaged_blob_is_refused_alone(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    """A pushes 12 small instances to F (which never dials A): a few pushed packs, no
    single pushes. One of A's blobs is damaged on A's disk (A serves as stored): F refuses
    that blob alone, installs the 11 others and their puts, and A, told so, re-hashes its
    copy and moves it aside."""
    a, f = new_node("a"), new_node("f")
    _small_study(tmp_path, a, 2, 12)
    victim = sorted(a.store.iter_hashes())[3]
    path = a.store.path(victim)
    original = path.read_bytes()
    os.chmod(path, 0o644)
    path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    fake = await FakePeer(f).start()
    try:
        await _pushing(a, f, fake, running)
        good = set(a.store.iter_hashes()) - {victim}

        def pushed() -> bool:
            return good <= set(f.store.iter_hashes()) and len(f.catalog.instances()) == 11 \
                and (a.data / "damaged" / victim).exists()

        await wait_for(pushed, 30, "F to hold the 11 good instances and A to quarantine "
                       "the damaged blob", describe=lambda: (describe_nodes([a, f]),
                                                             dict(fake.calls)))
        calls = dict(fake.calls)
    finally:
        await fake.stop()
    assert calls.get("push_blob", 0) == 0, calls  # no blob went alone
    assert 1 <= calls["push_pack"] <= 4, calls  # 12 blobs of ~15 kB: one pack, a retry
    assert not f.store.has(victim) and not list(f.store.tmp_dir.glob(f"{victim}*.part"))
    for b in f.store.iter_hashes():
        assert f.store.verify(b) is None
    assert not a.store.has(victim)  # A's own hash agreed: moved aside, not served again


@pytest.mark.timeout(60)
async def test_pushed_blobs_leave_the_receivers_page_cache(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    """Bytes a peer pushes are a peer's too: once their puts are applied and their headers
    indexed (from memory), F drops them from its page cache."""
    skip_without_page_cache(tmp_path)
    a, f = new_node("a"), new_node("f")
    import_files(a, *_instances(tmp_path, 53, [120_000] * 4))
    fake = await FakePeer(f).start()
    try:
        await _pushing(a, f, fake, running)
        await wait_for(lambda: len(f.catalog.instances()) == 4, 30, "F to hold A's 4",
                       describe=lambda: describe_nodes([a, f]))
        calls = dict(fake.calls)
    finally:
        await fake.stop()
    assert calls.get("push_pack", 0) >= 1, calls
    await settled(f, sorted(f.store.iter_hashes()))
