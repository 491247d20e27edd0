"""A fake trusted peer for fault and attack tests: the real peer protocol, served over real
mutual TLS with a real node's key and certificate, whose answers a test replaces route by
route (withhold events, trickle bytes, answer 1 GiB...). Routes not replaced are answered
by the real :class:`syncnode.peer_server.PeerServer` of that node.

Every request is counted per route (``calls``) so a test can bound what a receiver asks.
A test that replaces ``blob`` but not ``pack`` gets a peer whose hello offers no packs, so
that every blob goes through its ``blob`` answer. By default it answers hello only by GET,
as an older peer does (405 to a POST: its events come by ``/events``); a test that gives a
``hello_post`` answer gets that for ``POST /hello`` (hello with events).
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from aiohttp import web

from syncnode import protocol
from syncnode.listeners import ListenerLimits, start_listener
from syncnode.local import LocalNode
from syncnode.peer_server import PeerServer
from syncnode.tls.contexts import server_ssl_context

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ROUTES = [("GET", "/hello", "hello"), ("GET", "/merkle", "merkle"),
          ("POST", "/events", "events"), ("POST", "/blobs/pack", "pack"),
          ("GET", "/blobs/{hash}/chunks", "chunks"),
          ("GET", "/blobs/{hash}", "blob"), ("POST", "/notify", "notify"),
          ("POST", "/push/offer", "push_offer"), ("PUT", "/push/blobs/{hash}", "push_blob"),
          ("POST", "/push/pack", "push_pack"),
          ("POST", "/push/events", "push_events")]


class FakePeer:
    def __init__(self, node: LocalNode, **overrides: Handler) -> None:
        self.node = node
        self.real = PeerServer(node)
        self.calls: Counter[str] = Counter()
        self.runner: web.AppRunner | None = None
        self.port = 0
        if "blob" in overrides and "pack" not in overrides and "hello" not in overrides:
            overrides["hello"] = self._hello_without_packs
        app = web.Application(client_max_size=protocol.MAX_JSON_BODY,
                              middlewares=[self.real._guard])
        routes = ROUTES + ([("POST", "/hello", "hello_post")] if "hello_post" in overrides
                           else [])
        app.add_routes([web.route(method, protocol.PREFIX + path,
                                  self._counted(name, overrides.get(name)
                                                or getattr(self.real, name)))
                        for method, path, name in routes])
        self.app = app

    async def _hello_without_packs(self, request: web.Request) -> web.StreamResponse:
        answer = await self.real.hello(request)
        assert isinstance(answer, web.Response) and answer.body is not None
        obj = json.loads(bytes(answer.body))  # type: ignore[arg-type]
        obj.pop("features", None)
        return web.json_response(obj)

    def _counted(self, name: str, handler: Handler) -> Handler:
        async def counted(request: web.Request) -> web.StreamResponse:
            self.calls[name] += 1
            return await handler(request)

        return counted

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def start(self) -> FakePeer:
        self.runner, site = await start_listener(
            self.app, "127.0.0.1", 0, limits=ListenerLimits(),
            ssl_context=server_ssl_context(self.node.identity, self.node.trust),
            handler_cancellation=True)
        self.port = site.port
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        self.real.close()


@contextmanager
def small_disk(where: Path, size: str = "64m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` (root only), unmounted afterwards."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                   check=True, capture_output=True, timeout=30)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True, timeout=30)
