"""Time bounds of the node's HTTP listeners (syncnode.listeners): slow request heads, idle
keep-alive connections and stalled TLS handshakes are dropped; normal use is not.

Real sockets on 127.0.0.1, a real node (peer port with mutual TLS, admin API), bounds
shortened through ``RunningNode(limits=...)``. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import blake3
import pytest

from syncnode import protocol
from syncnode.apikeys import KeyStore
from syncnode.listeners import ListenerLimits
from syncnode.local import LocalNode
from syncnode.node import RunningNode
from syncnode.tls.contexts import client_ssl_context

HEAD = 0.5  # head_timeout in these tests
IDLE = 2.5  # keepalive_timeout
HANDSHAKE = 0.5  # tls_handshake_timeout
SLACK = 0.8  # scheduling slack allowed past a bound
LIMITS = ListenerLimits(head_timeout=HEAD, keepalive_timeout=IDLE, tls_handshake_timeout=HANDSHAKE)

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass
class Node:
    running: RunningNode
    client_ctx: ssl.SSLContext  # a trusted peer's client context
    admin_key: str

    @property
    def api(self) -> int:
        return self.running.ports["api"]

    @property
    def peer(self) -> int:
        return self.running.ports["peer"]


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    a = LocalNode.init(tmp_path / "a")
    b = LocalNode.init(tmp_path / "b")  # only its identity is used: a client A trusts
    a.trust.pin(b.identity.cert_der, b.node_id)
    b.trust.pin(a.identity.cert_der, a.node_id)
    settings = a.settings(peer_host="127.0.0.1", peer_port=0, api_port=0, dicom_port=0,
                          discovery=False)
    running = RunningNode(a, settings, limits=LIMITS)
    await running.start()
    try:
        yield Node(running, client_ssl_context(b.identity, b.trust, expected=a.node_id),
                   KeyStore(a.data).rotate("admin"))
    finally:
        await running.stop()
        b.close()


async def connect(port: int, ctx: ssl.SSLContext | None = None) -> Stream:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), 5)


async def closed_within(reader: asyncio.StreamReader, limit: float) -> float:
    """Seconds until the server closes the connection; fails after ``limit`` seconds.
    Nothing may be answered before the close."""
    start = time.monotonic()
    try:
        data = await asyncio.wait_for(reader.read(), limit)
    except (ConnectionResetError, ssl.SSLError):
        data = b""
    assert data == b"", f"the server answered instead of closing: {data[:200]!r}"
    return time.monotonic() - start


async def dropped_at_head_bound(reader: asyncio.StreamReader, started: float) -> None:
    """The server closes the connection once the head bound has run from ``started`` (the
    head's first byte), not before and not much later."""
    await closed_within(reader, HEAD + SLACK)
    took = time.monotonic() - started
    assert HEAD * 0.8 <= took < HEAD + SLACK, took


async def still_open(reader: asyncio.StreamReader, seconds: float) -> None:
    try:
        data = await asyncio.wait_for(reader.read(1), seconds)
    except TimeoutError:
        return
    raise AssertionError(f"connection closed or answered early: {data!r}")


async def request(stream: Stream, head: str, body: bytes = b"",
                  split: float = 0.0) -> tuple[int, bytes]:
    """Send one HTTP/1.1 request (its body after ``split`` seconds) and read the answer."""
    reader, writer = stream
    writer.write(head.encode() + b"\r\n")
    if split:
        await writer.drain()
        await asyncio.sleep(split)
    writer.write(body)
    await writer.drain()
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(v) for k, _, v in (ln.partition(":") for ln in lines[1:])
                  if k.lower() == "content-length")
    return status, await asyncio.wait_for(reader.readexactly(length), 5)


def get(path: str, node: Node | None = None) -> str:
    """A request head; to the admin API of ``node``, with a Host it serves and its key."""
    if node is None:
        return f"GET {path} HTTP/1.1\r\nHost: x\r\n"
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{node.api}\r\n"
            f"X-API-Key: {node.admin_key}\r\n")


async def close(stream: Stream) -> None:
    stream[1].close()
    try:
        await asyncio.wait_for(stream[1].wait_closed(), 2)
    except (OSError, ssl.SSLError, TimeoutError):
        pass


def test_limits_are_bounds() -> None:
    assert ListenerLimits().head_timeout == 10.0 and ListenerLimits().keepalive_timeout == 30.0
    assert ListenerLimits().tls_handshake_timeout == 10.0
    for bad in (0, -1.0):
        with pytest.raises(ValueError):
            ListenerLimits(head_timeout=bad)


async def test_admin_half_head_is_dropped_others_served(node: Node) -> None:
    slow = await connect(node.api)
    try:
        slow[1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no blank line: never ends
        await slow[1].drain()
        started = time.monotonic()
        async with aiohttp.ClientSession() as session, \
                session.get(f"http://127.0.0.1:{node.api}/healthz") as r:  # served meanwhile
            assert r.status == 200 and (await r.json())["ok"] is True
        assert time.monotonic() - started < HEAD * 0.8
        await still_open(slow[0], HEAD * 0.8 - (time.monotonic() - started))
        await dropped_at_head_bound(slow[0], started)
    finally:
        await close(slow)


async def test_admin_trickled_head_is_dropped(node: Node) -> None:
    """A byte now and then does not restart the bound: it runs from the head's first byte."""
    slow = await connect(node.api)
    try:
        started = time.monotonic()
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100
        for i in range(len(head)):
            slow[1].write(head[i:i + 1])
            try:
                await slow[1].drain()
            except ConnectionError:  # reset, or a broken pipe: dropped either way
                break
            if slow[0].at_eof() or time.monotonic() - started > HEAD + SLACK:
                break
            await asyncio.sleep(0.05)
        await dropped_at_head_bound(slow[0], started)
    finally:
        await close(slow)


async def test_peer_tls_half_head_is_dropped(node: Node) -> None:
    stream = await connect(node.peer, node.client_ctx)  # a trusted peer: handshake completes
    try:
        status, body = await request(stream, get(f"{protocol.PREFIX}/hello"))
        assert status == 200 and json.loads(body)["node_id"] == str(node.running.node.node_id)
        stream[1].write(f"GET {protocol.PREFIX}/hello HTTP/1.1\r\nHo".encode())
        await stream[1].drain()
        took = await closed_within(stream[0], HEAD + SLACK)
        assert HEAD * 0.8 <= took < HEAD + SLACK, took
    finally:
        await close(stream)


async def test_peer_silent_tcp_client_is_dropped_at_handshake_bound(node: Node) -> None:
    stream = await connect(node.peer)  # plain TCP: never sends a ClientHello
    try:
        took = await closed_within(stream[0], HANDSHAKE + SLACK)
        assert HANDSHAKE * 0.8 <= took < HANDSHAKE + SLACK, took
    finally:
        await close(stream)


async def test_idle_keepalive_connections_are_closed(node: Node) -> None:
    api = await connect(node.api)
    peer = await connect(node.peer, node.client_ctx)
    fresh = await connect(node.api)  # opened, never used
    try:
        status, _ = await request(api, get("/healthz", node))
        assert status == 200
        status, _ = await request(peer, get(f"{protocol.PREFIX}/hello"))
        assert status == 200
        # idle, not a head in progress: the head bound does not apply...
        await still_open(api[0], HEAD * 2)
        # ...the keep-alive bound does
        for stream in (api, peer, fresh):
            await closed_within(stream[0], IDLE + SLACK)
    finally:
        for stream in (api, peer, fresh):
            await close(stream)


async def test_slow_handlers_and_bodies_are_not_head_timeouts(node: Node) -> None:
    """A body arriving in pieces, a long-poll outlasting the head bound and a pause between
    requests shorter than the keep-alive bound all keep the connection."""
    stream = await connect(node.api)
    try:
        body = json.dumps({"node_id": "not-an-id"}).encode()
        head = (f"POST /api/v1/nodes HTTP/1.1\r\nHost: 127.0.0.1:{node.api}\r\n"
                f"Content-Type: application/json\r\nX-API-Key: {node.admin_key}\r\n"
                f"Content-Length: {len(body)}\r\n")
        status, answer = await request(stream, head, body, split=HEAD * 0.6)
        assert status == 400, answer
        await asyncio.sleep(HEAD * 1.5)  # idle longer than the head bound
        since = node.running.feed.last_id if node.running.feed else 0
        started = time.monotonic()
        status, _ = await request(
            stream, get(f"/api/v1/events?since={since}&timeout={HEAD * 2}", node))
        assert status == 200 and time.monotonic() - started >= HEAD * 1.5
        status, _ = await request(stream, get("/healthz", node))
        assert status == 200
    finally:
        await close(stream)


async def test_admin_body_read_is_bounded(node: Node) -> None:
    assert node.running.admin is not None
    node.running.admin.body_timeout = HEAD
    stream = await connect(node.api)
    try:
        stream[1].write(f"POST /api/v1/nodes HTTP/1.1\r\nHost: 127.0.0.1:{node.api}\r\n"
                        f"Content-Type: application/json\r\n"
                        f"X-API-Key: {node.admin_key}\r\n".encode()
                        + b"Content-Length: 100\r\n\r\n{\"node_id\": ")
        await stream[1].drain()
        started = time.monotonic()
        raw = await asyncio.wait_for(stream[0].readuntil(b"\r\n\r\n"), HEAD + SLACK)
        assert raw.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in raw
        assert time.monotonic() - started >= HEAD * 0.8
    finally:
        await close(stream)


async def test_a_trickled_push_body_is_cut_at_its_total_deadline(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each read of a pushed blob arriving in time is not enough: the whole body must
    arrive by BODY_READ_TIMEOUT + size / MIN_PUSH_RATE, or the push ends with 408 and what
    was verified so far is kept for a resume."""
    from syncnode import peer_server

    monkeypatch.setattr(peer_server, "BODY_READ_TIMEOUT", 0.5)
    monkeypatch.setattr(peer_server, "MIN_PUSH_RATE", 1 << 30)  # deadline ~0.5 s
    data = bytes(range(256)) * 64  # 16 KiB: one chunk
    h = blake3.blake3(data).hexdigest()
    offer = json.dumps({"blobs": [{"hash": h, "size": len(data), "chunks": h}]}).encode()
    stream = await connect(node.peer, node.client_ctx)
    try:
        status, answer = await request(stream, (
            "POST /peer/v1/push/offer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(offer)}\r\n"), offer)
        assert status == 200 and json.loads(answer)["want"] == [{"hash": h, "offset": 0}]
        reader, writer = stream
        writer.write(f"PUT /peer/v1/push/blobs/{h}?offset=0 HTTP/1.1\r\nHost: x\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode())
        started = time.monotonic()

        async def trickle() -> None:  # a byte every 0.1 s: each read is quick, the whole not
            for i in range(len(data)):
                writer.write(data[i:i + 1])
                await writer.drain()
                await asyncio.sleep(0.1)

        sender = asyncio.create_task(trickle())
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        assert raw.startswith(b"HTTP/1.1 408 "), raw
        assert time.monotonic() - started < 0.5 + 1.5
        assert not node.running.node.store.has(h)
    finally:
        await close(stream)
