"""The time and size bounds every HTTP listener of a node applies (peer port, admin API).

aiohttp's server reads a request head (request line and headers) for as long as the client
cares to send it: a client that sends half its headers, or a byte now and then, holds a
connection (and on the peer port a TLS session) forever. Each listener started here

* closes a connection whose request head is not complete ``head_timeout`` seconds after its
  first byte arrived (the timer does not restart with each byte: trickling does not help);
* closes a connection idle between requests (or, newly opened, before its first byte) after
  ``keepalive_timeout`` seconds: aiohttp's ``keepalive_timeout``. It is longer than the 15 s
  after which aiohttp's client drops idle pooled connections, so our own peers close first
  and never reuse a connection the server is just closing;
* with TLS, aborts a handshake not finished within ``tls_handshake_timeout`` seconds
  (asyncio's default is 60 s);
* keeps aiohttp's bounds on the head's size: request line and each header line at most
  ``MAX_LINE_SIZE`` / ``MAX_FIELD_SIZE`` bytes, at most ``MAX_HEADERS`` headers (400 beyond).

A TLS listener may serve some server names (SNI) with their own context
(``sni_contexts``): it then reads the ClientHello without consuming it (``MSG_PEEK``), picks
the context, and only then starts TLS. This is how the peer port serves introductions
(:mod:`syncnode.introduction`) without asking for a client certificate while every other
handshake still requires one: whether a certificate is requested is fixed when the TLS
connection object is created, before any ``sni_callback`` runs. A refused handshake is logged
with the client's address.

Request bodies are bounded by the applications (``client_max_size`` and timed reads in
:mod:`syncnode.peer_server` and :mod:`syncnode.admin.api`). Tests shorten the bounds by
passing a :class:`ListenerLimits` to :class:`syncnode.node.RunningNode`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from .tls.contexts import handshake_refused

log = logging.getLogger("syncnode.listeners")

HEAD_TIMEOUT = 10.0  # seconds from a request head's first byte to its end
KEEPALIVE_TIMEOUT = 30.0  # seconds a connection may sit idle between requests
TLS_HANDSHAKE_TIMEOUT = 10.0  # seconds for the TLS handshake on the peer port
MAX_LINE_SIZE = 8190  # bytes in the request line (aiohttp's default, stated here)
MAX_FIELD_SIZE = 8190  # bytes in one header line (aiohttp's default)
MAX_HEADERS = 128  # headers per request (aiohttp's default)


@dataclass(frozen=True)
class ListenerLimits:
    head_timeout: float = HEAD_TIMEOUT
    keepalive_timeout: float = KEEPALIVE_TIMEOUT
    tls_handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT

    def __post_init__(self) -> None:
        for name in ("head_timeout", "keepalive_timeout", "tls_handshake_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 (a bound), got {getattr(self, name)!r}")


class HeadTimeoutHandler(RequestHandler):
    """aiohttp's connection handler plus a deadline on reading each request head.

    The deadline starts when a byte arrives while no request body is expected (that byte
    starts a head) and ends when the parser has the whole head. It relies on two details of
    aiohttp's ``RequestHandler`` that ``tests/test_listener_limits.py`` pins: the count of
    parsed messages (``_request_count``) and the queue of parsed messages with their bodies
    (``_messages``), both updated synchronously by ``data_received``.
    """

    __slots__ = ("_body", "_head_timeout", "_head_timer")

    def __init__(self, manager: web.Server, *, head_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = head_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None  # body of the last head parsed

    def data_received(self, data: bytes) -> None:
        parsed = self._request_count
        in_body = self._body is not None and not self._body.is_eof()  # before the parser ran
        super().data_received(data)
        if self._request_count != parsed:  # one or more heads completed
            self._cancel_head_timer()
            if self._messages:
                self._body = self._messages[-1][1]
            return
        if (in_body or not data or self._head_timer is not None or self._upgraded
                or self.transport is None):
            return  # body bytes, nothing, a head already timed, or not HTTP any more
        self._head_timer = self._loop.call_later(self._head_timeout, self._head_expired, parsed)

    def _head_expired(self, parsed: int) -> None:
        self._head_timer = None
        if self._request_count == parsed and self.transport is not None:
            log.debug("closing a connection from %s: request head incomplete after %ss",
                      self.peername, self._head_timeout)
            self.force_close()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        self._body = None
        super().connection_lost(exc)


MAX_CLIENT_HELLO = 16 * 1024 + 5  # one TLS record: the ClientHello must fit in it
_PEEK_STEP = 0.005  # seconds between peeks while a ClientHello arrives in pieces


def server_name(hello: bytes) -> str | None:
    """The server name (SNI) of a TLS ClientHello record, or None (absent, not a ClientHello,
    or incomplete). Pure: parses, never raises."""
    try:
        if len(hello) < 9 or hello[0] != 0x16 or hello[5] != 0x01:  # handshake, ClientHello
            return None
        end = min(len(hello), 5 + int.from_bytes(hello[3:5], "big"))
        i = 9 + 2 + 32  # record and handshake headers, legacy version, random
        i += 1 + hello[i]  # session id
        i += 2 + int.from_bytes(hello[i:i + 2], "big")  # cipher suites
        i += 1 + hello[i]  # compression methods
        ext_end = min(end, i + 2 + int.from_bytes(hello[i:i + 2], "big"))
        i += 2
        while i + 4 <= ext_end:
            kind, size = int.from_bytes(hello[i:i + 2], "big"), int.from_bytes(hello[i + 2:i + 4],
                                                                              "big")
            i += 4
            if kind == 0 and i + 5 <= ext_end:  # server_name: list length, type 0, name
                size_name = int.from_bytes(hello[i + 3:i + 5], "big")
                if hello[i + 2] == 0 and i + 5 + size_name <= ext_end:
                    return hello[i + 5:i + 5 + size_name].decode("ascii").lower()
                return None
            i += size
    except (IndexError, UnicodeDecodeError):
        return None
    return None


def _record_complete(data: bytes) -> bool:
    return len(data) >= 5 and len(data) >= 5 + int.from_bytes(data[3:5], "big")


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _peek_client_hello(fd: int, timeout: float) -> bytes:
    """The first TLS record the client sent on ``fd``, left unread in the socket (as much as
    arrived within ``timeout`` seconds; b"" if nothing did)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    with socket.socket(fileno=socket.dup(fd)) as sock:  # a duplicate: the transport owns fd
        sock.setblocking(False)
        while True:
            try:
                data = sock.recv(MAX_CLIENT_HELLO, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                data = None
            if data is not None and (not data or _record_complete(data)
                                     or len(data) >= MAX_CLIENT_HELLO):
                return data
            left = deadline - loop.time()
            if left <= 0:
                return data or b""
            if data:  # part of the record: peeking again at once would spin
                await asyncio.sleep(min(_PEEK_STEP, left))
                continue
            readable: asyncio.Future[None] = loop.create_future()
            loop.add_reader(sock.fileno(), _settle, readable)
            try:
                async with asyncio.timeout(left):
                    await readable
            except TimeoutError:
                pass
            finally:
                loop.remove_reader(sock.fileno())


class _SniRouter(asyncio.Protocol):
    """Holds a new connection unread until its ClientHello is in, then starts TLS on it with
    the context for its server name and hands it to the HTTP handler."""

    def __init__(self, site: LimitedTCPSite, handler: HeadTimeoutHandler) -> None:
        self.site, self.handler = site, handler
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # before the loop reads a byte: TLS must see them all
        self.task = asyncio.get_running_loop().create_task(self._start_tls(transport))
        self.site._routing.add(self.task)
        self.task.add_done_callback(self.site._routing.discard)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def _start_tls(self, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        limits, where = self.site.limits, transport.get_extra_info("peername")
        address = f"{where[0]}:{where[1]}" if isinstance(where, tuple) else "?"
        deadline = loop.time() + limits.tls_handshake_timeout  # one bound for peek + handshake
        refused: list[str] = []

        def report(reason: str) -> None:
            refused.append(reason)
            if self.site.on_refused is not None:  # it logs, with what the operator can do
                self.site.on_refused(address, reason)
            else:
                log.info("refused a TLS peer from %s during the handshake: %s", address,
                         reason)

        try:
            sock = transport.get_extra_info("socket")
            hello = await _peek_client_hello(sock.fileno(), limits.tls_handshake_timeout)
            if not hello or deadline - loop.time() <= 0:
                log.debug("closing a connection from %s: no TLS handshake within %ss",
                          address, limits.tls_handshake_timeout)
                transport.abort()
                return
            ctx = self.site.sni_contexts.get(server_name(hello) or "", self.site.ssl_context)
            # Reported from inside the handshake, when it fails: afterwards the client may
            # close first, and asyncio then reports only a lost connection. This task's
            # context, so this connection only.
            handshake_refused.set(report)
            tls = await loop.start_tls(transport, self.handler, ctx, server_side=True,
                                       ssl_handshake_timeout=deadline - loop.time())
        except (OSError, TimeoutError) as exc:  # ssl.SSLError included
            if refused:
                pass
            elif isinstance(exc, ssl.SSLError):
                report(str(getattr(exc, "verify_message", None)
                           or getattr(exc, "reason", None) or exc))
            else:
                log.debug("TLS connection from %s ended before its handshake: %r", address,
                          exc)
            transport.abort()
            return
        except asyncio.CancelledError:
            transport.abort()
            raise
        self.handler.connection_made(tls)


class LimitedTCPSite(web.BaseSite):
    """A TCP site whose connections are :class:`HeadTimeoutHandler` and whose TLS
    handshakes are bounded. ``port`` is the bound port once started (useful with port 0)."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *,
                 limits: ListenerLimits, ssl_context: ssl.SSLContext | None = None,
                 sni_contexts: Mapping[str, ssl.SSLContext] | None = None,
                 on_refused: Callable[[str, str], None] | None = None,
                 backlog: int = 128) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self.host, self.port, self.limits = host, port, limits
        if sni_contexts and ssl_context is None:
            raise ValueError("sni_contexts need an ssl_context for the other server names")
        self.ssl_context = ssl_context
        self.sni_contexts = {k.lower(): v for k, v in (sni_contexts or {}).items()}
        self._routing: set[asyncio.Task[None]] = set()  # connections waiting for TLS
        # Called with (address, reason) when a handshake is refused (routed listeners only).
        self.on_refused = on_refused

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        # The same arguments aiohttp's own factory (Server.__call__) passes, plus ours.
        kwargs = dict(server._kwargs)
        head_timeout = self.limits.head_timeout

        def make_handler() -> HeadTimeoutHandler:
            return HeadTimeoutHandler(server, loop=loop, head_timeout=head_timeout, **kwargs)

        if self.sni_contexts:
            def make_router() -> _SniRouter:
                return _SniRouter(self, make_handler())

            self._server = await loop.create_server(make_router, self.host, self.port,
                                                    backlog=self._backlog)
        else:
            extra: dict[str, Any] = {}
            if self._ssl_context is not None:
                extra["ssl_handshake_timeout"] = self.limits.tls_handshake_timeout
            self._server = await loop.create_server(
                make_handler, self.host, self.port, ssl=self._ssl_context,
                backlog=self._backlog, **extra)
        if self._server.sockets:
            self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for task in list(self._routing):  # connections still before their TLS handshake
            task.cancel()
        await asyncio.gather(*self._routing, return_exceptions=True)
        await super().stop()


async def start_listener(app: web.Application, host: str, port: int, *,
                         limits: ListenerLimits, ssl_context: ssl.SSLContext | None = None,
                         sni_contexts: Mapping[str, ssl.SSLContext] | None = None,
                         on_refused: Callable[[str, str], None] | None = None,
                         handler_cancellation: bool = False, backlog: int = 128
                         ) -> tuple[web.AppRunner, LimitedTCPSite]:
    """Serve ``app`` on ``host:port`` within ``limits``; the caller cleans the runner up.
    ``sni_contexts``: TLS contexts for particular server names (else ``ssl_context``);
    ``on_refused(address, reason)`` is told of every refused handshake (with them only)."""
    runner = web.AppRunner(app, access_log=None, handler_cancellation=handler_cancellation,
                           keepalive_timeout=limits.keepalive_timeout,
                           max_line_size=MAX_LINE_SIZE, max_field_size=MAX_FIELD_SIZE,
                           max_headers=MAX_HEADERS)
    await runner.setup()
    site = LimitedTCPSite(runner, host, port, limits=limits, ssl_context=ssl_context,
                          sni_contexts=sni_contexts, on_refused=on_refused, backlog=backlog)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, site
