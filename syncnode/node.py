"""``syncnode run``: wires the services of one node together and runs them until stopped.

Services: the peer server (mutual TLS), the sync engine (one loop per trusted peer), and,
when available, the DICOM bridge, the admin API and LAN discovery. One ``run`` per data
folder (an exclusive lock on ``<data>/run.lock``); the CLI commands that read or change
the node work beside it through the catalog.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import signal
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .config import Settings
from .local import LocalNode
from .peer_server import PeerServer
from .sync import SyncEngine
from .tls import server_ssl_context

log = logging.getLogger("syncnode.node")
PEER_REFRESH_SECONDS = 2.0


class AlreadyRunning(Exception):
    pass


@dataclass
class RunningNode:
    node: LocalNode
    settings: Settings
    engine: SyncEngine | None = None
    peer_server: PeerServer | None = None
    ports: dict[str, int] = field(default_factory=dict)
    _runners: list[web.AppRunner] = field(default_factory=list)
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _lock_fd: int | None = None
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    def _take_lock(self) -> None:
        fd = os.open(self.node.data / "run.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise AlreadyRunning(f"another `syncnode run` is using {self.node.data}") from exc
        self._lock_fd = fd

    async def start(self) -> None:
        self._take_lock()
        self.node.store.clean_tmp()
        s = self.settings
        self.peer_server = PeerServer(self.node, on_events=self._on_pushed)
        runner = web.AppRunner(self.peer_server.app, access_log=None,
                               handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, s.peer_host, s.peer_port,
                           ssl_context=server_ssl_context(self.node.identity, self.node.trust),
                           backlog=128)
        await site.start()
        self._runners.append(runner)
        self.ports["peer"] = _bound_port(site)
        self.engine = SyncEngine(self.node, interval=s.sync_interval, max_pulls=s.max_pulls,
                                 last_seen_fn=lambda p: self.peer_server.last_seen.get(p, 0.0)
                                 if self.peer_server else 0.0)
        self._tasks.append(asyncio.get_running_loop().create_task(self._refresh_peers()))
        log.info("node %s running: peer port %d", self.node.node_id.short, self.ports["peer"])
        (self.node.data / "ports.json").write_text(json.dumps(self.ports, sort_keys=True))

    async def _on_pushed(self, _ids: list[str]) -> None:
        if self.engine:
            self.engine.changed()

    async def _refresh_peers(self) -> None:
        assert self.engine is not None
        last_root = None
        while True:
            self.engine.refresh()
            root = self.node.catalog.merkle_root().digest
            if last_root is not None and root != last_root:
                self.engine.changed()  # e.g. an import by the CLI beside us
            last_root = root
            await asyncio.sleep(PEER_REFRESH_SECONDS)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.engine:
            await self.engine.stop()
        for r in self._runners:
            await r.cleanup()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self.stopped.set()


def _bound_port(site: web.TCPSite) -> int:
    server = site._server  # aiohttp keeps the asyncio server here
    assert server is not None and server.sockets
    return server.sockets[0].getsockname()[1]


async def run(node: LocalNode, settings: Settings, duration: float | None = None) -> None:
    running = RunningNode(node, settings)
    await running.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if duration:
            try:
                await asyncio.wait_for(stop.wait(), duration)
            except TimeoutError:
                pass
        else:
            await stop.wait()
    finally:
        log.info("stopping")
        await running.stop()
