#!/usr/bin/env python3
"""Fault-injecting asyncio TCP proxy for syncnode sync tests and benchmarks.

The proxy sits between two syncnode peers (client -> proxy -> upstream server). It works on
raw bytes and knows nothing about TLS or HTTP, so mutual-TLS connections pass through it
unchanged when no fault is configured. "up" is client -> server, "down" is server -> client.

Faults (all off by default, see :class:`FaultConfig`):

* latency: a fixed one-way delay per direction, modelled as a timestamped FIFO per direction,
  so data keeps flowing (pipelined) instead of being serialised behind sleeps;
* bandwidth: token buckets per connection and/or shared by all connections, per direction;
* cuts: after N counted bytes on a connection, every N counted bytes over the proxy's lifetime
  (across reconnects), or at random per chunk; a cut closes both sides (RST via SO_LINGER 0
  by default); ``max_cuts`` bounds the total;
* corruption: single-bit flips every N bytes and/or with a per-byte probability, per
  direction, positioned in each direction's lifetime byte stream; ``max_corruptions`` bounds
  the total.

Invariants:

* Per direction, bytes are forwarded in order, never duplicated or reordered. The only
  modifications are declared corruptions: each one flips exactly one bit and is counted in
  :class:`FaultStats`.
* Every cut is counted in ``stats.cuts``. With ``cut_after_bytes=N`` exactly N counted bytes
  of a connection are handed to the kernel before the cut (with RST, bytes still in kernel
  buffers may be lost, as on a real reset link).
* Memory is bounded: data moves in chunks of at most ``chunk_size`` bytes, each direction of
  a connection queues at most about ``buffer_bytes`` and every write awaits ``drain()``.
* Corruption positions (and flipped bits) depend only on the seed and the position in the
  direction's lifetime stream, not on how the data was chunked. Random cuts depend on the
  chunking, so they are reproducible only for the same sequence of chunks.
* The configuration is read again for every chunk, so changes made at runtime (``proxy.config.x
  = ...``, :meth:`FaultConfig.heal`) apply from the next chunk on.
* :class:`FaultProxy` must be used from the thread running its event loop;
  :class:`ThreadedFaultProxy` runs one in a background thread and forwards calls to it.

Library use::

    async with FaultProxy(upstream=("127.0.0.1", port), config=FaultConfig(latency_ms=20)) as p:
        connect_to(p.port); print(p.stats.snapshot())

CLI use (``--help`` lists every option; Ctrl-C or SIGTERM stops it and prints stats)::

    python tools/faultproxy.py --listen 127.0.0.1:9000 --upstream 127.0.0.1:8443 \\
        --latency-ms 20 --rate 10M --cut-every 50M --corrupt-every 1M --seed 1
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import math
import random
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Self, TypeVar

__all__ = [
    "FaultConfig",
    "FaultProxy",
    "FaultStats",
    "ThreadedFaultProxy",
    "main",
    "parse_size",
]

log = logging.getLogger("syncnode.faultproxy")

Direction = Literal["up", "down"]
DirectionSel = Literal["up", "down", "both"]
PauseMode = Literal["drop", "refuse", "blackhole"]
ExistingMode = Literal["freeze", "keep", "cut"]
Address = tuple[str, int]
T = TypeVar("T")

DIRECTIONS: tuple[Direction, Direction] = ("up", "down")
_CLOSE_TIMEOUT_S = 5.0


def _pick(specific: T | None, general: T) -> T:
    return general if specific is None else specific


@dataclass
class FaultConfig:
    """Fault settings. Everything is off by default. Mutable at runtime.

    Fields with an ``_up``/``_down`` suffix override the general field for one direction when
    they are not None (use 0 to switch a direction off while the general field is set).
    """

    # Latency: one-way delay added to every chunk, per direction.
    latency_ms: float = 0.0
    latency_up_ms: float | None = None
    latency_down_ms: float | None = None
    # Bandwidth caps in bytes/s (None or 0 = unlimited), each direction separately.
    rate: float | None = None  # per connection
    rate_up: float | None = None
    rate_down: float | None = None
    shared_rate: float | None = None  # total over all connections
    shared_rate_up: float | None = None
    shared_rate_down: float | None = None
    # Cuts. Bytes of ``cut_direction`` count towards the two byte thresholds, and chunks of
    # ``cut_direction`` are subject to ``cut_probability``.
    cut_after_bytes: int | None = None  # per connection
    cut_every_bytes: int | None = None  # lifetime counter across all connections
    cut_probability: float = 0.0  # per chunk
    cut_direction: DirectionSel = "down"
    cut_reset: bool = True  # True: RST (SO_LINGER 0); False: close after flushing (FIN)
    max_cuts: int | None = None
    # Corruption: flip one bit in one byte every N bytes / with probability per byte.
    corrupt_every_bytes: int | None = None
    corrupt_every_bytes_up: int | None = None
    corrupt_every_bytes_down: int | None = None
    corrupt_probability: float = 0.0
    corrupt_probability_up: float | None = None
    corrupt_probability_down: float | None = None
    max_corruptions: int | None = None
    # Randomness: None picks a seed at random (logged and exposed as FaultProxy.seed).
    seed: int | None = None
    # Plumbing.
    chunk_size: int = 64 * 1024
    buffer_bytes: int = 4 * 1024 * 1024  # max queued per direction per connection
    connect_timeout: float = 10.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError if a setting is out of range."""
        for name in ("cut_probability", "corrupt_probability", "corrupt_probability_up",
                     "corrupt_probability_down"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value!r}")
        for name in ("latency_ms", "latency_up_ms", "latency_down_ms", "rate", "rate_up",
                     "rate_down", "shared_rate", "shared_rate_up", "shared_rate_down",
                     "cut_after_bytes", "max_cuts", "max_corruptions"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        for name in ("cut_every_bytes", "corrupt_every_bytes", "corrupt_every_bytes_up",
                     "corrupt_every_bytes_down"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 (0 or None = off), got {value!r}")
        if self.cut_direction not in ("up", "down", "both"):
            raise ValueError(f"cut_direction must be up, down or both, got {self.cut_direction!r}")
        if self.chunk_size < 1 or self.buffer_bytes < 1:
            raise ValueError("chunk_size and buffer_bytes must be >= 1")
        if self.connect_timeout <= 0:
            raise ValueError("connect_timeout must be > 0")

    def heal(self) -> None:
        """Switch off every cut and corruption setting (latency and rates are kept)."""
        self.cut_after_bytes = None
        self.cut_every_bytes = None
        self.cut_probability = 0.0
        self.corrupt_every_bytes = None
        self.corrupt_every_bytes_up = None
        self.corrupt_every_bytes_down = None
        self.corrupt_probability = 0.0
        self.corrupt_probability_up = None
        self.corrupt_probability_down = None

    # Effective per-direction values.
    def latency_s(self, d: Direction) -> float:
        specific = self.latency_up_ms if d == "up" else self.latency_down_ms
        return max(0.0, float(_pick(specific, self.latency_ms) or 0.0)) / 1000.0

    def rate_for(self, d: Direction) -> float | None:
        value = _pick(self.rate_up if d == "up" else self.rate_down, self.rate)
        return float(value) if value else None

    def shared_rate_for(self, d: Direction) -> float | None:
        specific = self.shared_rate_up if d == "up" else self.shared_rate_down
        value = _pick(specific, self.shared_rate)
        return float(value) if value else None

    def corrupt_every_for(self, d: Direction) -> int | None:
        specific = self.corrupt_every_bytes_up if d == "up" else self.corrupt_every_bytes_down
        value = _pick(specific, self.corrupt_every_bytes)
        return int(value) if value else None

    def corrupt_probability_for(self, d: Direction) -> float:
        specific = self.corrupt_probability_up if d == "up" else self.corrupt_probability_down
        return float(_pick(specific, self.corrupt_probability) or 0.0)

    def cuts_count(self, d: Direction) -> bool:
        return self.cut_direction in (d, "both")


@dataclass
class FaultStats:
    """Counters. Updated only on the proxy's event-loop thread; use snapshot() elsewhere."""

    connections_accepted: int = 0
    connections_active: int = 0
    connections_dropped: int = 0  # refused/dropped while paused
    upstream_connect_failures: int = 0
    connection_errors: int = 0  # resets/errors raised by a peer (not by our cuts)
    bytes_up: int = 0  # handed to the upstream socket
    bytes_down: int = 0  # handed to the client socket
    cuts: int = 0
    cuts_by_reason: dict[str, int] = field(default_factory=dict)
    bytes_corrupted_up: int = 0
    bytes_corrupted_down: int = 0

    @property
    def bytes_corrupted(self) -> int:
        return self.bytes_corrupted_up + self.bytes_corrupted_down

    def snapshot(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["bytes_corrupted"] = self.bytes_corrupted
        return data


class _TokenBucket:
    """Debt-based token bucket: reserve() returns how long the caller must wait."""

    def __init__(self) -> None:
        self._tokens = 0.0
        self._last = time.monotonic()
        self._rate: float | None = None

    def reserve(self, n: int, rate: float | None) -> float:
        now = time.monotonic()
        if rate is None:
            self._rate = None
            self._last = now
            return 0.0
        burst = max(_slice_for(rate), rate * 0.02) * 2
        if self._rate is None:  # (re)enabled: start with a full bucket
            self._tokens = burst
        else:
            self._tokens = min(burst, self._tokens + (now - self._last) * rate)
        self._rate = rate
        self._last = now
        self._tokens -= n
        return -self._tokens / rate if self._tokens < 0 else 0.0


def _slice_for(rate: float) -> int:
    """Write granularity under a rate cap: about 10 ms worth of data, at least 256 bytes."""
    return max(256, int(rate / 100))


def _geometric_gap(rng: random.Random, p: float) -> int:
    """Distance (>= 1) to the next success of a per-byte Bernoulli(p) process."""
    if p >= 1.0:
        return 1
    return int(math.log1p(-rng.random()) / math.log1p(-p)) + 1


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        log.warning("could not set TCP_NODELAY: %s", exc)


def _close_writer(writer: asyncio.StreamWriter, rst: bool) -> None:
    """Close abruptly: RST via SO_LINGER 0 (rst=True) or close after flushing (FIN)."""
    transport = writer.transport
    if transport.is_closing() and not rst:
        return
    if rst:
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.fileno() != -1:  # -1: already closed, nothing to reset
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError as exc:
                log.debug("SO_LINGER 0 failed (%s); closing without RST", exc)
        transport.abort()
    else:
        transport.close()


class _RandomCorruptState:
    def __init__(self) -> None:
        self.p = 0.0
        self.next_pos = -1  # absolute stream position of the next flip, -1 = not drawn


class _Connection:
    """One client connection and its upstream connection: 2 readers + 2 writers."""

    def __init__(self, proxy: FaultProxy, cid: int,
                 c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter,
                 u_reader: asyncio.StreamReader, u_writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.cid = cid
        self._src = {"up": c_reader, "down": u_reader}
        self._dst = {"up": u_writer, "down": c_writer}
        self._writers = (c_writer, u_writer)
        cfg = proxy.config
        qsize = max(2, cfg.buffer_bytes // cfg.chunk_size)
        self._queues: dict[Direction, asyncio.Queue[tuple[float, bytes]]] = {
            d: asyncio.Queue(maxsize=qsize) for d in DIRECTIONS}
        self._buckets = {d: _TokenBucket() for d in DIRECTIONS}
        self.bytes = {"up": 0, "down": 0}
        self._cut_counted = 0  # bytes counted towards cut_after_bytes on this connection
        self._tasks: list[asyncio.Task[None]] = []
        self.closed = False

    async def run(self) -> None:
        clean = False
        try:
            async with asyncio.TaskGroup() as tg:
                for d in DIRECTIONS:
                    self._tasks.append(tg.create_task(self._read_loop(d)))
                    self._tasks.append(tg.create_task(self._write_loop(d)))
            clean = not self.closed
        except* OSError as group:
            if not self.closed:
                self.proxy.stats.connection_errors += 1
                log.debug("connection %d: peer error: %r", self.cid, group.exceptions)
        except* Exception as group:
            log.error("connection %d: unexpected error", self.cid, exc_info=group)
        finally:
            if clean:
                await self._close_gracefully()
            elif not self.closed:
                self.abort()

    async def _close_gracefully(self) -> None:
        self.closed = True
        for w in self._writers:
            w.close()
        for w in self._writers:
            try:
                await asyncio.wait_for(w.wait_closed(), _CLOSE_TIMEOUT_S)
            except (OSError, TimeoutError) as exc:
                log.debug("connection %d: close did not finish cleanly: %r", self.cid, exc)
                _close_writer(w, rst=True)

    def abort(self) -> None:
        """Reset both sides without counting a cut (errors, proxy shutdown)."""
        if self.closed:
            return
        self.closed = True
        for w in self._writers:
            _close_writer(w, rst=True)
        self._cancel_tasks()

    def cut(self, reason: str) -> None:
        """Perform a counted cut: close both sides abruptly."""
        if self.closed:
            return
        self.closed = True
        stats = self.proxy.stats
        stats.cuts += 1
        stats.cuts_by_reason[reason] = stats.cuts_by_reason.get(reason, 0) + 1
        log.info("connection %d: cut (%s) after %d bytes up, %d bytes down", self.cid, reason,
                 self.bytes["up"], self.bytes["down"])
        rst = self.proxy.config.cut_reset
        for w in self._writers:
            _close_writer(w, rst=rst)
        self._cancel_tasks()

    def _cancel_tasks(self) -> None:
        current = asyncio.current_task()
        for t in self._tasks:
            if t is not current:
                t.cancel()

    async def _read_loop(self, d: Direction) -> None:
        src, queue = self._src[d], self._queues[d]
        loop = asyncio.get_running_loop()
        while True:
            data = await src.read(self.proxy.config.chunk_size)
            await queue.put((loop.time() + self.proxy.config.latency_s(d), data))
            if not data:
                return

    async def _write_loop(self, d: Direction) -> None:
        dst, queue = self._dst[d], self._queues[d]
        loop = asyncio.get_running_loop()
        proxy = self.proxy
        while True:
            due, data = await queue.get()
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await proxy._flow.wait()
            if not data:
                if dst.can_write_eof():
                    dst.write_eof()
                await dst.drain()
                return
            if not await self._forward(d, dst, data):
                return

    async def _forward(self, d: Direction, dst: asyncio.StreamWriter, data: bytes) -> bool:
        """Forward one chunk applying faults. Returns False if the connection was cut."""
        proxy = self.proxy
        cfg = proxy.config
        random_cut_at: int | None = None
        if (cfg.cut_probability > 0 and cfg.cuts_count(d) and proxy._cuts_allowed()
                and proxy._rng_cut.random() < cfg.cut_probability):
            random_cut_at = proxy._rng_cut.randrange(len(data) + 1)
        pos = 0
        while pos < len(data) or random_cut_at == pos:
            await proxy._flow.wait()
            cfg = proxy.config
            n = len(data) - pos
            rate, shared = cfg.rate_for(d), cfg.shared_rate_for(d)
            if rate or shared:
                n = min(n, _slice_for(min(r for r in (rate, shared) if r)))
                wait = max(self._buckets[d].reserve(n, rate),
                           proxy._shared_buckets[d].reserve(n, shared))
                if wait > 0:
                    await asyncio.sleep(wait)
                if self.closed:
                    return False
            # From here to write() nothing awaits, so the cut decision cannot go stale.
            reason: str | None = None
            limit = self._cut_limit(d)
            if limit is not None and limit[0] <= n:
                n, reason = max(0, limit[0]), limit[1]
            if random_cut_at is not None and random_cut_at - pos <= n:
                n, reason = random_cut_at - pos, "random"
            if n > 0:
                piece = data if n == len(data) else data[pos:pos + n]
                dst.write(proxy._corrupt(d, piece))
                self._account(d, n)
                pos += n
            if reason is not None:
                self.cut(reason)
                return False
            await dst.drain()
        return True

    def _cut_limit(self, d: Direction) -> tuple[int, str] | None:
        cfg = self.proxy.config
        if not cfg.cuts_count(d) or not self.proxy._cuts_allowed():
            return None
        best: tuple[int, str] | None = None
        if cfg.cut_after_bytes is not None:
            best = (cfg.cut_after_bytes - self._cut_counted, "after_bytes")
        if cfg.cut_every_bytes:
            every = cfg.cut_every_bytes
            limit = every - self.proxy._cut_every_counted % every
            if best is None or limit < best[0]:
                best = (limit, "every_bytes")
        return best

    def _account(self, d: Direction, n: int) -> None:
        self.bytes[d] += n
        stats = self.proxy.stats
        if d == "up":
            stats.bytes_up += n
        else:
            stats.bytes_down += n
        if self.proxy.config.cuts_count(d):
            self._cut_counted += n
            self.proxy._cut_every_counted += n


class FaultProxy:
    """Asyncio fault-injecting TCP proxy. Use ``async with`` or start()/stop()."""

    def __init__(self, upstream: Address, listen: Address = ("127.0.0.1", 0),
                 config: FaultConfig | None = None) -> None:
        self.upstream = upstream
        self.listen = listen
        self.config = config if config is not None else FaultConfig()
        self.stats = FaultStats()
        seed = self.config.seed
        self.seed: int = seed if seed is not None else random.SystemRandom().randrange(2**32)
        self._rng_cut = random.Random(f"{self.seed}/cut")
        self._rng_every = {d: random.Random(f"{self.seed}/every/{d}") for d in DIRECTIONS}
        self._rng_prob = {d: random.Random(f"{self.seed}/prob/{d}") for d in DIRECTIONS}
        self._random_corrupt = {d: _RandomCorruptState() for d in DIRECTIONS}
        self._stream_pos = {"up": 0, "down": 0}  # lifetime bytes per direction (corruption)
        self._cut_every_counted = 0
        self._shared_buckets = {d: _TokenBucket() for d in DIRECTIONS}
        self._server: asyncio.Server | None = None
        self._bound: tuple[Any, ...] | None = None
        self._family = socket.AF_INET
        self._restart_task: asyncio.Task[None] | None = None
        self._pending_sock: socket.socket | None = None
        self._conns: set[_Connection] = set()
        self._handler_tasks: dict[asyncio.Task[Any], asyncio.Task[None]] = {}  # outer -> inner
        self._pause_mode: PauseMode | None = None
        self._admit = asyncio.Event()
        self._admit.set()
        self._flow = asyncio.Event()
        self._flow.set()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("proxy already started")
        self.config.validate()
        self._server = await asyncio.start_server(self._on_client, self.listen[0], self.listen[1])
        sock = self._server.sockets[0]
        self._bound = sock.getsockname()
        self._family = sock.family
        if self.config.seed is None:
            log.info("faultproxy seed %d (pass seed= to reproduce)", self.seed)
        log.info("faultproxy listening on %s:%d -> %s:%d", self.host, self.port, *self.upstream)
        return self

    async def stop(self) -> None:
        """Stop listening, reset every connection and wait (bounded) for handlers to end."""
        self._cancel_restart()
        if self._restart_task is not None:
            await asyncio.wait([self._restart_task], timeout=_CLOSE_TIMEOUT_S)
            self._restart_task = None
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for conn in list(self._conns):
            conn.abort()
        for inner in self._handler_tasks.values():
            inner.cancel()
        tasks = list(self._handler_tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=_CLOSE_TIMEOUT_S)
            if pending:
                log.warning("%d connection handlers did not stop in time", len(pending))
        if server is not None:
            try:
                await asyncio.wait_for(server.wait_closed(), _CLOSE_TIMEOUT_S)
            except TimeoutError:
                log.warning("listening server did not close in time")

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._bound is None:
            raise RuntimeError("proxy not started")
        return int(self._bound[1])

    @property
    def host(self) -> str:
        if self._bound is None:
            raise RuntimeError("proxy not started")
        return str(self._bound[0])

    @property
    def address(self) -> Address:
        return (self.host, self.port)

    # ------------------------------------------------------------------ runtime control
    @property
    def paused(self) -> bool:
        return self._pause_mode is not None

    def pause(self, mode: PauseMode = "drop", existing: ExistingMode = "freeze") -> None:
        """Simulate a dead link until resume().

        mode -- what happens to new connections: "drop" accepts and resets them at once,
            "refuse" closes the listening socket (connection refused), "blackhole" accepts
            them but forwards nothing until resume().
        existing -- open connections: "freeze" stops forwarding (no error, data waits),
            "keep" leaves them running, "cut" cuts them (counted as cuts).
        """
        if mode not in ("drop", "refuse", "blackhole"):
            raise ValueError(f"unknown pause mode {mode!r}")
        if existing not in ("freeze", "keep", "cut"):
            raise ValueError(f"unknown existing-connection mode {existing!r}")
        if self._server is None:
            raise RuntimeError("proxy not started")
        if self._pause_mode == "refuse" and mode != "refuse":
            self._relisten()
        elif (mode == "refuse" and self._pause_mode != "refuse"
              and not self._cancel_restart()):
            self._server.close()
        self._pause_mode = mode
        self._admit.clear()
        if existing == "freeze":
            self._flow.clear()
        else:
            self._flow.set()
        if existing == "cut":
            self.cut_all("pause")
        log.info("paused (new connections: %s, existing: %s)", mode, existing)

    def resume(self) -> None:
        """Undo pause(): accept and forward again (frozen data then flows on)."""
        if self._pause_mode == "refuse":
            self._relisten()
        self._pause_mode = None
        self._admit.set()
        self._flow.set()
        log.info("resumed")

    def cut_all(self, reason: str = "manual") -> int:
        """Cut every open connection now (counted as cuts, ignores max_cuts). Returns count."""
        conns = [c for c in self._conns if not c.closed]
        for conn in conns:
            conn.cut(reason)
        return len(conns)

    def _relisten(self) -> None:
        # Bind and listen synchronously so that connects succeed (backlog) from now on.
        assert self._bound is not None
        sock = socket.socket(self._family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(self._bound)
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._pending_sock = sock

        async def serve() -> None:
            self._server = await asyncio.start_server(self._on_client, sock=sock)
            self._pending_sock = None

        self._restart_task = asyncio.get_running_loop().create_task(serve())

    def _cancel_restart(self) -> bool:
        """Abort a relisten still in progress. Returns True if there was one."""
        task, sock = self._restart_task, self._pending_sock
        if task is None or task.done() or sock is None:
            return False
        task.cancel()
        sock.close()
        self._pending_sock = None
        log.debug("cancelled pending relisten")
        return True

    # ------------------------------------------------------------------ internals
    def _cuts_allowed(self) -> bool:
        limit = self.config.max_cuts
        return limit is None or self.stats.cuts < limit

    def _corruptions_allowed(self) -> bool:
        limit = self.config.max_corruptions
        return limit is None or self.stats.bytes_corrupted < limit

    def _flip(self, d: Direction, piece: bytearray, index: int, rng: random.Random) -> None:
        piece[index] ^= 1 << rng.randrange(8)
        if d == "up":
            self.stats.bytes_corrupted_up += 1
        else:
            self.stats.bytes_corrupted_down += 1

    def _corrupt(self, d: Direction, piece: bytes) -> bytes | bytearray:
        """Apply corruption to a piece starting at this direction's stream position.

        Returns the piece itself when nothing is flipped, else a corrupted copy.
        """
        start = self._stream_pos[d]
        end = start + len(piece)
        self._stream_pos[d] = end
        cfg = self.config
        out: bytearray | None = None
        every = cfg.corrupt_every_for(d)
        if every:
            pos = start + (every - 1 - start) % every  # the every-th, 2*every-th ... byte
            while pos < end and self._corruptions_allowed():
                out = out if out is not None else bytearray(piece)
                self._flip(d, out, pos - start, self._rng_every[d])
                pos += every
        p = cfg.corrupt_probability_for(d)
        state = self._random_corrupt[d]
        if p <= 0:
            state.p, state.next_pos = 0.0, -1
            return piece if out is None else out
        rng = self._rng_prob[d]
        if state.p != p or state.next_pos < start:
            state.p = p
            state.next_pos = start + _geometric_gap(rng, p) - 1
        while state.next_pos < end and self._corruptions_allowed():
            out = out if out is not None else bytearray(piece)
            self._flip(d, out, state.next_pos - start, rng)
            state.next_pos += _geometric_gap(rng, p)
        return piece if out is None else out

    async def _on_client(self, c_reader: asyncio.StreamReader,
                         c_writer: asyncio.StreamWriter) -> None:
        # The work runs in an inner task so that stop() can cancel it without cancelling the
        # task asyncio.start_server created (Python 3.11 logs an error when that one is
        # cancelled).
        outer = asyncio.current_task()
        assert outer is not None
        self.stats.connections_accepted += 1
        self.stats.connections_active += 1
        cid = self.stats.connections_accepted
        inner = asyncio.get_running_loop().create_task(
            self._serve_client(cid, c_reader, c_writer))
        self._handler_tasks[outer] = inner
        try:
            await asyncio.wait([inner])
        except asyncio.CancelledError:
            inner.cancel()
            raise
        finally:
            self.stats.connections_active -= 1
            del self._handler_tasks[outer]
        if not inner.cancelled() and inner.exception() is not None:
            log.error("connection %d: handler failed", cid, exc_info=inner.exception())

    async def _serve_client(self, cid: int, c_reader: asyncio.StreamReader,
                            c_writer: asyncio.StreamWriter) -> None:
        _set_nodelay(c_writer)
        if self._pause_mode == "blackhole":
            await self._admit.wait()
        elif self._pause_mode is not None:  # drop (or refuse, accepted from the old backlog)
            self.stats.connections_dropped += 1
            log.debug("connection %d dropped: proxy paused (%s)", cid, self._pause_mode)
            _close_writer(c_writer, rst=True)
            return
        cfg = self.config
        try:
            u_reader, u_writer = await asyncio.wait_for(
                asyncio.open_connection(self.upstream[0], self.upstream[1]),
                cfg.connect_timeout)
        except (OSError, TimeoutError) as exc:
            self.stats.upstream_connect_failures += 1
            log.warning("connection %d: upstream %s:%d unreachable: %r", cid, *self.upstream, exc)
            _close_writer(c_writer, rst=True)
            return
        _set_nodelay(u_writer)
        conn = _Connection(self, cid, c_reader, c_writer, u_reader, u_writer)
        self._conns.add(conn)
        try:
            await conn.run()
        finally:
            self._conns.discard(conn)
            conn.abort()  # no-op unless cancelled mid-run


class ThreadedFaultProxy:
    """A FaultProxy running its own event loop in a daemon thread, for synchronous code.

    ``with ThreadedFaultProxy(upstream, config=...) as p: ...`` or start()/stop(). Settings
    can be changed from any thread via ``p.config.<field> = value``; pause(), resume() and
    cut_all() are executed on the proxy's loop and wait for completion.
    """

    def __init__(self, upstream: Address, listen: Address = ("127.0.0.1", 0),
                 config: FaultConfig | None = None) -> None:
        self.proxy = FaultProxy(upstream, listen, config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop_event: asyncio.Event | None = None

    def start(self, timeout: float = 10.0) -> Self:
        if self._thread is not None:
            raise RuntimeError("already started")
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, args=(started,),
                                        name="faultproxy", daemon=True)
        self._thread.start()
        try:
            started.result(timeout)
        except BaseException:
            self.stop(timeout)
            raise
        return self

    def _run(self, started: concurrent.futures.Future[None]) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main(started))
        finally:
            self._loop.close()

    async def _main(self, started: concurrent.futures.Future[None]) -> None:
        self._stop_event = asyncio.Event()
        try:
            await self.proxy.start()
        except Exception as exc:
            log.debug("faultproxy failed to start", exc_info=True)
            started.set_exception(exc)
            return
        started.set_result(None)
        try:
            await self._stop_event.wait()
        finally:
            await self.proxy.stop()

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive() and self._stop_event is not None:
            try:
                loop.call_soon_threadsafe(self._stop_event.set)
            except RuntimeError as exc:  # loop closed meanwhile: the thread is ending anyway
                log.debug("stop: loop already closed (%s)", exc)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"faultproxy thread did not stop within {timeout} s")
        self._loop = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 10.0) -> T:
        """Run fn(*args) on the proxy's loop thread and return its result."""
        if self._loop is None:
            raise RuntimeError("proxy not started")

        async def invoke() -> T:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(invoke(), self._loop).result(timeout)

    def pause(self, mode: PauseMode = "drop", existing: ExistingMode = "freeze") -> None:
        self.call(self.proxy.pause, mode, existing)

    def resume(self) -> None:
        self.call(self.proxy.resume)
        if self.proxy._restart_task is not None:  # refuse mode: wait until serving again
            asyncio.run_coroutine_threadsafe(self._await_restart(), self._loop).result(10.0)

    async def _await_restart(self) -> None:
        if self.proxy._restart_task is not None:
            await self.proxy._restart_task

    def cut_all(self, reason: str = "manual") -> int:
        return self.call(self.proxy.cut_all, reason)

    @property
    def config(self) -> FaultConfig:
        return self.proxy.config

    @config.setter
    def config(self, config: FaultConfig) -> None:
        config.validate()
        self.proxy.config = config

    @property
    def stats(self) -> FaultStats:
        return self.proxy.stats

    def snapshot(self) -> dict[str, Any]:
        """Consistent copy of the counters, taken on the loop thread."""
        return self.call(self.proxy.stats.snapshot)

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def host(self) -> str:
        return self.proxy.host

    @property
    def address(self) -> Address:
        return self.proxy.address


# ---------------------------------------------------------------------- CLI
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str) -> int:
    """Parse '65536', '64K', '10M', '1.5GiB' (K/M/G/T are powers of 1024) into bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"invalid size {text!r} (examples: 1000, 64K, 10M, 1.5G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _parse_address(text: str) -> Address:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="faultproxy.py",
        description="Fault-injecting TCP proxy (latency, bandwidth, cuts, bit flips) for "
                    "syncnode tests. Sizes accept K/M/G suffixes (powers of 1024); rates are "
                    "sizes per second. 'up' is client->server, 'down' is server->client. "
                    "Stops on Ctrl-C/SIGTERM or after --duration and prints stats as JSON.")
    p.add_argument("--listen", type=_parse_address, default=("127.0.0.1", 0),
                   help="HOST:PORT to listen on (default 127.0.0.1:0 = pick a free port)")
    p.add_argument("--upstream", type=_parse_address, required=True,
                   help="HOST:PORT of the server to forward to")
    g = p.add_argument_group("latency")
    g.add_argument("--latency-ms", type=float, default=0.0, help="one-way delay, each direction")
    g.add_argument("--latency-up-ms", type=float, help="override for client->server")
    g.add_argument("--latency-down-ms", type=float, help="override for server->client")
    g = p.add_argument_group("bandwidth (bytes/s)")
    g.add_argument("--rate", type=_size_arg, help="per-connection cap, each direction")
    g.add_argument("--rate-up", type=_size_arg)
    g.add_argument("--rate-down", type=_size_arg)
    g.add_argument("--shared-rate", type=_size_arg, help="cap shared by all connections")
    g.add_argument("--shared-rate-up", type=_size_arg)
    g.add_argument("--shared-rate-down", type=_size_arg)
    g = p.add_argument_group("cuts")
    g.add_argument("--cut-after", type=_size_arg, help="cut each connection after N bytes")
    g.add_argument("--cut-every", type=_size_arg,
                   help="cut every N bytes counted across all connections")
    g.add_argument("--cut-prob", type=float, default=0.0, help="cut probability per chunk")
    g.add_argument("--cut-direction", choices=("up", "down", "both"), default="down",
                   help="which direction's bytes/chunks count for cuts (default down)")
    g.add_argument("--cut-fin", action="store_true",
                   help="close with FIN after flushing instead of RST")
    g.add_argument("--max-cuts", type=int, help="stop cutting after K cuts")
    g = p.add_argument_group("corruption (single-bit flips)")
    g.add_argument("--corrupt-every", type=_size_arg, help="flip one byte every N bytes")
    g.add_argument("--corrupt-every-up", type=_size_arg, help="override (0 = off)")
    g.add_argument("--corrupt-every-down", type=_size_arg, help="override (0 = off)")
    g.add_argument("--corrupt-prob", type=float, default=0.0, help="per-byte probability")
    g.add_argument("--corrupt-prob-up", type=float)
    g.add_argument("--corrupt-prob-down", type=float)
    g.add_argument("--max-corruptions", type=int, help="stop corrupting after K bytes")
    g = p.add_argument_group("other")
    g.add_argument("--seed", type=int, help="RNG seed (default: random, logged)")
    g.add_argument("--chunk-size", type=_size_arg, default=64 * 1024)
    g.add_argument("--buffer-bytes", type=_size_arg, default=4 * 1024 * 1024,
                   help="max bytes queued per direction per connection")
    g.add_argument("--connect-timeout", type=float, default=10.0)
    g.add_argument("--duration", type=float, help="stop after S seconds")
    g.add_argument("--stats-interval", type=float, help="log stats every S seconds")
    g.add_argument("--log-level", default="INFO",
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def _config_from_args(args: argparse.Namespace) -> FaultConfig:
    return FaultConfig(
        latency_ms=args.latency_ms, latency_up_ms=args.latency_up_ms,
        latency_down_ms=args.latency_down_ms,
        rate=args.rate, rate_up=args.rate_up, rate_down=args.rate_down,
        shared_rate=args.shared_rate, shared_rate_up=args.shared_rate_up,
        shared_rate_down=args.shared_rate_down,
        cut_after_bytes=args.cut_after, cut_every_bytes=args.cut_every,
        cut_probability=args.cut_prob, cut_direction=args.cut_direction,
        cut_reset=not args.cut_fin, max_cuts=args.max_cuts,
        corrupt_every_bytes=args.corrupt_every, corrupt_every_bytes_up=args.corrupt_every_up,
        corrupt_every_bytes_down=args.corrupt_every_down,
        corrupt_probability=args.corrupt_prob, corrupt_probability_up=args.corrupt_prob_up,
        corrupt_probability_down=args.corrupt_prob_down, max_corruptions=args.max_corruptions,
        seed=args.seed, chunk_size=args.chunk_size, buffer_bytes=args.buffer_bytes,
        connect_timeout=args.connect_timeout)


async def _cli_main(args: argparse.Namespace, config: FaultConfig) -> int:
    proxy = FaultProxy(upstream=args.upstream, listen=args.listen, config=config)
    await proxy.start()
    print(f"faultproxy listening on {proxy.host}:{proxy.port} -> "
          f"{args.upstream[0]}:{args.upstream[1]} seed={proxy.seed}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError) as exc:  # e.g. Windows: Ctrl-C still works
            log.debug("cannot install handler for %s: %s", sig, exc)
    deadline = None if args.duration is None else loop.time() + args.duration
    try:
        while not stop.is_set():
            waits = [t for t in (args.stats_interval,
                                 None if deadline is None else deadline - loop.time())
                     if t is not None]
            timeout = min(waits) if waits else None
            if timeout is not None and timeout <= 0:
                break
            try:
                await asyncio.wait_for(stop.wait(), timeout)
            except TimeoutError:
                if args.stats_interval is not None:
                    log.info("stats %s", json.dumps(proxy.stats.snapshot(), sort_keys=True))
    finally:
        await proxy.stop()
        print("faultproxy stats: " + json.dumps(proxy.stats.snapshot(), sort_keys=True),
              flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = _config_from_args(args)
    except ValueError as exc:
        print(f"faultproxy: error: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_cli_main(args, config))
    except KeyboardInterrupt:  # Ctrl-C before the signal handler was installed
        print("faultproxy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
