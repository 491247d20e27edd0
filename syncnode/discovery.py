"""LAN discovery with mDNS / DNS-SD (zeroconf): advertise this node, list the others.

Each node registers ``syncnode-<short id>._syncnode._tcp.local.`` on its peer port, with TXT
records ``id`` (compact node id) and ``v`` (protocol version). What other nodes announce is
only a hint: a discovered node is *not* trusted until an operator accepts it (which pins
its certificate after checking its SHA-256 against the announced id), and a trusted node
seen at a new address is dialled there (its certificate still has to match).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import ifaddr
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from .nodeid import InvalidNodeId, NodeId

log = logging.getLogger("syncnode.discovery")
SERVICE = "_syncnode._tcp.local."


def local_ipv4() -> list[str]:
    """This host's IPv4 addresses, loopback last (used only if there is nothing else)."""
    found = [ip.ip for a in ifaddr.get_adapters() for ip in a.ips
             if isinstance(ip.ip, str) and not ip.ip.startswith("169.254.")]
    others = [a for a in found if not a.startswith("127.")]
    return others or ["127.0.0.1"]


class Discovery:
    def __init__(self, node_id: NodeId, peer_port: int,
                 on_seen: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.node_id = node_id
        self.peer_port = peer_port
        self.on_seen = on_seen
        self.seen: dict[str, dict[str, Any]] = {}  # grouped node id -> what it announced
        self._azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._azc = AsyncZeroconf(ip_version=IPVersion.V4Only)
        name = f"syncnode-{self.node_id.short.lower()}.{SERVICE}"
        info = AsyncServiceInfo(
            SERVICE, name, port=self.peer_port,
            addresses=[socket.inet_aton(a) for a in local_ipv4()],
            properties={"id": self.node_id.compact, "v": "1"},
            server=f"syncnode-{self.node_id.short.lower()}.local.")
        await self._azc.async_register_service(info)
        self._browser = AsyncServiceBrowser(self._azc.zeroconf, SERVICE,
                                            handlers=[self._on_change])
        log.info("advertising %s on port %d", name, self.peer_port)

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            return
        task = asyncio.get_running_loop().create_task(self._resolve(service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, service_type: str, name: str) -> None:
        assert self._azc is not None
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._azc.zeroconf, 3000):
            log.debug("no answer resolving %s", name)
            return
        raw = (info.properties or {}).get(b"id") or b""
        try:
            peer = NodeId.parse(raw.decode("ascii", "replace"))
        except InvalidNodeId as exc:
            log.warning("ignoring %s: bad node id in its announcement (%s)", name, exc)
            return
        if peer == self.node_id:
            return
        addresses = info.parsed_addresses(IPVersion.V4Only)
        if not addresses or not info.port:
            return
        entry = {"node_id": str(peer), "addresses": addresses, "port": info.port,
                 "url": f"https://{addresses[0]}:{info.port}", "last_seen": time.time()}
        new = str(peer) not in self.seen
        self.seen[str(peer)] = entry
        if new:
            log.info("discovered node %s at %s", peer.short, entry["url"])
        if self.on_seen:
            self.on_seen(entry)

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._azc is not None:
            await self._azc.async_unregister_all_services()
            await self._azc.async_close()
