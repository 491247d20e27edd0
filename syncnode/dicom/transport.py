"""pynetdicom adapted for a server on an untrusted network: bounded reads, no Nagle, low latency.

pynetdicom 3.0.4 as shipped has three problems for syncnode (DESIGN.md, "Pitfalls"):

1. It reads a PDU of whatever length its 6-byte header announces, before any AE check
   (upstream issue #1086). :class:`GuardedDUL` checks the length against a per-PDU-type
   cap *before* reading the body (P-DATA-TF: the maximum PDU length we announced;
   association PDUs: 1 MiB; release/abort: their fixed size), treats a violation as an
   invalid PDU (the state machine answers A-ABORT) and shuts the read side so nothing
   more is read from that peer. Bodies are read with ``recv_into`` into one buffer of
   the announced (capped) size, under the socket timeout, so a slow sender cannot hold
   a reader forever.
2. It sets ``TCP_NODELAY`` on none of its sockets (about 40 ms lost per instance on
   loopback). :func:`set_nodelay` is applied to every accepted and every requested
   association socket.
3. Its two reactor threads (DUL and association) poll with 1 ms sleeps: each hop of a
   request/response costs up to a millisecond. :class:`GuardedDUL` waits in ``select``
   on the socket and on a wake-up pipe written whenever the local user queues a
   primitive; :class:`FastAssociation` waits on an event set by the DUL after each
   state-machine action. Idle waits are bounded (``IDLE_WAIT``) so timers (ARTIM,
   idle timeout) still fire.

Associations are "upgraded" before they start (:func:`upgrade_association`): the DUL is
replaced before the socket is attached, and the instance's class becomes
:class:`FastAssociation`. Acceptor associations are created by
:class:`GuardedRequestHandler`; requestor associations by :class:`SyncnodeAE`, whose
``_create_socket`` hook runs right after pynetdicom creates the association.

Invariants: no PDU body larger than its cap is ever read or buffered; a socket this
module touches has TCP_NODELAY set; the overridden loops keep pynetdicom's semantics
(same checks, same order), only the waiting differs.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from pynetdicom import AE, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import (
    AddressInformation,
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

log = logging.getLogger("syncnode.dicom")

IDLE_WAIT = 0.01  # seconds a reactor sleeps at most when nothing happens
ASSOCIATION_PDU_CAP = 1 << 20  # A-ASSOCIATE-RQ/AC/RJ: generous for 128 contexts x many TS
_FIXED_PDU_LENGTH = {0x05: 4, 0x06: 4, 0x07: 4}
_PDU_TYPES = (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07)


@dataclass(frozen=True)
class PduLimits:
    """The largest PDU bodies (the length field of the header) this side reads."""

    max_pdata: int  # our Maximum Length Received (the variable field of a P-DATA-TF)
    max_association: int = ASSOCIATION_PDU_CAP

    def cap(self, pdu_type: int) -> int:
        if pdu_type == 0x04:
            return self.max_pdata
        if pdu_type in _FIXED_PDU_LENGTH:
            return _FIXED_PDU_LENGTH[pdu_type]
        return self.max_association


def set_nodelay(sock: socket.socket | None) -> None:
    """Disable Nagle's algorithm on a TCP socket (no-op for closed/non-TCP sockets)."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        log.debug("TCP_NODELAY not set: %s", exc)


class GuardedDUL(DULServiceProvider):
    """DUL service provider with capped PDU reads and event-driven waiting."""

    def __init__(self, assoc: Association, limits: PduLimits) -> None:
        super().__init__(assoc)
        self.limits = limits
        self.oversized_pdus = 0
        self._refused = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # -- waking ------------------------------------------------------------------------
    def wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already has a pending wake-up byte, or closed at shutdown

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self.wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def stop_dul(self) -> bool:
        self.wake()
        return super().stop_dul()

    def _idle_wait(self) -> None:
        waiting: list[Any] = [self._wake_r]
        sock = self.socket.socket if self.socket is not None else None
        if sock is not None and getattr(self.socket, "_is_connected", False):
            waiting.append(sock)
        try:
            readable, _, _ = select.select(waiting, [], [], IDLE_WAIT)
        except (OSError, ValueError):  # the socket was closed under us
            time.sleep(IDLE_WAIT)
            return
        if self._wake_r in readable:
            try:
                while self._wake_r.recv(4096):
                    pass
            except (BlockingIOError, OSError):
                pass

    def _notify_assoc(self, force: bool = False) -> None:
        """Wake the association thread if there is something for it: a primitive for the
        user (release, abort, association answer) or a DIMSE message to serve. Waking it
        for every PDU would only make it compete for the GIL."""
        wake = getattr(self.assoc, "_wake_evt", None)
        if wake is None or wake.is_set():
            return
        if force or self.to_user_queue.qsize() or self.assoc.dimse.msg_queue.qsize():
            wake.set()

    # -- the reactor (pynetdicom's run_reactor, waiting instead of sleeping) -----------
    def run_reactor(self) -> None:
        self._idle_timer.start()
        self.socket = cast(AssociationSocket, self.socket)
        idle = False
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                if idle:
                    self._idle_wait()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception as exc:  # pynetdicom's own policy: abort
                    log.error("DICOM upper layer failed, aborting the association: %s",
                              type(exc).__name__)
                    self._hard_abort()
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    idle = True
                    continue
                self.state_machine.do_action(event)
                self._notify_assoc()
                idle = False
        finally:
            self._notify_assoc(force=True)
            for s in (self._wake_r, self._wake_w):
                s.close()

    def _hard_abort(self) -> None:
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02
        abort_pdu.reason_diagnostic = 0x00
        if self.socket is not None:
            self.socket.send(abort_pdu.encode())
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True

    # -- reading PDUs ------------------------------------------------------------------
    def _read_pdu_data(self) -> None:
        """Read one PDU: 6-byte header, length checked against its cap, then the body."""
        sock = cast(AssociationSocket, self.socket)
        raw = sock.socket
        if raw is None:
            self.event_queue.put("Evt17")
            return
        if self._refused:  # after an invalid PDU: read nothing more, close the connection
            sock.close()
            return
        try:
            header = _recv_exact(raw, 6)
        except (OSError, TimeoutError):
            self.event_queue.put("Evt17")
            return
        if header is None:
            self.event_queue.put("Evt17")
            return
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type not in _PDU_TYPES:
            log.warning("DICOM peer sent an unknown PDU type 0x%02X; aborting", pdu_type)
            self._refuse(raw)
            return
        cap = self.limits.cap(pdu_type)
        if length > cap:
            self.oversized_pdus += 1
            log.warning("DICOM peer announced a PDU of %d bytes (type 0x%02X, limit %d); "
                        "aborting without reading it", length, pdu_type, cap)
            self._refuse(raw)
            return
        buf = bytearray(6 + length)
        buf[:6] = header
        try:
            if not _recv_into_exact(raw, memoryview(buf)[6:]):
                self.event_queue.put("Evt17")
                return
        except (OSError, TimeoutError):
            self.event_queue.put("Evt17")
            return
        try:
            pdu, event = self._decode_pdu(buf)
        except Exception as exc:  # any decoding failure is an invalid PDU
            log.warning("DICOM peer sent an undecodable PDU (type 0x%02X): %s", pdu_type,
                        type(exc).__name__)
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _refuse(self, raw: socket.socket) -> None:
        """Invalid PDU: let the state machine abort, and read nothing more from the peer."""
        self._refused = True
        self.event_queue.put("Evt19")
        try:
            raw.shutdown(socket.SHUT_RD)
        except OSError:
            pass  # already closed


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def _recv_into_exact(sock: socket.socket, view: memoryview) -> bool:
    got = 0
    total = len(view)
    while got < total:
        n = sock.recv_into(view[got:], min(total - got, 1 << 20))
        if n == 0:
            return False
        got += n
    return True


class FastAssociation(Association):
    """An Association whose reactor waits on an event instead of sleeping 1 ms per loop.

    Instances are made by :func:`upgrade_association` (class swap), never constructed.
    """

    _wake_evt: threading.Event

    def kill(self) -> None:
        self._wake_evt.set()
        super().kill()

    def _run_reactor(self) -> None:
        # pynetdicom's Association._run_reactor with the sleep replaced by a wait.
        self._is_paused = False
        while not self._kill:
            # Waiting counts as paused (as pynetdicom's checkpoint does): a user thread
            # that clears the checkpoint can use DIMSE at once instead of waiting a tick.
            self._is_paused = True
            self._wake_evt.wait(IDLE_WAIT)
            self._wake_evt.clear()
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
                self._wake_evt.set()  # more may be queued

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                log.warning("DICOM association idle for too long (network timeout)")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


DimseFactory = Callable[[Association], DIMSEServiceProvider]


def upgrade_association(assoc: Association, limits: PduLimits,
                        dimse_factory: DimseFactory | None = None) -> None:
    """Swap in the guarded DUL (and optionally another DIMSE provider) before the
    association has a socket or has started."""
    if assoc.dul.socket is not None or assoc.dul.is_alive():
        raise RuntimeError("upgrade_association must run before the socket is attached")
    old = assoc.dul
    dul = GuardedDUL(assoc, limits)
    dul._idle_timer = old._idle_timer
    dul.artim_timer = old.artim_timer
    assoc.dul = dul
    if dimse_factory is not None:
        assoc.dimse = dimse_factory(assoc)
    assoc._wake_evt = threading.Event()  # type: ignore[attr-defined]
    assoc.__class__ = FastAssociation


class GuardedRequestHandler(RequestHandler):
    """Creates acceptor associations with the guarded DUL; sets socket options first."""

    server: GuardedServer

    def _create_association(self) -> Association:
        # pynetdicom's RequestHandler._create_association, plus the upgrade.
        assoc = Association(self.ae, MODE_ACCEPTOR)
        upgrade_association(assoc, self.server.limits, self.server.dimse_factory)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"

        client = cast(socket.socket, self.request)
        set_nodelay(client)
        client.settimeout(self.server.read_timeout)
        sock = AssociationSocket(assoc, client_socket=client)
        assoc.set_socket(sock)

        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)
        assoc.requestor.address_info = self.remote

        for event in self.server._handlers:
            if event.is_intervention and self.server._handlers[event]:
                assoc.bind(event, *self.server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in self.server._handlers[event]:
                    handler = cast(tuple[Callable[..., Any], Any], handler)
                    assoc.bind(event, handler[0], handler[1])
        return assoc


class GuardedServer(ThreadedAssociationServer):
    """A threaded association server whose associations are guarded (see module doc)."""

    limits: PduLimits
    dimse_factory: DimseFactory | None
    read_timeout: float
    daemon_threads = True

    def __init__(self, *args: Any, limits: PduLimits, dimse_factory: DimseFactory | None,
                 read_timeout: float, **kwargs: Any) -> None:
        self.limits = limits
        self.dimse_factory = dimse_factory
        self.read_timeout = read_timeout
        super().__init__(*args, request_handler=GuardedRequestHandler, **kwargs)


def start_server(ae: AE, address: tuple[str, int], *, ae_title: str,
                 evt_handlers: list[Any], limits: PduLimits,
                 dimse_factory: DimseFactory | None = None,
                 read_timeout: float = 60.0) -> GuardedServer:
    """Start a non-blocking association server (its own thread) and return it."""
    server = cast(GuardedServer, ae.make_server(
        address, ae_title=ae_title, evt_handlers=evt_handlers, server_class=GuardedServer,
        limits=limits, dimse_factory=dimse_factory, read_timeout=read_timeout))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name=f"dicom-server-{server.server_address[1]}", daemon=True)
    thread.start()
    ae._servers.append(server)
    return server


class SyncnodeAE(AE):
    """An AE whose requested associations are upgraded (guarded DUL, TCP_NODELAY)."""

    def __init__(self, ae_title: str, limits: PduLimits | None = None) -> None:
        super().__init__(ae_title)
        self.limits = limits or PduLimits(max_pdata=1 << 20)

    def _create_socket(self, assoc: Association, address: AddressInformation,
                       tls_args: Any) -> AssociationSocket:
        upgrade_association(assoc, self.limits)
        sock = super()._create_socket(assoc, address, tls_args)
        set_nodelay(sock.socket)
        return sock


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
