"""Tests for tools/faultproxy.py: the fault-injecting TCP proxy used by sync tests/benchmarks.

Everything runs on 127.0.0.1 with servers started and stopped by the tests themselves. Timing
assertions use lower bounds (what a fault must at least cost) and generous upper bounds.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
import trustme
from aiohttp import web
from syncsupport import FAULTPROXY, load_faultproxy

fp = load_faultproxy()
FaultConfig = fp.FaultConfig
FaultProxy = fp.FaultProxy
ThreadedFaultProxy = fp.ThreadedFaultProxy

pytestmark = pytest.mark.timeout(30)

LOCAL = "127.0.0.1"
PAYLOAD = random.Random(1234).randbytes(1_000_000)
IO_TIMEOUT = 10.0
CHUNK = 64 * 1024


# ---------------------------------------------------------------------------- test servers
class Upstream:
    """A loopback asyncio server; records the connection errors its handlers saw."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.errors: list[BaseException] = []

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None
        return LOCAL, self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await asyncio.wait_for(self.server.wait_closed(), 5)


async def _source_handler(up: Upstream, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
    """Protocol: client sends b"GET <offset>\\n"; server streams PAYLOAD[offset:] and closes."""
    try:
        line = await reader.readline()
        offset = int(line.split()[1])
        for i in range(offset, len(PAYLOAD), CHUNK):
            writer.write(PAYLOAD[i:i + CHUNK])
            await writer.drain()
    except (ConnectionError, IndexError, ValueError) as exc:
        up.errors.append(exc)  # expected when the proxy cuts or drops the connection
    finally:
        writer.close()


async def _echo_handler(up: Upstream, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except ConnectionError as exc:
        up.errors.append(exc)
    finally:
        writer.close()


@pytest.fixture
async def source() -> AsyncIterator[Upstream]:
    up = Upstream()
    up.server = await asyncio.start_server(lambda r, w: _source_handler(up, r, w), LOCAL, 0)
    yield up
    await up.stop()


@pytest.fixture
async def echo() -> AsyncIterator[Upstream]:
    up = Upstream()
    up.server = await asyncio.start_server(lambda r, w: _echo_handler(up, r, w), LOCAL, 0)
    yield up
    await up.stop()


async def fetch(port: int, offset: int = 0) -> tuple[bytes, BaseException | None]:
    """GET PAYLOAD[offset:] through the proxy; returns what arrived and the error, if any."""
    reader, writer = await asyncio.open_connection(LOCAL, port)
    buf = bytearray()
    error: BaseException | None = None
    try:
        writer.write(b"GET %d\n" % offset)
        async with asyncio.timeout(IO_TIMEOUT):
            while chunk := await reader.read(CHUNK):
                buf += chunk
    except ConnectionError as exc:
        error = exc
    finally:
        writer.close()
    return bytes(buf), error


def diff_positions(a: bytes, b: bytes) -> list[int]:
    assert len(a) == len(b)
    return [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]


# ---------------------------------------------------------------------------- tests
async def test_passthrough_without_faults(source: Upstream, echo: Upstream) -> None:
    async with FaultProxy(upstream=source.address) as proxy:
        data, error = await fetch(proxy.port)
        assert error is None
        assert hashlib.sha256(data).digest() == hashlib.sha256(PAYLOAD).digest()
        assert proxy.stats.bytes_down == len(PAYLOAD)
        assert proxy.stats.bytes_up == len(b"GET 0\n")

    async with FaultProxy(upstream=echo.address) as proxy:
        reader, writer = await asyncio.open_connection(LOCAL, proxy.port)
        writer.write(PAYLOAD)  # full duplex: the echo comes back while we are still sending
        writer.write_eof()
        async with asyncio.timeout(IO_TIMEOUT):
            back = await reader.read(-1)
            # Both sockets of the proxied connection have TCP_NODELAY set.
            for conn in proxy._conns:
                for w in conn._writers:
                    sock = w.get_extra_info("socket")
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        writer.close()
        assert back == PAYLOAD
        stats = proxy.stats
        assert (stats.bytes_up, stats.bytes_down) == (len(PAYLOAD), len(PAYLOAD))
        assert stats.connections_accepted == 1
        assert stats.cuts == stats.bytes_corrupted == stats.connection_errors == 0


async def test_latency_adds_delay_in_both_directions(echo: Upstream) -> None:
    async with FaultProxy(upstream=echo.address, config=FaultConfig(latency_ms=50)) as proxy:
        reader, writer = await asyncio.open_connection(LOCAL, proxy.port)
        try:
            start = time.monotonic()
            writer.write(b"x" * 100)
            async with asyncio.timeout(IO_TIMEOUT):
                assert await reader.readexactly(100) == b"x" * 100
            rtt = time.monotonic() - start
        finally:
            writer.close()
    assert 0.095 <= rtt < 0.8, rtt


async def test_latency_is_pipelined_not_serialised(echo: Upstream) -> None:
    config = FaultConfig(latency_ms=300, latency_up_ms=0, latency_down_ms=100)
    async with FaultProxy(upstream=echo.address, config=config) as proxy:
        reader, writer = await asyncio.open_connection(LOCAL, proxy.port)
        loop = asyncio.get_running_loop()
        sent: list[float] = []
        received: list[float] = []

        async def send() -> None:
            for i in range(10):
                writer.write(b"msg-%04d" % i)
                sent.append(loop.time())
                await asyncio.sleep(0.02)

        async def receive() -> bytes:
            out = b""
            for _ in range(10):
                out += await reader.readexactly(8)
                received.append(loop.time())
            return out

        try:
            async with asyncio.timeout(IO_TIMEOUT):
                _, echoed = await asyncio.gather(send(), receive())
        finally:
            writer.close()
    assert echoed == b"".join(b"msg-%04d" % i for i in range(10))  # order preserved
    delays = [r - s for s, r in zip(sent, received, strict=True)]
    assert min(delays) >= 0.095, delays  # every message pays the down latency...
    # ...but the 10 messages overlap: 0.18 s of sending + 0.1 s delay, not 10 x 0.1 s.
    assert received[-1] - sent[0] < 0.7, received[-1] - sent[0]


async def test_rate_limit_per_connection(source: Upstream) -> None:
    async with FaultProxy(upstream=source.address, config=FaultConfig(rate=2_000_000)) as proxy:
        start = time.monotonic()
        data, error = await fetch(proxy.port)
        elapsed = time.monotonic() - start
    assert error is None and data == PAYLOAD
    assert 0.4 <= elapsed < 3.0, elapsed  # 1 MB at 2 MB/s


async def test_shared_rate_limit_across_connections(source: Upstream) -> None:
    config = FaultConfig(shared_rate=2_000_000)
    async with FaultProxy(upstream=source.address, config=config) as proxy:
        start = time.monotonic()
        results = await asyncio.gather(fetch(proxy.port, 500_000), fetch(proxy.port, 500_000))
        elapsed = time.monotonic() - start
    for data, error in results:
        assert error is None and data == PAYLOAD[500_000:]
    assert 0.4 <= elapsed < 3.0, elapsed  # 2 x 500 kB sharing 2 MB/s


async def test_cut_after_bytes_resets_connection(source: Upstream) -> None:
    config = FaultConfig(cut_after_bytes=100_000)
    async with FaultProxy(upstream=source.address, config=config) as proxy:
        data, error = await fetch(proxy.port)
        assert isinstance(error, ConnectionResetError), error
        assert len(data) <= 100_000 and data == PAYLOAD[:len(data)]
        assert proxy.stats.bytes_down == 100_000  # the proxy forwarded exactly N bytes
        assert proxy.stats.cuts == 1
        assert proxy.stats.cuts_by_reason == {"after_bytes": 1}
        # The per-connection limit applies again to the next connection.
        data, error = await fetch(proxy.port)
        assert len(data) <= 100_000 and proxy.stats.cuts == 2


async def test_cut_after_bytes_with_fin_delivers_exactly_n(source: Upstream) -> None:
    config = FaultConfig(cut_after_bytes=100_000, cut_reset=False)
    async with FaultProxy(upstream=source.address, config=config) as proxy:
        data, error = await fetch(proxy.port)
    assert error is None
    assert data == PAYLOAD[:100_000]
    assert proxy.stats.cuts == 1


async def test_cut_every_bytes_across_reconnects(source: Upstream) -> None:
    every = 150_000
    config = FaultConfig(cut_every_bytes=every)
    async with FaultProxy(upstream=source.address, config=config) as proxy:
        got = bytearray()
        attempts = 0
        while len(got) < len(PAYLOAD) and attempts < 50:  # resume where the cut left us
            data, _ = await fetch(proxy.port, len(got))
            got += data
            attempts += 1
        stats = proxy.stats
    assert got == PAYLOAD
    assert stats.cuts >= len(PAYLOAD) // every  # 6: every boundary crossed was cut
    assert stats.cuts == stats.bytes_down // every
    assert stats.cuts_by_reason == {"every_bytes": stats.cuts}
    assert stats.cuts <= attempts <= stats.cuts + 1
    assert stats.connections_accepted == attempts


async def test_random_cuts_are_bounded_by_max_cuts(source: Upstream) -> None:
    config = FaultConfig(cut_probability=1.0, max_cuts=2, seed=3)
    async with FaultProxy(upstream=source.address, config=config) as proxy:
        results = [await fetch(proxy.port) for _ in range(3)]
        stats = proxy.stats
    assert [len(d) < len(PAYLOAD) for d, _ in results] == [True, True, False]
    assert results[2] == (PAYLOAD, None)
    assert stats.cuts == 2 and stats.cuts_by_reason == {"random": 2}


async def test_corrupt_every_bytes_then_heal(source: Upstream) -> None:
    config = FaultConfig(corrupt_every_bytes=10_000, seed=5)
    async with FaultProxy(upstream=source.address, config=config) as proxy:
        data, error = await fetch(proxy.port)
        assert error is None
        assert hashlib.sha256(data).digest() != hashlib.sha256(PAYLOAD).digest()
        positions = diff_positions(data, PAYLOAD)
        assert positions == list(range(9_999, len(PAYLOAD), 10_000))
        assert all((data[i] ^ PAYLOAD[i]).bit_count() == 1 for i in positions)  # 1 bit each
        assert proxy.stats.bytes_corrupted_down == len(positions) == 100
        assert proxy.stats.bytes_corrupted_up == 0  # the 6-byte request is below N

        proxy.config.corrupt_every_bytes = None  # heal the link at runtime
        data, error = await fetch(proxy.port)
        assert error is None and data == PAYLOAD
        assert proxy.stats.bytes_corrupted == 100


async def test_max_corruptions(source: Upstream) -> None:
    config = FaultConfig(corrupt_every_bytes_down=1000, max_corruptions=5)
    async with FaultProxy(upstream=source.address, config=config) as proxy:
        data, _ = await fetch(proxy.port)
    assert diff_positions(data, PAYLOAD) == [999, 1999, 2999, 3999, 4999]
    assert proxy.stats.bytes_corrupted == 5


async def test_random_corruption_is_reproducible_with_seed(source: Upstream) -> None:
    outputs = []
    # Same seed, different chunk sizes: positions depend on the byte stream, not chunking.
    for seed, chunk in ((11, 64 * 1024), (11, 4096), (12, 64 * 1024)):
        config = FaultConfig(corrupt_probability_down=1e-4, seed=seed, chunk_size=chunk)
        async with FaultProxy(upstream=source.address, config=config) as proxy:
            data, error = await fetch(proxy.port)
            assert error is None
            corrupted = len(diff_positions(data, PAYLOAD))
            assert corrupted == proxy.stats.bytes_corrupted_down
            assert 40 <= corrupted <= 200  # expected 100
            proxy.config.heal()
            assert await fetch(proxy.port) == (PAYLOAD, None)
        outputs.append(data)
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]


async def test_pause_drop_refuse_blackhole_and_resume(source: Upstream) -> None:
    async with FaultProxy(upstream=source.address) as proxy:
        proxy.pause("drop")
        data, _ = await fetch(proxy.port)
        assert data == b"" and proxy.stats.connections_dropped == 1
        proxy.resume()
        assert await fetch(proxy.port) == (PAYLOAD, None)

        proxy.pause("refuse")
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(LOCAL, proxy.port)
        proxy.resume()
        assert await fetch(proxy.port) == (PAYLOAD, None)  # same port again

        proxy.pause("blackhole")
        pending = asyncio.create_task(fetch(proxy.port))
        await asyncio.sleep(0.2)
        assert not pending.done()
        proxy.resume()
        assert await pending == (PAYLOAD, None)


async def test_pause_freezes_or_cuts_existing_connections(echo: Upstream) -> None:
    async with FaultProxy(upstream=echo.address) as proxy:
        reader, writer = await asyncio.open_connection(LOCAL, proxy.port)
        try:
            async with asyncio.timeout(IO_TIMEOUT):
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
                proxy.pause()  # dead link: nothing moves, nothing is closed
                writer.write(b"pong")
                pending = asyncio.create_task(reader.readexactly(4))
                await asyncio.sleep(0.2)
                assert not pending.done()
                proxy.resume()
                assert await pending == b"pong"

                proxy.pause(existing="cut")
                with pytest.raises(ConnectionResetError):
                    await reader.read(10)
        finally:
            writer.close()
        assert proxy.stats.cuts_by_reason == {"pause": 1}


def test_threaded_proxy_from_synchronous_code() -> None:
    class EchoHandler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            while data := self.request.recv(CHUNK):
                self.request.sendall(data)

    server = socketserver.ThreadingTCPServer((LOCAL, 0), EchoHandler)
    server.daemon_threads = True
    server_thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                     daemon=True)
    server_thread.start()

    def roundtrip(port: int, size: int) -> tuple[bytes, float]:
        with socket.create_connection((LOCAL, port), timeout=IO_TIMEOUT) as sock:
            start = time.monotonic()
            sock.sendall(b"y" * size)
            got = b""
            while len(got) < size:
                chunk = sock.recv(CHUNK)
                assert chunk, "connection closed early"
                got += chunk
            return got, time.monotonic() - start

    try:
        config = FaultConfig(latency_ms=30)
        with ThreadedFaultProxy(upstream=server.server_address, config=config) as proxy:
            got, rtt = roundtrip(proxy.port, 1000)
            assert got == b"y" * 1000 and rtt >= 0.055
            proxy.config.latency_ms = 0  # runtime change from this thread
            proxy.pause("refuse")
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((LOCAL, proxy.port), timeout=IO_TIMEOUT)
            proxy.resume()
            got, rtt = roundtrip(proxy.port, 1000)
            assert got == b"y" * 1000
            snap = proxy.snapshot()
            port = proxy.port
        assert snap["connections_accepted"] == 2
        assert snap["bytes_up"] == 2000
        assert snap["bytes_down"] == 2000
        with pytest.raises(ConnectionRefusedError):  # stopped: nothing listens any more
            socket.create_connection((LOCAL, port), timeout=IO_TIMEOUT)
    finally:
        server.shutdown()
        server.server_close()
        server_thread.join(5)


async def test_mutual_tls_end_to_end_through_proxy() -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(LOCAL, "localhost").configure_cert(server_ctx)
    ca.configure_trust(server_ctx)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    ca.issue_cert("syncnode-client.test").configure_cert(client_ctx)

    body = random.Random(7).randbytes(2_000_000)
    peer_certs: list[object] = []

    async def blob(request: web.Request) -> web.Response:
        assert request.transport is not None
        peer_certs.append(request.transport.get_extra_info("peercert"))
        return web.Response(body=body)

    app = web.Application()
    app.router.add_get("/blob", blob)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, LOCAL, 0, ssl_context=server_ctx).start()
    port = runner.addresses[0][1]
    timeout = aiohttp.ClientTimeout(total=IO_TIMEOUT)
    try:
        async with (
            FaultProxy(upstream=(LOCAL, port)) as proxy,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ctx, force_close=True),
                                  timeout=timeout) as session,
        ):
            url = f"https://{LOCAL}:{proxy.port}/blob"
            async with session.get(url) as response:
                assert response.status == 200
                assert hashlib.sha256(await response.read()).digest() == \
                    hashlib.sha256(body).digest()
            assert peer_certs and peer_certs[0]  # the server saw the client certificate

            proxy.config.corrupt_every_bytes_down = 100_000  # TLS must detect a bit flip
            with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
                async with session.get(url) as response:
                    await response.read()
            assert proxy.stats.bytes_corrupted_down >= 1

            proxy.config.heal()
            async with session.get(url) as response:
                assert await response.read() == body
            assert proxy.stats.cuts == 0
    finally:
        await runner.cleanup()


async def test_cli_forwards_and_prints_stats_on_sigterm(source: Upstream) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(FAULTPROXY), "--listen", f"{LOCAL}:0",
        "--upstream", f"{source.address[0]}:{source.address[1]}",
        "--latency-ms", "5", "--rate", "50M", "--corrupt-every", "100K", "--seed", "1",
        "--duration", "30",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), IO_TIMEOUT)).decode()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert match, line
        data, error = await fetch(int(match.group(1)))
        assert error is None
        corrupted = diff_positions(data, PAYLOAD)
        assert len(corrupted) == len(PAYLOAD) // 102_400
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), IO_TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    stats = json.loads(out.decode().split("faultproxy stats: ", 1)[1])
    assert stats["bytes_down"] == len(PAYLOAD)
    assert stats["bytes_corrupted_down"] == len(corrupted)
    assert stats["connections_accepted"] == 1


def test_cli_help_and_duration() -> None:
    help_run = subprocess.run([sys.executable, str(FAULTPROXY), "--help"], capture_output=True,
                              text=True, timeout=IO_TIMEOUT, check=True)
    for option in ("--latency-ms", "--rate", "--cut-every", "--corrupt-every", "--seed"):
        assert option in help_run.stdout
    timed = subprocess.run(
        [sys.executable, str(FAULTPROXY), "--upstream", f"{LOCAL}:9", "--duration", "0.2"],
        capture_output=True, text=True, timeout=IO_TIMEOUT, check=False)
    assert timed.returncode == 0, timed.stderr
    assert "faultproxy stats: " in timed.stdout


def test_parse_size_and_config_validation() -> None:
    assert fp.parse_size("1000") == 1000
    assert fp.parse_size("64K") == 64 * 1024
    assert fp.parse_size("10M") == 10 * 1024**2
    assert fp.parse_size("1.5GiB") == int(1.5 * 1024**3)
    with pytest.raises(ValueError):
        fp.parse_size("ten")
    with pytest.raises(ValueError):
        FaultConfig(cut_probability=2.0)
    with pytest.raises(ValueError):
        FaultConfig(rate=-1)
    config = FaultConfig(latency_ms=10, latency_down_ms=0, corrupt_every_bytes=5,
                         corrupt_every_bytes_up=0)
    assert (config.latency_s("up"), config.latency_s("down")) == (0.01, 0.0)
    assert (config.corrupt_every_for("up"), config.corrupt_every_for("down")) == (None, 5)


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = {t for t in threading.enumerate() if t.name == "faultproxy"}
    yield
    leaked = {t for t in threading.enumerate() if t.name == "faultproxy"} - before
    assert not leaked, leaked
