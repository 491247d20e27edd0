"""``syncnode run``: wires the services of one node together and runs them until stopped.

Services: the peer server (mutual TLS), the sync engine (one loop per trusted peer), and,
when available, the DICOM bridge, the admin API and LAN discovery. One ``run`` per data
folder (an exclusive lock on ``<data>/run.lock``); the CLI commands that read or change
the node work beside it through the catalog.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import json
import logging
import os
import signal
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import renewal, sdnotify
from .admin.api import AdminAPI, UnsafeBinding, check_binding
from .admin.auth import TLSSetupError, https_context, is_loopback
from .admin.feed import EventFeed
from .apikeys import KEYS_FILE, KeyStore, adopt_config_key
from .audit import AuditLog
from .blobstore import BlobDamage
from .config import CONFIG_FILE, Settings
from .config import read_file as cfg_read_file
from .damage import DamageChecks
from .listeners import ListenerLimits, start_listener
from .local import RUN_LOCK, TRANSFER_MAX_AGE, LocalNode, offload
from .peer_server import PeerServer
from .ratelimit import Limiter, check_caps
from .safetext import clean_tree
from .scrub import BackgroundVerify
from .service import NodeService
from .sync import SyncEngine
from .tls.certificates import NODE_SAN
from .tls.contexts import INTRODUCTION_NAME, introduction_ssl_context, server_ssl_context

if TYPE_CHECKING:  # zeroconf and ifaddr are imported only when discovery is on
    from .discovery import Discovery

log = logging.getLogger("syncnode.node")
REFUSAL_LOG_SECONDS = 60.0  # one warning per refused address per minute
PEER_REFRESH_SECONDS = 0.5  # how soon a change made beside us (CLI import) reaches peers


class AlreadyRunning(Exception):
    pass


class StartFailed(Exception):
    """A service the settings ask for could not start (e.g. its port is taken): ``run``
    stops what it started and exits 2 rather than run half a node."""


@dataclass
class RunningNode:
    node: LocalNode
    settings: Settings
    engine: SyncEngine | None = None  # RunningNode is the service's NodeRuntime
    peer_server: PeerServer | None = None
    ports: dict[str, int] = field(default_factory=dict)
    _runners: list[web.AppRunner] = field(default_factory=list)
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _lock_fd: int | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    feed: EventFeed | None = None
    blob_locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    admin: AdminAPI | None = None
    discovery: Discovery | None = None
    dicom: Any = None  # syncnode.dicom.service.DicomBridge
    scrub: BackgroundVerify | None = None
    damage: DamageChecks | None = None  # re-hashes blobs peers report damaged
    # Other services add what they report: name -> callable giving a JSON-able value.
    status_providers: dict[str, Callable[[], Any]] = field(default_factory=dict)
    metric_providers: list[Callable[[], dict[str, float]]] = field(default_factory=list)
    # Time bounds of the peer and admin listeners (request head, idle, TLS handshake).
    limits: ListenerLimits = field(default_factory=ListenerLimits)
    # The audit trail: services call self.audit.record(...) (queued, never blocks the loop).
    audit: AuditLog | None = None
    syslog: Any = None  # syncnode.atna.SyslogForwarder when audit_syslog is set
    # set by local_change(): the root watch looks now instead of at its next tick
    _look_now: asyncio.Event = field(default_factory=asyncio.Event)
    # bandwidth caps of blob bytes, shared by the peer server and the sync engine
    limiter: Limiter = field(default_factory=Limiter)
    _config_stamp: float = 0.0  # mtime of config.toml when its caps were last read
    _refusals_logged: dict[str, float] = field(default_factory=dict)  # host, kind -> when

    def _take_lock(self) -> None:
        fd = os.open(self.node.data / RUN_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise AlreadyRunning(f"another `syncnode run` is using {self.node.data}") from exc
        self._lock_fd = fd

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._take_lock()
        try:  # refuse an unsafe admin binding before serving anything
            admin_tls = self._admin_tls()
        except BaseException:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            raise
        # abandoned transfers go; recent ones stay, to resume where they stopped
        self.node.store.clean_tmp(transfers_older_than=TRANSFER_MAX_AGE)
        s = self.settings
        self._start_audit()
        self.node.configure(s)  # the rules for received events
        self.limiter.configure(s.bandwidth_caps)
        with contextlib.suppress(FileNotFoundError):  # later edits of the file are re-read
            self._config_stamp = (self.node.data / CONFIG_FILE).stat().st_mtime
        # our certificate is served with our events (the journal signs without the catalog)
        self.node.catalog.add_origin_certificate(self.node.identity.cert_der)
        self.peer_server = PeerServer(self.node, on_events=self._on_pushed,
                                      blob_locks=self.blob_locks, on_seen=self._on_peer_seen,
                                      on_notify=self._on_peer_notify)
        self.peer_server.compression = s.compression
        self.peer_server.audit = self.audit
        self.peer_server.max_blob_size = s.max_blob_size
        self.peer_server.limiter = self.limiter
        self.peer_server.on_trust_changed = self.peers_changed
        self.damage = DamageChecks(self.node.store, on_damaged=self._mend)
        self.peer_server.damage = self.damage
        runner, site = await start_listener(
            self.peer_server.app, s.peer_host, s.peer_port, limits=self.limits,
            ssl_context=server_ssl_context(self.node.identity, self.node.trust,
                                           self.node.previous_identity),
            sni_contexts={INTRODUCTION_NAME: introduction_ssl_context(self.node.identity)},
            on_refused=self._on_tls_refused, handler_cancellation=True)
        self._runners.append(runner)
        self.ports["peer"] = site.port
        self.engine = SyncEngine(self.node, interval=s.sync_interval, max_pulls=s.max_pulls,
                                 max_window=s.max_window,
                                 compression=s.compression,
                                 max_blob_size=s.max_blob_size,
                                 min_pull_rate=s.min_pull_rate,
                                 blob_locks=self.blob_locks,
                                 last_seen_fn=lambda p: self.peer_server.last_seen.get(p, 0.0)
                                 if self.peer_server else 0.0)
        self._tasks.append(asyncio.get_running_loop().create_task(self._refresh_peers()))
        self.engine.on_state = self._on_peer_state
        self.engine.limiter = self.limiter
        self.engine.on_trust_changed = self.peers_changed
        self.engine.served = self.peer_server.stats  # status totals both ways
        self.engine.audit = self.audit
        self.engine.damage = self.damage
        await self._start_dicom()
        await self._start_admin(*admin_tls)
        if s.discovery:
            await self._start_discovery()
        self._start_scrub()
        assert self.audit is not None
        self.audit.record("node-start", "node")
        log.info("node %s running: ports %s", self.node.node_id.short,
                 " ".join(f"{k}={v}" for k, v in sorted(self.ports.items())))
        self._report_viewer()
        self.write_ports()

    def _report_viewer(self) -> None:
        """Say whether /viewer/ has a viewer to serve (it is installed separately)."""
        from .viewer import ViewerNotInstalled, folder_of, installed

        try:
            info = installed(folder_of(self.node.data, self.settings.viewer_dir))
        except ViewerNotInstalled:
            log.info("web viewer: not installed (`syncnode viewer install` adds it at "
                     "/viewer/)")
            return
        log.info("web viewer: %s %s at /viewer/ of the admin API", info.package, info.version)

    def _on_tls_refused(self, address: str, reason: str) -> None:
        """A peer-port handshake was refused (unknown, expired or no certificate): logged
        with the address and what to do (at most once a minute per address), and on
        record. The node id is unknown at this point (TLS shows no refused certificate); a
        syncnode peer introduces itself next, and that refusal names its id."""
        now = time.monotonic()
        trusted = len(self.engine.peers) if self.engine is not None else 0
        key = f"{address.rpartition(':')[0] or address} {bool(trusted)}"
        if now - self._refusals_logged.get(key, -REFUSAL_LOG_SECONDS) >= REFUSAL_LOG_SECONDS:
            self._refusals_logged[key] = now
            if len(self._refusals_logged) > 1000:  # a scan: forget the oldest
                self._refusals_logged.pop(next(iter(self._refusals_logged)))
            if "certificate" not in reason.lower():
                hint = ("not a syncnode peer presenting a certificate (a plain HTTP client, "
                        "a scanner, or a TLS client without a client certificate)")
            elif trusted:
                hint = (f"its certificate is not one of the {trusted} trusted peers' (nor "
                        "signed by a trusted cluster CA). A syncnode node introduces itself "
                        "next and is then named in the log; if it is expected, trust it: "
                        "syncnode peer add NODE_ID https://HOST:PORT")
            else:
                hint = ("this node trusts no peer yet: trust one with syncnode peer add "
                        "NODE_ID https://HOST:PORT")
            log.warning("refused a peer connection from %s at the TLS handshake (%s): %s",
                        address, reason, hint)
        if self.audit is not None:
            self.audit.record("connection-refused", "peer:?", "failure", remote=address,
                              reason=f"TLS handshake: {reason}"[:300])

    def _start_audit(self) -> None:
        self.audit = AuditLog.for_node(self.node.data)
        self.metric_providers.append(lambda: {
            "audit_entries_written": float(self.audit.written if self.audit else 0),
            "audit_entries_dropped": float(self.audit.dropped if self.audit else 0)})
        s = self.settings
        if not s.audit_syslog:
            return
        import socket
        from pathlib import Path

        from .atna import Source, SyslogForwarder

        self.syslog = SyslogForwarder(
            self.audit.folder, s.audit_syslog,
            Source(self.node.node_id.compact, socket.gethostname(), s.ae_title,
                   s.audit_site or None),
            ca_file=Path(s.audit_syslog_ca) if s.audit_syslog_ca else None,
            cert_file=self.node.data / "node.crt", key_file=self.node.data / "node.key",
            patient_ids=self._patient_ids if s.audit_patient_ids else None)
        self.syslog.start()
        self.audit.sinks.append(self.syslog.wake)
        self.status_providers["audit_syslog"] = self.syslog.status
        self.metric_providers.append(self.syslog.metrics)

    def _patient_ids(self, studies: list[str]) -> dict[str, str]:
        """Patient IDs of studies, for ATNA messages when the operator opted in (called from
        the forwarder's thread)."""
        found = {}
        for uid in studies:
            rows = self.node.catalog.instances(study=uid, limit=1)
            if rows and rows[0].patient_id:
                found[uid] = rows[0].patient_id
        return found

    async def _stop_audit(self) -> None:
        trail, self.audit = self.audit, None
        if trail is not None:
            trail.record("node-stop", "node")
            await asyncio.to_thread(trail.close)
        forwarder, self.syslog = self.syslog, None
        if forwarder is not None:
            await asyncio.to_thread(forwarder.stop)

    def write_ports(self) -> None:
        """Record the bound ports (useful when they were chosen by the OS: port 0)."""
        tmp = self.node.data / "ports.json.tmp"
        tmp.write_text(json.dumps(self.ports, sort_keys=True))
        os.replace(tmp, self.node.data / "ports.json")

    def _admin_tls(self) -> tuple[ssl.SSLContext | None, set[str]]:
        """Check the admin API's binding before anything starts; its HTTPS context (None
        for plain HTTP on loopback) and the names its certificate carries."""
        s = self.settings
        if adopt_config_key(self.node.data):
            log.warning("the api_key kept in clear in config.toml is now the admin key, stored "
                        "hashed in %s; it was removed from config.toml", KEYS_FILE)
        tls = s.api_tls == "on" or (s.api_tls == "auto" and not is_loopback(s.api_host))
        check_binding(s.api_host, tls=tls,
                      has_keys=KeyStore(self.node.data).has_keys() or bool(s.api_key))
        if not tls:
            return None, set()
        if bool(s.api_tls_cert) != bool(s.api_tls_key):
            raise UnsafeBinding("give both api_tls_cert and api_tls_key, or neither (then "
                                "the node's own certificate is used)")
        names: set[str] = set()
        if s.api_tls_cert:
            cert, key = Path(s.api_tls_cert), Path(s.api_tls_key)
        else:
            cert, key = self.node.identity.cert_path, self.node.identity.key_path
            names.add(NODE_SAN)  # the one name in the node's own certificate
        try:
            return https_context(cert, key), names
        except TLSSetupError as exc:
            raise UnsafeBinding(str(exc)) from exc

    async def _start_admin(self, ssl_context: ssl.SSLContext | None, names: set[str]
                           ) -> None:
        s = self.settings
        self.feed = EventFeed()
        self.admin = AdminAPI(self.service, self.feed, audit=self.audit)
        self.admin.extra_names = names
        runner, site = await start_listener(self.admin.app, s.api_host, s.api_port,
                                            limits=self.limits, ssl_context=ssl_context)
        self._runners.append(runner)
        self.ports["api"] = site.port

    async def _start_dicom(self) -> None:
        from .dicom.service import DicomBridge

        loop = asyncio.get_running_loop()
        bridge = DicomBridge(self.node, self.settings,
                             on_stored=lambda: loop.call_soon_threadsafe(self.local_change),
                             audit=self.audit)
        # (stored instances reach peers through the root watch, woken at once)
        try:
            self.ports["dicom"] = await asyncio.to_thread(bridge.start)
        except OSError as exc:  # e.g. the port is taken: a node without its SCP is refused
            raise StartFailed(
                f"DICOM SCP cannot listen on {self.settings.dicom_host}:"
                f"{self.settings.dicom_port}: {exc.strerror or exc} (another program uses "
                "the port? choose another with --dicom-port or dicom_port in config.toml)"
            ) from exc
        self.dicom = bridge
        self.status_providers["dicom"] = bridge.status

    def _start_scrub(self) -> None:
        """The periodic background verify (idle while verify_interval is 0)."""
        self.scrub = BackgroundVerify(self.node, self.settings.verify_interval,
                                      self.settings.verify_rate)
        self.scrub.start()
        self.status_providers["verify_schedule"] = self.scrub.status

    async def _start_discovery(self) -> None:
        from .discovery import Discovery

        self.discovery = Discovery(self.node.node_id, self.ports["peer"], self._on_discovered)
        await self.discovery.start()

    def _on_discovered(self, entry: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._note_discovered(entry))
        self._tasks.append(task)
        task.add_done_callback(self._tasks_done)

    def _tasks_done(self, task: asyncio.Task[Any]) -> None:
        if task in self._tasks:
            self._tasks.remove(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("recording a discovered node failed: %s", task.exception())

    async def _note_discovered(self, entry: dict[str, Any]) -> None:
        compact = entry["node_id"].replace("-", "")
        catalog = self.node.catalog

        def note() -> bool:
            catalog.note_discovered(compact, entry["url"])
            states = catalog.peer_states()
            for p in catalog.peers():
                # Move a trusted peer to its announced address only when the configured
                # one does not work: an operator's explicit URL wins while it is reachable.
                unreachable = states.get(compact, {}).get("state") == "unreachable"
                if p["node_id"] == compact and unreachable \
                        and p["url"].rstrip("/") != entry["url"]:
                    log.info("trusted peer %s now at %s", compact[:7], entry["url"])
                    catalog.add_peer(compact, entry["url"], p["push"])
                    return True
            return False

        if await offload(note):
            self.peers_changed()
        if self.feed is not None:
            self.feed.publish("discovered", node_id=entry["node_id"], url=entry["url"])

    @property
    def service(self) -> NodeService:
        """The operations of the admin API and the CLI, taking effect in this process."""
        return NodeService(self.node, self)

    def served_bytes(self) -> dict[str, dict[str, int]]:
        """Per peer (compact id): blob bytes the peer server sent and received."""
        return self.peer_server.stats if self.peer_server else {}

    def _on_peer_state(self, state: Any) -> None:
        if self.feed is not None:
            self.feed.publish("peer", node_id=state.node_id, state=state.state,
                              in_sync=state.in_sync, bytes_needed=state.bytes_needed,
                              blobs_needed=state.blobs_needed)

    def _on_loop(self, fn: Callable[[], None]) -> bool:
        """True if called on the node's loop; otherwise schedule ``fn`` there (the service
        calls these hooks from executor threads) and return False."""
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if self._loop is None or here is self._loop:
            return True
        self._loop.call_soon_threadsafe(fn)
        return False

    def peers_changed(self) -> None:
        """The trust list changed: the root watch reads it (off the loop) now."""
        if not self._on_loop(self.peers_changed):
            return
        self._look_now.set()
        if self.feed is not None:
            self.feed.publish("peers")

    def local_change(self) -> None:
        """The catalog changed here (SCP, API, CLI beside us): the root watch looks now and
        tells the peers once, whichever way the change came."""
        if not self._on_loop(self.local_change):
            return
        self._look_now.set()

    def apply_settings(self, changes: dict[str, Any]) -> None:
        """Take changed settings that need no restart into effect now."""
        if not self._on_loop(lambda: self.apply_settings(changes)):
            return
        self.settings = self.settings.model_copy(update=changes)
        if self.engine:
            self.engine.interval = self.settings.sync_interval
            self.engine.max_pulls = self.settings.max_pulls
            self.engine.max_window = self.settings.max_window
            self.engine.configure_windows()
            self.engine.compression = self.settings.compression
            self.engine.max_blob_size = self.settings.max_blob_size
            self.engine.min_pull_rate = self.settings.min_pull_rate
        if self.peer_server:
            self.peer_server.compression = self.settings.compression
            self.peer_server.max_blob_size = self.settings.max_blob_size
        if "bandwidth_caps" in changes:
            self.limiter.configure(self.settings.bandwidth_caps)
        if self.scrub is not None:
            self.scrub.configure(self.settings.verify_interval, self.settings.verify_rate)
        if self.feed is not None:
            self.feed.publish("config", keys=sorted(changes))

    def extra_status(self) -> dict[str, Any]:
        return clean_tree({name: fn() for name, fn in self.status_providers.items()})

    def extra_metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for fn in self.metric_providers:
            out.update(fn())
        return out

    def _on_peer_notify(self, peer: str) -> None:
        if self.engine is not None:
            self.engine.notified(peer)

    def _on_peer_seen(self, peer: str) -> None:
        if self.engine is not None:
            self.engine.peer_seen(peer)

    async def _on_pushed(self, _ids: list[str]) -> None:
        if self.engine:
            self.engine.changed()

    async def _reread_caps(self) -> None:
        """Caps changed in config.toml beside us (``syncnode limit set``) apply without a
        restart: the file is read again when its time stamp moves."""
        path = self.node.data / CONFIG_FILE

        def read() -> dict[str, str] | None:
            try:
                stamp = path.stat().st_mtime
            except FileNotFoundError:
                return None
            if stamp == self._config_stamp:
                return None
            self._config_stamp = stamp
            caps = cfg_read_file(self.node.data).get("bandwidth_caps", {})
            return check_caps(caps) if isinstance(caps, dict) else None

        try:
            caps = await offload(read)
        except (ValueError, OSError) as exc:  # a broken file: keep the caps in force, say so
            log.error("bandwidth caps in %s not taken: %s", CONFIG_FILE, exc)
            return
        if caps is not None and caps != self.settings.bandwidth_caps:
            log.info("bandwidth caps changed in %s: %s", CONFIG_FILE, caps)
            self.apply_settings({"bandwidth_caps": caps})

    def _read_peers_and_root(self) -> tuple[list[dict[str, Any]], Any]:
        """(Blocking.) The trust list and the Merkle root; on the way, end the grace periods
        of renewed certificates that are over (ours and our peers')."""
        if self.node.trust.retire_expired():
            self.node.refresh_policy()
        renewal.retire(self.node.data)
        return self.node.catalog.peers(), self.node.catalog.merkle_root()

    async def _refresh_peers(self) -> None:
        """The one watch of local changes: every PEER_REFRESH_SECONDS (or at once when
        :meth:`local_change` asks) read the trust list and the Merkle root off the loop;
        a new root wakes the peers' loops and tells the peers. Never ends on an error."""
        assert self.engine is not None
        last_root = None
        while True:
            self._look_now.clear()
            try:
                peers, root_node = await offload(self._read_peers_and_root)
            except Exception as exc:  # e.g. the catalog's disk failing: say so, look again
                log.error("reading the catalog for the peer refresh failed: %s: %s",
                          type(exc).__name__, exc)
            else:
                self.engine.refresh(peers)
                await self._reread_caps()
                root = root_node.digest
                if last_root is not None and root != last_root:
                    self.engine.changed()
                    if self.feed is not None:
                        self.feed.publish("catalog", merkle_root=root.hex())
                last_root = root
            try:
                async with asyncio.timeout(PEER_REFRESH_SECONDS):
                    await self._look_now.wait()
            except TimeoutError:
                pass

    async def _mend(self, damage: BlobDamage) -> None:
        """A blob our own re-hash found damaged (a peer's report led us to it): move it
        aside and fetch it again from the trusted peers, as ``syncnode verify --repair``
        does, holding the blob's lock so that no pull or push writes it meanwhile. The
        repair runs on a loop of its own in a thread (it reads the catalog)."""
        from .repair import quarantine, repair_blobs

        blob = damage.hash
        async with self.blob_locks.setdefault(blob, asyncio.Lock()):
            aside = await offload(quarantine, self.node, blob)
            log.error("blob %s is damaged here (%s): moved to %s; fetching it again from "
                      "the peers", blob, damage.reason, aside)
            outcome = await asyncio.to_thread(
                lambda: asyncio.run(repair_blobs(self.node, [blob])))
        log.warning("blob %s: %s", blob, outcome.get(blob, "not repaired"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.discovery:
            await self.discovery.stop()
        if self.scrub is not None:
            await self.scrub.stop()
        if self.dicom is not None:
            await asyncio.to_thread(self.dicom.stop)
        if self.engine:
            await self.engine.stop()
        for r in self._runners:
            await r.cleanup()
        if self.damage is not None:
            await self.damage.close()
        if self.peer_server is not None:
            self.peer_server.close()
        await self._stop_audit()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self.stopped.set()


async def run(node: LocalNode, settings: Settings, duration: float | None = None) -> None:
    running = RunningNode(node, settings)
    try:
        await running.start()
    except BaseException:
        await running.stop()  # what did start (listeners, lock, audit) is closed again
        raise
    settle_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sdnotify.notify(f"READY=1\nSTATUS=node {node.node_id.short}: ports "
                    + " ".join(f"{k}={v}" for k, v in sorted(running.ports.items())))
    watchdog = None
    interval = sdnotify.watchdog_interval()
    if interval is not None:
        watchdog = loop.create_task(_watchdog(interval))
    try:
        if duration:
            try:
                async with asyncio.timeout(duration):
                    await stop.wait()
            except TimeoutError:
                pass
        else:
            await stop.wait()
    finally:
        log.info("stopping")
        sdnotify.notify("STOPPING=1")
        if watchdog is not None:
            watchdog.cancel()
        await running.stop()


# Young-generation threshold of the cyclic garbage collector while the node runs (Python's
# default is 700): see settle_gc.
GC_YOUNG_THRESHOLD = 20_000


def settle_gc() -> None:
    """Spare the running node most of the cyclic garbage collector's work.

    Everything made while starting (modules, DICOM dictionaries, routes, contexts) lives as
    long as the process, yet each full collection walks all of it again: with Python's
    defaults the collector was 8-13 % of both ends' CPU during a sync. So what exists once
    the node is up is collected once and then frozen (moved out of the collector's sight,
    :func:`gc.freeze`), and the young generation is collected after 20,000 allocations
    instead of 700: most per-request objects are freed by reference counting before a
    collection ever looks at them, and fewer survive into the older generations. Cycles
    are still collected, only less often; memory stays bounded by the same mechanism."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


async def _watchdog(interval: float) -> None:
    """Ping systemd's watchdog while the event loop turns (a hung loop stops the pings)."""
    while True:
        sdnotify.notify("WATCHDOG=1")
        await asyncio.sleep(interval)
